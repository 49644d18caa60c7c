"""Key table of diffusers' ``AutoencoderKL`` checkpoints: PyTorch key -> our parameter path.

Our module tree mirrors the diffusers state dict (``encoder.down_blocks.i.resnets.j.*``,
``encoder.down_blocks.i.downsamplers.0.conv``, ``{encoder,decoder}.mid_block.{resnets.{0,1},attentions.0}``,
``decoder.up_blocks.i.upsamplers.0.conv``, ``quant_conv``, ``post_quant_conv``, ...), so the renames are:

- the mid-block attention's ``to_out.0`` -> ``to_out``, and its legacy names ``query``/``key``/``value``/
  ``proj_attn`` -> ``to_q``/``to_k``/``to_v``/``to_out`` (diffusers checkpoints saved before its Attention refactor;
  a conversion of the original LDM format that only renamed keys keeps them as 1x1 convs). All four projections
  load from a Linear (out, in) or a 1x1 Conv2d (out, in, 1, 1) weight;
- ``quant_conv``/``post_quant_conv``: 1x1 Conv2d weights;
- the standard leaves (norm ``weight`` -> ``scale``, conv ``weight`` -> HWIO ``kernel``).

Every checkpoint key is mapped; none is skipped (golden README, "Weight layout facts": AutoencoderKL).
"""

from __future__ import annotations

from show1_jax.keymap import KeyTable, MappingReport, Rule, conv2d, linear_or_conv1x1, standard_leaf_rules
from show1_jax.vae import VAEConfig

_ATTN = r"((?:encoder|decoder)\.mid_block\.attentions\.0)"
_PROJ = {"to_q": "to_q", "query": "to_q", "to_k": "to_k", "key": "to_k", "to_v": "to_v", "value": "to_v",
         r"to_out\.0": "to_out", "proj_attn": "to_out"}  # fmt: skip


def key_table(config: VAEConfig) -> KeyTable:
    rules = []
    for src, dst in _PROJ.items():
        rules.append(Rule(rf"{_ATTN}\.{src}\.weight", rf"\1.{dst}.kernel", linear_or_conv1x1))
        rules.append(Rule(rf"{_ATTN}\.{src}\.bias", rf"\1.{dst}.bias"))
    rules.append(Rule(r"(quant_conv|post_quant_conv)\.weight", r"\1.kernel", conv2d))
    return tuple(rules) + standard_leaf_rules()


def hint(config: VAEConfig, report: MappingReport) -> str:
    """A guess at the cause, from the first few mismatches."""
    keys = list(report.unmapped) + [k for k, _ in report.no_target]
    if any(k.startswith("first_stage_model.") or ".down.0.block." in k or ".mid.attn_1." in k for k in keys):
        return (
            "this is an original CompVis/LDM checkpoint (encoder.down.*.block.*, mid.attn_1): convert it to the "
            "diffusers layout first (diffusers' AutoencoderKL.from_single_file(...).save_pretrained(...))"
        )
    mismatched = [k for k, *_ in report.shape_mismatch]
    if any(p.startswith(("quant_conv.", "post_quant_conv.")) for p in report.unfilled):
        return "the checkpoint has no quant_conv / post_quant_conv: set use_quant_conv / use_post_quant_conv to false"
    if any(k.startswith(("quant_conv.", "post_quant_conv.")) for k, _ in report.no_target):
        return "the checkpoint has quant_conv / post_quant_conv: set use_quant_conv / use_post_quant_conv to true"
    if any(k.startswith("encoder.conv_in.") for k in mismatched):
        return f"in_channels={config.in_channels} in config.json does not match encoder.conv_in"
    if any(
        k.startswith(("decoder.conv_in.", "quant_conv.", "post_quant_conv.", "encoder.conv_out.")) for k in mismatched
    ):
        return f"latent_channels={config.latent_channels} in config.json does not match the checkpoint"
    if any(".resnets." in k for k in keys) or any(".resnets." in p for p in report.unfilled):
        return (
            f"the number of resnets per block differs: layers_per_block={config.layers_per_block} in config.json "
            "(the decoder has layers_per_block + 1 per block)"
        )
    if any(".down_blocks." in k or ".up_blocks." in k for k in keys) or any(
        ".down_blocks." in p or ".up_blocks." in p for p in report.unfilled
    ):
        return f"the number of blocks differs: config.json has {len(config.block_out_channels)} block_out_channels"
    if any("mid_block.attentions" in k for k in keys):
        return "the checkpoint has mid-block attention but config.json sets mid_block_add_attention=false"
    if any("mid_block.attentions" in p for p in report.unfilled):
        return "the checkpoint has no mid-block attention: set mid_block_add_attention to false in config.json"
    if mismatched:
        return "widths differ: block_out_channels in config.json and the weights come from different models"
    return ""
