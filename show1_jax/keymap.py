"""Key tables: how a PyTorch checkpoint's tensors become this implementation's parameters.

A key table is an ordered tuple of :class:`Rule`. The first rule whose regular expression matches a checkpoint key
(whole-key match) names the target parameter path (``re`` substitution syntax, ``\\1`` for groups) and the transform
that turns the PyTorch tensor into the Flax layout (SPEC.md §1.2). :func:`map_checkpoint` applies a table to every
key and collects every problem (keys no rule maps, keys mapped to a parameter the model lacks, parameters left
unfilled, shape mismatches) into one :class:`CheckpointMappingError`.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable, Mapping

import numpy as np

Transform = Callable[[np.ndarray], np.ndarray]


def identity(w: np.ndarray) -> np.ndarray:
    return w


def linear(w: np.ndarray) -> np.ndarray:
    """nn.Linear weight (out, in) -> Dense kernel (in, out)."""
    _expect_rank(w, 2, "a Linear weight")
    return w.T


def conv2d(w: np.ndarray) -> np.ndarray:
    """nn.Conv2d weight (O, I, kh, kw) -> Conv kernel (kh, kw, I, O)."""
    _expect_rank(w, 4, "a Conv2d weight")
    return w.transpose(2, 3, 1, 0)


def temporal_conv(w: np.ndarray) -> np.ndarray:
    """nn.Conv3d weight (O, I, kt, 1, 1) of a temporal conv -> Conv kernel (kt, 1, I, O) over (frames, pixels)."""
    _expect_rank(w, 5, "a Conv3d weight")
    if w.shape[3:] != (1, 1):
        raise ValueError(f"temporal Conv3d weight must have a (k, 1, 1) kernel, got {w.shape}")
    return w[:, :, :, 0, :].transpose(2, 3, 1, 0)


def linear_or_conv1x1(w: np.ndarray) -> np.ndarray:
    """A projection stored either as Linear (out, in) or as a 1x1 Conv2d (out, in, 1, 1) -> Dense kernel (in, out)."""
    if w.ndim == 4:
        if w.shape[2:] != (1, 1):
            raise ValueError(f"expected a 1x1 conv weight, got {w.shape}")
        w = w[:, :, 0, 0]
    return linear(w)


def _expect_rank(w: np.ndarray, rank: int, what: str) -> None:
    if w.ndim != rank:
        raise ValueError(f"{what} must have rank {rank}, got shape {tuple(w.shape)}")


@dataclasses.dataclass(frozen=True)
class Rule:
    """Checkpoint key pattern -> parameter path template, and the tensor transform."""

    pattern: str
    target: str
    transform: Transform = identity

    def __post_init__(self):
        object.__setattr__(self, "_regex", re.compile(self.pattern))

    def apply(self, key: str) -> str | None:
        m = self._regex.fullmatch(key)  # type: ignore[attr-defined]
        return None if m is None else m.expand(self.target)


KeyTable = tuple[Rule, ...]


def standard_leaf_rules(norm_names: str = r"\w*norm\w*") -> KeyTable:
    """Rules for the leaves shared by every family: norms' ``weight`` -> ``scale``, convs, linears and biases.

    Family tables put their renames first and end with these.
    """
    return (
        Rule(rf"(.*\.)?({norm_names})\.weight", r"\1\2.scale"),
        Rule(r"(.*\.)?(conv\w*)\.weight", r"\1\2.kernel", conv2d),
        Rule(r"(.+)\.weight", r"\1.kernel", linear),
        Rule(r"(.+)\.bias", r"\1.bias"),
    )


@dataclasses.dataclass
class MappingReport:
    """Everything found wrong while mapping a checkpoint; empty lists mean a clean load."""

    unmapped: list[str] = dataclasses.field(default_factory=list)  # checkpoint keys no rule maps
    no_target: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (key, target the model lacks)
    duplicates: list[tuple[str, str, str]] = dataclasses.field(default_factory=list)  # (key, other key, target)
    shape_mismatch: list[tuple[str, str, tuple, tuple]] = dataclasses.field(default_factory=list)
    unfilled: list[str] = dataclasses.field(default_factory=list)  # parameters nothing filled
    transform_errors: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    extra_problems: list[str] = dataclasses.field(default_factory=list)  # family-specific checks

    @property
    def ok(self) -> bool:
        return not (
            self.unmapped
            or self.no_target
            or self.duplicates
            or self.shape_mismatch
            or self.unfilled
            or self.transform_errors
            or self.extra_problems
        )


class CheckpointMappingError(ValueError):
    """A checkpoint that does not fill the model exactly; the message lists every problem at once."""

    def __init__(self, message: str, report: MappingReport):
        super().__init__(message)
        self.report = report


def _shape_proxy(shape: tuple[int, ...], dtype) -> np.ndarray:
    """A zero-stride array of the given shape: transforms run on it without allocating the tensor."""
    return np.broadcast_to(np.zeros((), dtype=dtype), shape)


def plan_mapping(
    keys_and_shapes: Iterable[tuple[str, tuple[int, ...]]],
    table: KeyTable,
    expected: Mapping[str, tuple[int, ...]],
) -> tuple[dict[str, tuple[str, Rule]], MappingReport]:
    """Decide, from names and shapes only, which checkpoint key fills which parameter.

    Args:
      keys_and_shapes: (checkpoint key, PyTorch shape) pairs.
      table: the family's key table.
      expected: parameter path -> Flax shape of the model to fill.

    Returns:
      (plan, report): ``plan[target] = (key, rule)`` for every mapped parameter, and the problems found.
    """
    report = MappingReport()
    plan: dict[str, tuple[str, Rule]] = {}
    for key, shape in keys_and_shapes:
        rule = target = None
        for r in table:
            target = r.apply(key)
            if target is not None:
                rule = r
                break
        if rule is None or target is None:
            report.unmapped.append(key)
            continue
        if target not in expected:
            report.no_target.append((key, target))
            continue
        if target in plan:
            report.duplicates.append((key, plan[target][0], target))
            continue
        try:
            got = tuple(rule.transform(_shape_proxy(tuple(shape), np.float32)).shape)
        except ValueError as err:
            report.transform_errors.append((key, str(err)))
            continue
        if got != tuple(expected[target]):
            report.shape_mismatch.append((key, target, tuple(shape), tuple(expected[target])))
            continue
        plan[target] = (key, rule)
    report.unfilled = sorted(set(expected) - set(plan))
    return plan, report


def format_report(report: MappingReport, *, source: str, model: str, hint: str = "", limit: int = 40) -> str:
    """A readable multi-line error for a failed mapping."""

    def block(title: str, rows: list[str]) -> list[str]:
        if not rows:
            return []
        shown = rows[:limit] + ([f"... and {len(rows) - limit} more"] if len(rows) > limit else [])
        return [f"{title} ({len(rows)}):"] + [f"  {r}" for r in shown]

    lines = [f"checkpoint {source} does not match {model}:"]
    lines += block("checkpoint keys no rule maps", report.unmapped)
    lines += block(
        "checkpoint keys mapped to a parameter the model does not have",
        [f"{k} -> {t}" for k, t in report.no_target],
    )
    lines += block("keys filling the same parameter twice", [f"{k} and {o} -> {t}" for k, o, t in report.duplicates])
    lines += block(
        "shape mismatches",
        [
            f"checkpoint key `{k}` has shape {s} (PyTorch layout), parameter `{t}` expects {e} (Flax layout)"
            for k, t, s, e in report.shape_mismatch
        ],
    )
    lines += block("tensors that cannot be converted", [f"{k}: {e}" for k, e in report.transform_errors])
    lines += block("model parameters the checkpoint does not fill", report.unfilled)
    lines += block("other problems", report.extra_problems)
    if hint:
        lines.append(f"Likely cause: {hint}")
    return "\n".join(lines)


# --- the other direction: our parameters -> a PyTorch-layout state dict ------------------------------------------
# Used to write components in the released folder format (tiny test models, trained weights) and to check the
# forward table key by key: load a checkpoint, export it, compare with the file.


def linear_inv(w: np.ndarray) -> np.ndarray:
    return w.T


def conv2d_inv(w: np.ndarray) -> np.ndarray:
    """Conv kernel (kh, kw, I, O) -> (O, I, kh, kw)."""
    return w.transpose(3, 2, 0, 1)


def temporal_conv_inv(w: np.ndarray) -> np.ndarray:
    """Conv kernel (kt, 1, I, O) -> Conv3d weight (O, I, kt, 1, 1)."""
    return w.transpose(3, 2, 0, 1)[..., None]


def kernel_inv(w: np.ndarray) -> np.ndarray:
    """Dense (in, out) -> (out, in); 2-D conv (kh, kw, I, O) -> (O, I, kh, kw), by rank."""
    return conv2d_inv(w) if w.ndim == 4 else linear_inv(w)


def standard_export_rules() -> KeyTable:
    """Inverse of :func:`standard_leaf_rules`; family export tables put their renames first."""
    return (
        Rule(r"(.+)\.scale", r"\1.weight"),
        Rule(r"(.+)\.embedding", r"\1.weight"),
        Rule(r"(.+)\.kernel", r"\1.weight", kernel_inv),
        Rule(r"(.+)\.bias", r"\1.bias"),
    )


def export_state_dict(params: Mapping[str, np.ndarray], table: KeyTable) -> dict[str, np.ndarray]:
    """Our flat parameters (path -> array) -> PyTorch-layout tensors under the reference's key names."""
    out: dict[str, np.ndarray] = {}
    for path, value in params.items():
        for rule in table:
            key = rule.apply(path)
            if key is not None:
                out[key] = np.ascontiguousarray(rule.transform(np.asarray(value)))
                break
        else:
            raise ValueError(f"no export rule for parameter `{path}`")
    return out
