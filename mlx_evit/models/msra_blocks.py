"""The layers of Microsoft's EfficientViT M0-M5 (:mod:`mlx_evit.models.msra`), NHWC.

Sandwich blocks (depthwise conv, FFN, cascaded group attention in local
windows, depthwise conv, FFN), the subsample block with its squeeze-excite
PatchMerging, the 16x patch embedding and the BatchNorm + Linear classifier.
Child names are timm's ``efficientvit_msra.py`` (BatchNorms are ``norm``);
the model, its checkpoint layouts and geometry are in :mod:`mlx_evit.models.msra`.
"""

from __future__ import annotations

from typing import Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlx_evit.ops.layers import ConvNorm, bn_scale_shift, relu, sigmoid, softmax

__all__ = [
    "CascadedGroupAttention",
    "LocalWindowAttention",
    "EfficientViTBlock",
    "EfficientViTStage",
    "PatchEmbed",
    "NormLinear",
]


# ---------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------


class Residual(nn.Module):
    """``x + m(x)`` (stochastic depth is not implemented: the released models use none)."""

    def __init__(self, m: nn.Module):
        super().__init__()
        self.m = m

    def __call__(self, x: mx.array) -> mx.array:
        return x + self.m(x)


class ConvMlp(nn.Module):
    """FFN of 1x1 convs: ``pw2(relu(pw1(x)))``, ``dim -> hidden -> dim``."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.pw1 = ConvNorm(dim, hidden, act=relu)
        self.pw2 = ConvNorm(hidden, dim)

    def __call__(self, x: mx.array) -> mx.array:
        return self.pw2(self.pw1(x))


class SqueezeExcite(nn.Module):
    """Channel gate ``x * sigmoid(fc2(relu(fc1(mean_hw(x)))))``; fc1/fc2 are biased 1x1 convs (Linear here)."""

    def __init__(self, channels: int, rd_channels: int):
        super().__init__()
        self.fc1 = nn.Linear(channels, rd_channels)
        self.fc2 = nn.Linear(rd_channels, channels)

    def __call__(self, x: mx.array) -> mx.array:
        s = self.fc2(relu(self.fc1(x.mean(axis=(1, 2)))))
        return x * sigmoid(s)[:, None, None, :]


def _se_channels(channels: int, ratio: float = 0.25, divisor: int = 8) -> int:
    """Squeeze width: ``channels * ratio`` rounded to the nearest multiple of ``divisor`` (at least one)."""
    return max(divisor, int(channels * ratio + divisor / 2) // divisor * divisor)


class PatchMerging(nn.Module):
    """Stride-2 downsampling: 1x1 (x4 wider), 3x3 depthwise stride 2, squeeze-excite, 1x1 to ``out_dim``."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        hidden = 4 * dim
        self.conv1 = ConvNorm(dim, hidden, act=relu)
        self.conv2 = ConvNorm(hidden, hidden, 3, stride=2, groups=hidden, act=relu)
        self.se = SqueezeExcite(hidden, _se_channels(hidden))
        self.conv3 = ConvNorm(hidden, out_dim)

    def __call__(self, x: mx.array) -> mx.array:
        return self.conv3(self.se(self.conv2(self.conv1(x))))


class CascadedGroupAttention(nn.Module):
    """Cascaded group attention over ``R x R`` windows: ``(B, R, R, C) -> (B, R, R, C)``.

    The channels are split into ``num_heads`` contiguous groups of ``d = C /
    num_heads``; head ``i`` sees its group plus the previous head's output
    (the cascade, hence a sequential loop), projects it to ``q | k | v``
    (``key_dim, key_dim, d``), runs a ``kernels[i]`` depthwise conv on ``q``,
    and attends with a learned relative-position bias
    ``attention_biases[i, |dy| * R + |dx|]``. The heads' outputs are
    concatenated and projected by ``proj`` (ReLU, 1x1 ConvNorm). Attention
    runs in float32.
    """

    def __init__(self, dim: int, key_dim: int, num_heads: int, resolution: int, kernels: Sequence[int]):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"num_heads={num_heads} must divide dim={dim}")
        if len(kernels) < num_heads:
            raise ValueError(f"need one q kernel per head: {num_heads} heads, kernels={tuple(kernels)}")
        self.num_heads = num_heads
        self.key_dim = key_dim
        self.val_dim = dim // num_heads
        self.scale = key_dim**-0.5
        self.resolution = resolution
        self.qkvs = [ConvNorm(self.val_dim, 2 * key_dim + self.val_dim) for _ in range(num_heads)]
        self.dws = [ConvNorm(key_dim, key_dim, kernels[i], groups=key_dim) for i in range(num_heads)]
        self.proj = [nn.ReLU(), ConvNorm(self.val_dim * num_heads, dim)]
        self.attention_biases = mx.zeros((num_heads, resolution * resolution))
        # Closed form of the original's offset enumeration: index of (|dy|, |dx|) is |dy| * R + |dx|.
        ys, xs = np.divmod(np.arange(resolution * resolution), resolution)
        idx = np.abs(ys[:, None] - ys[None, :]) * resolution + np.abs(xs[:, None] - xs[None, :])
        self._bias_idx = mx.array(idx.astype(np.int32))  # leading "_": not a parameter
        self._bias_cache: Optional[tuple[mx.array, mx.array]] = None

    def _extra_repr(self) -> str:
        return f"heads={self.num_heads}, key_dim={self.key_dim}, val_dim={self.val_dim}, resolution={self.resolution}"

    def attention_bias(self) -> mx.array:
        """Per-head additive logits bias ``(heads, N, N)``, float32, from the current parameter.

        After :meth:`fuse` the gathered table is reused in eval mode for as
        long as ``attention_biases`` is the same array (loading or updating
        weights replaces it, which retires the cache).
        """
        cache = self._bias_cache
        if cache is not None and cache[0] is self.attention_biases and not self.training:
            return cache[1]
        return self.attention_biases.astype(mx.float32)[:, self._bias_idx]

    def fuse(self) -> None:
        """Precompute the gathered bias table for inference (the ConvNorms fold themselves)."""
        table = self.attention_biases.astype(mx.float32)[:, self._bias_idx]
        mx.eval(table)
        self._bias_cache = (self.attention_biases, table)

    def __call__(self, x: mx.array) -> mx.array:
        B, H, W, C = x.shape
        n, kd, d = H * W, self.key_dim, self.val_dim
        bias = self.attention_bias()
        outs = []
        feat = None
        for i, (qkv, dw) in enumerate(zip(self.qkvs, self.dws)):
            part = x[..., i * d : (i + 1) * d]
            feat = part if feat is None else feat + part
            t = qkv(feat)
            q = dw(t[..., :kd]).reshape(B, n, kd).astype(mx.float32)
            k = t[..., kd : 2 * kd].reshape(B, n, kd).astype(mx.float32)
            v = t[..., 2 * kd :].reshape(B, n, d).astype(mx.float32)
            logits = mx.addmm(bias[i], q, k.swapaxes(1, 2), alpha=self.scale)
            attn = softmax(logits, axis=-1)
            feat = (attn @ v).astype(x.dtype).reshape(B, H, W, d)
            outs.append(feat)
        y = mx.concatenate(outs, axis=-1) if len(outs) > 1 else outs[0]
        return self.proj[1](self.proj[0](y))


class LocalWindowAttention(nn.Module):
    """CGA over non-overlapping ``R x R`` windows (windows become batch items): ``(B, H, W, C)``.

    Maps of exactly ``R x R`` go straight through; others are zero-padded
    bottom/right to multiples of ``R`` (padding not masked, as in the
    original), partitioned, attended and cropped back.
    """

    def __init__(self, dim: int, key_dim: int, num_heads: int, resolution: int, window_size: int, kernels: Sequence[int]):
        super().__init__()
        self.resolution = resolution
        self.window_size = window_size
        self.attn = CascadedGroupAttention(dim, key_dim, num_heads, min(window_size, resolution), kernels)

    def __call__(self, x: mx.array) -> mx.array:
        B, H, W, C = x.shape
        ws = self.attn.resolution
        if H == ws and W == ws:
            return self.attn(x)
        pad_b, pad_r = (-H) % ws, (-W) % ws
        if pad_b or pad_r:
            x = mx.pad(x, [(0, 0), (0, pad_b), (0, pad_r), (0, 0)])
        ph, pw = H + pad_b, W + pad_r
        nh, nw = ph // ws, pw // ws
        x = x.reshape(B, nh, ws, nw, ws, C).transpose(0, 1, 3, 2, 4, 5).reshape(B * nh * nw, ws, ws, C)
        x = self.attn(x)
        x = x.reshape(B, nh, nw, ws, ws, C).transpose(0, 1, 3, 2, 4, 5).reshape(B, ph, pw, C)
        if pad_b or pad_r:
            x = x[:, :H, :W, :]
        return x


class EfficientViTBlock(nn.Module):
    """Sandwich block: residual dw3x3, FFN, window attention, dw3x3, FFN (``(B, H, W, C)``)."""

    def __init__(self, dim: int, key_dim: int, num_heads: int, resolution: int, window_size: int, kernels: Sequence[int]):
        super().__init__()
        self.dw0 = Residual(ConvNorm(dim, dim, 3, groups=dim))
        self.ffn0 = Residual(ConvMlp(dim, 2 * dim))
        self.mixer = Residual(LocalWindowAttention(dim, key_dim, num_heads, resolution, window_size, kernels))
        self.dw1 = Residual(ConvNorm(dim, dim, 3, groups=dim))
        self.ffn1 = Residual(ConvMlp(dim, 2 * dim))

    def __call__(self, x: mx.array) -> mx.array:
        return self.ffn1(self.dw1(self.mixer(self.ffn0(self.dw0(x)))))


class Subsample(nn.Module):
    """Start of stages 2 and 3: residual dw3x3 + FFN at ``in_dim``, PatchMerging, residual dw3x3 + FFN at ``out_dim``."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.res1 = [Residual(ConvNorm(in_dim, in_dim, 3, groups=in_dim)), Residual(ConvMlp(in_dim, 2 * in_dim))]
        self.patchmerge = PatchMerging(in_dim, out_dim)
        self.res2 = [Residual(ConvNorm(out_dim, out_dim, 3, groups=out_dim)), Residual(ConvMlp(out_dim, 2 * out_dim))]

    def __call__(self, x: mx.array) -> mx.array:
        for layer in self.res1:
            x = layer(x)
        x = self.patchmerge(x)
        for layer in self.res2:
            x = layer(x)
        return x


class EfficientViTStage(nn.Module):
    """Optional :class:`Subsample` then ``depth`` blocks; ``resolution`` is the side after downsampling."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        key_dim: int,
        num_heads: int,
        depth: int,
        resolution: int,
        window_size: int,
        kernels: Sequence[int],
        downsample: bool,
    ):
        super().__init__()
        if not downsample and in_dim != out_dim:
            raise ValueError(f"a stage without downsampling keeps its width: {in_dim} != {out_dim}")
        self.downsample = Subsample(in_dim, out_dim) if downsample else None
        self.blocks = [
            EfficientViTBlock(out_dim, key_dim, num_heads, resolution, window_size, kernels) for _ in range(depth)
        ]

    def __call__(self, x: mx.array) -> mx.array:
        if self.downsample is not None:
            x = self.downsample(x)
        for block in self.blocks:
            x = block(x)
        return x


class PatchEmbed(nn.Module):
    """Four 3x3 stride-2 ConvNorms (``dim/8, dim/4, dim/2, dim``), ReLU between them, not after the last."""

    def __init__(self, in_chans: int, dim: int):
        super().__init__()
        self.conv1 = ConvNorm(in_chans, dim // 8, 3, stride=2, act=relu)
        self.conv2 = ConvNorm(dim // 8, dim // 4, 3, stride=2, act=relu)
        self.conv3 = ConvNorm(dim // 4, dim // 2, 3, stride=2, act=relu)
        self.conv4 = ConvNorm(dim // 2, dim, 3, stride=2)

    def __call__(self, x: mx.array) -> mx.array:
        return self.conv4(self.conv3(self.conv2(self.conv1(x))))


class NormLinear(nn.Module):
    """Classifier: BatchNorm1d then Linear on pooled features ``(B, C) -> (B, num_classes)``."""

    def __init__(self, in_features: int, out_features: int, eps: float = 1e-5):
        super().__init__()
        self.norm = nn.BatchNorm(in_features, eps=eps)
        self.linear = nn.Linear(in_features, out_features)

    def __call__(self, x: mx.array) -> mx.array:
        if self.norm is not None:
            x = self.norm(x)
        return self.linear(x)

    def fuse(self) -> None:
        """Fold the BatchNorm into the Linear's input columns: ``W' = W diag(s)``, ``b' = W t + b``."""
        if self.norm is None:
            return
        scale, shift = bn_scale_shift(self.norm)
        w = self.linear.weight
        self.linear.bias = (w.astype(mx.float32) @ shift + self.linear.bias.astype(mx.float32)).astype(w.dtype)
        self.linear.weight = (w * scale[None, :]).astype(w.dtype)
        self.norm = None
