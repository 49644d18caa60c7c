"""Prompt tokenization, prompt encoding and an on-disk embedding cache (SPEC.md §3.2, §3.6).

Tokenization reproduces the reference calls:

* T5 (keyframes, interpolation, SR1, IF-II-L): the prompt is lowercased and stripped (``clean_caption=False``),
  then ``tokenizer(text, max_length=77, padding="max_length", truncation=True, add_special_tokens=True)``: ``</s>``
  is appended, padding (id 0) follows, and the attention mask goes to T5 only.
* CLIP (SR2): the raw prompt, ``tokenizer(text, padding="max_length", max_length=tokenizer.model_max_length,
  truncation=True)``; no attention mask unless the encoder config sets ``use_attention_mask``.

Tokenizers are transformers' classes loaded from the checkpoint's ``tokenizer/`` folder. transformers 5 builds a
tokenizer from a bare vocabulary file without complaint yet maps every word to the unknown token, so every loaded
tokenizer is probed (:func:`check_tokenizer`).

The T5-XXL encoder is 4.7B parameters; :class:`EmbeddingCache` stores each prompt's embeddings on disk, keyed by
the text, the encoder class and a fingerprint of the checkpoint (:func:`checkpoint_fingerprint`), so that
generation and training can reuse them without loading T5 again. :class:`TextEncoder` loads its network only when
a prompt is not cached.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from show1_jax.checkpoint_io import list_weight_files
from show1_jax.configs import read_json
from show1_jax.loading import build_config, load_component

T5_MAX_LENGTH = 77  # the reference's max_length for T5 (SPEC.md §3.2)
PROBE_TEXT = "a photo of a cat"  # words every real vocabulary (and our test vocabularies) can spell
CACHE_FORMAT = 1  # bump when tokenization or the stored layout changes: old entries then no longer match

_KIND_OF_CLASS = {"T5EncoderModel": "t5", "CLIPTextModel": "clip"}


class TokenizerError(ValueError):
    """A tokenizer that would silently encode prompts wrongly."""


# --- tokenization ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Tokens:
    """A tokenized batch of prompts."""

    input_ids: np.ndarray  # [B, L] int32
    attention_mask: np.ndarray  # [B, L] int32, 1 for tokens (special tokens included), 0 for padding


def load_tokenizer(folder: str | Path) -> Any:
    """transformers' tokenizer from a checkpoint's ``tokenizer/`` folder, checked with :func:`check_tokenizer`.

    Pass the folder (as released: ``spiece.model`` or ``vocab.json`` + ``merges.txt`` with ``tokenizer_config.json``
    and ``special_tokens_map.json``), never a vocabulary file: see the module docstring.
    """
    from transformers import AutoTokenizer

    folder = Path(folder)
    if not folder.is_dir():
        raise TokenizerError(
            f"{folder} is not a folder: pass the checkpoint's tokenizer folder (e.g. show-1-base/tokenizer), not a"
            " vocabulary file"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as err:
        raise TokenizerError(
            f"cannot load a tokenizer from {folder} ({err}): it needs tokenizer_config.json and the vocabulary files"
            " (spiece.model for T5; vocab.json and merges.txt for CLIP)"
        ) from err
    check_tokenizer(tokenizer, str(folder))
    return tokenizer


def check_tokenizer(tokenizer: Any, source: str = "tokenizer") -> None:
    """Refuse a tokenizer whose vocabulary is (nearly) empty or that spells ordinary words as unknown tokens."""
    vocab = tokenizer.get_vocab()
    added = set(tokenizer.get_added_vocab())
    base = len([t for t in vocab if t not in added])
    ids = tokenizer(PROBE_TEXT, add_special_tokens=False)["input_ids"]
    unk = tokenizer.unk_token_id
    if base < 16 or not ids or (unk is not None and unk in ids):
        raise TokenizerError(
            f"{source}: the tokenizer has {base} vocabulary entries besides its special tokens and spells"
            f" {PROBE_TEXT!r} as {tokenizer.convert_ids_to_tokens(ids)}: its vocabulary was not loaded. Build it"
            " with AutoTokenizer.from_pretrained(<tokenizer folder>) (show1_jax.text.load_tokenizer), not from a"
            " vocabulary file path"
        )


def _as_list(prompts: str | Sequence[str]) -> list[str]:
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not all(isinstance(p, str) for p in prompts):
        raise TypeError("prompts must be strings")
    return prompts


def preprocess_t5_prompt(text: str) -> str:
    """The reference's ``_text_preprocessing`` with ``clean_caption=False``: lowercase and strip."""
    return text.lower().strip()


def _tokenize(tokenizer: Any, texts: list[str], max_length: int, **kwargs: Any) -> Tokens:
    enc = tokenizer(
        texts, max_length=max_length, padding="max_length", truncation=True, return_attention_mask=True, **kwargs
    )
    ids = np.asarray(enc["input_ids"], np.int32).reshape(len(texts), max_length)
    mask = np.asarray(enc["attention_mask"], np.int32).reshape(len(texts), max_length)
    return Tokens(ids, mask)


def tokenize_t5(tokenizer: Any, prompts: str | Sequence[str], *, max_length: int = T5_MAX_LENGTH) -> Tokens:
    """T5 tokens as the reference makes them: [B, max_length], ``</s>`` appended, then padding."""
    texts = [preprocess_t5_prompt(p) for p in _as_list(prompts)]
    return _tokenize(tokenizer, texts, max_length, add_special_tokens=True)


def tokenize_clip(tokenizer: Any, prompts: str | Sequence[str], *, max_length: int | None = None) -> Tokens:
    """CLIP tokens as the SR2 pipeline makes them: the raw prompt, [B, model_max_length]."""
    max_length = int(tokenizer.model_max_length if max_length is None else max_length)
    if max_length > 4096:  # transformers' "unset" value is 1e30
        raise TokenizerError(
            f"the CLIP tokenizer has no model_max_length ({max_length}): set it in tokenizer_config.json (77 for the"
            " released checkpoints) or pass max_length"
        )
    return _tokenize(tokenizer, _as_list(prompts), max_length)


# --- checkpoint fingerprint ----------------------------------------------------------------------------------------


def checkpoint_fingerprint(text_encoder_dir: str | Path, tokenizer_dir: str | Path | None = None) -> str:
    """sha256 over what decides a prompt's embedding, without reading the weights.

    Covers: ``config.json`` (contents), every weight file and shard index in the folder (name, size, mtime),
    and every file of the tokenizer folder (contents). Rewriting or replacing a weight file changes it; so does
    copying the checkpoint elsewhere (mtimes change), which costs one re-encode and never a stale embedding.
    """
    folder = Path(text_encoder_dir)
    h = hashlib.sha256()
    h.update(b"config.json\0" + (folder / "config.json").read_bytes())
    listing = list_weight_files(folder)
    for name in sorted(listing["safetensors"] + listing["bin"] + listing["index"]):
        st = (folder / name).stat()
        h.update(f"\0weights\0{name}\0{st.st_size}\0{st.st_mtime_ns}".encode())
    if tokenizer_dir is not None:
        for path in sorted(p for p in Path(tokenizer_dir).iterdir() if p.is_file()):
            h.update(f"\0tokenizer\0{path.name}\0".encode() + hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()


# --- encoders ------------------------------------------------------------------------------------------------------

Loader = Callable[..., nnx.Module]


class TextEncoder:
    """A text-encoder checkpoint and its tokenizer; the network is loaded on the first :meth:`encode`.

    Args:
      text_encoder_dir: the ``text_encoder/`` component folder (config.json + weights, sharded or not).
      tokenizer_dir: the ``tokenizer/`` folder; default: ``tokenizer`` next to ``text_encoder_dir``.
      dtype: parameter and compute dtype of the network (float32 or bfloat16; float64 with jax_enable_x64).
      loader: ``loader(folder, dtype=..., variant=...) -> model``; default :func:`show1_jax.loading.load_component`.
      variant: weight-file variant passed to the loader (``"fp16"``), or None.

    Attributes:
      class_name: ``T5EncoderModel`` or ``CLIPTextModel`` (from config.json).
      load_count: how many times the network was loaded.
    """

    def __init__(
        self,
        text_encoder_dir: str | Path,
        tokenizer_dir: str | Path | None = None,
        *,
        dtype=jnp.float32,
        loader: Loader | None = None,
        variant: str | None = None,
    ):
        self.text_encoder_dir = Path(text_encoder_dir)
        self.tokenizer_dir = (
            Path(tokenizer_dir) if tokenizer_dir is not None else self.text_encoder_dir.parent / "tokenizer"
        )
        self.dtype, self.variant = dtype, variant
        self._loader = loader or load_component
        raw = read_json(self.text_encoder_dir / "config.json")
        self.class_name, self.config = build_config(raw, str(self.text_encoder_dir / "config.json"))
        if self.class_name not in _KIND_OF_CLASS:
            raise ValueError(f"{self.text_encoder_dir} holds a {self.class_name}, not a text encoder")
        self.kind = _KIND_OF_CLASS[self.class_name]
        self.load_count = 0
        self._tokenizer = None
        self._model = None
        self._forward = None
        self._fingerprint: str | None = None

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.tokenizer_dir)
        return self._tokenizer

    @property
    def fingerprint(self) -> str:
        """:func:`checkpoint_fingerprint` plus the dtype and the tokenization settings (computed once)."""
        if self._fingerprint is None:
            base = checkpoint_fingerprint(self.text_encoder_dir, self.tokenizer_dir)
            extra = f"{base}\0{CACHE_FORMAT}\0{self.class_name}\0{jnp.dtype(self.dtype).name}\0{self.variant}"
            self._fingerprint = hashlib.sha256(extra.encode()).hexdigest()
        return self._fingerprint

    def tokenize(self, prompts: str | Sequence[str]) -> Tokens:
        if self.kind == "t5":
            return tokenize_t5(self.tokenizer, prompts)
        return tokenize_clip(self.tokenizer, prompts)

    def _ensure_loaded(self) -> None:
        if self._model is not None:
            return
        self._model = self._loader(self.text_encoder_dir, dtype=self.dtype, variant=self.variant)
        self.load_count += 1
        graphdef, state = nnx.split(self._model)
        kind = self.kind
        pass_mask = kind == "t5" or bool(getattr(self.config, "use_attention_mask", False))

        @jax.jit
        def forward(state, input_ids, attention_mask):
            model = nnx.merge(graphdef, state)
            out = model(input_ids, attention_mask if pass_mask else None)
            return out if kind == "t5" else out.last_hidden_state

        self._forward = lambda ids, mask: forward(state, ids, mask)

    def encode(self, prompts: str | Sequence[str], *, batch_size: int = 8) -> np.ndarray:
        """Prompt embeddings as the reference's pipelines use them: [B, L, D] float32.

        T5: ``last_hidden_state`` over all 77 positions (pads included). CLIP: ``last_hidden_state``. Prompts run
        in batches of ``batch_size`` (the last one padded, so one compiled shape serves every call).
        """
        tokens = self.tokenize(prompts)
        self._ensure_loaded()
        n = tokens.input_ids.shape[0]
        outs = []
        for start in range(0, n, batch_size):
            ids = tokens.input_ids[start : start + batch_size]
            mask = tokens.attention_mask[start : start + batch_size]
            rows = ids.shape[0]
            if rows < batch_size and n > batch_size:
                ids = np.concatenate([ids, np.repeat(ids[-1:], batch_size - rows, 0)])
                mask = np.concatenate([mask, np.repeat(mask[-1:], batch_size - rows, 0)])
            out = self._forward(jnp.asarray(ids), jnp.asarray(mask))[:rows]
            outs.append(np.asarray(out.astype(jnp.promote_types(out.dtype, jnp.float32)), np.float32))
        return np.concatenate(outs)

    def release(self) -> None:
        """Drop the loaded network (its memory is freed once nothing else holds it)."""
        self._model = self._forward = None


# --- the on-disk cache ---------------------------------------------------------------------------------------------


class EmbeddingCache:
    """Prompt embeddings on disk, one ``.npz`` per (text, encoder class, checkpoint fingerprint).

    Layout: ``<root>/<class_name>-<fingerprint[:16]>/<sha256(text)[:32]>.npz`` holding ``embeds`` [L, D] float32
    and, for verification on read, the text, class name and full fingerprint. Writes go to a temporary file in the
    same folder, renamed into place, so readers never see half a file and concurrent writers do not corrupt one.
    An entry that does not verify (or cannot be read) is encoded again and replaced.
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def path(self, encoder: TextEncoder, text: str) -> Path:
        name = hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]
        return self.root / f"{encoder.class_name}-{encoder.fingerprint[:16]}" / f"{name}.npz"

    def _read(self, path: Path, encoder: TextEncoder, text: str) -> np.ndarray | None:
        try:
            with np.load(path, allow_pickle=False) as data:
                ok = (
                    str(data["text"]) == text
                    and str(data["class_name"]) == encoder.class_name
                    and str(data["fingerprint"]) == encoder.fingerprint
                )
                return np.array(data["embeds"]) if ok else None
        except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile):
            return None

    def _write(self, path: Path, encoder: TextEncoder, text: str, embeds: np.ndarray) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.stem, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(
                    f,
                    embeds=np.asarray(embeds, np.float32),
                    text=np.asarray(text),
                    class_name=np.asarray(encoder.class_name),
                    fingerprint=np.asarray(encoder.fingerprint),
                )
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def encode(self, encoder: TextEncoder, prompts: str | Sequence[str]) -> np.ndarray:
        """Embeddings of ``prompts``: [B, L, D] float32, encoding (and storing) only the prompts not cached."""
        prompts = _as_list(prompts)
        found: dict[str, np.ndarray] = {}
        for text in dict.fromkeys(prompts):
            cached = self._read(self.path(encoder, text), encoder, text)
            if cached is not None:
                found[text] = cached
        missing = [t for t in dict.fromkeys(prompts) if t not in found]
        if missing:
            for text, embeds in zip(missing, encoder.encode(missing)):
                self._write(self.path(encoder, text), encoder, text, embeds)
                found[text] = embeds
        return np.stack([found[t] for t in prompts])


@dataclasses.dataclass(frozen=True)
class PromptEmbeddings:
    """Embeddings for classifier-free guidance; stack as [negative; positive] along the batch (SPEC.md §1.4)."""

    prompt_embeds: np.ndarray  # [B, L, D]
    negative_prompt_embeds: np.ndarray  # [B, L, D]


def encode_prompts(
    encoder: TextEncoder,
    prompts: str | Sequence[str],
    negative_prompt: str | Sequence[str] = "",
    *,
    cache: EmbeddingCache | None = None,
) -> PromptEmbeddings:
    """Encode prompts and the negative prompt(s) once, through ``cache`` when given.

    ``negative_prompt`` is one string for the whole batch or one per prompt. The T5 stages use ``""`` (the
    reference's default); SR2 uses ``"low resolution, blur"`` (SPEC.md §3.6).
    """
    prompts = _as_list(prompts)
    negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
    if len(negatives) != len(prompts):
        raise ValueError(f"{len(negatives)} negative prompts for {len(prompts)} prompts: give one, or one per prompt")
    texts = prompts + negatives
    embeds = cache.encode(encoder, texts) if cache is not None else encoder.encode(texts)
    return PromptEmbeddings(embeds[: len(prompts)], embeds[len(prompts) :])


__all__ = [
    "CACHE_FORMAT",
    "T5_MAX_LENGTH",
    "EmbeddingCache",
    "PromptEmbeddings",
    "TextEncoder",
    "TokenizerError",
    "Tokens",
    "check_tokenizer",
    "checkpoint_fingerprint",
    "encode_prompts",
    "load_tokenizer",
    "preprocess_t5_prompt",
    "tokenize_clip",
    "tokenize_t5",
]
