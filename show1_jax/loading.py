"""``load_component``: a released component folder (or one converted by us) -> a Flax NNX model.

The class is picked from ``config.json`` (``_class_name`` for diffusers, ``architectures`` for transformers). The
model is built abstractly (``nnx.eval_shape``: nothing is allocated or randomly initialised), every checkpoint
tensor is mapped through the family's key table (``<family>_params.py``), and each converted tensor is placed
directly where it belongs (optionally into a sharding). Any unmapped key, unfilled parameter or shape mismatch
fails the whole load with one error listing all of them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from show1_jax.configs import ConfigError, read_json
from show1_jax.keymap import CheckpointMappingError, MappingReport, Rule, format_report, plan_mapping


@dataclasses.dataclass(frozen=True)
class Family:
    """Where a model class and its key table live."""

    module: str  # defines the model class and its ``Config``
    model_class: str
    params_module: str  # defines ``key_table(config)``, optionally ``export_table``, ``check`` and ``hint``
    weights_name: str  # file name of the released format


DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
TRANSFORMERS_WEIGHTS = "model.safetensors"
FAMILIES: dict[str, Family] = {
    "UNet3DConditionModel": Family(
        "show1_jax.unet3d", "UNet3DConditionModel", "show1_jax.unet3d_params", DIFFUSERS_WEIGHTS
    ),
    "UNet2DConditionModel": Family(
        "show1_jax.unet3d", "UNet2DConditionModel", "show1_jax.unet3d_params", DIFFUSERS_WEIGHTS
    ),
    "AutoencoderKL": Family("show1_jax.vae", "AutoencoderKL", "show1_jax.vae_params", DIFFUSERS_WEIGHTS),
    "T5EncoderModel": Family("show1_jax.t5", "T5EncoderModel", "show1_jax.t5_params", TRANSFORMERS_WEIGHTS),
    "CLIPTextModel": Family("show1_jax.clip", "CLIPTextModel", "show1_jax.clip_params", TRANSFORMERS_WEIGHTS),
}

CONVERTED_MARKER = "show1_jax"  # key in a converted folder's config.json
CONVERTED_PARAMS_DIR = "params"  # orbax checkpoint directory in a converted folder


def class_name_of(raw_config: dict[str, Any], source: str = "config.json") -> str:
    """The model class a config.json describes."""
    if CONVERTED_MARKER in raw_config:
        return raw_config[CONVERTED_MARKER]["class_name"]
    name = raw_config.get("_class_name")
    if name is None and raw_config.get("architectures"):
        name = raw_config["architectures"][0]
    if name is None:
        raise ConfigError(f"{source} names no model class (no `_class_name` and no `architectures`)")
    if name not in FAMILIES:
        raise ConfigError(
            f"{source} describes a `{name}`, which show1-jax cannot load; known classes: {', '.join(sorted(FAMILIES))}"
        )
    return name


def family_of(class_name: str) -> tuple[type, Any]:
    """(model class, params module) for a class name from config.json."""
    fam = FAMILIES[class_name]
    model_cls = getattr(importlib.import_module(fam.module), fam.model_class)
    return model_cls, importlib.import_module(fam.params_module)


def build_config(raw_config: dict[str, Any], source: str = "config.json"):
    """(class name, config dataclass) from a parsed config.json."""
    name = class_name_of(raw_config, source)
    model_cls, _ = family_of(name)
    body = {k: v for k, v in raw_config.items() if k != CONVERTED_MARKER}
    return name, model_cls.config_class.from_dict(body)


def with_overrides(config: Any, overrides: Mapping[str, Any], source: str | Path) -> Any:
    """``dataclasses.replace(config, **overrides)``, refusing names that are not fields of the config (``source``
    names where the config came from, for the message)."""
    fields = {f.name for f in dataclasses.fields(config)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"config_overrides {unknown} are not fields of {source}'s model: choose from {sorted(fields)}")
    return dataclasses.replace(config, **overrides)


class AbstractRngs:
    """A stand-in for ``nnx.Rngs`` when building abstractly: every stream returns one constant key.

    With a real ``nnx.Rngs`` each draw updates a traced counter, and flax's sharding check on that tracer makes
    ``eval_shape`` of a 1.7B-parameter UNet take ~25 s instead of ~1 s. Abstract values need no distinct keys.
    """

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return lambda: jax.random.key(0)

    def __call__(self):
        return jax.random.key(0)


def abstract_model(class_name: str, config, dtype=jnp.float32) -> nnx.Module:
    """The model built with ``nnx.eval_shape``: shapes and dtypes only, nothing allocated."""
    model_cls, _ = family_of(class_name)
    return nnx.eval_shape(lambda: model_cls(config, dtype=dtype, rngs=AbstractRngs()))


def flat_params(model: nnx.Module) -> dict[str, Any]:
    """Parameter path ('a.0.b.kernel') -> value (array or ShapeDtypeStruct)."""
    _, state = nnx.split(model)
    return {".".join(str(p) for p in path): var.get_value() for path, var in nnx.to_flat_state(state)}


def param_count(model: nnx.Module) -> int:
    return int(sum(np.prod(v.shape) for v in flat_params(model).values()))


@dataclasses.dataclass
class LoadPlan:
    class_name: str
    config: Any
    model: nnx.Module  # abstract
    plan: dict[str, tuple[str, Rule]]
    report: MappingReport
    ignored: frozenset[str] = frozenset()  # checkpoint keys the family skips on purpose (tied aliases, buffers)


def plan_load(
    raw_config: dict[str, Any],
    keys_and_shapes: Iterable[tuple[str, tuple[int, ...]]],
    *,
    dtype=jnp.float32,
    source: str = "checkpoint",
) -> LoadPlan:
    """Map checkpoint names and shapes onto the abstract model of ``raw_config`` (no tensor is read).

    This is what :func:`load_component` does before reading any data, and what the full-size manifest tests run.
    """
    name, config = build_config(raw_config, source)
    model = abstract_model(name, config, dtype)
    _, params_mod = family_of(name)
    keys_and_shapes = [(k, tuple(s)) for k, s in keys_and_shapes]
    # A family may name keys to skip (``ignored_keys(config, keys)``): tied aliases, non-parameter buffers.
    ignored = (
        frozenset(params_mod.ignored_keys(config, [k for k, _ in keys_and_shapes]))
        if hasattr(params_mod, "ignored_keys")
        else frozenset()
    )
    expected = {p: tuple(v.shape) for p, v in flat_params(model).items()}
    mapped = [(k, s) for k, s in keys_and_shapes if k not in ignored]
    plan, report = plan_mapping(mapped, params_mod.key_table(config), expected)
    if hasattr(params_mod, "check"):
        report.extra_problems += params_mod.check(config, dict(keys_and_shapes))
    return LoadPlan(name, config, model, plan, report, ignored)


def _raise_if_bad(lp: LoadPlan, source: str) -> None:
    if lp.report.ok:
        return
    _, params_mod = family_of(lp.class_name)
    hint = params_mod.hint(lp.config, lp.report) if hasattr(params_mod, "hint") else ""
    raise CheckpointMappingError(
        format_report(lp.report, source=source, model=f"{lp.class_name} built from its config.json", hint=hint),
        lp.report,
    )


ShardingFn = Callable[[str, tuple[int, ...]], jax.sharding.Sharding | None]


def _sharding_of(sharding: ShardingFn | None, target: str, shape: tuple[int, ...], var) -> jax.sharding.Sharding | None:
    """Ask ``sharding`` for one parameter's placement; a callback with ``takes_logical_axes`` (such as
    ``show1_jax.sharding.sharding_fn``) also gets the parameter's logical axis names from the model."""
    if sharding is None:
        return None
    if getattr(sharding, "takes_logical_axes", False):
        return sharding(target, shape, logical_axes=var.get_metadata("out_sharding", None))
    return sharding(target, shape)


def load_component(
    path: str | Path,
    *,
    dtype=jnp.float32,
    variant: str | None = None,
    sharding: ShardingFn | None = None,
    config_overrides: dict[str, Any] | None = None,
) -> nnx.Module:
    """Load a component folder as released (or as converted by ``tools/convert_torch_weights``).

    Args:
      path: a folder with ``config.json`` and weights: ``diffusion_pytorch_model[.fp16].{safetensors,bin}``,
        ``model.safetensors``, ``pytorch_model.bin``, or a sharded ``*.index.json`` layout; or a converted folder
        (``config.json`` + ``params/`` orbax checkpoint).
      dtype: parameter and compute dtype (float32, bfloat16, or float64 under ``jax_enable_x64``).
      variant: ``"fp16"`` to require the fp16 weight files; by default the plain files are preferred.
      sharding: optional ``(param_path, shape) -> Sharding`` placing each converted tensor directly (each device
        receives only its shard); ``show1_jax.sharding.sharding_fn(mesh)`` builds one from the sharding rules.
      config_overrides: config fields replaced before the model is built, e.g. ``{"temporal_position_embedding":
        "sinusoidal"}`` to add that parameter-free frame code to a trained UNet. An override that changes a
        parameter's shape fails like any mismatched checkpoint, naming the keys.

    Returns:
      The Flax NNX model with every parameter filled from the checkpoint.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder: pass a component folder such as show-1-base/unet")
    raw = read_json(folder / "config.json")
    if config_overrides:
        with_overrides(build_config(raw, str(folder / "config.json"))[1], config_overrides, folder / "config.json")
        raw = {**raw, **config_overrides}
    if CONVERTED_MARKER in raw:
        return _load_converted(folder, raw, dtype=dtype, sharding=sharding)

    from show1_jax.checkpoint_io import open_state_dict

    with open_state_dict(folder, variant=variant) as reader:
        source = ", ".join(str(f) for f in reader.files)
        lp = plan_load(raw, [(k, reader.shape(k)) for k in reader.keys()], dtype=dtype, source=source)
        _raise_if_bad(lp, source)
        graphdef, state = nnx.split(lp.model)
        filled = []
        for path_, var in nnx.to_flat_state(state):
            target = ".".join(str(p) for p in path_)
            key, rule = lp.plan[target]
            arr = np.asarray(rule.transform(reader.get(key)))
            shard = _sharding_of(sharding, target, arr.shape, var)
            filled.append((path_, var.replace(_place(arr, dtype, shard))))
    return nnx.merge(graphdef, nnx.from_flat_state(filled))


def _place(arr: np.ndarray, dtype, shard: jax.sharding.Sharding | None) -> jax.Array:
    arr = np.ascontiguousarray(arr).astype(jnp.dtype(dtype), copy=False)
    if shard is None:
        return jnp.asarray(arr)
    # Each addressable device receives only its slice of the host array (also across processes).
    return jax.make_array_from_callback(arr.shape, shard, lambda index: arr[index])


def class_name_of_model(model: nnx.Module) -> str:
    for name, fam in FAMILIES.items():
        if fam.model_class == type(model).__name__:
            return name
    raise TypeError(f"{type(model).__name__} is not a show1-jax component")


@contextlib.contextmanager
def _atomic_folder(out_dir: str | Path):
    """Yield a temporary sibling folder that is renamed to ``out_dir`` only if the block succeeds."""
    import shutil

    out_dir = Path(out_dir).resolve()
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} exists: choose a new output folder or remove it first")
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OSError(f"cannot create {out_dir.parent}: {err}; choose a writable output folder") from err
    tmp = out_dir.with_name(out_dir.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_released(model: nnx.Module, out_dir: str | Path) -> Path:
    """Write ``model`` in the released (PyTorch/diffusers) folder format: config.json + safetensors weights.

    The key names and tensor layouts are the reference's, so the original code and :func:`load_component` both read
    the folder. Written atomically.
    """
    from safetensors.numpy import save_file

    from show1_jax.configs import config_to_dict
    from show1_jax.keymap import export_state_dict

    name = class_name_of_model(model)
    _, params_mod = family_of(name)
    params = {k: np.asarray(v) for k, v in flat_params(model).items()}
    # safetensors' numpy writer has no bfloat16: such models are written as float32.
    params = {k: v.astype(np.float32) if v.dtype == jnp.bfloat16 else v for k, v in params.items()}
    state = export_state_dict(params, params_mod.export_table(model.config))
    raw = {"_class_name": name, **config_to_dict(model.config)}
    with _atomic_folder(out_dir) as tmp:
        (tmp / "config.json").write_text(json.dumps(raw, indent=2, sort_keys=True))
        save_file(state, str(tmp / FAMILIES[name].weights_name))
    return Path(out_dir).resolve()


# --- our converted format: config.json (+ marker) and an orbax checkpoint of the parameters -----------------------


def save_converted(model: nnx.Module, out_dir: str | Path) -> Path:
    """Write ``model`` as a converted component folder (config.json + orbax ``params/``) for :func:`load_component`.

    Parameters are stored in the model's dtype. Written atomically: a failure leaves nothing behind.
    """
    import orbax.checkpoint as ocp

    from show1_jax.configs import config_to_dict

    name = class_name_of_model(model)
    raw = config_to_dict(model.config)
    raw[CONVERTED_MARKER] = {"format": 1, "class_name": name}
    with _atomic_folder(out_dir) as tmp:
        (tmp / "config.json").write_text(json.dumps(raw, indent=2, sort_keys=True))
        # Uncompressed: weights do not compress, and zstd decoding would cost more than the read (bench_load.py).
        with ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_compression=False)) as ckptr:
            ckptr.save(tmp / CONVERTED_PARAMS_DIR, args=ocp.args.PyTreeSave(flat_params(model)))
    return Path(out_dir).resolve()


def _load_converted(folder: Path, raw: dict, *, dtype, sharding: ShardingFn | None) -> nnx.Module:
    import orbax.checkpoint as ocp

    name, config = build_config(raw, str(folder / "config.json"))
    model = abstract_model(name, config, dtype)
    graphdef, state = nnx.split(model)
    flat = list(nnx.to_flat_state(state))
    targets = {}
    for path_, var in flat:
        target = ".".join(str(p) for p in path_)
        shape = tuple(var.get_value().shape)
        shard = _sharding_of(sharding, target, shape, var)
        targets[target] = jax.ShapeDtypeStruct(
            shape, jnp.dtype(dtype), sharding=shard or jax.sharding.SingleDeviceSharding(jax.devices()[0])
        )
    params_dir = (folder / CONVERTED_PARAMS_DIR).absolute()  # orbax reads no metadata from a relative path
    if not params_dir.is_dir():
        raise FileNotFoundError(f"{params_dir} is missing: the converted folder is incomplete, convert it again")
    with ocp.StandardCheckpointer() as ckptr:
        stored = ckptr.metadata(params_dir)
        stored_tree = getattr(stored, "item_metadata", stored)
        stored_keys = set(dict(stored_tree).keys())
        missing, extra = sorted(set(targets) - stored_keys), sorted(stored_keys - set(targets))
        if missing or extra:
            report = MappingReport(unmapped=extra, unfilled=missing)
            raise CheckpointMappingError(
                format_report(report, source=str(params_dir), model=f"{name} built from its config.json"), report
            )
        values = ckptr.restore(params_dir, targets)
    filled = [(p, var.replace(values[".".join(str(x) for x in p)])) for p, var in flat]
    return nnx.merge(graphdef, nnx.from_flat_state(filled))
