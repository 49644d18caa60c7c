"""Tiny Show-1 cascades with the released architectures, built here with no download.

``build_tiny_show1(root)`` writes the five model repositories of the cascade (``show-1-base``,
``show-1-interpolation``, ``show-1-sr1``, ``IF-II-L``, ``show-1-sr2``) with the released folder layout
(``unet/``, ``scheduler/``, ``text_encoder/``, ``tokenizer/``, ``vae/``, ``image_noising_scheduler/``), randomly
initialised models at toy widths, a sentencepiece T5 tokenizer trained on a few sentences and a small byte-level
CLIP BPE vocabulary. Models are written in show1-jax's converted format, which :func:`show1_jax.load_component`
reads exactly like converted released weights. Used by tests, by ``show1 selfcheck`` and as the starting point
of the shipped demo model.
"""

from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from show1_jax.clip import CLIPTextConfig, CLIPTextModel
from show1_jax.loading import FAMILIES, _atomic_folder, abstract_model, save_converted
from show1_jax.t5 import T5Config, T5EncoderModel
from show1_jax.unet3d import UNet2DConditionModel, UNet3DConditionModel, UNetConfig
from show1_jax.vae import AutoencoderKL, VAEConfig

# --- scheduler configs of the released repositories (SPEC.md §4) ---------------------------------------------------

PIXEL_DPM_SCHEDULER = {
    "_class_name": "DPMSolverMultistepScheduler",
    "algorithm_type": "dpmsolver++",
    "beta_schedule": "squaredcos_cap_v2",
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "dynamic_thresholding_ratio": 0.95,
    "lambda_min_clipped": -5.1,
    "lower_order_final": True,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.5,
    "solver_order": 2,
    "solver_type": "midpoint",
    "steps_offset": 0,
    "thresholding": True,
    "timestep_spacing": "linspace",
    "use_karras_sigmas": False,
    "variance_type": "fixed_small",
}
IF2_DDPM_SCHEDULER = {
    "_class_name": "DDPMScheduler",
    "beta_schedule": "squaredcos_cap_v2",
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "dynamic_thresholding_ratio": 0.95,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "steps_offset": 0,
    "thresholding": True,
    "timestep_spacing": "leading",
    "variance_type": "learned_range",
}
NOISING_SCHEDULER = {
    "_class_name": "DDPMScheduler",
    "beta_schedule": "squaredcos_cap_v2",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "thresholding": False,
    "variance_type": "fixed_small",
}
SR2_DPM_SCHEDULER = {
    "_class_name": "DPMSolverMultistepScheduler",
    "algorithm_type": "dpmsolver++",
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "lower_order_final": True,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "solver_order": 2,
    "solver_type": "midpoint",
    "steps_offset": 0,
    "thresholding": False,
    "timestep_spacing": "linspace",
}

# --- tiny model configs: the released block structure at toy widths ------------------------------------------------

T5_DIM, CLIP_DIM = 64, 64

_PIXEL = dict(
    down_block_types=("ResnetDownsampleBlock3D", "SimpleCrossAttnDownBlock3D"),
    up_block_types=("SimpleCrossAttnUpBlock3D", "ResnetUpsampleBlock3D"),
    mid_block_type="UNetMidBlock3DSimpleCrossAttn",
    block_out_channels=(32, 64),
    layers_per_block=1,
    act_fn="gelu",
    norm_num_groups=16,
    attention_head_dim=16,
    cross_attention_dim=64,
    cross_attention_norm="group_norm",
    encoder_hid_dim=T5_DIM,
    encoder_hid_dim_type="text_proj",
    addition_embed_type="text",
    addition_embed_type_num_heads=4,
    resnet_time_scale_shift="scale_shift",
)
# SR1 and IF-II-L attend only at their lowest resolutions, as the released models do (SPEC.md §5.3).
_SR_PIXEL = dict(
    _PIXEL,
    down_block_types=("ResnetDownsampleBlock3D", "ResnetDownsampleBlock3D", "SimpleCrossAttnDownBlock3D"),
    up_block_types=("SimpleCrossAttnUpBlock3D", "ResnetUpsampleBlock3D", "ResnetUpsampleBlock3D"),
    block_out_channels=(32, 32, 64),
    class_embed_type="timestep",
    resnet_skip_time_act=True,
    resnet_out_scale_factor=1.4142271248762552,
    mid_block_scale_factor=1.4142271248762552,
    time_embedding_act_fn="gelu",
    time_embedding_dim=96,
)
TINY_BASE = UNetConfig(in_channels=3, out_channels=6, **_PIXEL)
TINY_INTERP = UNetConfig(in_channels=7, out_channels=6, **_PIXEL)
TINY_SR1 = UNetConfig(in_channels=6, out_channels=6, **_SR_PIXEL)
TINY_IF2 = UNetConfig(
    in_channels=6,
    out_channels=6,
    temporal=False,
    **dict(
        _SR_PIXEL,
        down_block_types=("ResnetDownsampleBlock2D", "ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
        up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D", "ResnetUpsampleBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn",
    ),
)
TINY_SR2 = UNetConfig(
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
    up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"),
    mid_block_type="UNetMidBlock3DCrossAttn",
    block_out_channels=(32, 64),
    layers_per_block=1,
    act_fn="silu",
    norm_num_groups=16,
    attention_head_dim=8,
    cross_attention_dim=CLIP_DIM,
    use_linear_projection=True,
)
TINY_VAE = VAEConfig(
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(32, 32, 64, 64),
    layers_per_block=1,
    norm_num_groups=16,
)
TINY_T5 = T5Config(vocab_size=64, d_model=T5_DIM, d_kv=16, d_ff=128, num_layers=2, num_heads=4, dense_act_fn="gelu_new")
TINY_CLIP = CLIPTextConfig(
    vocab_size=1024,
    hidden_size=CLIP_DIM,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=77,
    hidden_act="gelu",
    eos_token_id=2,
)

# --- tokenizers ----------------------------------------------------------------------------------------------------

TOKENIZER_SENTENCES = [
    "a red circle moving left",
    "a green square moving right",
    "a blue triangle moving up",
    "a yellow star moving down",
    "a white ball bouncing on a black floor",
    "a purple cube sliding across the table",
    "an astronaut riding a horse on the moon",
    "close up of a panda eating bamboo in the rain",
    "time lapse of clouds over a mountain lake at sunset",
]


def write_t5_tokenizer(folder: str | Path, sentences: list[str] = TOKENIZER_SENTENCES, vocab_size: int = 64) -> Path:
    """Train a sentencepiece unigram model on ``sentences`` and write a T5 tokenizer folder (pad 0, eos 1, unk 2)."""
    import sentencepiece as spm

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences * 20),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="unigram",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        character_coverage=1.0,
        minloglevel=2,
    )
    (folder / "spiece.model").write_bytes(model.getvalue())
    special = {"eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
    (folder / "special_tokens_map.json").write_text(json.dumps(special))
    config = {"tokenizer_class": "T5Tokenizer", "model_max_length": 512, "extra_ids": 0, **special}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def _bytes_to_unicode() -> list[str]:
    """The printable stand-in of each byte in byte-level BPE vocabularies (GPT-2, CLIP)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def write_clip_tokenizer(
    folder: str | Path, sentences: list[str] = TOKENIZER_SENTENCES, max_vocab: int = TINY_CLIP.vocab_size
) -> Path:
    """A byte-level BPE CLIP tokenizer folder whose merges spell every word of ``sentences`` (ids < max_vocab)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    chars = _bytes_to_unicode()
    vocab = chars + [c + "</w>" for c in chars]
    merges: list[tuple[str, str]] = []
    words = sorted({w for s in sentences for w in s.lower().replace(",", " ").split()})
    for word in words:  # left-to-right merges: w, wo, wor, word</w>
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        cur = pieces[0]
        for nxt in pieces[1:]:
            if (cur, nxt) not in merges:
                merges.append((cur, nxt))
                vocab.append(cur + nxt)
            cur = cur + nxt
    vocab = list(dict.fromkeys(vocab + ["<|startoftext|>", "<|endoftext|>"]))
    if len(vocab) > max_vocab:
        raise ValueError(f"{len(sentences)} sentences need {len(vocab)} tokens, more than max_vocab={max_vocab}")
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    special = {
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
    }
    (folder / "special_tokens_map.json").write_text(json.dumps(special))
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True, **special}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


# --- random models ---------------------------------------------------------------------------------------------------


def random_model(model_cls: type, config, *, seed: int, dtype=jnp.float32, perturb: float = 0.0) -> nnx.Module:
    """A model with seeded random parameters, filled from numpy (no per-shape XLA compiles).

    Kernels N(0, 1/fan_in), embeddings N(0, 1), norm scales 1, biases 0 (the usual initialisation); ``perturb``
    adds N(0, perturb^2) to scales and biases, so that no parameter is exactly 0 or 1 (a dropped bias then shows).
    """
    model = abstract_model(class_name_of(model_cls), config, dtype)
    graphdef, state = nnx.split(model)
    rng = np.random.default_rng(seed)
    filled = []
    for path, var in nnx.to_flat_state(state):
        leaf, shape = str(path[-1]), tuple(var.get_value().shape)
        if leaf == "scale":
            value = np.ones(shape)
        elif leaf == "bias":
            value = np.zeros(shape)
        elif leaf == "kernel":
            value = rng.normal(size=shape) / np.sqrt(max(1, int(np.prod(shape[:-1]))))
        else:  # embeddings, positional embeddings
            value = rng.normal(size=shape) * (1.0 if "embed" in leaf or "shared" in str(path) else 0.02)
        if perturb and leaf in ("scale", "bias"):
            value = value + perturb * rng.normal(size=shape)
        filled.append((path, var.replace(jnp.asarray(value, dtype))))
    return nnx.merge(graphdef, nnx.from_flat_state(filled))


def class_name_of(model_cls: type) -> str:
    return next(name for name, fam in FAMILIES.items() if fam.model_class == model_cls.__name__)


@dataclasses.dataclass(frozen=True)
class TinyShow1:
    """Paths of a tiny cascade (the same layout as the released repositories)."""

    root: Path

    @property
    def base(self) -> Path:
        return self.root / "show-1-base"

    @property
    def interpolation(self) -> Path:
        return self.root / "show-1-interpolation"

    @property
    def sr1(self) -> Path:
        return self.root / "show-1-sr1"

    @property
    def first_frame(self) -> Path:
        return self.root / "IF-II-L"

    @property
    def sr2(self) -> Path:
        return self.root / "show-1-sr2"


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True))


def build_tiny_show1(root: str | Path, *, seed: int = 0) -> TinyShow1:
    """Write a tiny random cascade under ``root`` (atomically) and return its paths."""
    root = Path(root)
    with _atomic_folder(root) as tmp:

        def component(repo: str, name: str, model_cls: type, config, offset: int) -> None:
            save_converted(random_model(model_cls, config, seed=seed * 100 + offset), tmp / repo / name)

        component("show-1-base", "unet", UNet3DConditionModel, TINY_BASE, 1)
        component("show-1-base", "text_encoder", T5EncoderModel, TINY_T5, 2)
        write_t5_tokenizer(tmp / "show-1-base" / "tokenizer", vocab_size=TINY_T5.vocab_size)
        _write_json(tmp / "show-1-base" / "scheduler" / "scheduler_config.json", PIXEL_DPM_SCHEDULER)
        component("show-1-interpolation", "unet", UNet3DConditionModel, TINY_INTERP, 3)
        _write_json(tmp / "show-1-interpolation" / "scheduler" / "scheduler_config.json", PIXEL_DPM_SCHEDULER)
        component("show-1-sr1", "unet", UNet3DConditionModel, TINY_SR1, 4)
        _write_json(tmp / "show-1-sr1" / "scheduler" / "scheduler_config.json", PIXEL_DPM_SCHEDULER)
        _write_json(tmp / "show-1-sr1" / "image_noising_scheduler" / "scheduler_config.json", NOISING_SCHEDULER)
        component("IF-II-L", "unet", UNet2DConditionModel, TINY_IF2, 5)
        _write_json(tmp / "IF-II-L" / "scheduler" / "scheduler_config.json", IF2_DDPM_SCHEDULER)
        _write_json(tmp / "IF-II-L" / "image_noising_scheduler" / "scheduler_config.json", NOISING_SCHEDULER)
        component("show-1-sr2", "unet", UNet3DConditionModel, TINY_SR2, 6)
        component("show-1-sr2", "vae", AutoencoderKL, TINY_VAE, 7)
        component("show-1-sr2", "text_encoder", CLIPTextModel, TINY_CLIP, 8)
        write_clip_tokenizer(tmp / "show-1-sr2" / "tokenizer")
        _write_json(tmp / "show-1-sr2" / "scheduler" / "scheduler_config.json", SR2_DPM_SCHEDULER)
    return TinyShow1(root.resolve())
