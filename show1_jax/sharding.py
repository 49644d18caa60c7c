"""Sharding by rules: a device mesh from configuration, one table mapping logical axes to mesh axes, parameter and
activation shardings derived from it, sharded jitted entry points and multi-host helpers.

The model code names every parameter axis logically (``out_sharding`` metadata set by ``layers.logical``:
``embed``, ``heads``, ``mlp``, ``vocab``, ``conv_in``, ``conv_out``, ``norm``); callers name activation axes the
same way (``batch``, ``frames``, ``height``, ``width``, ``length``, ``channels``). :data:`DEFAULT_RULES` is the only
place that decides which mesh axis each name may use. Parameters smaller than a threshold (default 2**18
elements, as big_vision's FSDP) are replicated; larger ones are split over ``tensor`` where their rules allow it
and over ``fsdp`` on their largest divisible dimension the rules allow. Activations are split on the batch (the
CFG-doubled batch included) over ``data`` then ``fsdp``, and on frames over what is left; never on channels
(GroupNorm statistics span channel groups).

Typical use in a stage (see docs/scaling.md)::

    mesh = make_mesh("data=1,fsdp=-1")                               # every device on fsdp
    unet = load_component(folder, dtype=jnp.bfloat16, sharding=sharding_fn(mesh))  # each device reads its shard
    graphdef, params = functional.split(unet)
    denoise = jit_sharded(
        functional.pure(graphdef), mesh,
        in_axes=(param_shardings(params, mesh), VIDEO, BATCH, TOKENS),   # params, sample, timestep, text
        out_axes=VIDEO,
    )
    eps = denoise(params, sample, timestep, text)                    # shardings resolved from the shapes

Inside a function traced by :func:`jit_sharded` (or under :func:`use_mesh_rules`), :func:`constrain` pins an
intermediate to its logical sharding, e.g. the CFG-doubled sample in a sampler's denoiser.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec, Sharding

P = PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
FSDP_AXIS = "fsdp"
DEFAULT_THRESHOLD = 2**18  # parameters with fewer elements are replicated

Rules = Mapping[str, tuple[str, ...]]

# THE table: logical axis name -> mesh axes it may be split over, in order of preference. () = never split.
DEFAULT_RULES: dict[str, tuple[str, ...]] = {
    # activations
    "batch": ("data", "fsdp"),  # the (CFG-doubled) batch
    "frames": ("fsdp",),  # frames take what the batch left (a CFG batch of 2 cannot use fsdp=8)
    "height": (),
    "width": (),
    "length": (),  # text tokens
    "channels": (),  # never: GroupNorm statistics span channel groups
    # parameters
    "embed": ("fsdp",),
    "heads": ("tensor", "fsdp"),
    "mlp": ("tensor", "fsdp"),
    "vocab": ("tensor", "fsdp"),
    "conv_in": ("fsdp",),
    "conv_out": ("fsdp",),
    "norm": (),
}

# Logical specs of the usual activations (channels last, SPEC.md §1.1).
VIDEO = P("batch", "frames", "height", "width", "channels")  # [B, F, H, W, C]
IMAGE = P("batch", "height", "width", "channels")  # [B, H, W, C]
TOKENS = P("batch", "length", "channels")  # [B, L, D] text states
BATCH = P("batch")  # [B, ...]: only the leading axis named


class ShardingError(ValueError):
    """A mesh or sharding rules that cannot work; the message says how to fix it."""


# --- mesh ------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Sizes of the mesh axes; one of them may be -1 (all remaining devices).

    ``data``: data parallelism (parameters replicated, batch split); ``fsdp``: parameters and batch/frames split
    (ZeRO-3 style, parameters gathered when used); ``tensor``: heads/mlp split inside each layer (Megatron style,
    worth it for the T5-XXL encoder, see docs/scaling.md).
    """

    data: int = 1
    fsdp: int = -1
    tensor: int = 1

    @classmethod
    def parse(cls, spec: str | Mapping[str, int] | MeshConfig | None) -> MeshConfig:
        """``"data=2,fsdp=4"`` (missing axes take their defaults), a mapping, a MeshConfig, or None (defaults)."""
        if spec is None or isinstance(spec, MeshConfig):
            return spec or cls()
        if isinstance(spec, str):
            items = {}
            for part in filter(None, (p.strip() for p in spec.split(","))):
                name, sep, value = part.partition("=")
                if not sep:
                    raise ShardingError(f"mesh `{spec}`: `{part}` must look like axis=size, e.g. data=2,fsdp=4")
                try:
                    items[name.strip()] = int(value)
                except ValueError:
                    raise ShardingError(f"mesh `{spec}`: size of `{name.strip()}` must be an integer") from None
            spec = items
        unknown = sorted(set(spec) - set(MESH_AXES))
        if unknown:
            raise ShardingError(f"unknown mesh axis {', '.join(map(repr, unknown))}; the mesh axes are {MESH_AXES}")
        return cls(**{k: int(v) for k, v in spec.items()})

    def shape(self, num_devices: int) -> tuple[int, int, int]:
        """(data, fsdp, tensor) for ``num_devices`` devices, with a -1 axis resolved."""
        sizes = dict(data=self.data, fsdp=self.fsdp, tensor=self.tensor)
        bad = {k: v for k, v in sizes.items() if v == 0 or v < -1}
        if bad:
            raise ShardingError(f"mesh axis sizes must be positive (or -1 for the rest), got {bad}")
        free = [k for k, v in sizes.items() if v == -1]
        if len(free) > 1:
            raise ShardingError(f"only one mesh axis may be -1, got {free}: give the others explicit sizes")
        fixed = math.prod(v for v in sizes.values() if v != -1)
        if free:
            if num_devices % fixed:
                raise ShardingError(
                    f"{free[0]}=-1: {num_devices} devices are not divisible by the other axes' product {fixed} "
                    f"({_describe(sizes)}): choose sizes whose product divides {num_devices}"
                )
            sizes[free[0]] = num_devices // fixed
        elif fixed != num_devices:
            raise ShardingError(
                f"mesh {_describe(sizes)} uses {fixed} devices but {num_devices} are available: make the product "
                f"equal {num_devices}, or give one axis as -1 to take the rest (e.g. data=2,fsdp=-1)"
            )
        return sizes["data"], sizes["fsdp"], sizes["tensor"]


def _describe(sizes: Mapping[str, int]) -> str:
    return " x ".join(f"{k}={v}" for k, v in sizes.items())


def make_mesh(
    config: str | Mapping[str, int] | MeshConfig | None = None, *, devices: Sequence[jax.Device] | None = None
) -> Mesh:
    """A (data, fsdp, tensor) mesh over ``devices`` (default: every device of every process).

    Axis types are Auto, so :func:`constrain` (``with_sharding_constraint``) and XLA's sharding propagation apply.
    The device order is jax.make_mesh's (topology-aware on TPU and GPU).
    """
    cfg = MeshConfig.parse(config)
    devices = list(jax.devices() if devices is None else devices)
    shape = cfg.shape(len(devices))
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)


# --- rules -----------------------------------------------------------------------------------------------------------


def check_rules(mesh: Mesh, rules: Rules) -> None:
    """Raise :class:`ShardingError` if a rule names a mesh axis the mesh lacks."""
    for name, axes in rules.items():
        if isinstance(axes, str):
            raise ShardingError(f"sharding rule `{name}`: give a tuple of mesh axes, e.g. ('{axes}',), not a string")
        for axis in axes:
            if axis not in mesh.axis_names:
                raise ShardingError(
                    f"sharding rule `{name}` -> `{axis}`: the mesh has no axis `{axis}` (its axes: "
                    f"{', '.join(mesh.axis_names)}); fix the rule or build the mesh with make_mesh"
                )


def _rule(rules: Rules, name: str | None) -> tuple[str, ...]:
    if name is None:
        return ()
    if name not in rules:
        raise ShardingError(
            f"logical axis `{name}` has no sharding rule; known: {', '.join(sorted(rules))}. Add it to the rules "
            f"table (map it to () to never split it)"
        )
    return tuple(rules[name])


def _spec(parts: list[list[str]]) -> PartitionSpec:
    out = [None if not p else (p[0] if len(p) == 1 else tuple(p)) for p in parts]
    while out and out[-1] is None:
        out.pop()
    return P(*out)


def param_spec(
    shape: Sequence[int],
    logical_axes: Sequence[str | None] | None,
    mesh: Mesh,
    rules: Rules | None = None,
    threshold: int | None = None,
) -> PartitionSpec:
    """The PartitionSpec of one parameter.

    Below ``threshold`` elements: replicated. Otherwise every mesh axis (other axes first, ``fsdp`` last) that the
    rules of some dimension allow goes to the largest such dimension whose remaining size it divides. A parameter
    without names (``logical_axes`` None) may use ``fsdp`` on any dimension (big_vision's FSDP rule).
    """
    rules = DEFAULT_RULES if rules is None else rules
    threshold = DEFAULT_THRESHOLD if threshold is None else threshold
    shape = tuple(int(s) for s in shape)
    if math.prod(shape) < threshold or not shape:
        return P()
    if logical_axes is None:
        allowed = [(FSDP_AXIS,)] * len(shape)
    else:
        if len(logical_axes) != len(shape):
            raise ShardingError(f"logical axes {tuple(logical_axes)} do not match a parameter of shape {shape}")
        allowed = [_rule(rules, name) for name in logical_axes]
    parts: list[list[str]] = [[] for _ in shape]
    remaining = list(shape)
    candidates = [a for a in mesh.axis_names if a != FSDP_AXIS] + [FSDP_AXIS]
    for axis in candidates:
        size = mesh.shape.get(axis, 1)
        if size == 1:
            continue
        dims = [i for i, ok in enumerate(allowed) if axis in ok and remaining[i] % size == 0]
        if dims:
            best = max(dims, key=lambda i: remaining[i])  # the largest divisible dimension; ties: the first
            parts[best].append(axis)
            remaining[best] //= size
    return _spec(parts)


def activation_spec(
    shape: Sequence[int], logical_axes: Sequence[str | None], mesh: Mesh, rules: Rules | None = None
) -> PartitionSpec:
    """The PartitionSpec of an activation: each named dimension, in order, takes the mesh axes of its rule that are
    still free and divide what remains of it. Unnamed trailing dimensions are not split."""
    rules = DEFAULT_RULES if rules is None else rules
    if len(logical_axes) > len(shape):
        raise ShardingError(f"logical axes {tuple(logical_axes)} have more entries than the shape {tuple(shape)}")
    used: set[str] = set()
    parts: list[list[str]] = [[] for _ in shape]
    for i, name in enumerate(logical_axes):
        remaining = int(shape[i])
        for axis in _rule(rules, name):
            size = mesh.shape.get(axis, 1)
            if axis in used or size == 1 or remaining % size:
                continue
            parts[i].append(axis)
            used.add(axis)
            remaining //= size
    return _spec(parts)


def logical_sharding(
    mesh: Mesh, shape: Sequence[int], logical_axes: Sequence[str | None], rules: Rules | None = None
) -> NamedSharding:
    """NamedSharding of an activation of ``shape`` whose axes are named ``logical_axes`` (see activation_spec)."""
    return NamedSharding(mesh, activation_spec(shape, logical_axes, mesh, rules))


# --- parameters ------------------------------------------------------------------------------------------------------


def _state(model_or_state: nnx.Module | nnx.State) -> nnx.State:
    return nnx.split(model_or_state)[1] if isinstance(model_or_state, nnx.Module) else model_or_state


def _axes_of(var: nnx.Variable) -> tuple[str | None, ...] | None:
    axes = var.get_metadata("out_sharding", None)
    return None if axes is None else tuple(axes)


def param_specs(
    model_or_state: nnx.Module | nnx.State, mesh: Mesh, rules: Rules | None = None, threshold: int | None = None
) -> nnx.State:
    """The PartitionSpec of every parameter, as a State shaped like ``nnx.split(model)[1]``."""
    rules = DEFAULT_RULES if rules is None else rules
    check_rules(mesh, rules)
    flat = []
    for path, var in nnx.to_flat_state(_state(model_or_state)):
        spec = param_spec(var.get_value().shape, _axes_of(var), mesh, rules, threshold)
        flat.append((path, var.replace(spec)))
    return nnx.from_flat_state(flat)


def param_shardings(
    model_or_state: nnx.Module | nnx.State, mesh: Mesh, rules: Rules | None = None, threshold: int | None = None
) -> nnx.State:
    """The NamedSharding of every parameter (a State usable as ``in_shardings`` for ``nnx.split(model)[1]``)."""
    specs = param_specs(model_or_state, mesh, rules, threshold)
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, PartitionSpec))


def shard_model(model: nnx.Module, mesh: Mesh, rules: Rules | None = None, threshold: int | None = None) -> nnx.Module:
    """``model`` with every parameter moved into its sharding (a new module; ``model`` itself is unchanged).

    For checkpoints prefer ``load_component(..., sharding=sharding_fn(mesh))``, which never holds a whole tensor on
    one device.
    """
    graphdef, state = nnx.split(model)
    state = jax.device_put(state, param_shardings(state, mesh, rules, threshold))
    return nnx.merge(graphdef, state)


class ParamSharder:
    """``(param_path, shape, logical_axes=None) -> NamedSharding``: the ``sharding=`` callback of load_component.

    load_component passes each parameter's logical names (``takes_logical_axes``); without them a parameter may
    use ``fsdp`` on any dimension. Small parameters get a replicated sharding over the mesh (never a single device).
    """

    takes_logical_axes = True

    def __init__(self, mesh: Mesh, rules: Rules | None = None, threshold: int | None = None):
        self.mesh, self.rules = mesh, DEFAULT_RULES if rules is None else rules
        self.threshold = DEFAULT_THRESHOLD if threshold is None else threshold
        check_rules(mesh, self.rules)

    def __call__(
        self, param_path: str, shape: Sequence[int], logical_axes: Sequence[str | None] | None = None
    ) -> NamedSharding:
        try:
            spec = param_spec(shape, logical_axes, self.mesh, self.rules, self.threshold)
        except ShardingError as err:
            raise ShardingError(f"parameter `{param_path}`: {err}") from None
        return NamedSharding(self.mesh, spec)


def sharding_fn(mesh: Mesh, rules: Rules | None = None, threshold: int | None = None) -> ParamSharder:
    """The ``sharding=`` callback for ``load_component``: each tensor goes straight into its sharding."""
    return ParamSharder(mesh, rules, threshold)


@dataclasses.dataclass(frozen=True)
class ShardingSummary:
    """Bytes of a model's parameters in total and on the most loaded device, and what stays replicated."""

    total_bytes: int
    per_device_bytes: int  # the most loaded device
    num_devices: int
    replicated_large: tuple[str, ...]  # parameters above the threshold that no mesh axis divides


def summarize(
    model_or_state: nnx.Module | nnx.State, mesh: Mesh, rules: Rules | None = None, threshold: int | None = None
) -> ShardingSummary:
    """Parameter bytes per device under the rules, computed from shapes only (works on abstract models)."""
    threshold = DEFAULT_THRESHOLD if threshold is None else threshold
    specs = {p: s for p, s in nnx.to_flat_state(param_specs(model_or_state, mesh, rules, threshold))}
    total = per_device = 0
    large = []
    for path, var in nnx.to_flat_state(_state(model_or_state)):
        value = var.get_value()
        nbytes = int(np.prod(value.shape)) * np.dtype(value.dtype).itemsize
        spec = specs[path].get_value()
        split = math.prod(mesh.shape[a] for part in spec if part for a in ((part,) if isinstance(part, str) else part))
        total += nbytes
        per_device += nbytes // split  # shards are equal: every split divides its dimension
        if split == 1 and int(np.prod(value.shape)) >= threshold and mesh.size > 1:
            large.append(".".join(map(str, path)))
    return ShardingSummary(total, per_device, mesh.size, tuple(large))


# --- activations and sharded entry points ---------------------------------------------------------------------------

_ACTIVE: contextvars.ContextVar[tuple[Mesh, Rules] | None] = contextvars.ContextVar("show1_mesh_rules", default=None)


@contextlib.contextmanager
def use_mesh_rules(mesh: Mesh, rules: Rules | None = None) -> Iterator[None]:
    """While tracing inside this context, :func:`constrain` applies its sharding (otherwise it is the identity)."""
    rules = DEFAULT_RULES if rules is None else rules
    check_rules(mesh, rules)
    token = _ACTIVE.set((mesh, rules))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """``with_sharding_constraint`` to the logical sharding of ``x``; a no-op outside :func:`use_mesh_rules`."""
    active = _ACTIVE.get()
    if active is None:
        return x
    mesh, rules = active
    return jax.lax.with_sharding_constraint(x, logical_sharding(mesh, x.shape, logical_axes, rules))


AxesSpec = Any  # None | PartitionSpec (logical names) | Sharding | a pytree of those


def _is_spec_leaf(x: Any) -> bool:
    return x is None or isinstance(x, (PartitionSpec, Sharding))


def resolve_shardings(spec: AxesSpec, tree: Any, mesh: Mesh, rules: Rules | None = None) -> Any:
    """Concrete shardings for ``tree`` (arrays or ShapeDtypeStructs) from a logical ``spec``.

    ``spec`` is a pytree prefix of ``tree`` whose leaves are None (replicated), a PartitionSpec of logical names
    (applied to the leading axes of every array below it) or a Sharding (used as is).
    """

    def one(s: Any, sub: Any) -> Any:
        if isinstance(s, Sharding):
            return s
        if s is None:
            return NamedSharding(mesh, P())
        # Names beyond an array's rank are dropped (a scalar in a batch-named pytree is replicated).
        return jax.tree.map(lambda a: logical_sharding(mesh, np.shape(a), tuple(s)[: np.ndim(a)], rules), sub)

    return jax.tree.map(one, spec, tree, is_leaf=_is_spec_leaf)


def _signature(args: tuple) -> tuple:
    leaves, treedef = jax.tree.flatten(args)
    return treedef, tuple((tuple(np.shape(x)), str(getattr(x, "dtype", type(x)))) for x in leaves)


class ShardedFunction:
    """A function jitted with explicit in/out shardings resolved from logical axes and the argument shapes.

    One ``jax.jit`` is built per distinct argument signature (shapes, dtypes, tree structure) and reused.
    """

    def __init__(
        self,
        fn: Callable[..., Any],
        mesh: Mesh,
        *,
        in_axes: Sequence[AxesSpec],
        out_axes: AxesSpec = None,
        rules: Rules | None = None,
        donate_argnums: Sequence[int] = (),
    ):
        self.fn, self.mesh, self.in_axes, self.out_axes = fn, mesh, tuple(in_axes), out_axes
        self.rules = DEFAULT_RULES if rules is None else rules
        self.donate_argnums = tuple(donate_argnums)
        check_rules(mesh, self.rules)
        self._jitted: dict[tuple, Any] = {}

    def _traced(self, *args: Any) -> Any:
        with use_mesh_rules(self.mesh, self.rules):
            return self.fn(*args)

    def shardings(self, *args: Any) -> tuple[tuple, Any]:
        """(in_shardings, out_shardings) for these arguments (arrays or ShapeDtypeStructs)."""
        if len(args) != len(self.in_axes):
            raise TypeError(f"this sharded function takes {len(self.in_axes)} arguments (in_axes), got {len(args)}")
        ins = tuple(resolve_shardings(s, a, self.mesh, self.rules) for s, a in zip(self.in_axes, args))
        out_shape = jax.eval_shape(self._traced, *args)
        return ins, resolve_shardings(self.out_axes, out_shape, self.mesh, self.rules)

    def jitted(self, *args: Any) -> Any:
        """The ``jax.jit`` object for arguments like ``args``."""
        key = _signature(args)
        if key not in self._jitted:
            ins, outs = self.shardings(*args)
            self._jitted[key] = jax.jit(
                self._traced, in_shardings=ins, out_shardings=outs, donate_argnums=self.donate_argnums
            )
        return self._jitted[key]

    def __call__(self, *args: Any) -> Any:
        return self.jitted(*args)(*args)

    def lower(self, *args: Any) -> Any:
        """``jax.jit(...).lower`` for arrays or ShapeDtypeStructs (compile it for memory and cost analyses)."""
        return self.jitted(*args).lower(*args)


def jit_sharded(
    fn: Callable[..., Any],
    mesh: Mesh,
    *,
    in_axes: Sequence[AxesSpec],
    out_axes: AxesSpec = None,
    rules: Rules | None = None,
    donate_argnums: Sequence[int] = (),
) -> ShardedFunction:
    """``fn`` under ``jax.jit`` with explicit shardings on ``mesh``.

    Args:
      fn: a pure function of positional arguments (e.g. ``functional.pure(graphdef)`` or a sampler loop).
      in_axes: one entry per argument: None (replicated), a PartitionSpec of logical names such as :data:`VIDEO`
        (resolved against the argument's shape, divisibility included), a Sharding, or a pytree of these (e.g.
        :func:`param_shardings` for the parameters).
      out_axes: the same for the output pytree.
      rules: the logical-to-mesh table (default :data:`DEFAULT_RULES`); :func:`constrain` inside ``fn`` uses it.
      donate_argnums: arguments whose buffers the output may reuse.
    """
    return ShardedFunction(fn, mesh, in_axes=in_axes, out_axes=out_axes, rules=rules, donate_argnums=donate_argnums)


def sharded_apply(
    model: nnx.Module,
    mesh: Mesh,
    *,
    in_axes: Sequence[AxesSpec],
    out_axes: AxesSpec = None,
    method: str | Callable[..., Any] = "__call__",
    rules: Rules | None = None,
    threshold: int | None = None,
) -> tuple[ShardedFunction, nnx.State]:
    """(fn, params): ``fn(params, *args) = model.method(*args)`` jitted with the parameters in their shardings.

    ``method`` is a method name or a function ``(model, *args) -> outputs`` (e.g. to pass keyword arguments:
    ``lambda vae, z: vae.decode_video(z, frames_per_chunk=4)``).

    The parameters are moved into their shardings unless they already are (a model loaded with ``sharding_fn``).
    ``in_axes`` names the arguments after the parameters. Text encoders, for instance::

        encode, params = sharded_apply(t5, mesh, in_axes=(BATCH, BATCH), out_axes=TOKENS)
        states = encode(params, input_ids, attention_mask)      # [B, 77, 4096], batch split over data/fsdp
    """
    graphdef, state = nnx.split(model)
    shardings = param_shardings(state, mesh, rules, threshold)
    state = jax.device_put(state, shardings)

    def fn(params: nnx.State, *args: Any) -> Any:
        module = nnx.merge(graphdef, params)
        return getattr(module, method)(*args) if isinstance(method, str) else method(module, *args)

    sharded = jit_sharded(fn, mesh, in_axes=(shardings, *in_axes), out_axes=out_axes, rules=rules)
    return sharded, state


# --- multi-host ------------------------------------------------------------------------------------------------------

# Environment variables that say this process is one of several (value > 1), per launcher.
_MULTI_PROCESS_ENV = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    environ: Mapping[str, str] | None = None,
) -> bool:
    """Start ``jax.distributed`` when this run spans several processes; a no-op otherwise. Call before using JAX.

    Configuration, first found wins: the arguments; ``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` /
    ``JAX_PROCESS_ID``; ``SHOW1_DISTRIBUTED=auto`` or a multi-process launcher (TPU pod slice: several
    ``TPU_WORKER_HOSTNAMES``; SLURM; Open MPI), for which JAX detects everything itself. See docs/scaling.md.

    Returns:
      True if this call initialised ``jax.distributed``; False for a single-process run or when already done.
    """
    env = os.environ if environ is None else environ
    if jax.distributed.is_initialized():
        return False

    def number(value: Any, name: str) -> int | None:
        if value is None or value == "":
            return None
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ShardingError(f"{name} must be an integer, got {value!r}") from None

    coordinator_address = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS") or None
    num_processes = number(
        num_processes if num_processes is not None else env.get("JAX_NUM_PROCESSES"), "num_processes"
    )
    process_id = number(process_id if process_id is not None else env.get("JAX_PROCESS_ID"), "process_id")
    auto = env.get("SHOW1_DISTRIBUTED", "").lower() in ("1", "true", "auto", "yes")
    auto = auto or "," in env.get("TPU_WORKER_HOSTNAMES", "")
    auto = auto or any((number(env.get(k), k) or 1) > 1 for k in _MULTI_PROCESS_ENV)
    explicit = coordinator_address is not None or (num_processes or 1) > 1
    if not (explicit or auto):
        return False
    if num_processes is not None and num_processes > 1 and coordinator_address is None and not auto:
        raise ShardingError(
            f"num_processes={num_processes} but no coordinator address: set JAX_COORDINATOR_ADDRESS=host:port "
            "(process 0's address, same on every process) or pass coordinator_address="
        )
    if process_id is not None and num_processes is not None and not 0 <= process_id < num_processes:
        raise ShardingError(f"process_id={process_id} must be in [0, num_processes={num_processes})")
    jax.distributed.initialize(
        coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id
    )
    return True


def host_local_to_global(
    local: Any, mesh: Mesh, logical_axes: Sequence[str | None], rules: Rules | None = None, global_shape=None
) -> jax.Array:
    """A global array from each process's slice of the batch (``jax.make_array_from_process_local_data``).

    Every process passes its own rows (e.g. its prompts' embeddings) with the same logical axes; the global batch is
    their concatenation in process order. On one process this is ``device_put`` into the logical sharding.
    """
    local = np.asarray(local)
    if global_shape is None:
        global_shape = (local.shape[0] * jax.process_count(), *local.shape[1:])
    sharding = logical_sharding(mesh, global_shape, logical_axes, rules)
    return jax.make_array_from_process_local_data(sharding, local, tuple(global_shape))


def to_host(x: jax.Array) -> np.ndarray:
    """The whole array as numpy on every process (an all-gather across processes when it spans several)."""
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
