"""The plan (show1_jax/plan.py) on small models: its FLOP counter against XLA's, its figures against a real compile
of the same program, the mesh figures, the command line, and the attention chunking it relies on (golden parity).

The full-size plan itself is run by ``show1 plan`` (minutes); one slow test guards the issue-7 memory target of the
riskiest stage (SR2).
"""

from __future__ import annotations

import dataclasses
import json
import math

import golden
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from show1_jax import functional, load_component
from show1_jax import plan as P
from show1_jax import sharding as sh
from show1_jax.configs import config_to_dict
from show1_jax.layers import attention, set_attention_chunk, set_attention_implementation
from show1_jax.unet3d import UNet3DConditionModel, UNetConfig

TINY = UNetConfig(
    in_channels=3,
    out_channels=6,
    down_block_types=("ResnetDownsampleBlock3D", "SimpleCrossAttnDownBlock3D"),
    up_block_types=("SimpleCrossAttnUpBlock3D", "ResnetUpsampleBlock3D"),
    mid_block_type="UNetMidBlock3DSimpleCrossAttn",
    block_out_channels=(32, 64),
    layers_per_block=1,
    act_fn="gelu",
    attention_head_dim=16,
    cross_attention_dim=64,
    encoder_hid_dim=32,
    addition_embed_type="text",
    addition_embed_type_num_heads=4,
    resnet_time_scale_shift="scale_shift",
    cross_attention_norm="group_norm",
)
TINY_STAGE = dataclasses.replace(P.STAGES["base"], shape=(2, 8, 16, 16, 3), text=(2, 7, 32))


def one_device_mesh() -> jax.sharding.Mesh:
    return sh.make_mesh("fsdp=1", devices=jax.devices()[:1])


def compiled_flops(fn, *args) -> float:
    return P._cost(jax.jit(fn).lower(*args).compile().cost_analysis())["flops"]


# --- the FLOP counter ------------------------------------------------------------------------------------------------


def test_flop_counter_is_xla_plus_zero_padding_taps():
    """On dots and convolutions alone, XLA's cost_analysis equals 2 x MAC minus the taps that fall on padding."""
    x = jax.ShapeDtypeStruct((2, 16, 16, 8), jnp.float32)
    w = jax.ShapeDtypeStruct((8, 32), jnp.float32)
    k = jax.ShapeDtypeStruct((3, 3, 8, 16), jnp.float32)

    def f(x, w, k):
        same = jax.lax.conv_general_dilated(x, k, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))
        vae_down = jax.lax.conv_general_dilated(  # the VAE's stride-2 conv after a (0, 1) pad
            x, k, (2, 2), ((0, 1), (0, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        return x @ w, same, vae_down

    count = P.count_flops(jax.make_jaxpr(f)(x, w, k))
    assert count.dot == 2 * (2 * 16 * 16) * 32 * 8
    taps_same = (16 * 3) ** 2  # per output channel and image: 16 positions x 3 taps, per spatial dim
    taps_down = (8 * 3) ** 2
    assert count.conv == 2 * 2 * 16 * 8 * (taps_same + taps_down)
    valid_same, valid_down = (16 * 3 - 2) ** 2, (8 * 3 - 1) ** 2  # 2 padded taps at the edges; 1 for (0, 1)
    assert count.conv_padding == 2 * 2 * 16 * 8 * (taps_same - valid_same + taps_down - valid_down)
    assert count.total - count.conv_padding == compiled_flops(f, x, w, k)


def test_flop_counter_multiplies_loops():
    """A scan of 5 matmuls counts 5 times (XLA's cost_analysis counts a loop body once)."""
    w = jax.ShapeDtypeStruct((64, 64), jnp.float32)

    def f(w):
        return jax.lax.scan(lambda c, _: (c @ w, None), jnp.ones((4, 64)), None, length=5)[0]

    assert P.count_flops(jax.make_jaxpr(f)(w)).dot == 5 * 2 * 4 * 64 * 64
    assert compiled_flops(f, w) < 2 * 2 * 4 * 64 * 64  # one body


def test_attention_logits_are_found_in_compiled_hlo():
    """The logits block per step (chunked or not), and whether XLA:CPU fused it away (dot -> softmax -> dot).

    Plans compile the plain ("xla") attention, whose matmuls they read (never the CPU kernel's custom call).
    """
    q = jax.ShapeDtypeStruct((6, 40, 32), jnp.float32)
    # 12800: blocks of 10 queries of all 6 sequences; 1280: 1 query of all 6; 500: 1 query of 3 sequences
    for chunk, biggest in (
        (None, 6 * 4 * 40 * 40),
        (12800, 6 * 4 * 10 * 40),
        (1280, 6 * 4 * 1 * 40),
        (500, 3 * 4 * 40),
    ):
        fn = lambda a, b, c: attention(a, b, c, 4, chunk=chunk, implementation="xla")  # noqa: B023
        hlo = jax.jit(fn).lower(q, q, q).compile().as_text()
        largest, fused = P.attention_logits(hlo)
        assert largest == biggest and fused in (0, biggest)  # XLA:CPU fuses the larger ones away
    materialised = """
%fused_computation (p: f32[2,2]) -> f32[2,2] {
  ROOT %dot.1 = f32[2,2]{1,0} dot(%p, %p), metadata={op_name="jit(f)/NHQD,NHKD->NHQK/dot_general"}
}
ENTRY %main (x: f32[2,2]) -> f32[8,1,16,16] {
  %fusion = f32[2,2]{1,0} fusion(%x), kind=kOutput, calls=%fused_computation
  ROOT %copy = f32[8,1,16,16]{3,2,1,0} copy(%b), metadata={op_name="jit(f)/NHQD,NHKD->NHQK/dot_general"}
}"""
    assert P.attention_logits(materialised) == (8 * 16 * 16, 0)


# --- a stage against a real compile ---------------------------------------------------------------------------------


def _tiny_call_and_args():
    model = UNet3DConditionModel(TINY, rngs=nnx.Rngs(0))
    set_attention_implementation(model, "xla")  # as plans compile it (XLA counts no FLOPs in the CPU kernel)
    graphdef, params = functional.split(model)
    args = (
        jax.random.normal(jax.random.key(1), TINY_STAGE.shape),
        jnp.array([10, 500], jnp.int32),
        jax.random.normal(jax.random.key(2), TINY_STAGE.text),
    )
    return model, functional.pure(graphdef), params, args


def test_plan_of_a_tiny_unet_matches_a_real_compile():
    model, fn, params, args = _tiny_call_and_args()
    report = P.plan_stage(TINY_STAGE, dtype=jnp.float32, mesh=one_device_mesh(), config=("UNet3DConditionModel", TINY))
    leaves = jax.tree.leaves(params)
    assert report.param_count == sum(x.size for x in leaves)
    assert report.param_bytes_total == report.param_bytes == sum(x.nbytes for x in leaves)
    # FLOPs: our count of the same jaxpr; XLA's figure of the same (unoptimised) program, exactly.
    assert report.flops == P.count_flops(jax.make_jaxpr(fn)(params, *args)).total
    assert report.xla_flops == P._cost(jax.jit(fn).lower(params, *args).cost_analysis())["flops"]
    # The compiled module adds elementwise FLOPs to 2xMAC without the padding taps (measured +9% at this size).
    xla = compiled_flops(fn, params, *args)
    assert report.flops - report.flops_conv_padding <= xla <= 1.2 * (report.flops - report.flops_conv_padding)
    # Bytes: XLA's memory analysis of the same program compiled directly.
    mem = jax.jit(fn).lower(params, *args).compile().memory_analysis()
    assert report.argument_bytes == mem.argument_size_in_bytes
    assert report.output_bytes == mem.output_size_in_bytes == math.prod(TINY_STAGE.shape[:-1]) * 6 * 4
    assert report.temp_bytes == mem.temp_size_in_bytes
    assert report.proxy_temp_bytes is None  # float32: nothing to correct
    assert report.attention_logits == 2 * 8 * 4 * (8 * 8) * (8 * 8 + 7)  # [B*F, heads, H*W, 7 text + H*W] at 8x8
    assert report.attention_logits_fused in (0, report.attention_logits)  # added only if XLA:CPU fused it away
    transient = report.attention_logits_fused * (2 * 4 + 4)
    assert report.estimate_peak_bytes == report.argument_bytes + report.output_bytes + report.temp_bytes + transient


def test_plan_in_bfloat16_compiles_a_float32_proxy():
    report = P.plan_stage(TINY_STAGE, dtype=jnp.bfloat16, mesh=one_device_mesh(), config=("UNet3DConditionModel", TINY))
    assert report.proxy_temp_bytes is not None  # XLA:CPU upcasts 16-bit matmul operands: temps from float32
    assert report.param_bytes_total == 2 * sum(x.size for x in jax.tree.leaves(_tiny_call_and_args()[2]))
    assert report.estimate_peak_bytes == (
        report.argument_bytes
        + report.output_bytes
        + report.proxy_temp_bytes
        + report.attention_logits_fused * (2 * 2 + 4)
    )


def test_plan_on_eight_devices_splits_parameters_and_compute():
    mesh = sh.make_mesh("fsdp=8")
    report = P.plan_stage(
        TINY_STAGE, dtype=jnp.float32, mesh=mesh, threshold=2**10, config=("UNet3DConditionModel", TINY)
    )
    model = UNet3DConditionModel(TINY, rngs=nnx.Rngs(0))
    summary = sh.summarize(model, mesh, threshold=2**10)
    assert report.param_bytes == summary.per_device_bytes < summary.total_bytes / 4
    assert report.compute_split == 8  # the 8 frames of the CFG batch of 2
    assert report.collective_bytes > 0  # FSDP gathers the weights
    single = P.plan_stage(TINY_STAGE, dtype=jnp.float32, mesh=one_device_mesh(), config=("UNet3DConditionModel", TINY))
    assert report.flops == single.flops
    assert report.argument_bytes < single.argument_bytes / 4


def test_tables_and_roofline_smoke():
    report = P.plan_stage(TINY_STAGE, dtype=jnp.float32, mesh=one_device_mesh(), config=("UNet3DConditionModel", TINY))
    text = P.format_tables([report], device_memory_gib=1.0, accelerators=("tpu-v5e", "h100"))
    assert "| base |" in text and "ESTIMATE" in text and "H100 SXM ms/call" in text
    h100 = P.ACCELERATORS["h100"]
    assert report.per_call_seconds(h100) == max(report.flops / 989e12, report.param_bytes_total / 3350e9)


def test_plan_command_with_a_manifest_folder(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(P.STAGES, "base", TINY_STAGE)  # the tiny model's text width
    raw = {"_class_name": "UNet3DConditionModel", **config_to_dict(TINY)}
    (tmp_path / "base.config.json").write_text(json.dumps(raw))
    out_json = tmp_path / "plan.json"
    code = P.main(
        ["--stages", "base", "--manifests", str(tmp_path), "--dtype", "float32", "--no-cache", "--json", str(out_json)]
        + ["--accelerators", "h100", "--attention-chunk", "2**12"]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "| base |" in printed and "blocks of at most 4096 logits" in printed
    (saved,) = json.loads(out_json.read_text())
    assert saved["stage"] == "base" and saved["attention_chunk"] == 4096 and saved["attention_logits"] <= 4096


def test_plan_reports_missing_configs(tmp_path):
    with pytest.raises(FileNotFoundError, match="pass --weights ROOT"):
        P.stage_config(P.STAGES["sr2"], manifests=tmp_path)
    with pytest.raises(SystemExit, match="uses 3 devices but 8"):
        P.main(["--mesh", "fsdp=3", "--stages", "base"])


def test_plan_caches_reports(tmp_path, monkeypatch):
    raw = {"_class_name": "UNet3DConditionModel", **config_to_dict(TINY)}
    (tmp_path / "base.config.json").write_text(json.dumps(raw))
    monkeypatch.setitem(P.STAGES, "base", TINY_STAGE)
    kwargs = dict(dtype=jnp.float32, mesh=one_device_mesh(), manifests=tmp_path, cache_dir=tmp_path / "cache")
    (first,) = P.plan_stages(["base"], **kwargs)
    monkeypatch.setattr(P, "plan_stage", lambda *a, **k: pytest.fail("the cached report should be reused"))
    (second,) = P.plan_stages(["base"], **kwargs)
    assert first == second


# --- attention chunking keeps golden parity --------------------------------------------------------------------------


@pytest.mark.golden
@pytest.mark.parametrize("chunk", [1, 4096])
@pytest.mark.parametrize("case", golden.model_cases("showone_unet3d", "diffusers_unet2d"))
def test_attention_chunk_keeps_unet_golden_parity(case, chunk):
    """chunk=1: every attention runs one query of one sequence at a time; 4096: blocks of queries of every sequence
    (or groups of sequences). Same tolerance as tests/test_unet.py's float32 parity (1e-5)."""
    model = load_component(case)
    assert set_attention_chunk(model, chunk) > 0
    inputs = golden.load_npz(case / "inputs.npz")
    kwargs = {"class_labels": jnp.asarray(inputs["class_labels"])} if "class_labels" in inputs else {}
    graphdef, params = functional.split(model)
    fn = jax.jit(lambda p, x, t, c, kw: functional.pure(graphdef)(p, x, t, c, **kw))
    out = fn(
        params,
        jnp.asarray(golden.to_jax_layout(inputs["sample"]), jnp.float32),
        jnp.asarray(inputs["timestep"]),
        jnp.asarray(inputs["encoder_hidden_states"], jnp.float32),
        kwargs,
    )
    ref = golden.to_jax_layout(golden.load_npz(case / "outputs.npz")["sample"])
    assert golden.rel_err(np.asarray(out), ref) <= 1e-5


@pytest.mark.golden
@pytest.mark.parametrize("case", golden.model_cases("diffusers_vae"))
def test_attention_chunk_keeps_vae_golden_parity(case):
    model = load_component(case)
    assert set_attention_chunk(model, 64) == 2  # the encoder's and the decoder's mid-block attention
    inputs = golden.load_npz(case / "inputs.npz")
    decoded = jax.jit(lambda z: model.decode(z))(jnp.asarray(golden.to_jax_layout(inputs["latent"]), jnp.float32))
    ref = golden.to_jax_layout(golden.load_npz(case / "outputs.npz")["decoded"])
    assert golden.rel_err(np.asarray(decoded), ref) <= 1e-5


# --- the issue-7 memory target at full size (slow) --------------------------------------------------------------------


@pytest.mark.slow
def test_sr2_fits_ten_gib_in_bfloat16_with_attention_chunks():
    """SR2 at full size (29 x 40 x 72 latents, CFG batch 2) on one device: unchunked, its spatial attention alone
    needs 58 x 64 x 2880 x 2880 logits (> 200 GiB); in blocks of 2**27 the estimate stays under 10 GiB."""
    try:
        P.stage_config(P.STAGES["sr2"])
    except FileNotFoundError as err:
        pytest.skip(str(err))
    report = P.plan_stage("sr2", dtype=jnp.bfloat16, mesh=one_device_mesh(), attention_chunk=2**27)
    assert report.flops == pytest.approx(51.73e12, rel=1e-3)  # SPEC.md §10.3
    assert report.attention_logits <= 2**27
    assert report.estimate_peak_bytes <= 10 * 2**30
