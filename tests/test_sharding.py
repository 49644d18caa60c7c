"""Sharding by rules on 8 virtual CPU devices (tests/conftest.py): meshes, the rules table, parameter placement,
sharded forwards equal to single-device ones, and the multi-host helpers.

Sharded vs single device, float32, max|sharded - single| / max|single| (measured): UNets 1.3e-6 .. 1.7e-6 (sharded
reductions and gathered statistics change the summation order), text encoders 3.2e-7 .. 7.8e-7, VAE 9.5e-7, a
3-step sampler loop 2.7e-6; tolerance 1e-5.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from show1_jax import functional, load_component
from show1_jax import sharding as sh
from show1_jax.clip import CLIPTextConfig, CLIPTextModel
from show1_jax.loading import save_converted, save_released
from show1_jax.sampler import concat_cond_channels, sample
from show1_jax.schedulers import load_scheduler_config, make_schedule
from show1_jax.t5 import T5Config, T5EncoderModel
from show1_jax.unet3d import UNet2DConditionModel, UNet3DConditionModel, UNetConfig
from show1_jax.vae import AutoencoderKL, VAEConfig

TOL = 1e-5
SMALL = 2**10  # threshold that splits the tiny models' parameters

PIXEL = UNetConfig(
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
SR1_LIKE = dataclasses.replace(PIXEL, in_channels=6, class_embed_type="timestep", time_embedding_act_fn="gelu")
IF2_LIKE = dataclasses.replace(
    SR1_LIKE,
    temporal=False,
    down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
    up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
    mid_block_type="UNetMidBlock2DSimpleCrossAttn",
)
LATENT = UNetConfig(
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
    up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"),
    mid_block_type="UNetMidBlock3DCrossAttn",
    block_out_channels=(32, 64),
    layers_per_block=1,
    norm_num_groups=16,
    attention_head_dim=8,
    cross_attention_dim=48,
    use_linear_projection=True,
    transfromer_in_opt=True,
)
T5_TINY = T5Config(vocab_size=96, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, dense_act_fn="gelu_new")
CLIP_TINY = CLIPTextConfig(
    vocab_size=128, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4
)
VAE_TINY = VAEConfig(
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    block_out_channels=(32, 64),
    layers_per_block=1,
    norm_num_groups=16,
)


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def normal(i: int, shape, dtype=jnp.float32) -> jax.Array:
    return jax.random.normal(jax.random.key(i), shape, dtype)


@pytest.fixture(scope="module")
def meshes() -> dict[str, jax.sharding.Mesh]:
    assert jax.device_count() == 8, "tests/conftest.py must give 8 virtual CPU devices"
    return {"fsdp8": sh.make_mesh("fsdp=8"), "data2fsdp4": sh.make_mesh("data=2,fsdp=4")}


# --- mesh and rules ----------------------------------------------------------------------------------------------


def test_mesh_from_configuration():
    assert dict(sh.make_mesh("data=2,fsdp=4").shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    assert dict(sh.make_mesh().shape) == {"data": 1, "fsdp": 8, "tensor": 1}  # fsdp=-1 takes every device
    assert dict(sh.make_mesh({"data": 2, "tensor": 2}).shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert dict(sh.make_mesh("fsdp=2", devices=jax.devices()[:2]).shape) == {"data": 1, "fsdp": 2, "tensor": 1}
    axis_types = sh.make_mesh("fsdp=8").axis_types
    assert all(t == jax.sharding.AxisType.Auto for t in axis_types)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("data=3,fsdp=2", "uses 6 devices but 8 are available"),
        ("data=3,fsdp=-1", "not divisible"),
        ("data=-1,fsdp=-1", "only one mesh axis may be -1"),
        ("model=2", "unknown mesh axis 'model'"),
        ("fsdp", "must look like axis=size"),
        ("fsdp=0", "must be positive"),
    ],
)
def test_mesh_errors_name_the_fix(spec, message):
    with pytest.raises(sh.ShardingError, match=message):
        sh.make_mesh(spec)


def test_rules_errors_name_the_fix(meshes):
    mesh = meshes["fsdp8"]
    two_axes = jax.make_mesh((2, 4), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    with pytest.raises(sh.ShardingError, match="sharding rule `heads` -> `tensor`: the mesh has no axis `tensor`"):
        sh.sharding_fn(two_axes)  # the default rules use `tensor`; make_mesh always has it
    with pytest.raises(sh.ShardingError, match="logical axis `emb` has no sharding rule"):
        sh.param_spec((1024, 1024), ("emb", "mlp"), mesh)
    with pytest.raises(sh.ShardingError, match="parameter `a.kernel`: logical axes"):
        sh.sharding_fn(mesh)("a.kernel", (1024, 1024), ("embed",))
    with pytest.raises(sh.ShardingError, match="give a tuple of mesh axes"):
        sh.check_rules(mesh, {"batch": "data"})


def test_parameter_specs_follow_the_rules(meshes):
    mesh = meshes["fsdp8"]
    assert sh.param_spec((4096, 10240), ("embed", "mlp"), mesh) == P(None, "fsdp")  # the largest divisible dim
    assert sh.param_spec((10240, 4096), ("mlp", "embed"), mesh) == P("fsdp")
    assert sh.param_spec((3, 3, 320, 640), (None, None, "conv_in", "conv_out"), mesh) == P(None, None, None, "fsdp")
    assert sh.param_spec((512, 500), ("embed", "mlp"), mesh) == P()  # below 2**18 elements: replicated
    assert sh.param_spec((512, 500), ("embed", "mlp"), mesh, threshold=1000) == P("fsdp")  # 500 % 8 != 0
    assert sh.param_spec((6, 1000003), ("embed", "mlp"), mesh) == P()  # no dimension divisible by 8
    assert sh.param_spec((1024, 2048), None, mesh) == P(None, "fsdp")  # unnamed: any dimension
    assert sh.param_spec((2048,), ("norm",), mesh, threshold=1) == P()  # `norm` is never split
    tp = sh.make_mesh("fsdp=4,tensor=2")
    assert sh.param_spec((4096, 4096), ("embed", "heads"), tp) == P("fsdp", "tensor")
    assert sh.param_spec((4096, 4096), ("heads", "embed"), tp) == P("tensor", "fsdp")


def test_activation_specs_split_the_batch_never_channels(meshes):
    video, frames = (2, 8, 40, 64, 3), (2, 5, 40, 64, 7)
    assert sh.activation_spec(video, sh.VIDEO, meshes["data2fsdp4"]) == P("data", "fsdp")
    assert sh.activation_spec(video, sh.VIDEO, meshes["fsdp8"]) == P(None, "fsdp")  # CFG batch 2 < 8: frames
    assert sh.activation_spec(frames, sh.VIDEO, meshes["fsdp8"]) == P()  # nothing divides: replicated
    assert sh.activation_spec((16, 77, 4096), sh.TOKENS, meshes["fsdp8"]) == P("fsdp")
    assert sh.activation_spec((8, 64, 64, 1024), ("batch", None, None, "channels"), meshes["fsdp8"]) == P("fsdp")
    assert sh.activation_spec((1, 64, 64, 1024), ("batch", None, None, "channels"), meshes["fsdp8"]) == P()


def test_constrain_is_identity_outside_a_mesh_context(meshes):
    x = normal(0, (8, 4))
    assert sh.constrain(x, ("batch", None)) is x
    with sh.use_mesh_rules(meshes["fsdp8"]):
        y = jax.jit(lambda a: sh.constrain(a, ("batch", None)))(x)
    assert y.sharding.spec == P("fsdp")


# --- parameters really split, loaded directly into their shardings --------------------------------------------------


def _device_bytes(state: nnx.State) -> dict[jax.Device, int]:
    per = {d: 0 for d in jax.devices()}
    for leaf in jax.tree.leaves(state):
        for shard in leaf.addressable_shards:
            per[shard.device] += shard.data.nbytes
    return per


def test_parameters_above_threshold_are_split(meshes):
    """T5 with 512-wide layers on fsdp=8: every parameter of >= 2**18 elements is cut in 8, so a device holds about
    1/8 of the bytes (the replicated norms are 0.02%)."""
    cfg = T5Config(vocab_size=1024, d_model=512, d_kv=64, d_ff=2048, num_layers=2, num_heads=8)
    model = T5EncoderModel(cfg, rngs=nnx.Rngs(0))
    mesh = meshes["fsdp8"]
    sharded = sh.shard_model(model, mesh)
    _, state = nnx.split(sharded)
    total = sum(x.nbytes for x in jax.tree.leaves(state))
    per_device = _device_bytes(state)
    summary = sh.summarize(state, mesh)
    assert summary.total_bytes == total and summary.replicated_large == ()
    assert max(per_device.values()) == summary.per_device_bytes
    assert all(abs(b - total / 8) / (total / 8) < 0.01 for b in per_device.values())
    for path, var in nnx.to_flat_state(state):
        value = var.get_value()
        if value.size >= sh.DEFAULT_THRESHOLD:
            assert {s.data.size for s in value.addressable_shards} == {value.size // 8}, path
        else:
            assert value.sharding.is_fully_replicated, path
    wi = sharded.encoder.block[0].layer[1].DenseReluDense.wi_0.kernel.get_value()
    assert wi.sharding.spec == P(None, "fsdp")  # [d_model, d_ff]: the mlp axis, the larger
    # Tensor parallelism on the T5: heads/mlp over `tensor`, the rest over `fsdp`.
    tp = sh.shard_model(model, sh.make_mesh("fsdp=4,tensor=2"))
    assert tp.encoder.block[0].layer[0].SelfAttention.q.kernel.get_value().sharding.spec == P("fsdp", "tensor")
    assert tp.encoder.block[0].layer[0].SelfAttention.o.kernel.get_value().sharding.spec == P("tensor", "fsdp")


@pytest.mark.parametrize("fmt", ["released", "converted"])
def test_load_component_places_each_tensor_in_its_sharding(tmp_path, meshes, monkeypatch, fmt):
    model = UNet3DConditionModel(PIXEL, rngs=nnx.Rngs(1))
    folder = (save_released if fmt == "released" else save_converted)(model, tmp_path / "unet")
    mesh = meshes["data2fsdp4"]
    placed = []
    if fmt == "released":  # each tensor goes through make_array_from_callback: devices receive only their slice
        real = jax.make_array_from_callback

        def spy(shape, sharding, callback):
            placed.append(sharding)
            return real(shape, sharding, callback)

        monkeypatch.setattr(jax, "make_array_from_callback", spy)
    loaded = load_component(folder, sharding=sh.sharding_fn(mesh, threshold=SMALL))
    expected = sh.param_shardings(model, mesh, threshold=SMALL)
    _, state = nnx.split(loaded)
    flat_expected = dict(nnx.to_flat_state(expected))
    n_split = 0
    for path, var in nnx.to_flat_state(state):
        value, want = var.get_value(), flat_expected[path].get_value()
        assert value.sharding.is_equivalent_to(want, value.ndim), path
        n_split += not value.sharding.is_fully_replicated
    assert n_split > 20
    if fmt == "released":
        assert len(placed) == len(flat_expected) and all(isinstance(s, NamedSharding) for s in placed)
    for a, b in zip(jax.tree.leaves(nnx.split(model)[1]), jax.tree.leaves(state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# --- sharded results equal single-device results ---------------------------------------------------------------------


def _unet_inputs(cfg: UNetConfig, batch: int = 2, frames: int = 8, size: int = 16):
    shape = (batch, size, size, cfg.in_channels) if not cfg.temporal else (batch, frames, size, size, cfg.in_channels)
    text_dim = cfg.encoder_hid_dim or cfg.cross_attention_dim
    args = [normal(1, shape), jnp.array([10, 500][:batch], jnp.int32), normal(2, (batch, 7, text_dim))]
    if cfg.class_embed_type:
        args.append(jnp.array([250] * batch, jnp.int32))
    return args


@pytest.mark.parametrize(
    "name, cfg, mesh_name",
    [
        ("pixel", PIXEL, "data2fsdp4"),
        ("pixel", PIXEL, "fsdp8"),
        ("sr1", SR1_LIKE, "fsdp8"),
        ("if2", IF2_LIKE, "data2fsdp4"),
        ("latent", LATENT, "data2fsdp4"),
    ],
)
def test_unet_forward_sharded_equals_single_device(meshes, name, cfg, mesh_name):
    cls = UNet2DConditionModel if not cfg.temporal else UNet3DConditionModel
    model = cls(cfg, rngs=nnx.Rngs(3))
    graphdef, params = functional.split(model)
    args = _unet_inputs(cfg)

    def call(p, x, t, text, *labels):
        return functional.pure(graphdef)(p, x, t, text, class_labels=labels[0] if labels else None)

    single = jax.jit(call)(params, *args)
    mesh = meshes[mesh_name]
    sample_axes = sh.VIDEO if cfg.temporal else sh.IMAGE
    in_axes = (sh.param_shardings(params, mesh, threshold=SMALL), sample_axes, sh.BATCH, sh.TOKENS)
    fn = sh.jit_sharded(call, mesh, in_axes=in_axes + (sh.BATCH,) * (len(args) - 3), out_axes=sample_axes)
    sharded_params = jax.device_put(params, sh.param_shardings(params, mesh, threshold=SMALL))
    out = fn(sharded_params, *args)
    assert out.sharding.spec == sh.activation_spec(out.shape, sample_axes, mesh)
    assert not out.sharding.is_fully_replicated
    assert rel_err(out, single) <= TOL


def test_text_encoders_under_jit_with_shardings(meshes):
    mesh = meshes["data2fsdp4"]
    ids = jax.random.randint(jax.random.key(4), (8, 77), 0, 96)
    mask = (jnp.arange(77)[None] < jnp.array([77, 5, 20, 77, 1, 3, 40, 77])[:, None]).astype(jnp.int32)
    t5 = T5EncoderModel(T5_TINY, rngs=nnx.Rngs(5))
    encode, params = sh.sharded_apply(t5, mesh, in_axes=(sh.BATCH, sh.BATCH), out_axes=sh.TOKENS, threshold=SMALL)
    out = encode(params, ids, mask)
    assert out.sharding.spec == P(("data", "fsdp"))
    assert rel_err(out, t5(ids, mask)) <= TOL

    clip = CLIPTextModel(CLIP_TINY, rngs=nnx.Rngs(6))
    encode, params = sh.sharded_apply(clip, mesh, in_axes=(sh.BATCH,), out_axes=sh.BATCH, threshold=SMALL)
    out = encode(params, ids)
    ref = clip(ids)
    assert out.last_hidden_state.sharding.spec == P(("data", "fsdp"))
    assert rel_err(out.last_hidden_state, ref.last_hidden_state) <= TOL
    assert rel_err(out.pooler_output, ref.pooler_output) <= TOL


def test_vae_decode_sharded_equals_single_device(meshes):
    vae = AutoencoderKL(VAE_TINY, rngs=nnx.Rngs(7))
    latents = normal(8, (2, 8, 8, 8, 4))
    ref = vae.decode_video(latents, frames_per_chunk=2)
    decode, params = sh.sharded_apply(
        vae,
        meshes["data2fsdp4"],
        method=lambda m, z: m.decode_video(z, frames_per_chunk=2),
        in_axes=(sh.VIDEO,),
        out_axes=sh.VIDEO,
        threshold=SMALL,
    )
    out = decode(params, latents)
    assert out.sharding.spec == P("data", "fsdp")
    assert rel_err(out, ref) <= TOL


PIXEL_DPM = {
    "_class_name": "DPMSolverMultistepScheduler",
    "algorithm_type": "dpmsolver++",
    "beta_schedule": "squaredcos_cap_v2",
    "num_train_timesteps": 1000,
    "solver_order": 2,
    # Dynamic thresholding clips at a quantile of |x0|, which jumps when float noise reorders values: with it the
    # sharded loop differs by 3.9e-5 (one denoiser call: 1.5e-6); without, 2.7e-6.
    "thresholding": False,
    "variance_type": "fixed_small",
}


def test_sampler_loop_sharded_equals_single_device(meshes):
    """Three DPM-Solver++ steps of an SR1-like UNet with CFG: the sample is [B=1]; the CFG batch of 2 is built
    inside the loop and pinned to its batch sharding with `constrain`."""
    model = UNet3DConditionModel(SR1_LIKE, rngs=nnx.Rngs(9))
    graphdef, params = functional.split(model)
    unet = functional.pure(graphdef)
    schedule = make_schedule(load_scheduler_config(PIXEL_DPM), 3)

    def denoise(p, x_in, t, cond):
        x_in = sh.constrain(x_in, sh.VIDEO)  # [2B, F, H, W, C]: the CFG-doubled batch
        return unet(p, x_in, t, cond["text"], class_labels=cond["noise_level"])

    def loop(p, x, cond):
        return sample(
            denoise,
            p,
            schedule,
            x,
            cond,
            guidance_scale=7.0,
            model_input_fn=lambda x_cfg, c: concat_cond_channels(x_cfg, c["upscaled"]),
        )

    x = normal(10, (1, 4, 16, 16, 3))
    cond = {"text": normal(11, (2, 7, 32)), "noise_level": jnp.array([250, 250]), "upscaled": normal(12, x.shape)}
    single = jax.jit(loop)(params, x, cond)
    mesh = meshes["data2fsdp4"]
    shardings = sh.param_shardings(params, mesh, threshold=SMALL)
    run = sh.jit_sharded(loop, mesh, in_axes=(shardings, sh.VIDEO, sh.BATCH), out_axes=sh.VIDEO)
    out = run(jax.device_put(params, shardings), x, cond)
    assert out.sharding.spec == P(None, "fsdp")
    assert rel_err(out, single) <= TOL


def test_jit_sharded_reuses_its_compilation(meshes):
    fn = sh.jit_sharded(lambda a, b: a * 2 + b, meshes["fsdp8"], in_axes=(sh.BATCH, None), out_axes=sh.BATCH)
    a, b = normal(0, (8, 3)), normal(1, (3,))
    np.testing.assert_allclose(fn(a, b), a * 2 + b, rtol=1e-6)
    fn(a + 1, b)
    assert len(fn._jitted) == 1
    fn(normal(2, (16, 3)), b)
    assert len(fn._jitted) == 2
    with pytest.raises(TypeError, match="takes 2 arguments"):
        fn(a)


# --- multi-host helpers ----------------------------------------------------------------------------------------------


class _FakeDistributed:
    def __init__(self):
        self.calls = []

    def initialize(self, **kwargs):
        self.calls.append(kwargs)

    def is_initialized(self):
        return False


@pytest.mark.parametrize(
    "env, args, expected",
    [
        ({}, {}, None),
        ({"SLURM_NTASKS": "1"}, {}, None),
        (
            {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"},
            {},
            {"coordinator_address": "10.0.0.1:1234", "num_processes": 2, "process_id": 1},
        ),
        (
            {},
            {"coordinator_address": "h:1", "num_processes": 4, "process_id": 0},
            {"coordinator_address": "h:1", "num_processes": 4, "process_id": 0},
        ),
        ({"TPU_WORKER_HOSTNAMES": "t1,t2,t3,t4"}, {}, {"coordinator_address": None}),
        ({"SLURM_NTASKS": "16"}, {}, {"coordinator_address": None}),
        ({"SHOW1_DISTRIBUTED": "auto"}, {}, {"coordinator_address": None}),
    ],
)
def test_initialize_distributed_only_when_multi_process(monkeypatch, env, args, expected):
    fake = _FakeDistributed()
    monkeypatch.setattr(jax, "distributed", fake)
    started = sh.initialize_distributed(**args, environ=env)
    if expected is None:
        assert not started and fake.calls == []
    else:
        assert started and len(fake.calls) == 1
        assert {k: fake.calls[0][k] for k in expected} == expected


def test_initialize_distributed_errors_name_the_fix(monkeypatch):
    monkeypatch.setattr(jax, "distributed", _FakeDistributed())
    with pytest.raises(sh.ShardingError, match="JAX_COORDINATOR_ADDRESS"):
        sh.initialize_distributed(num_processes=2, process_id=0, environ={})
    with pytest.raises(sh.ShardingError, match="process_id=3 must be in"):
        sh.initialize_distributed("h:1", 2, 3, environ={})
    with pytest.raises(sh.ShardingError, match="must be an integer"):
        sh.initialize_distributed(environ={"JAX_NUM_PROCESSES": "two", "JAX_COORDINATOR_ADDRESS": "h:1"})


def test_host_local_batch_to_global_array(meshes):
    mesh = meshes["data2fsdp4"]
    local = np.asarray(normal(13, (8, 77, 16)))  # one process: its rows are the whole batch
    global_ = sh.host_local_to_global(local, mesh, sh.TOKENS)
    assert global_.shape == local.shape and global_.sharding.spec == P(("data", "fsdp"))
    np.testing.assert_array_equal(sh.to_host(global_), local)
