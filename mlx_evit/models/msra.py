"""Microsoft EfficientViT M0-M5 (Liu et al., CVPR 2023, arXiv 2305.07027) in MLX, NHWC.

The "memory efficient" EfficientViT from Microsoft Research Asia: a 16x
convolutional patch embedding, then three stages of sandwich blocks
(depthwise conv, FFN, cascaded group attention in local 7x7 windows,
depthwise conv, FFN); stages 2 and 3 start with a subsample block whose
PatchMerging carries a squeeze-excite. Not to be confused with MIT's
EfficientViT B/L (:mod:`mlx_evit.models.mit`).

MLX parameter paths are timm's ``efficientvit_msra.py`` state-dict keys
(``patch_embed.conv1...``, ``stages.1.downsample.patchmerge...``,
``stages.i.blocks.j.mixer.m.attn...``, ``head.linear``) except that every
BatchNorm is called ``norm`` (timm: ``bn``), as in :class:`ConvNorm`.
Checkpoints load from both layouts (:data:`TIMM_LAYOUT`, and
:data:`ORIGINAL_LAYOUT` for microsoft/Cream's ``patch_embed.0.c``,
``blocks2.3...``, ``head.l`` keys) through declarative key tables.

Input size. ``img_size`` (a multiple of 16, default 224) fixes the stage
resolutions ``r0 = img_size // 16``, ``r_{i+1} = ceil(r_i / 2)`` and with them
the attention-bias tables: stage ``i`` attends within windows of
``R_i = min(7, r_i)`` tokens a side and learns an ``(heads, R_i * R_i)`` table.
For the released 224 checkpoints (tables 7x7, 7x7, 4x4) the tables are
unchanged for ``img_size`` in 208, 224, 240, 256; any other size resizes the
learned tables when a checkpoint is loaded (bicubic on the ``R x R`` grid,
exactly as Microsoft's fine-tuning code does with PyTorch's
``F.interpolate(mode="bicubic", align_corners=False)``) and warns which ones.
A built model accepts every input (any height and width, multiples of 16)
that implies the same windows as its ``img_size``, e.g. 208..256 square (or
non-square, the shorter side deciding, as in timm) for a 224 model, and
computes exactly what a model built at that input size would; other sizes
raise a ``ValueError`` that names the built and the needed windows.
Feature maps larger than a window are split into zero-padded 7x7 windows
(bottom/right padding, not masked, as in the original).

The layers are in :mod:`mlx_evit.models.msra_blocks` (re-exported here);
this module holds the model, its checkpoint key tables and the geometry that
ties input size to the attention-bias tables.
"""

from __future__ import annotations

import math
import warnings
from typing import Optional, Sequence, Union

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from mlx_evit.ops.layers import check_image_input, fuse_modules
from mlx_evit.ops.resampling import resize_matrix
from mlx_evit.models.msra_blocks import (CascadedGroupAttention, EfficientViTBlock, EfficientViTStage,
                                         LocalWindowAttention, NormLinear, PatchEmbed)
from mlx_evit.models.metadata import Described
from mlx_evit.models.specs import ModelEntry, PretrainedCfg
from mlx_evit.models.keymap import KeyMap

__all__ = [
    "EfficientViTMSRA",
    "CascadedGroupAttention",
    "LocalWindowAttention",
    "EfficientViTBlock",
    "attention_resolutions",
    "resize_bias_table",
    "TIMM_LAYOUT",
    "ORIGINAL_LAYOUT",
    "MODELS",
]

PATCH_SIZE = 16

# ---------------------------------------------------------------------------
# Checkpoint layouts
# ---------------------------------------------------------------------------

# Every BatchNorm is ``norm`` here (ConvNorm's child), ``bn`` in both PyTorch layouts.
_BN_RULE = (r"(^|\.)bn\.", r"\1norm.")
_DROP = (r"(^|\.)num_batches_tracked$", r"(^|\.)attention_bias_idxs$")
# Original blocks{2,3}.{3+j} -> stages.{1,2}.blocks.{j}; regexes cannot subtract, so list the depths.
_MAX_ORIGINAL_DEPTH = 16

TIMM_LAYOUT = KeyMap(
    name="timm",
    marker=r"^stages\.\d+\.|^patch_embed\.conv\d\.",
    rules=(_BN_RULE,),
    drop=_DROP,
)

ORIGINAL_LAYOUT = KeyMap(
    name="original (microsoft/Cream)",
    marker=r"^(module\.)?(blocks\d\.\d+\.|patch_embed\.\d\.)",
    rules=(
        (r"^module\.", ""),
        (r"\.c\.(weight|bias)$", r".conv.\1"),  # legacy Conv2d_BN child name
        (r"^(head(?:_dist)?)\.l\.", r"\1.linear."),  # legacy BN_Linear child name
        _BN_RULE,
        (r"^patch_embed\.0\.", "patch_embed.conv1."),  # ReLUs sit at indices 1, 3, 5
        (r"^patch_embed\.2\.", "patch_embed.conv2."),
        (r"^patch_embed\.4\.", "patch_embed.conv3."),
        (r"^patch_embed\.6\.", "patch_embed.conv4."),
        (r"^blocks1\.", "stages.0.blocks."),
        *(
            rule
            for s in (1, 2)
            for rule in (
                (rf"^blocks{s + 1}\.0\.", f"stages.{s}.downsample.res1."),
                (rf"^blocks{s + 1}\.1\.", f"stages.{s}.downsample.patchmerge."),
                (rf"^blocks{s + 1}\.2\.", f"stages.{s}.downsample.res2."),
                *((rf"^blocks{s + 1}\.{j + 3}\.", f"stages.{s}.blocks.{j}.") for j in range(_MAX_ORIGINAL_DEPTH)),
            )
        ),
    ),
    drop=_DROP,
)

# ---------------------------------------------------------------------------
# Geometry
# ---------------------------------------------------------------------------


def stage_resolutions(img_size: int, num_stages: int = 3) -> tuple[int, ...]:
    """Feature-map side per stage: ``img_size // 16``, then halved (rounding up) per subsample."""
    r = img_size // PATCH_SIZE
    out = [r]
    for _ in range(num_stages - 1):
        r = (r - 1) // 2 + 1
        out.append(r)
    return tuple(out)


def attention_resolutions(img_size: int, window_size: Sequence[int] = (7, 7, 7)) -> tuple[int, ...]:
    """Attention window side ``R_i = min(window_i, r_i)`` per stage; fixes the bias-table sizes."""
    res = stage_resolutions(img_size, len(window_size))
    return tuple(min(w, r) for w, r in zip(window_size, res))


def _sizes_with_windows(windows: tuple[int, ...], window_size: Sequence[int]) -> str:
    """Human-readable range of input sides (multiples of 16) that give ``windows``."""
    limit = PATCH_SIZE * (2 ** len(window_size)) * max(window_size)  # beyond this all windows are full
    ok = [s for s in range(PATCH_SIZE, limit + 1, PATCH_SIZE) if attention_resolutions(s, window_size) == windows]
    if not ok:
        return "none"
    if ok[-1] == limit:
        return f"{ok[0]} and larger"
    return f"{ok[0]}..{ok[-1]}" if len(ok) > 1 else str(ok[0])


# ---------------------------------------------------------------------------
# Bias-table resizing (numpy; PyTorch bicubic weights)
# ---------------------------------------------------------------------------


def resize_bias_table(table: np.ndarray, size: int) -> np.ndarray:
    """Resize attention biases ``(heads, S*S)`` to ``(heads, size*size)`` bicubically on the S x S grid.

    PyTorch's ``interpolate(mode="bicubic", align_corners=False)`` weights
    (:func:`mlx_evit.ops.resampling.resize_matrix`), both passes summed in float64.
    """
    heads, n = table.shape
    s = math.isqrt(n)
    if s * s != n:
        raise ValueError(f"attention-bias table with {n} entries is not a square grid")
    m = resize_matrix(s, size, "bicubic").astype(np.float64)
    grid = table.astype(np.float64).reshape(heads, s, s)
    out = np.einsum("ij,hjk,lk->hil", m, grid, m)
    return out.reshape(heads, size * size).astype(table.dtype)


# ---------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------


class EfficientViTMSRA(Described, nn.Module):
    """Microsoft EfficientViT classifier: ``(B, H, W, in_chans)`` NHWC -> logits ``(B, num_classes)``.

    ``embed_dim``/``depth``/``num_heads`` per stage; ``kernels[i]`` is the q
    depthwise kernel of head ``i`` (shared by all stages); ``img_size`` (a
    multiple of 16) fixes the attention windows (see the module docstring).
    With ``num_classes`` 0 or None the model returns pooled features
    ``(B, embed_dim[-1])``.
    """

    checkpoint_layouts = (TIMM_LAYOUT, ORIGINAL_LAYOUT)
    # What adapt_checkpoint fits, as data for identification (mlx_evit.loading.identify): a distillation
    # head it folds away, and attention-bias tables it resizes to this model's windows.
    adapted_keys = (r"^head_dist\.",)
    resized_keys = (r"attention_biases$",)
    PLAIN_ATTRIBUTES = ("window_size", "resolutions", "attn_resolutions")

    def __init__(
        self,
        embed_dim: Sequence[int] = (64, 128, 192),
        depth: Sequence[int] = (1, 2, 3),
        num_heads: Sequence[int] = (4, 4, 4),
        kernels: Sequence[int] = (5, 5, 5, 5),
        key_dim: Sequence[int] = (16, 16, 16),
        window_size: Sequence[int] = (7, 7, 7),
        img_size: Union[int, Sequence[int]] = 224,
        in_chans: int = 3,
        num_classes: Optional[int] = 1000,
    ):
        super().__init__()
        sizes = (img_size,) if isinstance(img_size, int) else tuple(img_size)
        if not sizes or any(not isinstance(s, int) or s < PATCH_SIZE or s % PATCH_SIZE for s in sizes):
            raise ValueError(f"img_size must be a positive multiple of {PATCH_SIZE} (or an (H, W) pair of them), got {img_size!r}")
        n = len(embed_dim)
        if not (len(depth) == len(num_heads) == len(key_dim) == len(window_size) == n):
            raise ValueError("embed_dim, depth, num_heads, key_dim and window_size need one entry per stage")
        self.img_size = min(sizes)  # the shorter side sets the windows, as in timm
        self.in_chans = in_chans
        self.num_classes = num_classes or 0
        self.num_features = embed_dim[-1]
        self.window_size = tuple(window_size)
        self.resolutions = stage_resolutions(self.img_size, n)
        self.attn_resolutions = attention_resolutions(self.img_size, self.window_size)

        self.patch_embed = PatchEmbed(in_chans, embed_dim[0])
        self.stages = [
            EfficientViTStage(
                in_dim=embed_dim[max(i - 1, 0)],
                out_dim=embed_dim[i],
                key_dim=key_dim[i],
                num_heads=num_heads[i],
                depth=depth[i],
                resolution=self.resolutions[i],
                window_size=window_size[i],
                kernels=kernels,
                downsample=i > 0,
            )
            for i in range(n)
        ]
        self.head = NormLinear(self.num_features, self.num_classes) if self.num_classes else None

    def _check_input(self, x: mx.array) -> None:
        check_image_input(x, self.in_chans, multiple=PATCH_SIZE, min_size=PATCH_SIZE)
        H, W = x.shape[1:3]
        needed = attention_resolutions(min(H, W), self.window_size)
        if needed != self.attn_resolutions:
            built = ", ".join(map(str, self.attn_resolutions))
            raise ValueError(
                f"{getattr(self, 'arch_name', type(self).__name__)} was built for img_size={self.img_size} "
                f"(attention windows {built}); a {H}x{W} input needs windows {', '.join(map(str, needed))}. "
                f"Build the model with img_size={min(H, W)} (checkpoint bias tables are resized on load), "
                f"or feed inputs whose shorter side is {_sizes_with_windows(self.attn_resolutions, self.window_size)}."
            )

    def forward_features(self, x: mx.array) -> list[mx.array]:
        """The three stage outputs, NHWC: ``(B, H/16, W/16, C0)``, ``(.., H/32, ..)``, ``(.., H/64, ..)`` (rounded up)."""
        self._check_input(x)
        x = self.patch_embed(x)
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        return feats

    def __call__(self, x: mx.array) -> mx.array:
        x = self.forward_features(x)[-1].mean(axis=(1, 2))
        return self.head(x) if self.head is not None else x

    def fuse(self) -> "EfficientViTMSRA":
        """Fold every BatchNorm (conv and head) and cache the bias tables; in place, for inference."""
        return fuse_modules(self)

    def adapt_checkpoint(self, params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Fit a mapped checkpoint to this model before the strict shape check.

        * ``attention_biases`` tables of another window size (a checkpoint
          trained at another resolution) are resized bicubically (see
          :func:`resize_bias_table`), with a warning naming them.
        * A distillation head (``head_dist``, DeiT-style, whose eval output is
          the mean of both heads) is folded with ``head`` into one
          equivalent classifier (identity BatchNorm, averaged affine map).
        """
        params = dict(params)
        expected = dict(tree_flatten(self.parameters()))
        params = self._fold_distillation_head(params, expected)
        resized = []
        for key, value in params.items():
            want = expected.get(key)
            if not key.endswith("attention_biases") or want is None or tuple(value.shape) == tuple(want.shape):
                continue
            if value.ndim != 2 or value.shape[0] != want.shape[0]:
                continue  # head count differs: left to the shape report
            s1, s2 = math.isqrt(value.shape[1]), math.isqrt(want.shape[1])
            if s1 * s1 != value.shape[1] or s2 * s2 != want.shape[1]:
                continue
            params[key] = resize_bias_table(value, s2)
            resized.append(f"{key} {s1}x{s1} -> {s2}x{s2}")
        if resized:
            name = getattr(self, "arch_name", type(self).__name__)
            warnings.warn(
                f"{name} at img_size={self.img_size}: resized {len(resized)} attention-bias table(s) of the "
                f"checkpoint bicubically to this model's windows: " + "; ".join(resized),
                stacklevel=3,
            )
        return params

    def _fold_distillation_head(self, params: dict[str, np.ndarray], expected: dict) -> dict[str, np.ndarray]:
        dist = {k: params[k] for k in params if k.startswith("head_dist.")}
        names = ("norm.weight", "norm.bias", "norm.running_mean", "norm.running_var", "linear.weight", "linear.bias")
        if not dist or "head.linear.weight" not in expected:
            return params
        if not all(f"head.{n}" in params for n in names) or not all(f"head_dist.{n}" in params for n in names):
            return params  # incomplete heads: left to the missing/unexpected report
        eps = self.head.norm.eps if self.head.norm is not None else 1e-5

        def affine(prefix: str) -> tuple[np.ndarray, np.ndarray]:
            p = {n: params[f"{prefix}.{n}"].astype(np.float64) for n in names}
            s = p["norm.weight"] / np.sqrt(p["norm.running_var"] + eps)
            t = p["norm.bias"] - p["norm.running_mean"] * s
            return p["linear.weight"] * s[None, :], p["linear.weight"] @ t + p["linear.bias"]

        (w1, b1), (w2, b2) = affine("head"), affine("head_dist")
        dtype = params["head.linear.weight"].dtype
        c = w1.shape[1]
        for k in dist:
            del params[k]
        params.update({
            "head.norm.weight": np.ones(c, dtype),
            "head.norm.bias": np.zeros(c, dtype),
            "head.norm.running_mean": np.zeros(c, dtype),
            "head.norm.running_var": np.full(c, 1.0 - eps, dtype),
            "head.linear.weight": ((w1 + w2) / 2).astype(dtype),
            "head.linear.bias": ((b1 + b2) / 2).astype(dtype),
        })
        warnings.warn(
            "checkpoint has a distillation head (head_dist): folded it with head into one classifier "
            "that outputs the mean of both, as the original model does in eval mode",
            stacklevel=4,
        )
        return params


# ---------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------

_VARIANTS: dict[str, dict] = {
    "efficientvit_m0": dict(embed_dim=(64, 128, 192), depth=(1, 2, 3), num_heads=(4, 4, 4), kernels=(5, 5, 5, 5)),
    "efficientvit_m1": dict(embed_dim=(128, 144, 192), depth=(1, 2, 3), num_heads=(2, 3, 3), kernels=(7, 5, 3, 3)),
    "efficientvit_m2": dict(embed_dim=(128, 192, 224), depth=(1, 2, 3), num_heads=(4, 3, 2), kernels=(7, 5, 3, 3)),
    "efficientvit_m3": dict(embed_dim=(128, 240, 320), depth=(1, 2, 3), num_heads=(4, 3, 4), kernels=(5, 5, 5, 5)),
    "efficientvit_m4": dict(embed_dim=(128, 256, 384), depth=(1, 2, 3), num_heads=(4, 4, 4), kernels=(7, 5, 3, 3)),
    "efficientvit_m5": dict(embed_dim=(192, 288, 384), depth=(1, 3, 4), num_heads=(3, 3, 4), kernels=(7, 5, 3, 3)),
}

MODELS: tuple[ModelEntry, ...] = tuple(
    ModelEntry(
        name=name,
        family="msra",
        builder=EfficientViTMSRA,
        defaults=dict(args, img_size=224),
        tags=(PretrainedCfg(tag="r224_in1k", hf_hub_id=f"timm/{name}.r224_in1k"),),
    )
    for name, args in _VARIANTS.items()
)
