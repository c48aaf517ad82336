"""The seed model: a configurable EfficientViT with cascaded group linear attention.

This is the model the project was started from, as its seed design document
reads it (section "How we read it"; summarised in the README, "The seed
model"), in NHWC:

* patch embedding: a ``patch_size`` x ``patch_size`` convolution with stride
  ``patch_size`` (``in_channels -> embed_dim``), then LayerNorm;
* stages ``i = 0 .. len(depths) - 1`` of width ``embed_dim * 2**i`` with
  ``depths[i]`` blocks and ``num_heads[i]`` heads; every stage after the first
  starts with a downsample (LayerNorm, then a 3x3 stride-2 convolution with
  padding 1 that doubles the width; ceil semantics, so 14 -> 7 -> 4);
* block (pre-norm, residual): ``x = x + CGA(LN(x))``, ``x = x + FFN(LN(x))``;
* head: LayerNorm, mean over all tokens, optional Linear classifier.

There are no positional parameters, so the model takes any input whose height
and width are positive multiples of ``patch_size`` (square or not);
``image_size`` only documents the training resolution and is validated.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass
from typing import Any, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn

from mlx_evit.ops.layers import Conv2d, DepthwiseConv2d, check_image_input, elu_plus_one, gelu, linear_attention
from mlx_evit.models.metadata import Described
from mlx_evit.models.specs import ModelEntry

__all__ = [
    "EfficientViT",
    "output_size",
    "SeedConfig",
    "CascadedGroupLinearAttention",
    "ConvFFN",
    "SeedBlock",
    "MODELS",
]

# Denominator guard of the linear attention. phi = ELU + 1 is strictly
# positive, so the normaliser only needs protecting against underflow.
ATTN_EPS = 1e-6


# ---------------------------------------------------------------------------
# Options
# ---------------------------------------------------------------------------


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _positive_int_list(name: str, value: Any) -> tuple[int, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) == 0:
        raise ValueError(f"{name} must be a non-empty list of positive integers (one per stage), got {value!r}")
    return tuple(_positive_int(f"{name}[{i}]", v) for i, v in enumerate(value))


@dataclass(frozen=True)
class SeedConfig:
    """Validated options of the seed model (the seed's option names and defaults)."""

    image_size: int = 224
    patch_size: int = 16
    in_channels: int = 3
    embed_dim: int = 64
    depths: tuple[int, ...] = (1, 2, 3)
    num_heads: tuple[int, ...] = (4, 4, 4)
    mlp_ratio: float = 4.0
    num_classes: Optional[int] = None

    def __post_init__(self):
        # Normalise and validate every option; errors name the option and value.
        def set_(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)  # the dataclass is frozen

        for name in ("image_size", "patch_size", "in_channels", "embed_dim"):
            set_(name, _positive_int(name, getattr(self, name)))
        set_("depths", _positive_int_list("depths", self.depths))
        set_("num_heads", _positive_int_list("num_heads", self.num_heads))
        if len(self.depths) != len(self.num_heads):
            raise ValueError(
                f"depths has {len(self.depths)} entries but num_heads has {len(self.num_heads)}; "
                "give one block count and one head count per stage"
            )
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size={self.image_size} is not divisible by patch_size={self.patch_size}")
        for i, (heads, width) in enumerate(zip(self.num_heads, self.widths)):
            if width % heads:
                raise ValueError(f"num_heads[{i}]={heads} does not divide width {width} of stage {i}")
        ratio = self.mlp_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real) or not math.isfinite(ratio) or ratio <= 0:
            raise ValueError(f"mlp_ratio must be a positive finite number, got {ratio!r}")
        set_("mlp_ratio", float(ratio))
        for i, width in enumerate(self.widths):
            if int(width * self.mlp_ratio) < 1:
                raise ValueError(
                    f"mlp_ratio={ratio!r} gives an FFN hidden width of 0 in stage {i} (width {width}); "
                    f"it must be at least {1 / width:g}"
                )
        if self.num_classes is not None:
            n = self.num_classes
            if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 0:
                raise ValueError(f"num_classes must be a positive integer or None, got {n!r}")
            set_("num_classes", int(n))

    @property
    def widths(self) -> tuple[int, ...]:
        """Channel width of each stage: ``embed_dim * 2**i``."""
        return tuple(self.embed_dim * 2**i for i in range(len(self.depths)))

    @property
    def num_features(self) -> int:
        """Width of the pooled features (the last stage's width)."""
        return self.widths[-1]

    @property
    def output_size(self) -> int:
        return self.num_classes if self.num_classes else self.num_features


def output_size(**options: Any) -> int:
    """Width of the model's output: ``num_classes`` if given, else ``embed_dim * 2**(stages - 1)``.

    Takes the same options as :meth:`EfficientViT.build` (the fields of
    :class:`SeedConfig`, same defaults) and validates them the same way.
    """
    return SeedConfig(**options).output_size


# ---------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------


class CascadedGroupLinearAttention(nn.Module):
    """Cascaded group attention with ELU+1 linear attention: ``(B, N, C) -> (B, N, C)``.

    The channels are split into ``num_heads`` contiguous slices of
    ``C / num_heads``. Head ``i`` takes ``slice_i + out_{i-1}`` (head 0 its
    slice alone), projects it with its own ``qkvs[i]`` to q, k, v (each
    ``C / num_heads`` wide) and computes
    ``phi(q) (phi(k)^T v) / (phi(q) . sum_n phi(k_n) + eps)`` with
    ``phi = ELU + 1``, forming ``phi(k)^T v`` first (``d x d`` per head, in
    float32), so cost and memory are linear in ``N``. The concatenated head
    outputs go through ``proj``. The heads run one after another: each needs
    the previous one's output.
    """

    def __init__(self, dim: int, num_heads: int, eps: float = ATTN_EPS):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"num_heads={num_heads} does not divide dim={dim}")
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.eps = eps
        self.qkvs = [nn.Linear(self.head_dim, 3 * self.head_dim) for _ in range(num_heads)]
        self.proj = nn.Linear(dim, dim)

    def _extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}"

    def heads(self, x: mx.array) -> list[mx.array]:
        """Per-head outputs before the projection: ``num_heads`` arrays ``(B, N, C / num_heads)``."""
        d = self.head_dim
        slices = mx.split(x, self.num_heads, axis=-1) if self.num_heads > 1 else [x]
        outs: list[mx.array] = []
        for i, qkv in enumerate(self.qkvs):
            h = slices[i] if i == 0 else slices[i] + outs[-1]
            t = qkv(h)
            qk = elu_plus_one(t[..., : 2 * d])
            out = linear_attention(qk[..., :d], qk[..., d:], t[..., 2 * d :], self.eps)
            outs.append(out.astype(x.dtype))
        return outs

    def __call__(self, x: mx.array) -> mx.array:
        outs = self.heads(x)
        return self.proj(mx.concatenate(outs, axis=-1) if len(outs) > 1 else outs[0])


class ConvFFN(nn.Module):
    """Linear -> GELU -> learned 3x3 depthwise conv -> GELU -> Linear, on ``(B, H, W, C)``.

    The depthwise convolution mixes each hidden channel over the 2-D token
    grid, adding local context between the two pointwise layers.
    """

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dw = DepthwiseConv2d(hidden, 3, bias=True)
        self.fc2 = nn.Linear(hidden, dim)

    def __call__(self, x: mx.array) -> mx.array:
        x = gelu(self.fc1(x))
        x = gelu(self.dw(x))
        return self.fc2(x)


class SeedBlock(nn.Module):
    """Pre-norm residual block on ``(B, H, W, C)``: CGA, then the depthwise-conv FFN."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = CascadedGroupLinearAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = ConvFFN(dim, int(dim * mlp_ratio))

    def __call__(self, x: mx.array) -> mx.array:
        B, H, W, C = x.shape
        x = x + self.attn(self.norm1(x).reshape(B, H * W, C)).reshape(B, H, W, C)
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    """``patch x patch`` conv with stride ``patch`` then LayerNorm: ``(B, H, W, in) -> (B, H/p, W/p, dim)``."""

    def __init__(self, in_channels: int, dim: int, patch_size: int):
        super().__init__()
        self.proj = Conv2d(in_channels, dim, patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(dim)

    def __call__(self, x: mx.array) -> mx.array:
        return self.norm(self.proj(x))


class Downsample(nn.Module):
    """LayerNorm then 3x3 stride-2 conv (padding 1): ``(B, H, W, C) -> (B, ceil(H/2), ceil(W/2), 2C)``.

    The residual stream of pre-norm blocks is un-normalised, so it is
    normalised before the strided convolution (as in ConvNeXt); the next
    stage's blocks normalise their own inputs.
    """

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.conv = Conv2d(dim, out_dim, 3, stride=2, padding=1)

    def __call__(self, x: mx.array) -> mx.array:
        return self.conv(self.norm(x))


class SeedStage(nn.Module):
    """Optional downsample followed by ``depth`` blocks."""

    def __init__(self, in_dim: int, dim: int, depth: int, num_heads: int, mlp_ratio: float, downsample: bool):
        super().__init__()
        self.downsample = Downsample(in_dim, dim) if downsample else None
        self.blocks = [SeedBlock(dim, num_heads, mlp_ratio) for _ in range(depth)]

    def __call__(self, x: mx.array) -> mx.array:
        if self.downsample is not None:
            x = self.downsample(x)
        for block in self.blocks:
            x = block(x)
        return x


# ---------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------


class EfficientViT(Described, nn.Module):
    """The seed model. Build it with :meth:`build` (the seed's options).

    ``model(x)``: ``x`` ``(B, H, W, in_channels)`` float, ``H`` and ``W``
    positive multiples of ``patch_size`` -> ``(B, output_size)``: logits with
    ``num_classes``, else the pooled features ``(B, num_features)``.
    ``model.forward_features(x)``: the per-stage maps
    ``(B, h_i, w_i, embed_dim * 2**i)`` with ``h_0 = H / patch_size`` and
    ``h_{i+1} = ceil(h_i / 2)``.
    """

    # No published checkpoints exist for the seed model; weights are saved
    # and loaded in MLX's own format (``save_weights`` / ``load_weights``).
    checkpoint_layouts: tuple = ()

    def __init__(self, config: SeedConfig):
        super().__init__()
        self.config = config
        c = config
        self.in_channels = c.in_channels
        self.patch_size = c.patch_size
        self.num_classes = c.num_classes
        self.num_features = c.num_features
        widths = c.widths
        self.patch_embed = PatchEmbed(c.in_channels, c.embed_dim, c.patch_size)
        self.stages = [
            SeedStage(widths[max(i - 1, 0)], widths[i], c.depths[i], c.num_heads[i], c.mlp_ratio, downsample=i > 0)
            for i in range(len(widths))
        ]
        self.norm = nn.LayerNorm(c.num_features)
        self.head = nn.Linear(c.num_features, c.num_classes) if c.num_classes else None

    @classmethod
    def build(cls, **options: Any) -> "EfficientViT":
        """Build the model with random weights; invalid options raise ``ValueError`` naming them.

        ``options``: the fields of :class:`SeedConfig` (the one place their
        defaults are written): ``image_size=224, patch_size=16,
        in_channels=3, embed_dim=64, depths=(1, 2, 3), num_heads=(4, 4, 4),
        mlp_ratio=4.0, num_classes=None``.

        ``num_classes`` ``None`` (or 0) leaves out the classifier, so the
        model returns pooled features ``(B, embed_dim * 2**(len(depths) - 1))``.
        """
        return cls(SeedConfig(**options))

    @property
    def output_size(self) -> int:
        return self.config.output_size

    def _extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in asdict(self.config).items())

    def _check_input(self, x: mx.array) -> mx.array:
        if not isinstance(x, mx.array) and hasattr(x, "shape") and hasattr(x, "dtype"):
            x = mx.array(x)
        check_image_input(x, self.in_channels, multiple=self.patch_size, min_size=self.patch_size)
        if not mx.issubdtype(x.dtype, mx.floating):
            raise ValueError(f"expected a floating-point (normalized) image batch, got dtype {x.dtype}")
        return x

    def forward_features(self, x: mx.array) -> list[mx.array]:
        """Per-stage feature maps, NHWC: ``[(B, h_i, w_i, width_i) for each stage]``."""
        x = self.patch_embed(self._check_input(x))
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features

    def forward_head(self, x: mx.array) -> mx.array:
        """Last stage map ``(B, h, w, C)`` -> LayerNorm, token mean, classifier."""
        x = self.norm(x).mean(axis=(1, 2))
        return self.head(x) if self.head is not None else x

    def __call__(self, x: mx.array) -> mx.array:
        return self.forward_head(self.forward_features(x)[-1])

    def fuse(self) -> "EfficientViT":
        """Nothing to fold (the seed model has no BatchNorm); returns ``self``."""
        return self


# ---------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------


def _build_seed(**options: Any) -> EfficientViT:
    return EfficientViT.build(**options)


MODELS = (
    ModelEntry(
        "efficientvit_seed",
        "seed",
        _build_seed,
        defaults=asdict(SeedConfig()),
    ),
)
