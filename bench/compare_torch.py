"""show1-jax against the PyTorch reference implementations on the CPU, side by side in one process.

Every row builds the PyTorch model with a seed (diffusers / transformers, as installed), saves it in the released
folder format (``config.json`` + safetensors, ``save_pretrained``), loads that folder with
``show1_jax.load_component`` (the converter path users take), checks that both give the same output (max
|jax - torch| / max |torch|), then times the same computation:

- JAX: the model split once and its pure forward under ``jax.jit`` (``show1_jax.functional``), as the samplers run
  it, with the attention chunk the pipeline uses by default; compile time (``lower().compile()``) is reported apart.
- PyTorch: eager, under ``torch.inference_mode()``, ``torch.set_num_threads(threads)``.

Both sides use float32 and the same thread count (``--threads``, default 2; fewer threads than CPUs pins this process
to that many CPUs, which XLA's thread pool follows). Runs alternate between JAX and PyTorch (the order flips every
repeat) so that both see the same machine noise; a row's figure is the median over ``--repeats`` runs after one
warm-up. GFLOP counts 2 x multiply-accumulates of the matmuls, convolutions and attention of the reference call
(torch's ``FlopCounterMode``; counted there because a custom call, such as our CPU attention kernel, has no FLOPs in
XLA's analysis); "% peak" is against the best float32 GEMM rate of either library in the ``matmul`` row. "other
load" is the number of CPUs other processes kept busy while the row was timed (/proc/stat). The last line names the
custom calls in each compiled JAX program, i.e. which attention implementation ran.

``--breakdown`` also profiles each model row: JAX per compiled op (a ``jax.profiler`` trace of the XLA program,
grouped into matmul / convolution / custom call / other, and by the parameters each op reads, i.e. the module),
PyTorch per aten op (``torch.profiler``).

Reading the table: PyTorch's OpenMP threads spin-wait, so when other processes keep CPUs busy (the "other load"
column) its rows with many small ops slow down several-fold (T5 below: 0.4 s on 1 thread, 3.6 s on 2 threads with
one of 2 CPUs busy elsewhere), while XLA's degrade less; compare rows taken with other load ~0, or run
``--threads 1``. In ``unet_sr2``, ``transformer_in`` (8 heads x 64 whatever the width, as in the reference) is ~45%
of the FLOPs at these widths, against ~4% at full size.

Rows (float32, CPU-sized; widths are the released models' layouts at smaller sizes):

- ``matmul``: a 2048 x 2048 x 2048 GEMM (jnp.dot / torch.mm): the peak the machine gives each library.
- ``attention_d40`` / ``attention_d64``: ``show1_jax.layers.attention`` on q, k, v [16, 1024, 8 * D] (16 frames of
  a 32 x 32 latent, 8 heads of D) against diffusers' processor path (view to [N, H, L, D],
  ``F.scaled_dot_product_attention``, back to [N, L, H * D]).
- ``unet_sr2``: diffusers ``UNet3DConditionModel`` (the zeroscope / ModelScope layout of Show-1's SR2 UNet) with
  block_out_channels (64, 128, 256, 256), 2 layers per block, 64-dim heads, 256-dim text states, on a [1, 4, 32, 32]
  latent video (4 frames of 32 x 32) with 77 text tokens. The folder's config.json gets the three keys that select
  diffusers' behaviour in ours (SPEC.md §6.3): ``use_linear_projection``, ``transfromer_in_opt`` and
  ``attention_head_split="diffusers"``.
- ``t5``: transformers ``T5EncoderModel``, T5 v1.1-base layout (d_model 768, gated-GELU d_ff 2048, 12 layers,
  12 heads; vocabulary cut to 1024), ids [2, 77] (a prompt and the empty prompt, padded, with the attention mask).
- ``clip``: transformers ``CLIPTextModel``, CLIP ViT-L/14 text layout (768 wide, 12 layers, 12 heads; vocabulary
  cut to 4096), ids [2, 77], no attention mask (as the SR2 pipeline), last hidden state.
- ``vae_decode``: diffusers ``AutoencoderKL.decode`` (post_quant_conv + decoder) with block_out_channels
  (64, 128, 256, 256), 2 layers per block: latents [1, 16, 24, 4] -> images [1, 128, 192, 3].

Run (from the repository root, with a bench venv outside the repository, pins in bench/requirements.txt)::

    python3 -m venv ../benchvenv && ../benchvenv/bin/pip install -c constraints.txt -e . -r bench/requirements.txt
    ../benchvenv/bin/python bench/compare_torch.py                   # every row, prints a markdown table
    ../benchvenv/bin/python bench/compare_torch.py --update-readme   # and rewrites README.md's table
    ../benchvenv/bin/python bench/compare_torch.py --rows unet_sr2 attention_d40 --repeats 9 --threads 1
    ../benchvenv/bin/python bench/compare_torch.py --rows unet_sr2 --breakdown      # where the time goes, per op

Measured 2026-12-03 on the project's 2-CPU AMD EPYC machine (jax 0.10.2 with show1_jax's CPU attention kernel
``show1_cpu_attention`` in the attention rows, the UNet and the VAE; torch 2.13.0+cpu, diffusers 0.42.1, transformers
5.23.0). README.md holds the output of the last ``--update-readme``. Other processes kept about one CPU busy, so:

- ``--threads 2`` (the default) inflated PyTorch's model rows several-fold (its OpenMP threads spin-wait for the
  busy CPU: T5 3.6 s against 0.37 s on one thread, SR2 UNet 17.9 s against 2.0 s): JAX/PyTorch 0.09-0.32 on the
  models, which says nothing about a quiet machine. On a quiet minute, 2 threads: attention d40 218 ms against 214.
- ``--threads 1 --update-readme`` (each library on one CPU: the fair comparison that day) gave JAX/PyTorch: matmul
  1.05, attention d40 0.91 and d64 0.93 (305 / 483 ms against 337 / 522), SR2 UNet 0.88 (1.81 s against 2.05 s),
  T5 0.87, CLIP 0.80, VAE decode 1.13 (801 ms against 709: XLA's convolutions). "% peak" above 100% there: the
  matmul row ran while another process was busy, the attention rows while it was not.

Before the CPU kernel, attention d40 took 2.0-2.4 s in XLA on the busy machine (the SR2 UNet row then spent
``transformer_in``'s time mostly in attention); ``--breakdown --threads 1`` on the UNet with the kernel: matmuls 56%
(``transformer_in``, fixed at 8 heads x 64 whatever the width, is 37% of the time at these widths and ~4% at full
size), convolutions 18%, attention 11%, the rest 15%, the same split as PyTorch's.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import gzip
import inspect
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import textwrap
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
START, END = "<!-- bench:torch:start -->", "<!-- bench:torch:end -->"
SECTION = "## Speed against PyTorch (CPU)"
BUSY = 0.25  # CPUs kept busy by other processes above which a table is flagged as taken on a busy machine
COMMAND = (
    "python3 -m venv ../benchvenv && ../benchvenv/bin/pip install -c constraints.txt -e . -r bench/requirements.txt\n"
    "../benchvenv/bin/python bench/compare_torch.py --update-readme"
)


@dataclasses.dataclass
class Row:
    """One computation, ready to time on both sides (inputs bound, JAX program compiled)."""

    name: str
    shape: str  # what is computed, in words
    run_jax: Callable[[], Any]  # blocks until the result is ready
    run_torch: Callable[[], Any]
    compile_s: float
    rel_err: float | None  # max|jax - torch| / max|torch|; None where not compared (the GEMM)
    hlo: str  # the compiled JAX program

    @property
    def custom_calls(self) -> tuple[str, ...]:
        """Custom-call targets in the compiled JAX program (e.g. an attention kernel)."""
        return tuple(sorted(set(re.findall(r'custom_call_target="([^"]+)"', self.hlo))))


@dataclasses.dataclass
class Result:
    """A timed row, without its models."""

    name: str
    shape: str
    flops: float  # 2 x MAC of one call (torch_flops)
    compile_s: float
    rel_err: float | None
    custom_calls: tuple[str, ...]
    jax_times: list[float]
    torch_times: list[float]
    other_load: float | None  # CPUs busy with other processes during the timed runs, on average

    @property
    def jax_s(self) -> float:
        return statistics.median(self.jax_times)

    @property
    def torch_s(self) -> float:
        return statistics.median(self.torch_times)


# --- building rows ---------------------------------------------------------------------------------------------------


def pipeline_attention_chunk() -> int | None:
    """The attention chunk the pipeline sets on every model by default, so the models run here as users run them."""
    from show1_jax.pipeline import Show1Pipeline

    return inspect.signature(Show1Pipeline.__init__).parameters["attention_chunk"].default


def compile_jax(fn: Callable, *args) -> tuple[Callable[[], Any], float, str]:
    """(zero-argument runner of the compiled ``fn(*args)``, compile seconds, the compiled HLO text)."""
    import jax

    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - t0
    return (lambda: jax.block_until_ready(compiled(*args))), compile_s, compiled.as_text()


def torch_flops(fn: Callable[[], Any]) -> float:
    """2 x multiply-accumulates of the matmuls, convolutions and attention of one PyTorch call (FlopCounterMode).

    Counted on the reference side so that the figure does not depend on how our attention is implemented (a custom
    call has no FLOPs in XLA's analysis or in a jaxpr walk). torch's table lacks the CPU flash-attention kernel.
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

    cpu_sdpa = lambda q, k, v, *args, out_shape=None, **kwargs: sdpa_flop_count(q, k, v)
    mapping = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: cpu_sdpa}
    with torch.inference_mode(), FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        fn()
    return float(counter.get_total_flops())


def rel_err(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def perturb_(model, seed: int, scale: float = 0.1) -> None:
    """Add N(0, scale^2) to every 1-D parameter (biases, norm scales), so that none is exactly 0 or 1."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(scale * torch.randn(p.shape, generator=gen))


def load_ours(torch_model, folder: Path, overrides: dict | None = None):
    """Save ``torch_model`` as a released folder and load it with show1_jax (the converter path); chunk as the
    pipeline does. ``overrides``: config.json keys to set first."""
    from show1_jax import load_component
    from show1_jax.layers import set_attention_chunk

    torch_model.save_pretrained(folder)
    if overrides:
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, **overrides}))
    model = load_component(folder)
    set_attention_chunk(model, pipeline_attention_chunk())
    return model


def pure_forward(model, method: str = "__call__"):
    """(params, pure function of (params, *args)) as the samplers and stages run a model."""
    from show1_jax import functional

    graphdef, params = functional.split(model)
    return params, functional.pure(graphdef, method)


def row_matmul(tmp: Path, seed: int) -> Row:
    import jax.numpy as jnp
    import torch

    n = 2048
    rng = np.random.default_rng(seed)
    a, b = (rng.standard_normal((n, n), dtype=np.float32) for _ in range(2))
    run_jax, compile_s, hlo = compile_jax(jnp.dot, jnp.asarray(a), jnp.asarray(b))
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    return Row("matmul", f"GEMM {n}x{n}x{n}", run_jax, lambda: torch.mm(ta, tb), compile_s, None, hlo)


def attention_row(head_dim: int) -> Callable[[Path, int], Row]:
    def build(tmp: Path, seed: int) -> Row:
        import jax.numpy as jnp
        import torch
        import torch.nn.functional as F

        from show1_jax.layers import attention

        n, length, heads = 16, 1024, 8
        chunk = pipeline_attention_chunk()
        rng = np.random.default_rng(seed)
        q, k, v = (rng.standard_normal((n, length, heads * head_dim), dtype=np.float32) for _ in range(3))
        fn = lambda q, k, v: attention(q, k, v, heads, chunk=chunk)
        run_jax, compile_s, hlo = compile_jax(fn, *(jnp.asarray(x) for x in (q, k, v)))

        tq, tk, tv = (torch.from_numpy(x) for x in (q, k, v))

        def run_torch():  # diffusers' AttnProcessor2_0 around the kernel
            split = lambda x: x.view(n, -1, heads, head_dim).transpose(1, 2)  # [N, H, L, D]
            out = F.scaled_dot_product_attention(split(tq), split(tk), split(tv))
            return out.transpose(1, 2).reshape(n, -1, heads * head_dim)

        with torch.inference_mode():
            err = rel_err(run_jax(), run_torch())
        shape = f"{n} x {heads} heads x {length} tokens x d {head_dim}"
        return Row(f"attention_d{head_dim}", shape, run_jax, run_torch, compile_s, err, hlo)

    return build


def row_unet_sr2(tmp: Path, seed: int) -> Row:
    import jax.numpy as jnp
    import torch
    from diffusers import UNet3DConditionModel

    batch, frames, size, text_len, text_dim = 1, 4, 32, 77, 256
    torch.manual_seed(seed)
    ref = UNet3DConditionModel(
        block_out_channels=(64, 128, 256, 256),
        layers_per_block=2,
        attention_head_dim=64,
        cross_attention_dim=text_dim,
        norm_num_groups=32,
    ).eval()
    perturb_(ref, seed)
    # diffusers' class is the zeroscope layout: linear projections, transformer_in, diffusers' head split (§6.3).
    overrides = {"use_linear_projection": True, "transfromer_in_opt": True, "attention_head_split": "diffusers"}
    params, fwd = pure_forward(load_ours(ref, tmp / "unet", overrides))

    rng = np.random.default_rng(seed)
    video = rng.standard_normal((batch, 4, frames, size, size), dtype=np.float32)  # [B, C, F, H, W]
    text = rng.standard_normal((batch, text_len, text_dim), dtype=np.float32)
    timestep = np.full((batch,), 500, np.int32)
    args = (jnp.asarray(video.transpose(0, 2, 3, 4, 1)), jnp.asarray(timestep), jnp.asarray(text))
    run_jax, compile_s, hlo = compile_jax(fwd, params, *args)

    tv, tt, tc = torch.from_numpy(video), torch.from_numpy(timestep).long(), torch.from_numpy(text)
    run_torch = lambda: ref(tv, tt, tc).sample
    with torch.inference_mode():
        err = rel_err(np.asarray(run_jax()), run_torch().numpy().transpose(0, 2, 3, 4, 1))
    shape = f"latent {batch}x{frames}x{size}x{size}x4, widths 64-256, text {text_len}x{text_dim}"
    return Row("unet_sr2", shape, run_jax, run_torch, compile_s, err, hlo)


def text_ids(rng: np.random.Generator, vocab: int, length: int, eos: int) -> tuple[np.ndarray, np.ndarray]:
    """ids [2, L]: a 12-token prompt and an empty one, each ended by ``eos`` and padded with 0; the mask [2, L]."""
    ids, mask = np.zeros((2, length), np.int32), np.zeros((2, length), np.int32)
    for row, n in enumerate((12, 0)):
        ids[row, :n] = rng.integers(3, vocab - 2, n)
        ids[row, n] = eos
        mask[row, : n + 1] = 1
    return ids, mask


def row_t5(tmp: Path, seed: int) -> Row:
    import jax.numpy as jnp
    import torch
    from transformers import T5Config, T5EncoderModel

    vocab, length = 1024, 77
    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=vocab,
        d_model=768,
        d_kv=64,
        d_ff=2048,
        num_layers=12,
        num_heads=12,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
    )
    ref = T5EncoderModel(config).eval()
    perturb_(ref, seed)
    params, fwd = pure_forward(load_ours(ref, tmp / "t5"))
    ids, mask = text_ids(np.random.default_rng(seed), vocab, length, eos=1)
    run_jax, compile_s, hlo = compile_jax(fwd, params, jnp.asarray(ids), jnp.asarray(mask))
    tids, tmask = torch.from_numpy(ids).long(), torch.from_numpy(mask).long()
    run_torch = lambda: ref(input_ids=tids, attention_mask=tmask).last_hidden_state
    with torch.inference_mode():
        err = rel_err(run_jax(), run_torch())
    return Row("t5", f"T5 v1.1-base encoder, ids 2x{length}", run_jax, run_torch, compile_s, err, hlo)


def row_clip(tmp: Path, seed: int) -> Row:
    import jax.numpy as jnp
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    vocab, length = 4096, 77
    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=vocab,
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        max_position_embeddings=length,
        hidden_act="gelu",
        bos_token_id=vocab - 2,
        eos_token_id=vocab - 1,
        pad_token_id=vocab - 1,
    )
    ref = CLIPTextModel(config).eval()
    perturb_(ref, seed)
    params, fwd = pure_forward(load_ours(ref, tmp / "clip"))  # transformers 5 layout: no `text_model.` prefix
    ids, _ = text_ids(np.random.default_rng(seed), vocab, length, eos=vocab - 1)
    last_hidden = lambda params, ids: fwd(params, ids).last_hidden_state
    run_jax, compile_s, hlo = compile_jax(last_hidden, params, jnp.asarray(ids))
    tids = torch.from_numpy(ids).long()
    run_torch = lambda: ref(input_ids=tids).last_hidden_state
    with torch.inference_mode():
        err = rel_err(run_jax(), run_torch())
    return Row("clip", f"CLIP ViT-L/14 text, ids 2x{length}", run_jax, run_torch, compile_s, err, hlo)


def row_vae_decode(tmp: Path, seed: int) -> Row:
    import jax.numpy as jnp
    import torch
    from diffusers import AutoencoderKL

    batch, height, width = 1, 16, 24
    torch.manual_seed(seed)
    ref = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(64, 128, 256, 256),
        layers_per_block=2,
        latent_channels=4,
        norm_num_groups=32,
    ).eval()
    perturb_(ref, seed)
    params, fwd = pure_forward(load_ours(ref, tmp / "vae"), "decode")
    latents = np.random.default_rng(seed).standard_normal((batch, 4, height, width), dtype=np.float32)
    run_jax, compile_s, hlo = compile_jax(fwd, params, jnp.asarray(latents.transpose(0, 2, 3, 1)))
    tz = torch.from_numpy(latents)
    run_torch = lambda: ref.decode(tz).sample
    with torch.inference_mode():
        err = rel_err(run_jax(), run_torch().numpy().transpose(0, 2, 3, 1))
    shape = f"latents {batch}x{height}x{width}x4 -> {batch}x{8 * height}x{8 * width}x3, widths 64-256"
    return Row("vae_decode", shape, run_jax, run_torch, compile_s, err, hlo)


ROWS: dict[str, Callable[[Path, int], Row]] = {
    "matmul": row_matmul,
    "attention_d40": attention_row(40),
    "attention_d64": attention_row(64),
    "unet_sr2": row_unet_sr2,
    "t5": row_t5,
    "clip": row_clip,
    "vae_decode": row_vae_decode,
}


# --- timing ----------------------------------------------------------------------------------------------------------


def cpu_seconds() -> tuple[float, float] | None:
    """(CPU seconds every process has used, CPU seconds this process has used); None where /proc/stat is missing."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    own = os.times()
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK"), own.user + own.system


def time_row(row: Row, repeats: int) -> Result:
    """Medians over ``repeats`` runs of each side after one warm-up, alternating sides (order flips every repeat)."""
    import torch

    jax_times: list[float] = []
    torch_times: list[float] = []
    sides = [(row.run_jax, jax_times), (row.run_torch, torch_times)]
    with torch.inference_mode():
        for fn, _ in sides:
            fn()  # warm-up
        start, t_start = cpu_seconds(), time.perf_counter()
        for i in range(repeats):
            for fn, times in sides if i % 2 == 0 else sides[::-1]:
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
        end, wall = cpu_seconds(), time.perf_counter() - t_start
    # CPUs kept busy by other processes while this row was timed (what makes its figures noisy).
    others = None if start is None or end is None else max(0.0, (end[0] - start[0]) - (end[1] - start[1])) / wall
    flops = torch_flops(row.run_torch)
    return Result(
        row.name, row.shape, flops, row.compile_s, row.rel_err, row.custom_calls, jax_times, torch_times, others
    )


# --- --breakdown: where the time goes --------------------------------------------------------------------------------

_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (.*)$", re.M)
_CONTAINERS = {"down_blocks", "up_blocks", "mid_block", "encoder", "decoder", "text_model", "block", "layer", "layers"}
_TORCH_KINDS = (
    ("attention", ("scaled_dot_product",)),
    ("convolution", ("conv",)),
    ("matmul", ("aten::addmm", "aten::mm", "aten::bmm", "aten::baddbmm", "aten::matmul")),
)


def _module(param: str) -> str:
    """'down_blocks___2___resnets___1___conv1____kernel' -> 'resnets': the first name below the block containers."""
    parts = [p for p in re.split(r"_{3,4}", param) if p and not p.isdigit()]
    return next((p for p in parts if p not in _CONTAINERS), parts[0] if parts else "?")


def hlo_ops(hlo: str) -> dict[str, tuple[str, str]]:
    """Instruction name -> (kind, module) for every instruction of a compiled HLO module.

    kind: 'matmul' / 'convolution' (the jax primitive in the op's metadata), 'custom call <target>', or 'other';
    module: the parameter families the op reads ('transformer_in', 'resnets', ...; '-' if it reads activations only).
    Loops and conditionals are left out: their bodies' ops are timed on their own.
    """
    ops = {}
    for name, rest in _INSTRUCTION.findall(hlo):
        body, _, meta = rest.partition("metadata=")
        opcode = re.search(r"\s([\w-]+)\(", " " + body)
        if opcode and opcode.group(1) in ("while", "conditional", "call"):
            continue
        target = re.search(r'custom_call_target="([^"]+)"', body)
        primitive = re.search(r'op_name="[^"]*?([\w]+)"', meta)
        kinds = {"dot_general": "matmul", "conv_general_dilated": "convolution"}
        kind = f"custom call {target.group(1)}" if target else kinds.get(primitive and primitive.group(1), "other")
        modules = sorted({_module(p) for p in re.findall(r"%params__(\w+?)___value", body)})
        ops[name] = (kind, ",".join(modules) or "-")
    return ops


def jax_breakdown(row: Row, runs: int = 3) -> tuple[Counter, Counter]:
    """(ms per call by kind, ms per call by (kind, module)) from a ``jax.profiler`` trace of ``runs`` calls."""
    import jax

    ops = hlo_ops(row.hlo)
    with tempfile.TemporaryDirectory(prefix="compare_torch_trace_") as folder:
        jax.profiler.start_trace(folder, create_perfetto_trace=True)
        for _ in range(runs):
            row.run_jax()
        jax.profiler.stop_trace()
        (trace,) = Path(folder).rglob("perfetto_trace.json.gz")
        events = json.loads(gzip.decompress(trace.read_bytes()))["traceEvents"]
    by_kind, by_module = Counter(), Counter()
    for e in events:
        if e.get("ph") == "X" and e.get("name") in ops:
            kind, module = ops[e["name"]]
            by_kind[kind] += e["dur"] / 1e3 / runs
            by_module[(kind, module)] += e["dur"] / 1e3 / runs
    return by_kind, by_module


def torch_breakdown(row: Row, runs: int = 3) -> tuple[Counter, Counter]:
    """(ms per call by kind, ms per call by aten op) from ``torch.profiler`` (self CPU time of the calling thread)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(runs):
            row.run_torch()
    by_kind, by_op = Counter(), Counter()
    for e in prof.key_averages():
        kind = next((k for k, names in _TORCH_KINDS if any(n in e.key for n in names)), "other")
        by_kind[kind] += e.self_cpu_time_total / 1e3 / runs
        by_op[e.key] += e.self_cpu_time_total / 1e3 / runs
    return by_kind, by_op


def breakdown_text(name: str, jax_parts: tuple[Counter, Counter], torch_parts: tuple[Counter, Counter]) -> str:
    def shares(counter: Counter, top: int, label=str) -> str:
        total = sum(counter.values()) or 1.0
        return ", ".join(f"{label(k)} {v:.0f} ms ({v / total:.0%})" for k, v in counter.most_common(top))

    (jk, jm), (tk, to) = jax_parts, torch_parts
    return (
        f"{name}\n  JAX ops {sum(jk.values()):.0f} ms: {shares(jk, 8)}\n"
        f"    by module: {shares(jm, 10, lambda k: f'{k[1]} {k[0]}')}\n"
        f"  PyTorch ops {sum(tk.values()):.0f} ms: {shares(tk, 8)}\n    by op: {shares(to, 10)}"
    )


# --- the table -------------------------------------------------------------------------------------------------------


def table(results: list[Result]) -> str:
    """The markdown table; GFLOP/s with its share of the peak: the best GEMM rate of either library (matmul row)."""
    peak = max((r.flops / min(r.jax_times + r.torch_times) for r in results if r.name == "matmul"), default=None)

    def rate(flops: float, seconds: float) -> str:
        r = flops / seconds
        return f"{r / 1e9:.1f}" + (f" ({100 * r / peak:.0f}%)" if peak else "")

    lines = [
        "| row | computation | max rel err | JAX compile (s) | JAX (ms) | PyTorch (ms) | JAX / PyTorch | GFLOP "
        "| JAX GFLOP/s (% peak) | PyTorch GFLOP/s (% peak) | other load |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        err = "-" if r.rel_err is None else f"{r.rel_err:.1e}"
        cells = [r.name, r.shape, err, f"{r.compile_s:.2f}", f"{1e3 * r.jax_s:.1f}", f"{1e3 * r.torch_s:.1f}"]
        cells += [f"{r.jax_s / r.torch_s:.2f}", f"{r.flops / 1e9:.2f}"]
        cells += [
            rate(r.flops, r.jax_s),
            rate(r.flops, r.torch_s),
            "-" if r.other_load is None else f"{r.other_load:.1f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def conditions(results: list[Result], threads: int, repeats: int) -> str:
    """One paragraph (wrapped at 120): date, machine, versions, method, and custom calls in the JAX programs."""
    import diffusers
    import jax
    import torch
    import transformers

    calls = "; ".join(f"{r.name}: `{'`, `'.join(r.custom_calls)}`" for r in results if r.custom_calls) or "none"
    text = (
        f"Measured {datetime.date.today().isoformat()} on {cpu_name()} ({os.cpu_count()} CPUs), {threads} thread(s) "
        f"for each library; jax {jax.__version__}, torch {torch.__version__}, diffusers {diffusers.__version__}, "
        f"transformers {transformers.__version__}; float32; medians of {repeats} alternating runs after a warm-up. "
        "Other load: CPUs kept busy by other processes while the row was timed (/proc/stat); PyTorch's OpenMP "
        "threads spin-wait and slow down several-fold when it is not ~0. Custom calls in the compiled JAX programs: "
        f"{calls}."
    )
    busiest = max((r.other_load for r in results if r.other_load is not None), default=0.0)
    if busiest > (os.cpu_count() or threads) - threads + BUSY:  # more threads than free CPUs
        text += (
            f" **Taken on a busy machine (other processes kept up to {busiest:.1f} CPUs busy): PyTorch's rows with "
            "many small ops are inflated by OpenMP spin-waiting; rerun on a quiet machine (or with fewer threads) "
            "before comparing.**"
        )
    return textwrap.fill(text, width=120, break_on_hyphens=False)


def update_readme(text: str, path: Path = README) -> None:
    """Replace the block between the markers; without them, add the section before ``## Layout`` (or at the end)."""
    readme = path.read_text()
    block = f"{START}\n{text}\n{END}"
    if START in readme and END in readme:
        head, rest = readme.split(START, 1)
        readme = head + block + rest.split(END, 1)[1]
    else:
        intro = textwrap.fill(
            "`bench/compare_torch.py` times show1-jax (jitted) against the PyTorch reference classes (diffusers / "
            "transformers, eager) in one process, with identical weights loaded through `load_component`, on "
            "CPU-sized models (the script's docstring describes the rows). Regenerate it with a bench venv outside "
            "the repository (pins in `bench/requirements.txt`):",
            width=120,
            break_on_hyphens=False,
        )
        section = f"\n{SECTION}\n\n{intro}\n\n```bash\n{COMMAND}\n```\n\n{block}\n"
        if "\n## Layout\n" in readme:
            head, tail = readme.split("\n## Layout\n", 1)
            readme = head.rstrip("\n") + "\n" + section + "\n## Layout\n" + tail
        else:
            readme = readme.rstrip("\n") + "\n" + section
    path.write_text(readme)


# --- command line ----------------------------------------------------------------------------------------------------


def pin_threads(threads: int) -> None:
    """Give both libraries ``threads`` threads. Must run before jax and torch are imported: XLA sizes its CPU thread
    pool from the CPUs this process may use, so fewer threads than CPUs means pinning the process."""
    cpus = sorted(os.sched_getaffinity(0))
    if threads > len(cpus):
        raise SystemExit(f"--threads {threads}: this process may use only {len(cpus)} CPUs")
    if threads < len(cpus):
        os.sched_setaffinity(0, cpus[:threads])
    import torch

    torch.set_num_threads(threads)
    torch.set_num_interop_threads(1)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS), help="rows to run (default: all)")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per side and row (default 5)")
    ap.add_argument("--threads", type=int, default=2, help="threads for XLA and for PyTorch (default 2)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--update-readme", action="store_true", help=f"rewrite the table in {README.name}")
    ap.add_argument("--breakdown", action="store_true", help="profile the model rows per op on both sides")
    args = ap.parse_args(argv)
    if "matmul" not in args.rows:
        args.rows.insert(0, "matmul")  # the peak every row is measured against
    pin_threads(args.threads)
    import jax

    jax.config.update("jax_platforms", "cpu")  # a CPU comparison, even where an accelerator is present

    results, breakdowns = [], []
    with tempfile.TemporaryDirectory(prefix="compare_torch_") as tmp:
        for name in args.rows:
            t0 = time.perf_counter()
            row = ROWS[name](Path(tmp), args.seed)
            res = time_row(row, args.repeats)
            results.append(res)
            if args.breakdown and not name.startswith(("matmul", "attention")):  # model rows
                breakdowns.append(breakdown_text(name, jax_breakdown(row), torch_breakdown(row)))
            del row
            gc.collect()  # the row's models are gone
            err = "" if res.rel_err is None else f", max rel err {res.rel_err:.1e}"
            others = "" if res.other_load is None else f", other load {res.other_load:.1f}"
            print(
                f"{name}: JAX {1e3 * res.jax_s:.1f} ms, PyTorch {1e3 * res.torch_s:.1f} ms, compile "
                f"{res.compile_s:.2f} s{err}{others} ({time.perf_counter() - t0:.0f} s)",
                file=sys.stderr,
                flush=True,
            )
    text = table(results) + "\n\n" + conditions(results, args.threads, args.repeats)
    print(text)
    if breakdowns:
        print("\nPer-op breakdown (ms per call, profiled; the profilers add overhead):\n" + "\n".join(breakdowns))
    if args.update_readme:
        update_readme(text)
        print(f"\nwrote the table into {README}", file=sys.stderr)


if __name__ == "__main__":
    main()
