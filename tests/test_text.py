"""Tokenization as the reference calls it, the guard against vocabulary-less tokenizers, and the embedding cache.

The tokenizer folders are built here: a sentencepiece model trained on a few sentences (T5 layout: spiece.model,
tokenizer_config.json, special_tokens_map.json) and a small byte-level BPE vocabulary (CLIP layout: vocab.json,
merges.txt, with the SD-2 special tokens, pad "!"). Nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import sentencepiece as spm
from flax import nnx
from safetensors.numpy import save_file
from transformers import AutoTokenizer

from show1_jax import load_component
from show1_jax.clip import CLIPTextConfig, CLIPTextModel
from show1_jax.t5 import T5Config, T5EncoderModel
from show1_jax.text import (
    PROBE_TEXT,
    EmbeddingCache,
    TextEncoder,
    TokenizerError,
    check_tokenizer,
    checkpoint_fingerprint,
    encode_prompts,
    load_tokenizer,
    tokenize_clip,
    tokenize_t5,
)
from show1_jax.tiny import _bytes_to_unicode, write_t5_tokenizer

SENTENCES = [
    "a photo of a cat sitting on a mat",
    "the quick brown fox jumps over the lazy dog",
    "an astronaut riding a horse on the moon, 4k, cinematic",
    "close up of a panda eating bamboo in the rain",
    "time lapse of clouds over a mountain lake at sunset",
]
PROMPTS = [
    "A Photo of a CAT, sitting on a mat!",  # mixed case and punctuation
    "   the quick brown fox   ",  # surrounding and repeated spaces
    "",  # the negative prompt
    "   ",
    " ".join(SENTENCES * 6),  # far beyond 77 tokens
    "café ünïcode — dashes",  # characters the tiny vocabulary lacks
]


@pytest.fixture(scope="module")
def t5_tokenizer_dir(tmp_path_factory) -> Path:
    return write_t5_tokenizer(tmp_path_factory.mktemp("t5") / "tokenizer", SENTENCES, vocab_size=48)


CLIP_MERGES = [("c", "a"), ("ca", "t</w>"), ("p", "h"), ("ph", "o"), ("pho", "t"), ("phot", "o</w>"), ("o", "f</w>")]


@pytest.fixture(scope="module")
def clip_tokenizer_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("clip") / "tokenizer"
    folder.mkdir()
    chars = _bytes_to_unicode()
    vocab = chars + [c + "</w>" for c in chars] + [a + b for a, b in CLIP_MERGES]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in CLIP_MERGES))
    special = {
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "pad_token": "!",
        "unk_token": "<|endoftext|>",
    }
    (folder / "special_tokens_map.json").write_text(json.dumps(special))
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True, **special}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


# --- tokenization --------------------------------------------------------------------------------------------------


def test_t5_tokens_match_the_reference_call(t5_tokenizer_dir):
    """Equal to transformers' tokenizer called as the reference does, and to sentencepiece + </s> + padding."""
    tokens = tokenize_t5(load_tokenizer(t5_tokenizer_dir), PROMPTS)
    assert tokens.input_ids.shape == tokens.attention_mask.shape == (len(PROMPTS), 77)
    assert tokens.input_ids.dtype == np.int32
    reference = AutoTokenizer.from_pretrained(str(t5_tokenizer_dir))
    texts = [p.lower().strip() for p in PROMPTS]
    enc = reference(texts, max_length=77, padding="max_length", truncation=True, add_special_tokens=True)
    np.testing.assert_array_equal(tokens.input_ids, enc["input_ids"])
    np.testing.assert_array_equal(tokens.attention_mask, enc["attention_mask"])
    sp = spm.SentencePieceProcessor(model_file=str(t5_tokenizer_dir / "spiece.model"))
    for row, mask, text in zip(tokens.input_ids, tokens.attention_mask, texts):
        ids = sp.encode(text)[:76] + [1]
        np.testing.assert_array_equal(row, ids + [0] * (77 - len(ids)))
        np.testing.assert_array_equal(mask, [1] * len(ids) + [0] * (77 - len(ids)))
    assert tokens.input_ids[4, -1] == 1 and tokens.attention_mask[4].all()  # truncated, still ends with </s>
    np.testing.assert_array_equal(
        tokens.input_ids[0], tokenize_t5(reference, "a photo of a cat, sitting on a mat!").input_ids[0]
    )


def test_t5_empty_negative_prompt_is_eos_then_padding(t5_tokenizer_dir):
    tokens = tokenize_t5(load_tokenizer(t5_tokenizer_dir), ["", "  "])
    expected = np.zeros((2, 77), np.int32)
    expected[:, 0] = 1
    np.testing.assert_array_equal(tokens.input_ids, expected)
    np.testing.assert_array_equal(tokens.attention_mask, expected)


def test_clip_tokens_match_the_reference_call(clip_tokenizer_dir):
    tokenizer = load_tokenizer(clip_tokenizer_dir)
    prompts = PROMPTS + ["low resolution, blur"]
    tokens = tokenize_clip(tokenizer, prompts)
    assert tokens.input_ids.shape == (len(prompts), 77)
    reference = AutoTokenizer.from_pretrained(str(clip_tokenizer_dir))
    enc = reference(prompts, padding="max_length", max_length=reference.model_max_length, truncation=True)
    np.testing.assert_array_equal(tokens.input_ids, enc["input_ids"])
    vocab = json.loads((clip_tokenizer_dir / "vocab.json").read_text())
    bos, eos, pad = vocab["<|startoftext|>"], vocab["<|endoftext|>"], vocab["!"]
    words = ["a</w>", "photo</w>", "of</w>", "a</w>", "cat</w>"]
    expected = [bos] + [vocab[w] for w in words] + [eos] + [pad] * 70  # lowercased by the tokenizer itself
    np.testing.assert_array_equal(tokenize_clip(tokenizer, "A Photo of a CAT").input_ids[0], expected)
    np.testing.assert_array_equal(tokens.input_ids[2, :3], [bos, eos, pad])
    assert tokens.input_ids[4, 0] == bos and tokens.input_ids[4, -1] == eos  # truncated to 77


def test_tokenizers_without_their_vocabulary_are_refused(t5_tokenizer_dir, clip_tokenizer_dir, tmp_path):
    """transformers 5 builds tokenizers from bare file paths but maps every word to <unk>: we must notice."""
    from transformers import CLIPTokenizer, T5Tokenizer

    from_paths = {
        t5_tokenizer_dir: T5Tokenizer(vocab_file=str(t5_tokenizer_dir / "spiece.model")),
        clip_tokenizer_dir: CLIPTokenizer(
            vocab_file=str(clip_tokenizer_dir / "vocab.json"), merges_file=str(clip_tokenizer_dir / "merges.txt")
        ),
    }
    for folder, tokenizer in from_paths.items():
        good = load_tokenizer(folder)
        if tokenizer(PROBE_TEXT)["input_ids"] != good(PROBE_TEXT)["input_ids"]:  # broken, as in transformers 5.x
            with pytest.raises(TokenizerError, match="AutoTokenizer.from_pretrained"):
                check_tokenizer(tokenizer)
    # A folder whose vocabulary holds only the special tokens, whatever the transformers version.
    empty = tmp_path / "empty"
    shutil.copytree(clip_tokenizer_dir, empty)
    (empty / "vocab.json").write_text(json.dumps({"<|startoftext|>": 0, "<|endoftext|>": 1, "!": 2}))
    (empty / "merges.txt").write_text("#version: 0.2\n")
    with pytest.raises(TokenizerError, match="vocabulary was not loaded"):
        load_tokenizer(empty)
    with pytest.raises(TokenizerError, match="not a folder"):
        load_tokenizer(t5_tokenizer_dir / "spiece.model")


# --- encoders and the cache ----------------------------------------------------------------------------------------

T5_TINY = {
    "architectures": ["T5EncoderModel"],
    "vocab_size": 160,  # covers the tokenizer's 48 pieces and 100 extra ids
    "d_model": 16,
    "d_kv": 4,
    "d_ff": 24,
    "num_layers": 2,
    "num_heads": 2,
    "feed_forward_proj": "gated-gelu",
}


def write_text_encoder(folder: Path, model: nnx.Module, raw: dict) -> None:
    """A text_encoder folder in the transformers layout (config.json + model.safetensors) for one of our models."""
    from show1_jax.loading import flat_params

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(raw))
    sd = {}
    for path, value in flat_params(model).items():
        stem, leaf = path.rsplit(".", 1)
        value = np.asarray(value, np.float32)
        name = "bias" if leaf == "bias" else "weight"
        sd[f"{stem}.{name}"] = np.ascontiguousarray(value.T if leaf == "kernel" else value)
    save_file(sd, str(folder / "model.safetensors"))


class CountingLoader:
    def __init__(self):
        self.calls = 0

    def __call__(self, folder, **kwargs):
        self.calls += 1
        return load_component(folder, **kwargs)


@pytest.fixture
def t5_pipeline(tmp_path, t5_tokenizer_dir) -> Path:
    """A pipeline folder: text_encoder/ (tiny random T5) next to tokenizer/."""
    model = T5EncoderModel(T5Config.from_dict(T5_TINY), rngs=nnx.Rngs(1))
    write_text_encoder(tmp_path / "pipe" / "text_encoder", model, T5_TINY)
    shutil.copytree(t5_tokenizer_dir, tmp_path / "pipe" / "tokenizer")
    return tmp_path / "pipe"


def test_encode_matches_the_model_on_reference_tokens(t5_pipeline):
    encoder = TextEncoder(t5_pipeline / "text_encoder")
    tokens = tokenize_t5(load_tokenizer(t5_pipeline / "tokenizer"), PROMPTS)
    model = load_component(t5_pipeline / "text_encoder")
    expected = np.asarray(model(jnp.asarray(tokens.input_ids), jnp.asarray(tokens.attention_mask)))
    got = encoder.encode(PROMPTS, batch_size=4)  # two batches, the second padded
    assert got.shape == (len(PROMPTS), 77, 16) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)


def test_cache_loads_t5_once_and_notices_a_changed_checkpoint(t5_pipeline, tmp_path):
    cache = EmbeddingCache(tmp_path / "cache")
    loader = CountingLoader()
    first = encode_prompts(TextEncoder(t5_pipeline / "text_encoder", loader=loader), ["A cat"], cache=cache)
    assert loader.calls == 1
    assert first.prompt_embeds.shape == first.negative_prompt_embeds.shape == (1, 77, 16)

    # A new process (a fresh encoder object): everything is cached, T5 is not loaded.
    again = encode_prompts(TextEncoder(t5_pipeline / "text_encoder", loader=loader), ["A cat"], cache=cache)
    assert loader.calls == 1
    np.testing.assert_array_equal(again.prompt_embeds, first.prompt_embeds)
    np.testing.assert_array_equal(again.negative_prompt_embeds, first.negative_prompt_embeds)

    # Only the new prompt is encoded; the cached one comes back unchanged.
    encoder = TextEncoder(t5_pipeline / "text_encoder", loader=loader)
    mixed = cache.encode(encoder, ["A cat", "a mountain lake"])
    assert loader.calls == 2
    np.testing.assert_array_equal(mixed[0], first.prompt_embeds[0])
    assert not list((tmp_path / "cache").rglob("*.tmp"))  # writes are renamed into place

    # New weights: the fingerprint changes and the prompt is encoded again, with the new result.
    other = T5EncoderModel(T5Config.from_dict(T5_TINY), rngs=nnx.Rngs(2))
    write_text_encoder(t5_pipeline / "text_encoder", other, T5_TINY)
    changed = encode_prompts(TextEncoder(t5_pipeline / "text_encoder", loader=loader), ["A cat"], cache=cache)
    assert loader.calls == 3
    assert not np.allclose(changed.prompt_embeds, first.prompt_embeds)


def test_cache_replaces_an_unreadable_entry(t5_pipeline, tmp_path):
    cache = EmbeddingCache(tmp_path / "cache")
    loader = CountingLoader()
    encoder = TextEncoder(t5_pipeline / "text_encoder", loader=loader)
    first = cache.encode(encoder, ["a cat"])
    entry = cache.path(encoder, "a cat")
    entry.write_bytes(entry.read_bytes()[:100])  # a torn file from some other writer
    second = cache.encode(TextEncoder(t5_pipeline / "text_encoder", loader=loader), ["a cat"])
    assert loader.calls == 2
    np.testing.assert_array_equal(first, second)


def test_fingerprint_covers_config_weights_and_tokenizer(t5_pipeline):
    te, tok = t5_pipeline / "text_encoder", t5_pipeline / "tokenizer"
    base = checkpoint_fingerprint(te, tok)
    assert checkpoint_fingerprint(te, tok) == base
    weights = te / "model.safetensors"
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    touched = checkpoint_fingerprint(te, tok)
    assert touched != base
    (tok / "tokenizer_config.json").write_text((tok / "tokenizer_config.json").read_text().replace("512", "511"))
    assert checkpoint_fingerprint(te, tok) != touched


def test_empty_negative_prompt_embedding(t5_pipeline):
    """The T5 negative "" is encoded from [</s>, <pad>, ...] with the mask [1, 0, ...]."""
    encoder = TextEncoder(t5_pipeline / "text_encoder")
    out = encode_prompts(encoder, ["a cat", "a dog"])
    model = load_component(t5_pipeline / "text_encoder")
    ids = jnp.zeros((1, 77), jnp.int32).at[0, 0].set(1)
    expected = np.asarray(model(ids, (ids == 1).astype(jnp.int32)))
    np.testing.assert_allclose(out.negative_prompt_embeds, np.repeat(expected, 2, 0), rtol=0, atol=1e-5)


def test_clip_encoder_uses_no_mask_unless_the_config_asks(tmp_path, clip_tokenizer_dir):
    raw = {
        "architectures": ["CLIPTextModel"],
        "vocab_size": 521,
        "hidden_size": 16,
        "intermediate_size": 24,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "max_position_embeddings": 77,
        "hidden_act": "gelu",
        "eos_token_id": 2,
    }
    model = CLIPTextModel(CLIPTextConfig.from_dict(raw), rngs=nnx.Rngs(0))
    shutil.copytree(clip_tokenizer_dir, tmp_path / "tokenizer")
    write_text_encoder(tmp_path / "text_encoder", model, raw)
    prompts = ["a cat", "low resolution, blur"]
    tokens = tokenize_clip(load_tokenizer(clip_tokenizer_dir), prompts)
    plain = TextEncoder(tmp_path / "text_encoder").encode(prompts)
    np.testing.assert_allclose(plain, np.asarray(model(jnp.asarray(tokens.input_ids)).last_hidden_state), atol=1e-5)
    write_text_encoder(tmp_path / "text_encoder", model, dict(raw, use_attention_mask=True))
    masked = TextEncoder(tmp_path / "text_encoder").encode(prompts)
    expected = model(jnp.asarray(tokens.input_ids), jnp.asarray(tokens.attention_mask)).last_hidden_state
    np.testing.assert_allclose(masked, np.asarray(expected), atol=1e-5)
    assert not np.allclose(masked[:, -1], plain[:, -1])
