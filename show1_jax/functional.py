"""Pure-function views of NNX modules for the hot paths (samplers, train steps).

Split a module once, pass its parameters as a pytree argument, merge inside the traced function: the compiled
program then depends only on shapes and dtypes, never on Python object identity.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flax import nnx


def split(model: nnx.Module) -> tuple[nnx.GraphDef, nnx.State]:
    """(graphdef, params): the static structure and the parameter pytree."""
    return nnx.split(model)


def pure(graphdef: nnx.GraphDef, method: str = "__call__") -> Callable[..., Any]:
    """``fn(params, *args, **kwargs) -> model.method(*args, **kwargs)``, a pure function suitable for ``jax.jit``."""

    def fn(params: nnx.State, *args, **kwargs):
        model = nnx.merge(graphdef, params)
        return getattr(model, method)(*args, **kwargs)

    return fn
