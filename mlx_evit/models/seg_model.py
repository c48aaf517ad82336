"""EfficientViT-Seg (Cai et al., ICCV 2023): semantic segmentation on the MIT B and L backbones, NHWC.

The model is an MIT EfficientViT backbone (:mod:`mlx_evit.models.mit`, without its
classifier) and :class:`SegHead`, a small FPN-like head: the stride-32, 16
and 8 maps are projected to ``head_width`` channels (1x1 conv + BN), the
first two are upsampled bicubically (x4, x2; :func:`mlx_evit.ops.resampling.resize`,
equal to PyTorch's ``interpolate``) and the three are summed; residual
MBConv (B series) or FusedMBConv (L series) blocks follow, then an optional
expansion (1x1 conv + BN + act) and a 1x1 classifier with bias.

``model(x)``: ``(B, H, W, 3)`` ImageNet-normalised images, ``H`` and ``W``
multiples of 32 -> logits ``(B, H / 8, W / 8, num_classes)``. Resize them to
the image size with :func:`mlx_evit.ops.resampling.resize` (bicubic, as the
original evaluation) or use :class:`mlx_evit.tasks.segmenter.Segmenter`, which also
does the dataset's preprocessing and the argmax.

The original checkpoints (``efficientvit_seg_*.pt``) load through the
declarative key tables :data:`ORIGINAL_SEG_LAYOUT` (B) and
:data:`ORIGINAL_SEG_LARGE_LAYOUT` (L), which prefix the backbone tables of
:mod:`mlx_evit.models.mit` with ``backbone.`` and rename the head:

=========================================== ===================================
original key                                MLX parameter path
=========================================== ===================================
``head.input_ops.{0,1}.op_list.0.*``        ``head.inputs.{0,1}.*`` (stride 32, 16)
``head.input_ops.2.*``                      ``head.inputs.2.*`` (stride 8, no upsample)
``head.middle.op_list.k.main.*``            ``head.blocks.k.main.*``
``head.output_ops.0.op_list.{0,1}.*``       ``head.output.{0,1}.*`` (expand, classifier)
=========================================== ===================================
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import mlx.core as mx
import mlx.nn as nn

from mlx_evit.ops.backend import default_device_is_gpu
from mlx_evit.ops.layers import ConvNorm, check_image_input, fuse_modules, get_act
from mlx_evit.models.mit import (ORIGINAL_LARGE_LAYOUT, ORIGINAL_LAYOUT, DSConv, FusedMBConv, MBConv, MitEfficientViT, ResBlock,
                  Residual, Stem)
from mlx_evit.models.metadata import Described
from mlx_evit.models.specs import ModelEntry, PretrainedCfg
from mlx_evit.ops.resampling import resize
from mlx_evit.models.keymap import KeyMap

__all__ = [
    "EfficientViTSeg",
    "SegHead",
    "SegBackbone",
    "SegPretrainedCfg",
    "ORIGINAL_SEG_LAYOUT",
    "ORIGINAL_SEG_LARGE_LAYOUT",
    "HUB_REPO",
    "MODELS",
]

HUB_REPO = "han-cai/efficientvit-seg"
"""Hugging Face repository of the released checkpoints (``efficientvit_seg_<variant>_<dataset>.pt``)."""

# ---------------------------------------------------------------------------
# Banded execution of the convolutional blocks (high resolution)
# ---------------------------------------------------------------------------

BAND_ELEMENTS = 1 << 21
"""Widest intermediate of a convolutional block computed at once, in elements (8 MB in float32).

At 1024x2048 the stem and the first stages expand maps of 512x1024 pixels
to 32-64 channels; computed whole, each intermediate is 64-128 MB and every
pass over it goes to main memory. Bands of output rows (with the halo rows
their 3x3 convolutions need) keep the working set small: seg-B1 at
1024x2048 peaks at about half the memory (612 -> 343 MB of MLX arrays),
and the result is bit-identical.

On a GPU the bands cost more than they save: every band is a launch of
each of the block's kernels on a sliver of the map (seg-L2 at 1024x2048
ran its FusedMBConv stages on 8-row bands, 32 per block; H200, MLX CUDA,
``benchmarks/gpu_diag.py`` "bands" gives the time with and without). There
the limit is :data:`BAND_ELEMENTS_GPU`, which only bounds memory for
inputs far larger than the models' sizes.
"""

BAND_ELEMENTS_GPU = 1 << 28
"""The GPU's limit (1 GiB in float32): 1024x2048 runs whole, a hostile 16k x 16k input still in bands."""


def _geometry(block: nn.Module) -> Optional[tuple[int, int, int]]:
    """(stride, input rows of halo, widest channel count) of a purely convolutional block, else None."""
    main = block.main if isinstance(block, Residual) else block
    if isinstance(main, MBConv):
        conv, halo, width = main.depth_conv.conv, 1, main.inverted_conv.conv.weight.shape[0]
    elif isinstance(main, FusedMBConv):
        conv, halo, width = main.spatial_conv.conv, 1, main.spatial_conv.conv.weight.shape[0]
    elif isinstance(main, DSConv):
        conv, halo, width = main.depth_conv.conv, 1, main.depth_conv.conv.weight.shape[0]
    elif isinstance(main, ResBlock):
        conv, halo, width = main.conv1.conv, 2, main.conv1.conv.weight.shape[0]
    else:
        return None
    stride = conv.stride[0] if isinstance(conv.stride, (tuple, list)) else conv.stride
    return int(stride), halo, int(width)


def run_banded(block: nn.Module, x: mx.array, max_elements: Optional[int] = None) -> mx.array:
    """``block(x)`` computed in bands of output rows when its widest intermediate exceeds ``max_elements``
    (default :data:`BAND_ELEMENTS`, on a GPU :data:`BAND_ELEMENTS_GPU`).

    Exact: each band reads the input rows it needs plus the halo of the
    block's 3x3 convolutions (bands start on a stride boundary) and keeps
    only rows that saw no band-edge padding. Blocks other than the MIT
    convolutional ones (attention) run whole.
    """
    geometry = _geometry(block)
    B, H, W = x.shape[:3]
    if geometry is None:
        return block(x)
    stride, halo, width = geometry
    if max_elements is None:
        max_elements = BAND_ELEMENTS_GPU if default_device_is_gpu() else BAND_ELEMENTS
    Ho, Wo = (H - 1) // stride + 1, (W - 1) // stride + 1
    rows = max(8, max_elements // max(1, B * width * max(W, Wo)))
    if rows >= Ho:
        return block(x)
    bands = []
    for a in range(0, Ho, rows):
        b = min(Ho, a + rows)
        start = max(0, a * stride - halo)
        start -= start % stride
        end = min(H, (b - 1) * stride + halo + 1)
        y = block(x[:, start:end])
        bands.append(y[:, a - start // stride : b - start // stride])
    return mx.concatenate(bands, axis=1)


# ---------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------


class SegBackbone(nn.Module):
    """The MIT backbone of :class:`~mlx_evit.models.mit.MitEfficientViT` without its classifier.

    Same children (``stem``, ``stages``) and blocks, so the MIT key tables
    apply under a ``backbone.`` prefix. Returns the four stage maps.
    """

    def __init__(self, widths: Sequence[int], depths: Sequence[int], head_dim: int, large: bool,
                 in_chans: int, act, eps: float, attention_eps: float, expand_ratio: float = 4.0):
        super().__init__()
        if len(widths) != 5 or len(depths) != 5:
            raise ValueError(f"widths and depths need 5 entries (stem + 4 stages), got {widths}, {depths}")
        self.in_chans = in_chans
        self.stem = Stem(in_chans, widths[0], depths[0], large, act, eps)
        self.stages = MitEfficientViT.build_stages(widths, depths, head_dim, large, act, eps, attention_eps,
                                                   expand_ratio)

    def __call__(self, x: mx.array) -> list[mx.array]:
        stem = self.stem
        x = stem.in_conv(x)
        for i in range(stem.depth):
            x = run_banded(getattr(stem, f"res{i}"), x)
        feats = []
        for stage in self.stages:
            for block in stage.blocks:
                x = run_banded(block, x)
            feats.append(x)
        return feats


class SegHead(nn.Module):
    """Stage 4/3/2 maps -> stride-8 logits (see the module docstring).

    ``in_channels``: channels of the stride-32, 16 and 8 maps, in that
    order. ``middle``: ``"mbconv"`` or ``"fmbconv"``. ``final_expand``:
    width multiplier of the expansion conv before the classifier (``None``:
    no expansion). ``num_classes`` 0: no classifier (returns the features
    it would classify).
    """

    def __init__(self, in_channels: Sequence[int], head_width: int, head_depth: int, middle: str,
                 expand_ratio: float, final_expand: Optional[float], num_classes: int, act, eps: float):
        super().__init__()
        if middle not in ("mbconv", "fmbconv"):
            raise ValueError(f"middle must be 'mbconv' or 'fmbconv', got {middle!r}")
        self.strides = (32, 16, 8)
        self.inputs = [ConvNorm(c, head_width, 1, eps=eps) for c in in_channels]
        if middle == "mbconv":
            blocks = [MBConv(head_width, head_width, 1, expand_ratio, act, eps) for _ in range(head_depth)]
        else:
            blocks = [FusedMBConv(head_width, head_width, 1, expand_ratio, act, eps) for _ in range(head_depth)]
        self.blocks = [Residual(b, shortcut=True) for b in blocks]
        width = head_width
        self.output = []
        if final_expand:
            width = round(head_width * final_expand)
            self.output.append(ConvNorm(head_width, width, 1, act=act, eps=eps))
        if num_classes:
            self.output.append(ConvNorm(width, num_classes, 1, bias=True, norm=False))
        self.num_features = width

    def __call__(self, feats: Sequence[mx.array]) -> mx.array:
        """``feats``: the stride-32, 16 and 8 maps (NHWC) -> ``(B, h8, w8, classes)``."""
        h, w = feats[-1].shape[1:3]
        projected = []
        for proj, f, stride in zip(self.inputs, feats, self.strides):
            y = proj(f)
            factor = stride // 8
            if factor > 1:  # the original upsamples by the factor (the result must match the stride-8 map)
                size = (y.shape[1] * factor, y.shape[2] * factor)
                if size != (h, w):
                    raise ValueError(f"stride-{stride} map {tuple(f.shape[1:3])} upsampled x{factor} is {size}, "
                                     f"not the stride-8 size {(h, w)}: use an input size that is a multiple of 32")
                y = resize(y, size, "bicubic")
            projected.append(y)
        x = projected[0] + (projected[1] + projected[2])  # the original's summation order
        for block in self.blocks:
            x = run_banded(block, x)
        for layer in self.output:
            x = layer(x)
        return x


class EfficientViTSeg(Described, nn.Module):
    """EfficientViT-Seg: MIT backbone + :class:`SegHead`, NHWC.

    ``widths``/``depths``/``head_dim``/``large``: the backbone, as for
    :class:`~mlx_evit.models.mit.MitEfficientViT`. ``head_width``, ``head_depth``,
    ``middle``, ``expand_ratio``, ``final_expand``: the head (spec table in
    the README). ``norm_eps``: every BatchNorm (1e-5 B, 1e-7 L);
    ``attention_eps``: LiteMLA normaliser (1e-15, the original's).
    ``dataset``: ``"cityscapes"`` or ``"ade20k"`` (which class names and
    preprocessing apply; informational).

    ``model(x)``: ``(B, H, W, in_chans)`` with ``H, W`` multiples of 32 ->
    logits ``(B, H / 8, W / 8, num_classes)``.
    """

    checkpoint_layouts: tuple[KeyMap, ...] = ()  # set below, after the tables

    def __init__(
        self,
        widths: Sequence[int],
        depths: Sequence[int],
        head_dim: int,
        head_width: int,
        head_depth: int,
        middle: str,
        expand_ratio: float = 4.0,
        final_expand: Optional[float] = None,
        large: bool = False,
        num_classes: Optional[int] = 19,
        in_chans: int = 3,
        act: Optional[str] = None,
        norm_eps: Optional[float] = None,
        attention_eps: float = 1e-15,
        dataset: Optional[str] = None,
    ):
        super().__init__()
        act_fn = get_act(act if act is not None else ("gelu_tanh" if large else "hswish"))
        eps = norm_eps if norm_eps is not None else (1e-7 if large else 1e-5)
        self.large = large
        self.in_chans = in_chans
        self.num_classes = num_classes or 0
        self.dataset = dataset
        self.attention_eps = attention_eps
        self.backbone = SegBackbone(widths, depths, head_dim, large, in_chans, act_fn, eps, attention_eps)
        self.head = SegHead(tuple(widths[4:1:-1]), head_width, head_depth, middle, expand_ratio, final_expand,
                            self.num_classes, act_fn, eps)
        self.num_features = self.head.num_features
        self.feature_info = [dict(num_chs=w, reduction=2 ** (i + 2)) for i, w in enumerate(widths[1:])]

    def forward_features(self, x: mx.array) -> list[mx.array]:
        """The four backbone stage maps (strides 4, 8, 16, 32), NHWC; ``H, W`` multiples of 32."""
        check_image_input(x, self.in_chans, multiple=32)
        return self.backbone(x)

    def forward_head(self, feats: Sequence[mx.array]) -> mx.array:
        """Backbone maps (as from :meth:`forward_features`) -> stride-8 logits."""
        return self.head([feats[3], feats[2], feats[1]])

    def __call__(self, x: mx.array) -> mx.array:
        return self.forward_head(self.forward_features(x))

    def fuse(self) -> "EfficientViTSeg":
        """Fold every BatchNorm into its convolution (inference; in place)."""
        return fuse_modules(self)


# ---------------------------------------------------------------------------
# Checkpoint layouts
# ---------------------------------------------------------------------------


def _backbone_rules(layout: KeyMap) -> tuple[tuple[str, str], ...]:
    """The backbone rules of an MIT classification table, keeping the ``backbone.`` prefix."""
    return tuple((p, "backbone." + r) for p, r in layout.rules if p.startswith(r"^backbone\."))


_HEAD_RULES = (
    (r"^head\.input_ops\.(\d+)\.(op_list\.0\.)?", r"head.inputs.\1."),
    (r"^head\.middle\.op_list\.(\d+)\.", r"head.blocks.\1."),
    (r"^head\.output_ops\.0\.op_list\.(\d+)\.", r"head.output.\1."),
)
_HEAD_MARKER = r"head\.(input_ops|middle|output_ops)"

# mit-han-lab EfficientViT-Seg, B series: backbone.input_stem.*, backbone.stages.{0-3}, head.*.
ORIGINAL_SEG_LAYOUT = KeyMap(
    name="mit-han-lab seg (B series)",
    marker=rf"^{_HEAD_MARKER}\.",
    rules=(*_backbone_rules(ORIGINAL_LAYOUT), *_HEAD_RULES),
)

# L series: the stem is backbone.stages.0 and stage 4 exists (more marker hits than the B table).
ORIGINAL_SEG_LARGE_LAYOUT = KeyMap(
    name="mit-han-lab seg (L series)",
    marker=rf"^({_HEAD_MARKER}|backbone\.stages\.4)\.",
    rules=(*_backbone_rules(ORIGINAL_LARGE_LAYOUT), *_HEAD_RULES),
)

EfficientViTSeg.checkpoint_layouts = (ORIGINAL_SEG_LAYOUT, ORIGINAL_SEG_LARGE_LAYOUT)


# ---------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SegPretrainedCfg(PretrainedCfg):
    """Preprocessing of a segmentation checkpoint (the original evaluation's).

    ``crop_mode``: ``"resize"`` (Cityscapes: resize to ``input_size``) or
    ``"short_side"`` (ADE20K: short side to ``input_size[1]``, long side to
    the next multiple of ``size_multiple`` of the proportional length).
    ``interpolation`` ``"cv2_cubic"``: OpenCV's ``INTER_CUBIC`` on uint8,
    reproduced by :func:`mlx_evit.tasks.segmenter.cv2_resize_cubic`. ``hf_filename``:
    the checkpoint's file in ``hf_hub_id``.
    """

    dataset: str = "cityscapes"
    size_multiple: int = 32
    hf_filename: Optional[str] = None


_BACKBONES = {
    "b0": dict(widths=(8, 16, 32, 64, 128), depths=(1, 2, 2, 2, 2), head_dim=16, large=False),
    "b1": dict(widths=(16, 32, 64, 128, 256), depths=(1, 2, 3, 3, 4), head_dim=16, large=False),
    "b2": dict(widths=(24, 48, 96, 192, 384), depths=(1, 3, 4, 4, 6), head_dim=32, large=False),
    "b3": dict(widths=(32, 64, 128, 256, 512), depths=(1, 4, 6, 6, 9), head_dim=32, large=False),
    "l1": dict(widths=(32, 64, 128, 256, 512), depths=(1, 1, 1, 6, 6), head_dim=32, large=True),
    "l2": dict(widths=(32, 64, 128, 256, 512), depths=(1, 2, 2, 8, 8), head_dim=32, large=True),
}

# (variant, dataset): head_width, head_depth, middle, expand_ratio, final_expand (the original zoo).
_HEADS = {
    ("b0", "cityscapes"): (32, 1, "mbconv", 4, 4),
    ("b1", "cityscapes"): (64, 3, "mbconv", 4, 4),
    ("b2", "cityscapes"): (96, 3, "mbconv", 4, 4),
    ("b3", "cityscapes"): (128, 3, "mbconv", 4, 4),
    ("l1", "cityscapes"): (256, 3, "fmbconv", 1, None),
    ("l2", "cityscapes"): (256, 5, "fmbconv", 1, None),
    ("b1", "ade20k"): (64, 3, "mbconv", 4, None),
    ("b2", "ade20k"): (96, 3, "mbconv", 4, None),
    ("b3", "ade20k"): (128, 3, "mbconv", 4, None),
    ("l1", "ade20k"): (128, 3, "fmbconv", 4, 8),
    ("l2", "ade20k"): (128, 3, "fmbconv", 4, 8),
}

_DATASETS = {
    # dataset: classes, tag, input_size, crop_mode
    "cityscapes": (19, "r1024x2048", (3, 1024, 2048), "resize"),
    "ade20k": (150, "r512", (3, 512, 512), "short_side"),
}


def _entry(variant: str, dataset: str) -> ModelEntry:
    name = f"efficientvit_seg_{variant}_{dataset}"
    backbone = _BACKBONES[variant]
    head_width, head_depth, middle, expand, final_expand = _HEADS[(variant, dataset)]
    classes, tag, input_size, crop_mode = _DATASETS[dataset]
    large = backbone["large"]
    defaults = dict(
        **backbone,
        head_width=head_width,
        head_depth=head_depth,
        middle=middle,
        expand_ratio=expand,
        final_expand=final_expand,
        num_classes=classes,
        act="gelu_tanh" if large else "hswish",
        norm_eps=1e-7 if large else 1e-5,
        attention_eps=1e-15,
        dataset=dataset,
    )
    cfg = SegPretrainedCfg(
        tag=tag,
        input_size=input_size,
        crop_pct=1.0,
        interpolation="cv2_cubic",
        crop_mode=crop_mode,
        num_classes=classes,
        hf_hub_id=HUB_REPO,
        dataset=dataset,
        hf_filename=f"{name}.pt",
    )
    return ModelEntry(name, "seg", EfficientViTSeg, defaults, (cfg,))


MODELS: tuple[ModelEntry, ...] = tuple(_entry(v, d) for v, d in _HEADS)
