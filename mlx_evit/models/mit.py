"""MIT EfficientViT B0-B3 and L1-L3 (Cai et al., ICCV 2023), NHWC.

Two series share one implementation:

* B series: hardswish, BatchNorm eps 1e-5, DSConv stem blocks, MBConv
  stages 1-2, EfficientViT blocks (LiteMLA + MBConv) in stages 3-4.
* L series: tanh-GELU, BatchNorm/LayerNorm eps 1e-7, ResBlock stem blocks,
  FusedMBConv stages 1-2, MBConv stage 3, EfficientViT blocks in stage 4.

MLX parameter paths are timm's state-dict keys (``stem.in_conv.conv.weight``,
``stages.2.blocks.1.context_module.main.qkv.conv.weight``,
``head.classifier.4.bias``), so timm checkpoints load without renaming and
the original mit-han-lab checkpoints load through a regex table
(:data:`ORIGINAL_LAYOUT`, :data:`ORIGINAL_LARGE_LAYOUT`).

The two reference implementations differ in two constants, both arguments
here: the LiteMLA normaliser eps (``attention_eps``: timm 1e-5, original
1e-15) and, for the L series, the eps of the head's BatchNorm
(``head_norm_eps``: timm 1e-5, original 1e-7 like every other norm). The
original layouts imply the original values when loaded through
:func:`mlx_evit.convert.load_into`.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Callable, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn

from mlx_evit.ops.layers import (
    ConvNorm,
    DepthwiseConv2d,
    GroupedPointwise,
    check_image_input,
    fuse_modules,
    get_act,
    linear_attention,
    relu,
)
from mlx_evit.models.metadata import Described
from mlx_evit.models.specs import ModelEntry, PretrainedCfg
from mlx_evit.models.keymap import KeyMap

__all__ = [
    "MitEfficientViT",
    "LiteMLA",
    "EfficientViTBlock",
    "MBConv",
    "FusedMBConv",
    "DSConv",
    "ResBlock",
    "TIMM_LAYOUT",
    "ORIGINAL_LAYOUT",
    "ORIGINAL_LARGE_LAYOUT",
    "MODELS",
]

Act = Optional[Callable[[mx.array], mx.array]]


# ---------------------------------------------------------------------------
# Blocks
# ---------------------------------------------------------------------------


class Residual(nn.Module):
    """``main(x) + x`` (``shortcut=True``) or just ``main(x)``; child ``main``."""

    def __init__(self, main: nn.Module, shortcut: bool):
        super().__init__()
        self.main = main
        self.shortcut = shortcut

    def __call__(self, x: mx.array) -> mx.array:
        y = self.main(x)
        return y + x if self.shortcut else y


class DSConv(nn.Module):
    """Depthwise 3x3 (BN, act) then pointwise (BN): the B-series stem block."""

    def __init__(self, cin: int, cout: int, stride: int, act: Act, eps: float):
        super().__init__()
        self.depth_conv = ConvNorm(cin, cin, 3, stride, groups=cin, act=act, eps=eps)
        self.point_conv = ConvNorm(cin, cout, 1, eps=eps)

    def __call__(self, x: mx.array) -> mx.array:
        return self.point_conv(self.depth_conv(x))


class ResBlock(nn.Module):
    """Two full 3x3 convolutions (BN, act / BN): the L-series stem block."""

    def __init__(self, cin: int, cout: int, stride: int, act: Act, eps: float):
        super().__init__()
        self.conv1 = ConvNorm(cin, cin, 3, stride, act=act, eps=eps)
        self.conv2 = ConvNorm(cin, cout, 3, eps=eps)

    def __call__(self, x: mx.array) -> mx.array:
        return self.conv2(self.conv1(x))


class MBConv(nn.Module):
    """Inverted bottleneck: 1x1 expand, 3x3 depthwise (stride), 1x1 project.

    ``fewer_norm``: the expand and depthwise convolutions carry a bias and no
    BatchNorm; only the projection is normalised (B stages 3-4 downsample,
    L stage 3-4, every EfficientViT block's local module).
    """

    def __init__(self, cin: int, cout: int, stride: int, expand: float, act: Act, eps: float,
                 fewer_norm: bool = False):
        super().__init__()
        mid = round(cin * expand)
        full = not fewer_norm
        self.inverted_conv = ConvNorm(cin, mid, 1, bias=fewer_norm, norm=full, act=act, eps=eps)
        self.depth_conv = ConvNorm(mid, mid, 3, stride, groups=mid, bias=fewer_norm, norm=full, act=act, eps=eps)
        self.point_conv = ConvNorm(mid, cout, 1, eps=eps)

    def __call__(self, x: mx.array) -> mx.array:
        return self.point_conv(self.depth_conv(self.inverted_conv(x)))


class FusedMBConv(nn.Module):
    """Full 3x3 expand convolution (stride) then 1x1 projection (L stages 1-2)."""

    def __init__(self, cin: int, cout: int, stride: int, expand: float, act: Act, eps: float):
        super().__init__()
        mid = round(cin * expand)
        self.spatial_conv = ConvNorm(cin, mid, 3, stride, act=act, eps=eps)
        self.point_conv = ConvNorm(mid, cout, 1, eps=eps)

    def __call__(self, x: mx.array) -> mx.array:
        return self.point_conv(self.spatial_conv(x))


class LiteMLA(nn.Module):
    """Lightweight multi-scale linear attention, one 5x5 aggregation scale.

    ``qkv`` (1x1) gives ``3 * heads * dim`` channels laid out per head as
    ``[q | k | v]``; ``aggreg.0`` (5x5 depthwise, then a 1x1 grouped per q/k/v
    of each head) gives a second, spatially aggregated copy. The raw and
    aggregated copies form ``2 * heads`` attention groups, each attending with
    ReLU kernels in O(N) (float32), and ``proj`` (1x1 + BN) maps the
    ``2 * heads * dim`` outputs back to ``channels``.
    """

    def __init__(self, channels: int, dim: int, eps: float, norm_eps: float, kernel_size: int = 5):
        super().__init__()
        heads = channels // dim
        total = heads * dim
        self.dim = dim
        self.eps = eps
        self.qkv = ConvNorm(channels, 3 * total, 1, norm=False)
        self.aggreg = [[
            DepthwiseConv2d(3 * total, kernel_size),
            GroupedPointwise(3 * total, 3 * total, groups=3 * heads),
        ]]
        self.proj = ConvNorm(2 * total, channels, 1, eps=norm_eps)

    def __call__(self, x: mx.array) -> mx.array:
        B, H, W, _ = x.shape
        N, d = H * W, self.dim
        qkv = self.qkv(x)
        heads = qkv.shape[-1] // (3 * d)
        # Each scale attends in its own layout, with no concatenation of the two copies (one fewer
        # full copy of the 6 * heads * dim channels): the raw copy as a strided (B, heads, N, 3 dim)
        # view, the aggregated one straight from the grouped 1x1's per-group output (B, 3 heads, N, dim),
        # group 3h + j being q, k, v (j = 0, 1, 2) of head h. x86 CPU (benchmarks/litemla_ab.py, min of 15,
        # compiled, 2 loaded cores): 16x14x14x256 1322 ms against 2995 for the concatenated form, 1x32x32x512
        # 2162 vs 3911, 8x14x14x128 321 vs 379. GPU: not measured on its own (gpu_bench.py models).
        raw = qkv.reshape(B, N, heads, 3 * d).transpose(0, 2, 1, 3)
        outs = [linear_attention(relu(raw[..., :d]), relu(raw[..., d : 2 * d]), raw[..., 2 * d :], self.eps)]
        for dw, pw in self.aggreg:
            agg = pw.per_group(dw(qkv)).reshape(B, heads, 3, N, d)
            outs.append(linear_attention(relu(agg[:, :, 0]), relu(agg[:, :, 1]), agg[:, :, 2], self.eps))
        out = mx.concatenate(outs, axis=1).astype(x.dtype)  # (B, G, N, dim), G = 2 heads
        out = out.transpose(0, 2, 1, 3).reshape(B, H, W, -1)  # channel = g * dim + d
        return self.proj(out)


class EfficientViTBlock(nn.Module):
    """LiteMLA (context) then a fewer-norm MBConv (local), each residual."""

    def __init__(self, channels: int, dim: int, expand: float, act: Act, eps: float, attention_eps: float,
                 kernel_size: int = 5):
        super().__init__()
        self.context_module = Residual(LiteMLA(channels, dim, attention_eps, eps, kernel_size), shortcut=True)
        self.local_module = Residual(
            MBConv(channels, channels, 1, expand, act, eps, fewer_norm=True), shortcut=True
        )

    def __call__(self, x: mx.array) -> mx.array:
        return self.local_module(self.context_module(x))


class Stem(nn.Module):
    """3x3 stride-2 conv (``in_conv``) then ``depth`` residual blocks ``res0, res1, ...``."""

    def __init__(self, cin: int, cout: int, depth: int, large: bool, act: Act, eps: float):
        super().__init__()
        self.in_conv = ConvNorm(cin, cout, 3, 2, act=act, eps=eps)
        block = ResBlock if large else DSConv
        self.depth = depth
        for i in range(depth):
            setattr(self, f"res{i}", Residual(block(cout, cout, 1, act, eps), shortcut=True))

    def __call__(self, x: mx.array) -> mx.array:
        x = self.in_conv(x)
        for i in range(self.depth):
            x = getattr(self, f"res{i}")(x)
        return x


class Stage(nn.Module):
    """One stride-2 stage: ``blocks[0]`` downsamples (no residual), the rest keep size."""

    def __init__(self, blocks: list[nn.Module]):
        super().__init__()
        self.blocks = blocks

    def __call__(self, x: mx.array) -> mx.array:
        for block in self.blocks:
            x = block(x)
        return x


class _Activation(nn.Module):
    """A parameterless activation as a module (keeps timm's classifier indices)."""

    def __init__(self, fn: Act):
        super().__init__()
        self.fn = fn

    def __call__(self, x: mx.array) -> mx.array:
        return x if self.fn is None else self.fn(x)


class ClassifierHead(nn.Module):
    """1x1 conv (BN, act) -> global average pool -> Linear -> LayerNorm -> act -> Linear.

    ``classifier`` indices follow timm (0 Linear, 1 LayerNorm, 2 act,
    3 dropout, 4 Linear); without classes the last Linear is an identity and
    the head returns the ``widths[1]`` pre-logits features.
    """

    def __init__(self, cin: int, widths: Sequence[int], num_classes: int, act: Act,
                 norm_eps: float, head_norm_eps: float, drop_rate: float = 0.0):
        super().__init__()
        w0, w1 = widths
        self.in_conv = ConvNorm(cin, w0, 1, act=act, eps=head_norm_eps)
        self.classifier = [
            nn.Linear(w0, w1, bias=False),
            nn.LayerNorm(w1, eps=norm_eps),
            _Activation(act),
            nn.Dropout(drop_rate),
            nn.Linear(w1, num_classes) if num_classes else nn.Identity(),
        ]

    def __call__(self, x: mx.array) -> mx.array:
        x = self.in_conv(x).mean(axis=(1, 2))
        for layer in self.classifier:
            x = layer(x)
        return x


# ---------------------------------------------------------------------------
# Checkpoint layouts
# ---------------------------------------------------------------------------

# The original code's constants: LiteMLA eps 1e-15, head BatchNorm eps = norm eps.
_ORIGINAL_DEFAULTS = MappingProxyType({"attention_eps": 1e-15, "head_norm_eps": None})

# timm's keys are the MLX parameter paths.
TIMM_LAYOUT = KeyMap(
    name="timm",
    marker=r"^(stem\.in_conv|stages\.\d+\.blocks|head\.in_conv|head\.classifier)\.",
)

_HEAD_RULES = (
    (r"^head\.op_list\.0\.", "head.in_conv."),
    (r"^head\.op_list\.2\.linear\.", "head.classifier.0."),
    (r"^head\.op_list\.2\.norm\.", "head.classifier.1."),
    (r"^head\.op_list\.3\.linear\.", "head.classifier.4."),
)
# Stem block n (original op_list.n, n >= 1) is timm's res{n-1}.
_MAX_STEM_BLOCKS = 9

# mit-han-lab B series: backbone.input_stem.op_list.*, backbone.stages.{0-3}.
ORIGINAL_LAYOUT = KeyMap(
    name="mit-han-lab (B series)",
    marker=r"^backbone\.input_stem\.",
    rules=(
        (r"^backbone\.input_stem\.op_list\.0\.", "stem.in_conv."),
        *((rf"^backbone\.input_stem\.op_list\.{n}\.", f"stem.res{n - 1}.") for n in range(1, _MAX_STEM_BLOCKS + 1)),
        (r"^backbone\.stages\.(\d+)\.op_list\.", r"stages.\1.blocks."),
        *_HEAD_RULES,
    ),
    defaults=_ORIGINAL_DEFAULTS,
)

# mit-han-lab L series: the stem is backbone.stages.0, stage i is backbone.stages.{i+1}.
# (Not expressible in the B table: e.g. backbone.stages.3.op_list.0.main.* is a
# B stage-4 or an L stage-3 block depending on the series.)
ORIGINAL_LARGE_LAYOUT = KeyMap(
    name="mit-han-lab (L series)",
    marker=r"^backbone\.stages\.(0\.op_list\.\d+\.(conv|norm|main\.conv[12])|4)\.",
    rules=(
        (r"^backbone\.stages\.0\.op_list\.0\.", "stem.in_conv."),
        *((rf"^backbone\.stages\.0\.op_list\.{n}\.", f"stem.res{n - 1}.") for n in range(1, _MAX_STEM_BLOCKS + 1)),
        *((rf"^backbone\.stages\.{i + 1}\.op_list\.", f"stages.{i}.blocks.") for i in range(4)),
        *_HEAD_RULES,
    ),
    defaults=_ORIGINAL_DEFAULTS,
)


# ---------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------


class MitEfficientViT(Described, nn.Module):
    """MIT EfficientViT classifier (B or L series), NHWC.

    ``widths``/``depths``: stem then four stages (timm's convention: B stages
    1-2 count their downsample block in ``depth``, every other stage adds
    ``depth`` blocks after it). ``head_dim``: LiteMLA per-head size.
    ``head_widths``: (head conv width, pre-logits width). ``norm_eps`` applies
    to every BatchNorm and the head LayerNorm except the head's BatchNorm,
    which uses ``head_norm_eps`` (``None``: same as ``norm_eps``).

    ``model(x)``: ``(B, H, W, in_chans)`` -> logits ``(B, num_classes)``, or
    ``(B, num_features)`` pre-logits features when ``num_classes`` is 0/None.
    Any input size works (no positional parameters).
    """

    checkpoint_layouts = (TIMM_LAYOUT, ORIGINAL_LAYOUT, ORIGINAL_LARGE_LAYOUT)

    def __init__(
        self,
        widths: Sequence[int],
        depths: Sequence[int],
        head_dim: int,
        head_widths: Sequence[int],
        large: bool = False,
        num_classes: Optional[int] = 1000,
        in_chans: int = 3,
        act: Optional[str] = None,
        expand_ratio: float = 4.0,
        norm_eps: Optional[float] = None,
        head_norm_eps: Optional[float] = None,
        attention_eps: float = 1e-5,
        drop_rate: float = 0.0,
    ):
        super().__init__()
        if len(widths) != 5 or len(depths) != 5:
            raise ValueError(f"widths and depths need 5 entries (stem + 4 stages), got {widths}, {depths}")
        act_fn = get_act(act if act is not None else ("gelu_tanh" if large else "hswish"))
        eps = norm_eps if norm_eps is not None else (1e-7 if large else 1e-5)
        head_eps = head_norm_eps if head_norm_eps is not None else eps
        self.large = large
        self.in_chans = in_chans
        self.num_classes = num_classes or 0
        self.num_features = head_widths[-1]
        self.attention_eps = attention_eps

        self.stem = Stem(in_chans, widths[0], depths[0], large, act_fn, eps)
        self.stages = self.build_stages(widths, depths, head_dim, large, act_fn, eps, attention_eps, expand_ratio)
        cin = widths[-1]
        # Per returned feature map: channels and stride (reduction), as timm's feature_info.
        self.feature_info = [dict(num_chs=w, reduction=2 ** (i + 2)) for i, w in enumerate(widths[1:])]
        self.head = ClassifierHead(cin, head_widths, self.num_classes, act_fn, eps, head_eps, drop_rate)

    @classmethod
    def build_stages(cls, widths: Sequence[int], depths: Sequence[int], head_dim: int, large: bool, act, eps: float,
                     attention_eps: float, expand_ratio: float = 4.0) -> list[Stage]:
        """The four backbone stages after the stem (``widths[0]`` channels in), B or L series.

        Shared with the segmentation backbone (:mod:`mlx_evit.models.seg_model`), which runs them its own way.
        """
        stages, cin = [], widths[0]
        for i, (w, d) in enumerate(zip(widths[1:], depths[1:])):
            if large:
                blocks = cls._large_stage(i, cin, w, d, head_dim, act, eps, attention_eps)
            else:
                blocks = cls._stage(i, cin, w, d, head_dim, expand_ratio, act, eps, attention_eps)
            stages.append(Stage(blocks))
            cin = w
        return stages

    @staticmethod
    def _stage(i, cin, w, d, head_dim, expand, act, eps, attention_eps) -> list[nn.Module]:
        """B series: MBConv stages (0, 1), then EfficientViT stages (2, 3)."""
        vit = i >= 2
        blocks = [Residual(MBConv(cin, w, 2, expand, act, eps, fewer_norm=vit), shortcut=False)]
        if vit:
            blocks += [EfficientViTBlock(w, head_dim, expand, act, eps, attention_eps) for _ in range(d)]
        else:
            blocks += [Residual(MBConv(w, w, 1, expand, act, eps), shortcut=True) for _ in range(d - 1)]
        return blocks

    @staticmethod
    def _large_stage(i, cin, w, d, head_dim, act, eps, attention_eps) -> list[nn.Module]:
        """L series: FusedMBConv (0, 1), fewer-norm MBConv (2), EfficientViT (3)."""
        if i < 2:
            down = FusedMBConv(cin, w, 2, 16, act, eps)
            body = [FusedMBConv(w, w, 1, 4, act, eps) for _ in range(d)]
        elif i == 2:
            down = MBConv(cin, w, 2, 16, act, eps, fewer_norm=True)
            body = [MBConv(w, w, 1, 4, act, eps, fewer_norm=True) for _ in range(d)]
        else:
            down = MBConv(cin, w, 2, 24, act, eps, fewer_norm=True)
            return [Residual(down, shortcut=False)] + [
                EfficientViTBlock(w, head_dim, 6, act, eps, attention_eps) for _ in range(d)
            ]
        return [Residual(down, shortcut=False)] + [Residual(b, shortcut=True) for b in body]

    def forward_features(self, x: mx.array) -> list[mx.array]:
        """The four stage outputs, NHWC, at strides 4, 8, 16 and 32.

        Channels are ``widths[1:]``; odd sizes round up (``ceil(H / 2)`` per
        stride-2 layer).
        """
        check_image_input(x, self.in_chans)
        x = self.stem(x)
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        return feats

    def forward_head(self, x: mx.array) -> mx.array:
        """Last stage map ``(B, h, w, C)`` -> logits (or pre-logits features)."""
        return self.head(x)

    def __call__(self, x: mx.array) -> mx.array:
        return self.forward_head(self.forward_features(x)[-1])

    def fuse(self) -> "MitEfficientViT":
        """Fold every BatchNorm into its convolution (inference; in place)."""
        return fuse_modules(self)


# ---------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------


def _tags(name: str, sizes_crops: Sequence[tuple[int, float]]) -> tuple[PretrainedCfg, ...]:
    return tuple(
        PretrainedCfg(
            tag=f"r{s}_in1k",
            input_size=(3, s, s),
            crop_pct=crop,
            hf_hub_id=f"timm/{name}.r{s}_in1k",
        )
        for s, crop in sizes_crops
    )


def _entry(name: str, large: bool, widths, depths, head_dim, head_widths, sizes_crops) -> ModelEntry:
    defaults = dict(
        widths=widths,
        depths=depths,
        head_dim=head_dim,
        head_widths=head_widths,
        large=large,
        act="gelu_tanh" if large else "hswish",
        norm_eps=1e-7 if large else 1e-5,
        # timm's L head BatchNorm keeps torch's default eps (the original uses 1e-7).
        head_norm_eps=1e-5,
        attention_eps=1e-5,
        num_classes=1000,
    )
    return ModelEntry(name, "mit", MitEfficientViT, defaults, _tags(name, sizes_crops))


# timm's eval crops: 0.95 for the B r224 tags, 1.0 for B r256/r288 and every L tag.
_B_TAGS = ((224, 0.95), (256, 1.0), (288, 1.0))

MODELS: tuple[ModelEntry, ...] = (
    _entry("efficientvit_b0", False, (8, 16, 32, 64, 128), (1, 2, 2, 2, 2), 16, (1024, 1280), _B_TAGS[:1]),
    _entry("efficientvit_b1", False, (16, 32, 64, 128, 256), (1, 2, 3, 3, 4), 16, (1536, 1600), _B_TAGS),
    _entry("efficientvit_b2", False, (24, 48, 96, 192, 384), (1, 3, 4, 4, 6), 32, (2304, 2560), _B_TAGS),
    _entry("efficientvit_b3", False, (32, 64, 128, 256, 512), (1, 4, 6, 6, 9), 32, (2304, 2560), _B_TAGS),
    _entry("efficientvit_l1", True, (32, 64, 128, 256, 512), (1, 1, 1, 6, 6), 32, (3072, 3200), ((224, 1.0),)),
    _entry("efficientvit_l2", True, (32, 64, 128, 256, 512), (1, 2, 2, 8, 8), 32, (3072, 3200),
           ((224, 1.0), (256, 1.0), (288, 1.0), (384, 1.0))),
    _entry("efficientvit_l3", True, (64, 128, 256, 512, 1024), (1, 2, 2, 8, 8), 32, (6144, 6400),
           ((224, 1.0), (256, 1.0), (320, 1.0), (384, 1.0))),
)
