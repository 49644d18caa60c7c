"""Key table of the Show-1 UNets (showone UNet3DConditionModel, IF UNet2DConditionModel): PyTorch key -> our path.

Our module tree mirrors the reference state dict; the renames are the Sequential/ModuleList indices that carry no
meaning (``to_out.0``, ``ff.net.0.proj``, ``temp_convs.*.conv{k}.{0,2,3}``) and the leaf names of Flax
(``weight`` -> ``kernel``/``scale``). SPEC.md §5.5 lists the keys; §1.2 the layouts.
"""

from __future__ import annotations

import re

from show1_jax.keymap import (
    KeyTable,
    MappingReport,
    Rule,
    conv2d_inv,
    linear,
    linear_inv,
    linear_or_conv1x1,
    standard_export_rules,
    standard_leaf_rules,
    temporal_conv,
    temporal_conv_inv,
)
from show1_jax.unet3d import UNetConfig

_TC = r"(.*\.temp_convs\.\d+)"


def key_table(config: UNetConfig) -> KeyTable:
    return (
        Rule(r"(.*)\.to_out\.0\.weight", r"\1.to_out.kernel", linear),
        Rule(r"(.*)\.to_out\.0\.bias", r"\1.to_out.bias"),
        # TemporalConvLayer: Sequential(GroupNorm, SiLU, [Dropout,] Conv3d) -> norm{k} / conv{k}
        Rule(_TC + r"\.conv(\d)\.0\.weight", r"\1.norm\2.scale"),
        Rule(_TC + r"\.conv(\d)\.0\.bias", r"\1.norm\2.bias"),
        Rule(_TC + r"\.conv(1)\.2\.weight", r"\1.conv\2.kernel", temporal_conv),
        Rule(_TC + r"\.conv(1)\.2\.bias", r"\1.conv\2.bias"),
        Rule(_TC + r"\.conv([234])\.3\.weight", r"\1.conv\2.kernel", temporal_conv),
        Rule(_TC + r"\.conv([234])\.3\.bias", r"\1.conv\2.bias"),
        # GEGLU feed-forward: net.0.proj -> proj, net.2 -> out
        Rule(r"(.*)\.ff\.net\.0\.proj\.weight", r"\1.ff.proj.kernel", linear),
        Rule(r"(.*)\.ff\.net\.0\.proj\.bias", r"\1.ff.proj.bias"),
        Rule(r"(.*)\.ff\.net\.2\.weight", r"\1.ff.out.kernel", linear),
        Rule(r"(.*)\.ff\.net\.2\.bias", r"\1.ff.out.bias"),
        # Transformer2DModel projections are Linear or 1x1 Conv (use_linear_projection); `check` enforces which.
        Rule(r"(.*)\.(proj_in|proj_out)\.weight", r"\1.\2.kernel", linear_or_conv1x1),
        Rule(r"(.*\.)?(positional_embedding)", r"\1\2"),
    ) + standard_leaf_rules()


def export_table(config: UNetConfig) -> KeyTable:
    """Our parameter paths -> the reference's keys (the inverse of :func:`key_table`)."""
    # Transformer2D projections are written as 1x1 convs unless the config says Linear (SPEC.md §6.3).
    spatial_proj = linear_inv if config.use_linear_projection else (lambda w: conv2d_inv(w[None, None]))
    return (
        Rule(r"(.*)\.to_out\.kernel", r"\1.to_out.0.weight", linear_inv),
        Rule(r"(.*)\.to_out\.bias", r"\1.to_out.0.bias"),
        Rule(_TC + r"\.norm(\d)\.scale", r"\1.conv\2.0.weight"),
        Rule(_TC + r"\.norm(\d)\.bias", r"\1.conv\2.0.bias"),
        Rule(_TC + r"\.conv(1)\.kernel", r"\1.conv\2.2.weight", temporal_conv_inv),
        Rule(_TC + r"\.conv(1)\.bias", r"\1.conv\2.2.bias"),
        Rule(_TC + r"\.conv([234])\.kernel", r"\1.conv\2.3.weight", temporal_conv_inv),
        Rule(_TC + r"\.conv([234])\.bias", r"\1.conv\2.3.bias"),
        Rule(r"(.*)\.ff\.proj\.kernel", r"\1.ff.net.0.proj.weight", linear_inv),
        Rule(r"(.*)\.ff\.proj\.bias", r"\1.ff.net.0.proj.bias"),
        Rule(r"(.*)\.ff\.out\.kernel", r"\1.ff.net.2.weight", linear_inv),
        Rule(r"(.*)\.ff\.out\.bias", r"\1.ff.net.2.bias"),
        Rule(
            r"((?:down_blocks|up_blocks|mid_block)\.(?:\d+\.)?attentions\.\d+\.proj_(?:in|out))\.kernel",
            r"\1.weight",
            spatial_proj,
        ),
        Rule(r"(.*\.)?(positional_embedding)", r"\1\2"),
    ) + standard_export_rules()


_SPATIAL_PROJ = re.compile(r"(?:down_blocks|up_blocks|mid_block)\.(?:\d+\.)?attentions\.\d+\.proj_(?:in|out)\.weight")


def check(config: UNetConfig, shapes: dict[str, tuple[int, ...]]) -> list[str]:
    """The two SR2 traps of SPEC.md §6.3, reported instead of silently dropping or misreading weights."""
    problems = []
    for key, shape in shapes.items():
        if _SPATIAL_PROJ.fullmatch(key):
            if config.use_linear_projection and len(shape) == 4:
                problems.append(
                    f"`{key}` is a 1x1 conv weight {shape} but config.json says use_linear_projection=true: "
                    "set use_linear_projection to false (the showone class default) to match this checkpoint"
                )
            elif not config.use_linear_projection and len(shape) == 2:
                problems.append(
                    f"`{key}` is a Linear weight {shape} but config.json says use_linear_projection=false: "
                    "set use_linear_projection to true (the diffusers/zeroscope setting) to match this checkpoint"
                )
    has_tin = any(k.startswith("transformer_in.") for k in shapes)
    if has_tin and not config.transfromer_in_opt:
        problems.append(
            "the checkpoint has `transformer_in.*` weights but config.json has transfromer_in_opt=false (sic), so "
            "the reference would silently ignore them: set transfromer_in_opt to true to use them"
        )
    return problems


def hint(config: UNetConfig, report: MappingReport) -> str:
    """A guess at the cause, from the first few mismatches."""
    keys = [k for k, *_ in report.shape_mismatch]
    if any(k.startswith("conv_in.") for k in keys):
        return (
            f"conv_in input channels differ from in_channels={config.in_channels}: show-1-base takes 3, "
            "show-1-interpolation 7, show-1-sr1 6; is the config.json from another component?"
        )
    if any(k.startswith(("time_embedding.", "class_embedding.")) for k in keys):
        return "time_embedding_dim in config.json does not match the checkpoint (sr1: 768 or null, SPEC.md §5.1)"
    if any("temp_attentions" in k for k in keys):
        return "temporal attention widths differ: check attention_head_dim and block_out_channels in config.json"
    unfilled_temporal = [p for p in report.unfilled if "temp_" in p]
    if unfilled_temporal and len(unfilled_temporal) == len(report.unfilled) and not report.unmapped:
        return "the checkpoint has no temporal layers: is this a 2D (IF) checkpoint loaded with a 3D config?"
    if any(k.startswith("temp_") or ".temp_" in k for k, _ in report.no_target):
        return "the checkpoint has temporal layers but the config builds a 2D UNet: use the 3D config"
    if report.shape_mismatch:
        return "widths differ: the config.json and the weights come from different models"
    return ""
