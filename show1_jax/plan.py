"""Memory and compute plan of every Show-1 stage at full size, from abstract compiles (nothing is allocated).

For each stage the model is built with ``nnx.eval_shape``, its call is lowered with ShapeDtypeStruct arguments on a
mesh (one device or N virtual ones) through :func:`show1_jax.sharding.jit_sharded`, compiled, and read back:

* parameter bytes, in total and on the most loaded device (the sharding rules of ``show1_jax.sharding``);
* XLA's peak memory per device: ``memory_analysis()`` arguments + outputs + temporaries - aliases;
* an accelerator estimate of that peak (see :func:`estimate_peak` for the two XLA:CPU effects it corrects);
* FLOPs per call: 2 x multiply-accumulates of every dot and convolution counted on the jaxpr (loops included; the
  convention of SPEC.md §10.3), XLA's ``cost_analysis()`` figure, and the difference explained (XLA does not
  count convolution taps that fall on zero padding and adds one FLOP per elementwise operation);
* bytes moved by collectives per device, and a roofline estimate of the time per call and per video on named
  accelerators (peak bf16 FLOP/s and HBM bandwidth from public datasheets), labelled as an estimate.

``main(argv)`` is the ``show1 plan`` command; ``bench/plan.py`` calls it. Results are cached per stage and setting.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.extend as jex
import jax.numpy as jnp
from flax import nnx

from show1_jax import sharding as sh
from show1_jax.layers import set_attention_chunk, set_attention_implementation
from show1_jax.loading import abstract_model, build_config

GIB = 2**30
PLAN_VERSION = 2  # bump when the figures' meaning changes (invalidates the cache)

# --- accelerators (public datasheets: dense bf16 peak, HBM bandwidth, memory per chip) -------------------------------


@dataclasses.dataclass(frozen=True)
class Accelerator:
    name: str
    bf16_tflops: float  # dense peak, no sparsity
    hbm_gbps: float  # GB/s
    memory_gib: float
    note: str = ""


ACCELERATORS: dict[str, Accelerator] = {
    "tpu-v5e": Accelerator("TPU v5e", 197.0, 819.0, 16.0, "cloud.google.com/tpu/docs/v5e"),
    "tpu-v5p": Accelerator("TPU v5p", 459.0, 2765.0, 95.0, "cloud.google.com/tpu/docs/v5p"),
    "h100": Accelerator("H100 SXM", 989.0, 3350.0, 80.0, "NVIDIA H100 datasheet: 1979 TFLOP/s with sparsity"),
    "a100": Accelerator("A100 SXM 80GB", 312.0, 2039.0, 80.0, "NVIDIA A100 datasheet"),
    "t4": Accelerator("T4", 65.0, 320.0, 16.0, "no bfloat16 on Turing: the float16 tensor-core peak"),
}

# --- stages ----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Stage:
    """One model call of the cascade with run_inference.py's shapes (SPEC.md §3.1, §10.3)."""

    name: str
    kind: str  # unet | t5 | clip | vae_decode | vae_encode
    manifest: str  # config file stem under the golden manifests
    released: str  # config.json of the released folder layout, relative to the weights root
    shape: tuple[int, ...]  # the model input: sample (CFG batch included), token ids, or latents / frames
    text: tuple[int, int, int] | None = None  # encoder_hidden_states of a UNet
    class_labels: bool = False
    calls_per_video: int = 1
    reference_tflop: float | None = None  # SPEC.md §10.3
    what: str = ""


STAGES: dict[str, Stage] = {
    s.name: s
    for s in (
        Stage("t5", "t5", "t5_v1_1_xxl_encoder", "show-1-base/text_encoder/config.json", (2, 77), what="T5-XXL"),
        Stage(
            "base", "unet", "base", "show-1-base/unet/config.json", (2, 8, 40, 64, 3), (2, 77, 4096),
            calls_per_video=75, reference_tflop=10.47, what="keyframes 8x40x64",
        ),
        Stage(
            "interp", "unet", "interp", "show-1-interpolation/unet/config.json", (2, 5, 40, 64, 7), (2, 77, 4096),
            calls_per_video=7 * 75, reference_tflop=6.55, what="interpolation 5x40x64, 7 windows",
        ),
        Stage(
            "if2", "unet", "if_ii_l_unet", "IF-II-L-v1.0/unet/config.json", (2, 160, 256, 6), (2, 77, 4096),
            class_labels=True, calls_per_video=70, reference_tflop=3.85, what="IF-II-L first frame 160x256",
        ),
        Stage(
            "sr1", "unet", "sr1", "show-1-sr1/unet/config.json", (2, 8, 160, 256, 6), (2, 77, 4096),
            class_labels=True, calls_per_video=4 * 125, reference_tflop=26.17, what="SR1 8x160x256, 4 windows",
        ),
        Stage("clip", "clip", "openclip_h_text", "show-1-sr2/text_encoder/config.json", (2, 77), what="CLIP ViT-H"),
        Stage(
            "sr2", "unet", "sr2_zeroscope_like", "show-1-sr2/unet/config.json", (2, 29, 40, 72, 4), (2, 77, 1024),
            calls_per_video=40, reference_tflop=51.73, what="SR2 latent 29x40x72",
        ),
        Stage(
            "vae_decode", "vae_decode", "sd_vae_kl_f8", "show-1-sr2/vae/config.json", (1, 29, 40, 72, 4),
            what="VAE decode 29x320x576",
        ),
        Stage(
            "vae_encode", "vae_encode", "sd_vae_kl_f8", "show-1-sr2/vae/config.json", (1, 29, 320, 576, 3),
            what="VAE encode 29x320x576",
        ),
    )
}  # fmt: skip
DEFAULT_STAGES = ("t5", "base", "interp", "if2", "sr1", "clip", "sr2", "vae_decode")


def default_manifests() -> Path:
    """``$SHOW1_GOLDEN/manifests``, else ``../shared/golden/manifests`` next to the repository."""
    root = os.environ.get("SHOW1_GOLDEN")
    base = Path(root) if root else Path(__file__).resolve().parents[2] / "shared" / "golden"
    return base / "manifests"


def stage_config(stage: Stage, *, weights: Path | None = None, manifests: Path | None = None) -> tuple[str, Any]:
    """(class name, config) of a stage's model: the released folder's config.json under ``weights``, else the
    golden manifest."""
    candidates = []
    if weights is not None:
        candidates.append(Path(weights) / stage.released)
    candidates.append(Path(manifests or default_manifests()) / f"{stage.manifest}.config.json")
    for path in candidates:
        if path.is_file():
            return build_config(json.loads(path.read_text()), str(path))
    raise FileNotFoundError(
        f"no config for stage `{stage.name}` (looked for {', '.join(map(str, candidates))}): pass --weights ROOT "
        "(the released folders) or --manifests DIR (the golden manifests), or set SHOW1_GOLDEN"
    )


# --- FLOPs on the jaxpr ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class FlopCount:
    """2 x multiply-accumulates of dots and convolutions (SPEC.md §10.3's convention), loops multiplied out."""

    dot: int = 0
    conv: int = 0
    conv_padding: int = 0  # the part of ``conv`` whose taps fall on zero padding (XLA does not count it)
    unknown_loops: int = 0  # while loops of unknown trip count, counted once

    @property
    def total(self) -> int:
        return self.dot + self.conv


def _conv_taps(eqn: Any) -> tuple[int, int]:
    """(all kernel taps per output feature map, taps inside the input) of a conv_general_dilated."""
    lhs, rhs, out = (v.aval.shape for v in (*eqn.invars[:2], eqn.outvars[0]))
    dn = eqn.params["dimension_numbers"]
    lhs_dil = eqn.params.get("lhs_dilation") or (1,) * (len(lhs) - 2)
    rhs_dil = eqn.params.get("rhs_dilation") or (1,) * (len(lhs) - 2)
    total = valid = 1
    for j, (lo, _hi) in enumerate(eqn.params["padding"]):
        n_in, n_out = lhs[dn.lhs_spec[2 + j]], out[dn.out_spec[2 + j]]
        k, stride = rhs[dn.rhs_spec[2 + j]], eqn.params["window_strides"][j]
        extent = (n_in - 1) * lhs_dil[j] + 1
        count = 0
        for o in range(n_out):
            for q in range(k):
                pos = o * stride - lo + q * rhs_dil[j]
                count += 0 <= pos < extent and pos % lhs_dil[j] == 0
        total *= n_out * k
        valid *= count
    return total, valid


def count_flops(jaxpr: Any, multiplier: int = 1, acc: FlopCount | None = None) -> FlopCount:
    """Walk a (closed) jaxpr and its sub-jaxprs; scans count ``length`` times, conds their costliest branch."""
    acc = FlopCount() if acc is None else acc
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            (lhs_contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            k = math.prod(lhs[i] for i in lhs_contract)
            acc.dot += multiplier * 2 * math.prod(eqn.outvars[0].aval.shape) * k
        elif name == "conv_general_dilated":
            rhs, out = eqn.invars[1].aval.shape, eqn.outvars[0].aval.shape
            dn = eqn.params["dimension_numbers"]
            total, valid = _conv_taps(eqn)
            per_tap = 2 * out[dn.out_spec[0]] * out[dn.out_spec[1]] * rhs[dn.rhs_spec[1]]
            acc.conv += multiplier * per_tap * total
            acc.conv_padding += multiplier * per_tap * (total - valid)
        if name == "cond":
            branches = [count_flops(b, multiplier) for b in eqn.params["branches"]]
            worst = max(branches, key=lambda c: c.total)
            acc.dot, acc.conv = acc.dot + worst.dot, acc.conv + worst.conv
            acc.conv_padding += worst.conv_padding
            continue
        inner = multiplier * (eqn.params["length"] if name == "scan" else 1)
        if name == "while":
            acc.unknown_loops += 1
        for sub in jex.core.jaxprs_in_params(eqn.params):
            count_flops(sub, inner, acc)
    return acc


# --- reading compiled programs ---------------------------------------------------------------------------------------

_SHAPE = re.compile(r"\b(pred|s8|u8|s16|u16|s32|u32|s64|u64|f16|bf16|f32|f64|c64|c128)\[([0-9,]*)\]")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4}
_COLLECTIVE = re.compile(r"=\s*(.*?)\s(all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute)(-start)?\(")
# The logits of an attention: the einsum "...->..QK" (its metadata may sit on a bitcast of the dot).
_LOGITS = re.compile(r"=\s*(\w+)\[([0-9,]*)\][^\n]*op_name=\"[^\"]*->[A-Z]*QK/dot_general\"")


def _shape_bytes(text: str) -> int:
    total = 0
    for dtype, dims in _SHAPE.findall(text):
        total += math.prod(int(d) for d in dims.split(",") if d) * _BYTES.get(dtype, 8)
    return total


def collective_bytes(hlo_text: str) -> int:
    """Bytes produced by collectives in an optimised HLO module, per device (ops inside loops counted once)."""
    return sum(_shape_bytes(m.group(1)) for m in map(_COLLECTIVE.search, hlo_text.splitlines()) if m)


def attention_logits(hlo_text: str) -> tuple[int, int]:
    """(largest, largest never materialised): elements of attention-logits blocks (einsum ``...->..QK``) in an
    optimised HLO module, per device. A block is never materialised when it only appears inside fused computations
    (XLA:CPU fuses dot -> softmax -> dot); one that a top-level or loop-body instruction produces is a buffer."""
    fused = set(re.findall(r"\sfusion\(.*?calls=%([\w.\-]+)", hlo_text))
    computation, inside, outside = "", 0, 0
    for line in hlo_text.splitlines():
        if line and not line[0].isspace() and line.rstrip().endswith("{"):
            computation = line.split()[1 if line.startswith("ENTRY") else 0].lstrip("%")
            continue
        m = _LOGITS.search(line)
        if m:
            n = math.prod(int(d) for d in m.group(2).split(",") if d)
            if computation in fused:
                inside = max(inside, n)
            else:
                outside = max(outside, n)
    return max(inside, outside), (inside if inside > outside else 0)


def largest_attention_logits(hlo_text: str) -> int:
    """Elements of the largest attention-logits block in an HLO module, per device."""
    return attention_logits(hlo_text)[0]


def _cost(analysis: Any) -> dict[str, float]:
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else {}
    return dict(analysis or {})


# --- one stage -------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class StageReport:
    """Figures of one stage; bytes are per device unless named ``total``."""

    stage: str
    what: str
    dtype: str
    mesh: str
    backend: str
    param_count: int
    param_bytes_total: int
    param_bytes: int
    argument_bytes: int
    output_bytes: int
    temp_bytes: int
    xla_peak_bytes: int  # XLA's memory_analysis of the compile in ``dtype``
    proxy_temp_bytes: int | None  # temporaries of the float32 compile (see estimate_peak)
    attention_logits: int  # elements of the largest attention logits block, per device
    attention_logits_fused: int  # the largest block XLA fused away (not in its buffers; added to the estimate)
    estimate_peak_bytes: int
    flops: int  # 2 x MAC per call (all devices)
    flops_conv_padding: int
    xla_flops: float  # XLA cost_analysis of the whole (unpartitioned) program
    compute_split: int  # devices that share the compute (the batch/frames split)
    collective_bytes: int
    calls_per_video: int
    reference_tflop: float | None
    compile_seconds: float
    attention_chunk: int | None
    frames_per_chunk: int | None

    def per_call_seconds(self, acc: Accelerator) -> float:
        """Roofline: the slower of peak compute on this device's share and streaming every weight once."""
        compute = self.flops / self.compute_split / (acc.bf16_tflops * 1e12)
        weights = self.param_bytes_total / (acc.hbm_gbps * 1e9)
        return max(compute, weights)


def estimate_peak(
    *, argument: int, output: int, temp: int, proxy_temp: int | None, logits: int, dtype: Any, cpu: bool
) -> int:
    """Peak bytes per device expected on an accelerator, from XLA:CPU's analysis.

    Two XLA:CPU effects are corrected. (1) The CPU has no 16-bit matmul/convolution kernels: it converts their
    operands, the weights included, to float32 copies, which inflates temporaries by up to twice the parameter
    bytes. The same program compiled in float32 has no such copies and every activation at least as wide, so its
    temporaries (``proxy_temp``) bound the 16-bit ones from above. (2) XLA:CPU fuses dot -> softmax -> dot, so the
    logits of such an attention never appear in its buffers; accelerators materialise them. The largest such block
    (``logits`` elements, see :func:`attention_logits`) is added with the logits in ``dtype``, their float32
    softmax and the probabilities in ``dtype`` live at once.
    """
    temps = proxy_temp if proxy_temp is not None else temp
    item = jnp.dtype(dtype).itemsize
    transient = logits * (2 * item + 4) if cpu else 0
    return int(argument + output + temps + transient)


def _unet_call(cfg: Any, stage: Stage) -> tuple[Callable, tuple, tuple]:
    image = len(stage.shape) == 4

    def call(model: nnx.Module, sample, timestep, text, *labels):
        return model(sample, timestep, text, class_labels=labels[0] if labels else None)

    b = stage.shape[0]
    args = [((stage.shape, None), sh.IMAGE if image else sh.VIDEO), (((b,), jnp.int32), sh.BATCH)]
    args.append(((stage.text, None), sh.TOKENS))
    if stage.class_labels:
        args.append((((b,), jnp.int32), sh.BATCH))
    return call, tuple(a for a, _ in args), tuple(s for _, s in args)


def _stage_program(stage: Stage, cfg: Any, frames_per_chunk: int | None) -> tuple[Callable, tuple, tuple, Any]:
    """(call(model, *args), ((shape, dtype or None=model dtype), ...), logical in_axes, logical out_axes)."""
    if stage.kind == "unet":
        call, args, axes = _unet_call(cfg, stage)
        return call, args, axes, axes[0]
    if stage.kind == "t5":
        ids = (stage.shape, jnp.int32)
        return (lambda m, i, a: m(i, a)), (ids, ids), (sh.BATCH, sh.BATCH), sh.TOKENS
    if stage.kind == "clip":
        ids = (stage.shape, jnp.int32)
        return (lambda m, i: m(i).last_hidden_state), (ids,), (sh.BATCH,), sh.TOKENS
    if stage.kind == "vae_decode":
        call = lambda m, z: m.decode_video(z, frames_per_chunk=frames_per_chunk)  # noqa: E731
        return call, ((stage.shape, None),), (sh.VIDEO,), sh.VIDEO
    if stage.kind == "vae_encode":
        call = lambda m, x: m.encode_video(x, frames_per_chunk=frames_per_chunk)[0]  # noqa: E731
        return call, ((stage.shape, None),), (sh.VIDEO,), sh.VIDEO
    raise ValueError(f"unknown stage kind `{stage.kind}`")


def _abstract(graphdef_model: nnx.Module, args: tuple, dtype: Any) -> tuple[nnx.GraphDef, nnx.State, tuple]:
    graphdef, params = nnx.split(graphdef_model)
    structs = tuple(jax.ShapeDtypeStruct(shape, dtype if dt is None else dt) for shape, dt in args)
    return graphdef, params, structs


def _compile(
    model: nnx.Module, call: Callable, args: tuple, in_axes: tuple, out_axes: Any, dtype: Any, mesh, rules, threshold
):
    graphdef, params, structs = _abstract(model, args, dtype)

    def fn(p, *a):
        return call(nnx.merge(graphdef, p), *a)

    shardings = sh.param_shardings(params, mesh, rules, threshold)
    sharded = sh.jit_sharded(fn, mesh, in_axes=(shardings, *in_axes), out_axes=out_axes, rules=rules)
    compiled = sharded.lower(params, *structs).compile()
    return compiled, sharded, params, structs


def plan_stage(
    stage: Stage | str,
    *,
    dtype: Any = jnp.bfloat16,
    mesh: jax.sharding.Mesh | None = None,
    rules: sh.Rules | None = None,
    threshold: int | None = None,
    attention_chunk: int | None = None,
    frames_per_chunk: int | None = 4,
    config: tuple[str, Any] | None = None,
    weights: Path | None = None,
    manifests: Path | None = None,
    proxy: bool | None = None,
) -> StageReport:
    """Compile one stage abstractly and measure it (see the module docstring).

    Args:
      stage: a :data:`STAGES` entry or its name; its ``shape``/``text`` may be replaced (dataclasses.replace) for
        other sizes.
      dtype: parameter and compute dtype.
      mesh: default: every device on ``fsdp``.
      attention_chunk: ``layers.set_attention_chunk`` on the UNet / VAE (None: unchunked).
      frames_per_chunk: the VAE's chunk of frames (SR2's default decode_chunk is 4).
      config: (class name, config) to use instead of the stage's released config (e.g. a tiny model).
      proxy: also compile in float32 to correct XLA:CPU's 16-bit upcasts (default: on the CPU for 16-bit dtypes).
    """
    stage = STAGES[stage] if isinstance(stage, str) else stage
    dtype = jnp.dtype(dtype)
    mesh = sh.make_mesh() if mesh is None else mesh
    rules = sh.DEFAULT_RULES if rules is None else rules
    class_name, cfg = config if config is not None else stage_config(stage, weights=weights, manifests=manifests)
    call, args, in_axes, out_axes = _stage_program(stage, cfg, frames_per_chunk)
    cpu = jax.default_backend() == "cpu"
    proxy = (cpu and dtype.itemsize == 2) if proxy is None else proxy

    def build(dt: Any, chunk: int | None) -> nnx.Module:
        model = abstract_model(class_name, cfg, dt)
        set_attention_chunk(model, chunk)
        # Plans are for accelerators and count attention FLOPs from its matmuls: never the CPU kernel's custom call.
        set_attention_implementation(model, "xla")
        return model

    # FLOPs: the unchunked program, attention and VAE frames alike (XLA's cost analysis counts a loop body once).
    plain = build(dtype, None)
    graphdef, params, structs = _abstract(plain, args, dtype)
    whole = _stage_program(stage, cfg, None)[0]
    fn = lambda p, *a: whole(nnx.merge(graphdef, p), *a)  # noqa: E731
    flops = count_flops(jax.make_jaxpr(fn)(params, *structs))
    xla_flops = _cost(jax.jit(fn).lower(params, *structs).cost_analysis()).get("flops", float("nan"))
    param_count = int(sum(math.prod(v.shape) for v in jax.tree.leaves(params)))
    summary = sh.summarize(params, mesh, rules, threshold)

    t0 = time.perf_counter()
    model = build(dtype, attention_chunk) if attention_chunk is not None else plain
    compiled, sharded, params, structs = _compile(model, call, args, in_axes, out_axes, dtype, mesh, rules, threshold)
    mem = compiled.memory_analysis()
    hlo = compiled.as_text()
    proxy_temp = None
    if proxy:
        compiled32, *_ = _compile(
            build(jnp.float32, attention_chunk), call, args, in_axes, out_axes, jnp.float32, mesh, rules, threshold
        )
        proxy_temp = int(compiled32.memory_analysis().temp_size_in_bytes)
    seconds = time.perf_counter() - t0

    alias = int(getattr(mem, "alias_size_in_bytes", 0))
    argument, output, temp = (
        int(x) for x in (mem.argument_size_in_bytes, mem.output_size_in_bytes, mem.temp_size_in_bytes)
    )
    logits, logits_fused = attention_logits(hlo)
    in_shardings, _ = sharded.shardings(params, *structs)
    split = _split_factor(in_shardings[1])  # the first activation (sample, ids or latents) decides
    return StageReport(
        stage=stage.name,
        what=stage.what,
        dtype=dtype.name,
        mesh=_mesh_name(mesh),
        backend=jax.default_backend(),
        param_count=param_count,
        param_bytes_total=summary.total_bytes,
        param_bytes=summary.per_device_bytes,
        argument_bytes=argument,
        output_bytes=output,
        temp_bytes=temp,
        xla_peak_bytes=argument + output + temp - alias,
        proxy_temp_bytes=proxy_temp,
        attention_logits=logits,
        attention_logits_fused=logits_fused,
        estimate_peak_bytes=estimate_peak(
            argument=argument - alias,
            output=output,
            temp=temp,
            proxy_temp=proxy_temp,
            logits=logits_fused,
            dtype=dtype,
            cpu=cpu,
        ),  # fmt: skip
        flops=flops.total,
        flops_conv_padding=flops.conv_padding,
        xla_flops=float(xla_flops),
        compute_split=split,
        collective_bytes=collective_bytes(hlo),
        calls_per_video=stage.calls_per_video,
        reference_tflop=stage.reference_tflop,
        compile_seconds=seconds,
        attention_chunk=attention_chunk,
        frames_per_chunk=frames_per_chunk if stage.kind.startswith("vae") else None,
    )


def _split_factor(sharding: jax.sharding.NamedSharding) -> int:
    """How many ways an activation sharding splits the array (the devices that share its compute)."""
    used = [a for part in sharding.spec if part for a in ((part,) if isinstance(part, str) else part)]
    return math.prod(sharding.mesh.shape[a] for a in used)


def _mesh_name(mesh: jax.sharding.Mesh) -> str:
    return ",".join(f"{a}={mesh.shape[a]}" for a in mesh.axis_names)


# --- cache -----------------------------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "show1_jax" / "plan"


def _cache_key(stage: Stage, cfg: Any, settings: dict[str, Any]) -> str:
    blob = json.dumps(
        {
            "version": PLAN_VERSION,
            "jax": jax.__version__,
            "backend": jax.default_backend(),
            "stage": dataclasses.asdict(stage),
            "config": repr(cfg),
            **settings,
        },
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def plan_stages(
    stages: Sequence[str],
    *,
    dtype: Any = jnp.bfloat16,
    mesh: jax.sharding.Mesh | None = None,
    rules: sh.Rules | None = None,
    threshold: int | None = None,
    attention_chunk: int | None = None,
    frames_per_chunk: int | None = 4,
    weights: Path | None = None,
    manifests: Path | None = None,
    cache_dir: Path | None = None,
    progress: Callable[[str], None] | None = None,
) -> list[StageReport]:
    """:func:`plan_stage` for several stages, one compile at a time, reusing cached reports (``cache_dir``)."""
    mesh = sh.make_mesh() if mesh is None else mesh
    reports = []
    for name in stages:
        if name not in STAGES:
            raise ValueError(f"unknown stage `{name}`; stages: {', '.join(STAGES)}")
        stage = STAGES[name]
        class_name, cfg = stage_config(stage, weights=weights, manifests=manifests)
        settings = {
            "dtype": jnp.dtype(dtype).name,
            "mesh": _mesh_name(mesh),
            "rules": rules or sh.DEFAULT_RULES,
            "threshold": threshold,
            "attention_chunk": attention_chunk,
            "frames_per_chunk": frames_per_chunk if stage.kind.startswith("vae") else None,
        }
        path = None if cache_dir is None else Path(cache_dir) / f"{name}-{_cache_key(stage, cfg, settings)}.json"
        if path is not None and path.is_file():
            reports.append(StageReport(**json.loads(path.read_text())))
            if progress:
                progress(f"{name}: cached ({path})")
            continue
        if progress:
            progress(f"{name}: compiling {stage.what} ({settings['dtype']}, mesh {settings['mesh']}) ...")
        report = plan_stage(
            stage,
            dtype=dtype,
            mesh=mesh,
            rules=rules,
            threshold=threshold,
            attention_chunk=attention_chunk,
            frames_per_chunk=frames_per_chunk,
            config=(class_name, cfg),
        )
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(dataclasses.asdict(report), indent=1))
        if progress:
            progress(f"{name}: done in {report.compile_seconds:.0f} s")
        reports.append(report)
    return reports


# --- tables ----------------------------------------------------------------------------------------------------------


def _gib(n: float | None) -> str:
    return "-" if n is None else f"{n / GIB:.2f}"


def format_tables(
    reports: Sequence[StageReport],
    *,
    device_memory_gib: float = 10.0,
    accelerators: Sequence[str] = tuple(ACCELERATORS),
) -> str:
    """Markdown tables: memory per device, FLOPs per call against SPEC.md §10.3, and the roofline estimate."""
    if not reports:
        return ""
    r0 = reports[0]
    lines = [
        f"Plan: {r0.dtype}, mesh {r0.mesh} ({r0.backend} compile), fits = estimate <= {device_memory_gib:g} GiB per "
        "device. Bytes per device unless marked total; GiB = 2^30 bytes.",
        "",
        "| stage | params | params total (GiB) | params / device (GiB) | XLA peak / device (GiB) | temps, f32 compile "
        "(GiB) | largest attention block / device | estimate peak / device (GiB) | fits | collectives / device "
        "(GiB) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in reports:
        fits = "yes" if r.estimate_peak_bytes <= device_memory_gib * GIB else "**no**"
        block = f"{r.attention_logits / 1e6:.3g}M logits" if r.attention_logits else "-"
        lines.append(
            f"| {r.stage} | {r.param_count / 1e9:.3f}B | {_gib(r.param_bytes_total)} | {_gib(r.param_bytes)} | "
            f"{_gib(r.xla_peak_bytes)} | {_gib(r.proxy_temp_bytes)} | {block} | {_gib(r.estimate_peak_bytes)} | "
            f"{fits} | {_gib(r.collective_bytes)} |"
        )
    lines += [
        "",
        "FLOPs per call (CFG batch of 2). 2xMAC: dots and convolutions counted on the jaxpr, SPEC.md §10.3's "
        "convention. XLA: cost_analysis, which skips convolution taps on zero padding and adds elementwise ops.",
        "",
        "| stage | input | 2xMAC (TFLOP) | SPEC §10.3 | diff | XLA cost_analysis | of which zero-padding taps "
        "(not in XLA) | calls / video | TFLOP / video |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    total = 0.0
    for r in reports:
        ref = "-" if r.reference_tflop is None else f"{r.reference_tflop:.2f}"
        diff = "-" if r.reference_tflop is None else f"{(r.flops / 1e12 / r.reference_tflop - 1) * 100:+.2f}%"
        per_video = r.flops * r.calls_per_video / 1e12
        total += per_video
        lines.append(
            f"| {r.stage} | {r.what} | {r.flops / 1e12:.3f} | {ref} | {diff} | {r.xla_flops / 1e12:.3f} | "
            f"{r.flops_conv_padding / 1e12:.3f} | {r.calls_per_video} | {per_video:.1f} |"
        )
    lines.append(f"| total | | | | | | | | {total:.1f} |")
    accs = [ACCELERATORS[a] for a in accelerators]
    lines += [
        "",
        "Roofline ESTIMATE (not a measurement): per call max(2xMAC / (devices sharing the compute x peak bf16), "
        "parameter bytes / HBM bandwidth), i.e. 100% of peak, no communication; per video x calls.",
        "",
        "| stage | compute split | " + " | ".join(f"{a.name} ms/call" for a in accs) + " | "
        + " | ".join(f"{a.name} s/video" for a in accs) + " |",
        "|---|---|" + "---|" * (2 * len(accs)),
    ]  # fmt: skip
    totals = [0.0] * len(accs)
    for r in reports:
        calls = [r.per_call_seconds(a) for a in accs]
        videos = [c * r.calls_per_video for c in calls]
        totals = [t + v for t, v in zip(totals, videos)]
        lines.append(
            f"| {r.stage} | {r.compute_split} | " + " | ".join(f"{c * 1e3:.1f}" for c in calls) + " | "
            + " | ".join(f"{v:.1f}" for v in videos) + " |"
        )  # fmt: skip
    lines.append("| total | | " + " | " * (len(accs) - 1) + " | " + " | ".join(f"{t:.1f}" for t in totals) + " |")
    sources = [
        f"{a.name} {a.bf16_tflops:g} TFLOP/s, {a.hbm_gbps:g} GB/s, {a.memory_gib:g} GB"
        + (f" ({a.note})" if a.note else "")
        for a in accs
    ]
    lines += ["", "Peak bf16 / HBM from public datasheets: " + "; ".join(sources) + "."]
    return "\n".join(lines)


# --- command line ----------------------------------------------------------------------------------------------------


def _chunk(text: str) -> int | None:
    """A positive count, written as 134217728 or 2**27; none/off for no chunking."""
    if text.strip().lower() in ("none", "off", ""):
        return None
    power = re.fullmatch(r"\s*(\d+)\s*\*\*\s*(\d+)\s*", text)
    try:
        value = int(power.group(1)) ** int(power.group(2)) if power else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"`{text}` is not a count (e.g. 2**27) or none") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be positive (or none)")
    return value


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="show1 plan",
        description="Memory and FLOPs of each Show-1 stage at full size from abstract XLA compiles (nothing is "
        "allocated), with a roofline estimate per accelerator.",
    )
    ap.add_argument("--stages", default=",".join(DEFAULT_STAGES), help=f"comma list of {', '.join(STAGES)}")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--devices", type=int, default=None, help="use N virtual CPU devices (sets jax_num_cpu_devices)")
    ap.add_argument("--mesh", default="fsdp=-1", help="mesh axes, e.g. data=2,fsdp=4 or fsdp=8,tensor=1")
    ap.add_argument("--threshold", type=int, default=sh.DEFAULT_THRESHOLD, help="replicate smaller parameters")
    ap.add_argument(
        "--attention-chunk", type=_chunk, default=2**27, help="max attention logits per block (e.g. 2**27; none)"
    )
    ap.add_argument("--frames-per-chunk", type=_chunk, default=4, help="VAE frames per chunk (none: all)")
    ap.add_argument("--device-memory", type=float, default=10.0, help="GiB per device for the `fits` column")
    ap.add_argument("--accelerators", default=",".join(ACCELERATORS), help=f"comma list of {', '.join(ACCELERATORS)}")
    ap.add_argument("--weights", type=Path, default=None, help="root of the released folders (their config.json)")
    ap.add_argument("--manifests", type=Path, default=None, help="golden manifests folder (default: SHOW1_GOLDEN)")
    ap.add_argument("--cache", type=Path, default=default_cache_dir(), help="report cache folder")
    ap.add_argument("--no-cache", action="store_true", help="recompile every stage")
    ap.add_argument("--json", type=Path, default=None, help="also write the reports as JSON")
    return ap


MEMORY_SCHEDULER_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"


def prefer_memory_scheduler() -> bool:
    """Make XLA:CPU schedule for memory, as accelerators' memory-limited schedulers do; True if in effect.

    XLA:CPU's default (concurrency-optimised) scheduler starts every FSDP all-gather at the beginning of the
    program, so its memory analysis would hold a gathered copy of all weights at once (measured: 4.9 GiB of
    temporaries per device for the base UNet on data=2,fsdp=4 in float32 instead of 0.28 GiB). Must run before JAX
    initialises its backends.
    """
    flags = os.environ.get("XLA_FLAGS", "")
    if "concurrency_optimized_scheduler" not in flags:
        from jax._src import xla_bridge  # no public API tells whether the backends exist yet

        if xla_bridge.backends_are_initialized():
            return False
        os.environ["XLA_FLAGS"] = f"{flags} {MEMORY_SCHEDULER_FLAG}".strip()
    return MEMORY_SCHEDULER_FLAG in os.environ["XLA_FLAGS"]


def main(argv: Sequence[str] | None = None) -> int:
    """``show1 plan``: print the plan tables (progress on stderr)."""
    args = build_parser().parse_args(argv)
    if not prefer_memory_scheduler():
        print(
            f"warning: JAX was initialised before the plan could set {MEMORY_SCHEDULER_FLAG}: multi-device "
            "figures may count all gathered weights at once; run `show1 plan` in a fresh process",
            file=sys.stderr,
        )
    if args.devices is not None:
        try:
            jax.config.update("jax_num_cpu_devices", args.devices)
        except RuntimeError as err:
            raise SystemExit(f"--devices {args.devices}: {err}; run the plan in a fresh process") from None
        if jax.default_backend() == "cpu" and jax.device_count() != args.devices:
            raise SystemExit(
                f"--devices {args.devices}: JAX already has {jax.device_count()} CPU devices; unset XLA_FLAGS' "
                "--xla_force_host_platform_device_count or run in a fresh process"
            )
    accelerators = [a.strip() for a in args.accelerators.split(",") if a.strip()]
    unknown = [a for a in accelerators if a not in ACCELERATORS]
    if unknown:
        raise SystemExit(f"unknown accelerator(s) {unknown}; known: {', '.join(ACCELERATORS)}")
    try:
        mesh = sh.make_mesh(args.mesh)
    except sh.ShardingError as err:
        raise SystemExit(f"--mesh {args.mesh}: {err}") from None
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    reports = plan_stages(
        stages,
        dtype=args.dtype,
        mesh=mesh,
        threshold=args.threshold,
        attention_chunk=args.attention_chunk,
        frames_per_chunk=args.frames_per_chunk,
        weights=args.weights,
        manifests=args.manifests,
        cache_dir=None if args.no_cache else args.cache,
        progress=lambda msg: print(msg, file=sys.stderr, flush=True),
    )
    print(format_tables(reports, device_memory_gib=args.device_memory, accelerators=accelerators))
    if args.attention_chunk is not None:
        print(f"\nAttention runs in blocks of at most {args.attention_chunk} logits (layers.set_attention_chunk).")
    if args.json is not None:
        args.json.write_text(json.dumps([dataclasses.asdict(r) for r in reports], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
