"""The Show-1 UNets: the showone ``UNet3DConditionModel`` (pixel stages and SR2) and IF's ``UNet2DConditionModel``.

One class builds every released UNet from its config.json:
- the IF-style blocks of the pixel stages (ResnetDownsample / SimpleCrossAttn down, mid and up blocks, SPEC.md §5),
- the ModelScope-style blocks of SR2 (CrossAttnDown / Down / mid / Up / CrossAttnUp 3D, SPEC.md §6),
- and, with the temporal layers switched off, DeepFloyd IF-II-L's 2D UNet (SPEC.md §7).

Layout is channels-last: ``unet(sample[B, F, H, W, C], timestep[B] | scalar, encoder_hidden_states[B, L, D],
class_labels=[B]) -> [B, F, H, W, Cout]``; the 2D model takes ``[B, H, W, C]``. Frames fold into the batch as
row = b * F + f, the reference's order, so per-frame layers see the same rows (SPEC.md §1.1).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from show1_jax.configs import config_from_dict
from show1_jax.layers import (
    AddedKVAttention,
    Downsample2D,
    GroupNorm,
    ResnetBlock2D,
    TemporalConvLayer,
    TextTimeEmbedding,
    TimestepEmbedding,
    Transformer2DModel,
    TransformerTemporalModel,
    Upsample2D,
    activation,
    conv2d,
    dense,
    timestep_embedding,
)

Array = jax.Array

IF_DOWN = ("ResnetDownsampleBlock", "SimpleCrossAttnDownBlock")
IF_UP = ("ResnetUpsampleBlock", "SimpleCrossAttnUpBlock")
MS_DOWN = ("DownBlock", "CrossAttnDownBlock")
MS_UP = ("UpBlock", "CrossAttnUpBlock")

# Keys of the diffusers/showone config that we do not model, with the value that makes them a no-op.
_NEUTRAL = {
    "center_input_sample": False,
    "dual_cross_attention": False,
    "time_cond_proj_dim": None,
    "timestep_post_act": None,
    "num_class_embeds": None,
    "projection_class_embeddings_input_dim": None,
    "addition_time_embed_dim": None,
    "class_embeddings_concat": False,
    "time_embedding_type": "positional",
    "upcast_attention": False,  # softmax is computed in >= float32 anyway
    "num_attention_heads": None,
    "resnet_pre_norm": True,
}


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """config.json of a showone UNet3DConditionModel or a diffusers UNet2DConditionModel (key names as released).

    ``attention_head_split`` is ours, not the reference's: "showone" (default) reproduces the showone class's
    (heads, head_dim) order for temporal attention and ModelScope-style spatial attention; "diffusers" uses
    diffusers' order (SPEC.md §1.5). ``temporal`` is False for the 2D (IF-II-L) model.

    ``temporal_position_embedding`` is ours too, and off (None) in every released model: the reference's temporal
    layers have no positional encoding, so frame order is known only through the temporal convolutions' zero
    padding (SPEC.md §5.4). "sinusoidal" adds a fixed (parameter-free) sinusoidal embedding of the frame index to
    every temporal attention's tokens after ``proj_in``, as AnimateDiff's motion modules do; the weights' keys and
    shapes are unchanged, so released weights load with it (and then need finetuning). For small models trained
    from few clips, where the order of the frames (``left`` vs ``right`` is the same path played backwards) is
    otherwise hard to learn.
    """

    in_channels: int = 4
    out_channels: int = 4
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock3D",) * 3 + ("DownBlock3D",)
    up_block_types: tuple[str, ...] = ("UpBlock3D",) + ("CrossAttnUpBlock3D",) * 3
    mid_block_type: str | None = "UNetMidBlock3DCrossAttn"
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int | tuple[int, ...] = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    act_fn: str = "silu"
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int | tuple[int, ...] = 1280
    transformer_layers_per_block: int | tuple[int, ...] = 1
    encoder_hid_dim: int | None = None
    encoder_hid_dim_type: str | None = None
    attention_head_dim: int | tuple[int, ...] = 8
    use_linear_projection: bool = False
    only_cross_attention: bool | tuple[bool, ...] = False
    mid_block_only_cross_attention: bool | None = None
    class_embed_type: str | None = None
    addition_embed_type: str | None = None
    addition_embed_type_num_heads: int = 64
    resnet_time_scale_shift: str = "default"
    resnet_skip_time_act: bool = False
    resnet_out_scale_factor: float = 1.0
    time_embedding_dim: int | None = None
    time_embedding_act_fn: str | None = None
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3
    cross_attention_norm: str | None = None
    transfromer_in_opt: bool = False  # sic: the showone spelling (SPEC.md §6.3)
    attention_head_split: str = "showone"
    temporal: bool = True
    temporal_position_embedding: str | None = None

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> UNetConfig:
        raw = dict(raw)
        if raw.get("_class_name") == "UNet2DConditionModel":
            raw.setdefault("temporal", False)
        return config_from_dict(cls, raw, neutral=_NEUTRAL)

    def __post_init__(self):
        if self.encoder_hid_dim is not None and self.encoder_hid_dim_type is None:
            # The reference's default, registered back into its config.
            object.__setattr__(self, "encoder_hid_dim_type", "text_proj")
        self.validate()

    def per_block(self, value, name: str) -> tuple:
        n = len(self.down_block_types)
        if isinstance(value, (tuple, list)):
            if len(value) != n:
                raise ValueError(f"`{name}` has {len(value)} entries but there are {n} down blocks")
            return tuple(value)
        return (value,) * n

    def validate(self) -> None:
        n = len(self.down_block_types)
        if len(self.up_block_types) != n or len(self.block_out_channels) != n:
            raise ValueError(
                f"config has {n} down blocks, {len(self.up_block_types)} up blocks and "
                f"{len(self.block_out_channels)} block_out_channels: they must agree"
            )
        for name in ("layers_per_block", "attention_head_dim", "cross_attention_dim", "only_cross_attention"):
            self.per_block(getattr(self, name), name)
        known = IF_DOWN + MS_DOWN + IF_UP + MS_UP
        for t in self.down_block_types + self.up_block_types:
            if _block_kind(t) not in known:
                raise ValueError(f"unknown block type `{t}`; supported: {', '.join(k + '3D' for k in known)}")
        if self.attention_head_split not in ("showone", "diffusers"):
            raise ValueError("attention_head_split must be 'showone' or 'diffusers'")
        if self.temporal_position_embedding not in (None, "sinusoidal"):
            raise ValueError(
                f"temporal_position_embedding `{self.temporal_position_embedding}`: use null (the reference) or"
                " 'sinusoidal'"
            )
        if self.encoder_hid_dim_type not in (None, "text_proj"):
            raise ValueError(f"encoder_hid_dim_type `{self.encoder_hid_dim_type}` is not supported (text_proj)")
        if self.class_embed_type not in (None, "timestep"):
            raise ValueError(f"class_embed_type `{self.class_embed_type}` is not supported (timestep)")
        if self.addition_embed_type not in (None, "text"):
            raise ValueError(f"addition_embed_type `{self.addition_embed_type}` is not supported (text)")
        if any(t not in (1,) for t in self.per_block(self.transformer_layers_per_block, "transformer_layers")):
            if any(_block_kind(t) in IF_DOWN for t in self.down_block_types):
                raise ValueError("transformer_layers_per_block > 1 only exists for ModelScope-style blocks")

    @property
    def time_embed_dim(self) -> int:
        return self.time_embedding_dim or 4 * self.block_out_channels[0]


def _block_kind(block_type: str) -> str:
    """'SimpleCrossAttnDownBlock3D' -> 'SimpleCrossAttnDownBlock': 2D and 3D names share one implementation."""
    return block_type.replace("2D", "").replace("3D", "")


def _split(channels: int, n: int, mode: str) -> tuple[int, int]:
    """(heads, head_dim) of a showone-quirk attention built as (n, C // n); diffusers builds (C // n, n)."""
    return (n, channels // n) if mode == "showone" else (channels // n, n)


class _Layer(nnx.Module):
    """One layer of a block: resnet -> temporal conv [-> spatial attention -> temporal attention]."""

    def __init__(
        self,
        cfg: UNetConfig,
        cin: int,
        cout: int,
        *,
        attn: str | None,
        heads_arg: int,
        context_dim: int,
        only_cross: bool,
        transformer_layers: int,
        if_style: bool,
        dtype,
        rngs: nnx.Rngs,
    ):
        self.resnet = ResnetBlock2D(
            cin,
            cout,
            cfg.time_embed_dim,
            groups=cfg.norm_num_groups,
            eps=cfg.norm_eps,
            act=cfg.act_fn,
            time_scale_shift=cfg.resnet_time_scale_shift,
            skip_time_act=cfg.resnet_skip_time_act if if_style else False,
            output_scale_factor=cfg.resnet_out_scale_factor if if_style else 1.0,
            dtype=dtype,
            rngs=rngs,
        )
        self.temp_conv = TemporalConvLayer(cout, dtype=dtype, rngs=rngs) if cfg.temporal else None
        attention = temp_attention = None
        if attn == "added_kv":
            attention = AddedKVAttention(
                cout,
                cout // heads_arg,
                heads_arg,
                context_dim=context_dim,
                groups=cfg.norm_num_groups,
                cross_attention_norm=cfg.cross_attention_norm,
                only_cross_attention=only_cross,
                dtype=dtype,
                rngs=rngs,
            )
        elif attn == "transformer":
            heads, head_dim = _split(cout, heads_arg, cfg.attention_head_split)
            attention = Transformer2DModel(
                cout,
                heads,
                head_dim,
                context_dim=context_dim,
                groups=cfg.norm_num_groups,
                num_layers=transformer_layers,
                dtype=dtype,
                rngs=rngs,
            )
        if attn is not None and cfg.temporal:
            heads, head_dim = _split(cout, heads_arg, cfg.attention_head_split)
            temp_attention = TransformerTemporalModel(
                cout,
                heads,
                head_dim,
                groups=cfg.norm_num_groups,
                position_embedding=cfg.temporal_position_embedding,
                dtype=dtype,
                rngs=rngs,
            )
        self.attention, self.temp_attention = nnx.data(attention), nnx.data(temp_attention)


class _Block(nnx.Module):
    """A down or up block. Attribute names mirror the reference state dict (resnets, temp_convs, attentions, ...)."""

    def __init__(
        self,
        cfg: UNetConfig,
        kind: str,
        cin: int,
        cout: int,
        *,
        prev_out: int | None,
        num_layers: int,
        heads_arg: int,
        context_dim: int,
        only_cross: bool,
        transformer_layers: int,
        resample: bool,
        dtype,
        rngs: nnx.Rngs,
    ):
        self.is_up = kind in IF_UP + MS_UP
        self.if_style = kind in IF_DOWN + IF_UP
        attn = None
        if kind.startswith("SimpleCrossAttn"):
            attn = "added_kv"
        elif kind.startswith("CrossAttn"):
            attn = "transformer"
        resnets, temp_convs, attentions, temp_attentions = [], [], [], []
        for i in range(num_layers):
            if self.is_up:
                skip = cin if i == num_layers - 1 else cout
                rin = (prev_out if i == 0 else cout) + skip
            else:
                rin = cin if i == 0 else cout
            layer = _Layer(
                cfg,
                rin,
                cout,
                attn=attn,
                heads_arg=heads_arg,
                context_dim=context_dim,
                only_cross=only_cross,
                transformer_layers=transformer_layers,
                if_style=self.if_style,
                dtype=dtype,
                rngs=rngs,
            )
            resnets.append(layer.resnet)
            if layer.temp_conv is not None:
                temp_convs.append(layer.temp_conv)
            if layer.attention is not None:
                attentions.append(layer.attention)
            if layer.temp_attention is not None:
                temp_attentions.append(layer.temp_attention)
        self.resnets = nnx.List(resnets)
        self.temp_convs = nnx.List(temp_convs)
        self.attentions = nnx.List(attentions)
        self.temp_attentions = nnx.List(temp_attentions)
        samplers = None
        if resample:
            if self.if_style:
                sampler = ResnetBlock2D(
                    cout,
                    cout,
                    cfg.time_embed_dim,
                    groups=cfg.norm_num_groups,
                    eps=cfg.norm_eps,
                    act=cfg.act_fn,
                    time_scale_shift=cfg.resnet_time_scale_shift,
                    skip_time_act=cfg.resnet_skip_time_act,
                    output_scale_factor=cfg.resnet_out_scale_factor,
                    up=self.is_up,
                    down=not self.is_up,
                    dtype=dtype,
                    rngs=rngs,
                )
            elif self.is_up:
                sampler = Upsample2D(cout, dtype=dtype, rngs=rngs)
            else:
                sampler = Downsample2D(cout, padding=cfg.downsample_padding, dtype=dtype, rngs=rngs)
            samplers = nnx.List([sampler])
        self.upsamplers = samplers if self.is_up else None
        self.downsamplers = None if self.is_up else samplers

    def _layer(self, i: int, h: Array, temb: Array, context: Array, num_frames: int, dropout_key) -> Array:
        h = self.resnets[i](h, temb)
        if len(self.temp_convs):
            key = None if dropout_key is None else jax.random.fold_in(dropout_key, i)
            h = self.temp_convs[i](h, num_frames, key)
        if len(self.attentions):
            h = self.attentions[i](h, context)
            if len(self.temp_attentions):
                h = self.temp_attentions[i](h, num_frames)
        return h

    def down(self, h, temb, context, num_frames, dropout_key=None) -> tuple[Array, list[Array]]:
        skips = []
        for i in range(len(self.resnets)):
            h = self._layer(i, h, temb, context, num_frames, dropout_key)
            skips.append(h)
        if self.downsamplers is not None:
            d = self.downsamplers[0]
            h = d(h, temb) if self.if_style else d(h)
            skips.append(h)
        return h, skips

    def up(self, h, skips, temb, context, num_frames, upsample_size=None, dropout_key=None) -> Array:
        for i in range(len(self.resnets)):
            h = jnp.concatenate([h, skips.pop()], axis=-1)  # [h, skip]: h first (SPEC.md §1.2)
            h = self._layer(i, h, temb, context, num_frames, dropout_key)
        if self.upsamplers is not None:
            u = self.upsamplers[0]
            h = u(h, temb) if self.if_style else u(h, upsample_size)
        return h


class _MidBlock(nnx.Module):
    """resnet0 -> temp_conv0 -> [attention -> temp_attention -> resnet1 -> temp_conv1]."""

    def __init__(self, cfg: UNetConfig, channels: int, *, heads_arg: int, context_dim: int, dtype, rngs: nnx.Rngs):
        kind = _block_kind(cfg.mid_block_type)
        self.if_style = "SimpleCrossAttn" in kind
        if kind not in ("UNetMidBlockSimpleCrossAttn", "UNetMidBlockCrossAttn"):
            raise ValueError(f"mid_block_type `{cfg.mid_block_type}` is not supported")
        only_cross = (
            bool(cfg.mid_block_only_cross_attention)
            if cfg.mid_block_only_cross_attention is not None
            else (cfg.only_cross_attention if isinstance(cfg.only_cross_attention, bool) else False)
        )
        layers = [
            _Layer(
                cfg,
                channels,
                channels,
                attn=None,
                heads_arg=heads_arg,
                context_dim=context_dim,
                only_cross=only_cross,
                transformer_layers=1,
                if_style=self.if_style,
                dtype=dtype,
                rngs=rngs,
            ),
            _Layer(
                cfg,
                channels,
                channels,
                attn="added_kv" if self.if_style else "transformer",
                heads_arg=heads_arg,
                context_dim=context_dim,
                only_cross=only_cross,
                transformer_layers=cfg.per_block(cfg.transformer_layers_per_block, "transformer_layers")[-1],
                if_style=self.if_style,
                dtype=dtype,
                rngs=rngs,
            ),
        ]
        for layer in layers:  # the mid block scales its resnets by mid_block_scale_factor, not the blocks' factor
            layer.resnet.output_scale_factor = cfg.mid_block_scale_factor
            if not self.if_style:
                layer.resnet.skip_time_act = False
        self.resnets = nnx.List([layer.resnet for layer in layers])
        self.temp_convs = nnx.List([layer.temp_conv for layer in layers if layer.temp_conv is not None])
        self.attentions = nnx.List([layers[1].attention])
        self.temp_attentions = nnx.List([layers[1].temp_attention] if layers[1].temp_attention is not None else [])

    def __call__(self, h, temb, context, num_frames, dropout_key=None) -> Array:
        keys = [None, None] if dropout_key is None else [jax.random.fold_in(dropout_key, i) for i in range(2)]
        h = self.resnets[0](h, temb)
        if len(self.temp_convs):
            h = self.temp_convs[0](h, num_frames, keys[0])
        h = self.attentions[0](h, context)
        if len(self.temp_attentions):
            h = self.temp_attentions[0](h, num_frames)
        h = self.resnets[1](h, temb)
        if len(self.temp_convs):
            h = self.temp_convs[1](h, num_frames, keys[1])
        return h


class UNet3DConditionModel(nnx.Module):
    """The showone 3D UNet (SPEC.md §5.2 forward; §6 for the SR2 configuration)."""

    config_class = UNetConfig

    def __init__(self, config: UNetConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        cfg = self.config = config
        self.dtype = dtype
        c0 = cfg.block_out_channels[0]
        ted = cfg.time_embed_dim
        n = len(cfg.down_block_types)
        layers = cfg.per_block(cfg.layers_per_block, "layers_per_block")
        head_args = cfg.per_block(cfg.attention_head_dim, "attention_head_dim")
        ctx_dims = cfg.per_block(cfg.cross_attention_dim, "cross_attention_dim")
        only_cross = cfg.per_block(cfg.only_cross_attention, "only_cross_attention")
        tlayers = cfg.per_block(cfg.transformer_layers_per_block, "transformer_layers_per_block")

        self.conv_in = conv2d(cfg.in_channels, c0, cfg.conv_in_kernel, dtype=dtype, rngs=rngs)
        # Hard-wired in the showone class: 8 heads x 64, GroupNorm(32), whatever the width (SPEC.md §6.3).
        self.transformer_in = (
            TransformerTemporalModel(
                c0, 8, 64, groups=32, position_embedding=cfg.temporal_position_embedding, dtype=dtype, rngs=rngs
            )
            if cfg.transfromer_in_opt
            else None
        )
        self.time_embedding = TimestepEmbedding(c0, ted, act=cfg.act_fn, dtype=dtype, rngs=rngs)
        self.class_embedding = (
            TimestepEmbedding(c0, ted, act=cfg.act_fn, dtype=dtype, rngs=rngs)
            if cfg.class_embed_type == "timestep"
            else None
        )
        self.encoder_hid_proj = (
            dense(cfg.encoder_hid_dim, ctx_dims[0], dtype=dtype, rngs=rngs)
            if cfg.encoder_hid_dim_type == "text_proj"
            else None
        )
        text_dim = cfg.encoder_hid_dim if cfg.encoder_hid_dim is not None else ctx_dims[0]
        self.add_embedding = (
            TextTimeEmbedding(text_dim, ted, cfg.addition_embed_type_num_heads, dtype=dtype, rngs=rngs)
            if cfg.addition_embed_type == "text"
            else None
        )

        down, out = [], c0
        for i, t in enumerate(cfg.down_block_types):
            cin, out = out, cfg.block_out_channels[i]
            down.append(
                _Block(
                    cfg,
                    _block_kind(t),
                    cin,
                    out,
                    prev_out=None,
                    num_layers=layers[i],
                    heads_arg=head_args[i],
                    context_dim=ctx_dims[i],
                    only_cross=only_cross[i],
                    transformer_layers=tlayers[i],
                    resample=i < n - 1,
                    dtype=dtype,
                    rngs=rngs,
                )
            )
        self.down_blocks = nnx.List(down)
        self.mid_block = (
            _MidBlock(
                cfg,
                cfg.block_out_channels[-1],
                heads_arg=head_args[-1],
                context_dim=ctx_dims[-1],
                dtype=dtype,
                rngs=rngs,
            )
            if cfg.mid_block_type is not None
            else None
        )

        rev = list(reversed(cfg.block_out_channels))
        up, prev = [], rev[0]
        for i, t in enumerate(cfg.up_block_types):
            out, cin = rev[i], rev[min(i + 1, n - 1)]
            # The reference indexes attention_head_dim un-reversed for up blocks (a diffusers 0.19 quirk we keep).
            kind = _block_kind(t)
            heads_arg = head_args[i] if kind in IF_UP else tuple(reversed(head_args))[i]
            up.append(
                _Block(
                    cfg,
                    kind,
                    cin,
                    out,
                    prev_out=prev,
                    num_layers=tuple(reversed(layers))[i] + 1,
                    heads_arg=heads_arg,
                    context_dim=tuple(reversed(ctx_dims))[i],
                    only_cross=tuple(reversed(only_cross))[i],
                    transformer_layers=tuple(reversed(tlayers))[i],
                    resample=i < n - 1,
                    dtype=dtype,
                    rngs=rngs,
                )
            )
            prev = out
        self.up_blocks = nnx.List(up)
        self.conv_norm_out = GroupNorm(cfg.norm_num_groups, c0, eps=cfg.norm_eps, dtype=dtype)
        self.conv_out = conv2d(c0, cfg.out_channels, cfg.conv_out_kernel, dtype=dtype, rngs=rngs)

    # -- forward --------------------------------------------------------------------------------------------------

    def embed(self, timestep: Array, encoder_hidden_states: Array, class_labels: Array | None) -> tuple[Array, Array]:
        """(emb [B, D_time], context [B, L, D_ctx]) before the per-frame repeat (SPEC.md §5.2 steps 1-5)."""
        cfg, dtype = self.config, self.dtype
        c0 = cfg.block_out_channels[0]
        sinus = lambda t: timestep_embedding(  # noqa: E731
            t, c0, flip_sin_to_cos=cfg.flip_sin_to_cos, freq_shift=cfg.freq_shift, dtype=dtype
        )
        emb = self.time_embedding(sinus(timestep))
        if self.class_embedding is not None:
            if class_labels is None:
                raise ValueError("this UNet has a noise-level (class) embedding: pass class_labels=[B] noise levels")
            emb = emb + self.class_embedding(sinus(class_labels))
        elif class_labels is not None:
            raise ValueError("this UNet has no noise-level (class) embedding: class_labels would be ignored, drop it")
        if self.add_embedding is not None:
            emb = emb + self.add_embedding(encoder_hidden_states)
        if cfg.time_embedding_act_fn is not None:
            emb = activation(cfg.time_embedding_act_fn)(emb)
        context = encoder_hidden_states
        if self.encoder_hid_proj is not None:
            context = self.encoder_hid_proj(encoder_hidden_states)
        return emb, context

    def __call__(
        self,
        sample: Array,
        timestep: Array | int,
        encoder_hidden_states: Array,
        *,
        class_labels: Array | None = None,
        dropout_key: Array | None = None,
    ) -> Array:
        """Denoise one batch of videos.

        Args:
          sample: [B, F, H, W, Cin] (the 2D model: [B, H, W, Cin]).
          timestep: [B] or a scalar.
          encoder_hidden_states: [B, L, D] raw text states (T5 for the pixel stages, CLIP for SR2).
          class_labels: [B] noise levels, for models with a timestep class embedding (SR1, IF-II-L).
          dropout_key: if given, the reference's train-mode temporal-conv dropout (SPEC.md §1.6); None = eval.

        Returns:
          [B, F, H, W, Cout] (2D: [B, H, W, Cout]).
        """
        cfg = self.config
        image = not cfg.temporal
        expected_rank = 4 if image else 5
        if sample.ndim != expected_rank:
            layout = "[B, H, W, C]" if image else "[B, F, H, W, C]"
            raise ValueError(f"sample must be {layout} (channels last), got shape {sample.shape}")
        if image:
            sample = sample[:, None]
        b, f, hh, ww, c = sample.shape
        if c != cfg.in_channels:
            raise ValueError(
                f"sample has {c} channels on its last axis, the model expects {cfg.in_channels}: "
                "inputs are channels-last [B, F, H, W, C]"
            )
        if encoder_hidden_states.ndim != 3 or encoder_hidden_states.shape[0] != b:
            raise ValueError(f"encoder_hidden_states must be [B={b}, L, D], got {encoder_hidden_states.shape}")
        dtype = self.dtype
        timestep = jnp.broadcast_to(jnp.asarray(timestep), (b,))
        if class_labels is not None:
            class_labels = jnp.broadcast_to(jnp.asarray(class_labels), (b,))
        emb, context = self.embed(timestep, encoder_hidden_states.astype(dtype), class_labels)
        emb = jnp.repeat(emb, f, axis=0)  # row = b * F + f (repeat_interleave)
        context = jnp.repeat(context, f, axis=0)

        h = self.conv_in(sample.astype(dtype).reshape(b * f, hh, ww, c))
        if self.transformer_in is not None:
            h = self.transformer_in(h, f)
        skips = [h]
        for i, block in enumerate(self.down_blocks):
            key = None if dropout_key is None else jax.random.fold_in(dropout_key, i)
            h, res = block.down(h, emb, context, f, key)
            skips += res
        if self.mid_block is not None:
            key = None if dropout_key is None else jax.random.fold_in(dropout_key, 100)
            h = self.mid_block(h, emb, context, f, key)
        for i, block in enumerate(self.up_blocks):
            n_res = len(block.resnets)
            res, skips = skips[-n_res:], skips[:-n_res]
            size = tuple(skips[-1].shape[1:3]) if skips else None  # the reference's forward_upsample_size
            key = None if dropout_key is None else jax.random.fold_in(dropout_key, 200 + i)
            h = block.up(h, res, emb, context, f, size, key)
        h = activation(cfg.act_fn)(self.conv_norm_out(h))
        out = self.conv_out(h).reshape(b, f, hh, ww, cfg.out_channels)
        return out[:, 0] if image else out


class UNet2DConditionModel(UNet3DConditionModel):
    """DeepFloyd IF's 2D UNet (IF-II-L for SR1's first frame): the same blocks without temporal layers."""

    config_class = UNetConfig
