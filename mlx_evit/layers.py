"""Layers shared by every EfficientViT family in this package (all NHWC).

Everything a family module needs and that is not specific to it lives here:
activations, convolution + BatchNorm (+ activation) with inference-time BN
folding, a backend-aware depthwise convolution, the grouped 1x1 convolution
used by LiteMLA's multi-scale aggregation, the linear-attention kernels, and
input validation.

Layout conventions (MLX): activations are ``(B, H, W, C)``; convolution
weights are ``(O, kH, kW, I / groups)``; pointwise (1x1, stride 1, groups 1)
convolutions are ``nn.Linear`` layers over the channel axis, with weights
``(O, I)``, so they run as one GEMM and can be quantized with ``nn.quantize``.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import mlx.core as mx
import mlx.nn as nn

Activation = Optional[Callable[[mx.array], mx.array]]

# ---------------------------------------------------------------------------
# Backend awareness
# ---------------------------------------------------------------------------


def native_grouped_conv() -> bool:
    """True when MLX's own grouped convolution is the fast path.

    Metal has a dedicated depthwise kernel; the CPU backend runs any grouped
    convolution as a scalar loop, where shifted multiply-adds (and, for grouped
    1x1 convolutions, a batched matmul) are several times faster.
    """
    return mx.default_device().type == mx.DeviceType.gpu


def native_transcendentals() -> bool:
    """True when MLX's own ``exp``/``erf``/``tanh``/``softmax`` are fast (the GPU).

    On the x86 CPU backend they cost 20-40 ns per element (their polynomial
    evaluation calls a software ``fma``); :func:`exp` below is 10x faster
    there and at least as accurate.
    """
    return mx.default_device().type == mx.DeviceType.gpu


# ---------------------------------------------------------------------------
# Elementwise math (backend-aware)
# ---------------------------------------------------------------------------

# exp(x) = 2**n * e**r, n = round(x / ln 2), r = x - n ln 2 in [-ln2/2, ln2/2]
# (Cody-Waite: ln 2 split in a high part exact in float32 and a low part).
_LOG2E = 1.4426950408889634
_LN2_HI = 0.693145751953125
_LN2_LO = 1.428606765330187e-06
_ROUND = 12582912.0  # 1.5 * 2**23: (t + _ROUND) - _ROUND rounds t to an integer
# e**r - 1 - r = r**2 * P(r) on [-ln2/2, ln2/2] (Cephes expf coefficients).
_EXP_POLY = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1)


def exp(x: mx.array) -> mx.array:
    """``e**x``: ``mx.exp`` on the GPU, a float32 polynomial with exact power-of-two scaling elsewhere.

    The CPU form is made of adds, multiplies and one integer shift, which
    ``mx.compile`` fuses; relative error < 1e-7 over the float32 range.
    Arguments are clamped to [-88, 88]: results below ``e**-88`` flush to
    zero and above ``e**88`` saturate at 1.65e38 instead of overflowing.
    """
    if native_transcendentals():
        return mx.exp(x)
    dtype = x.dtype
    x = mx.clip(x.astype(mx.float32), -88.0, 88.0)
    n = mx.stop_gradient((x * _LOG2E + _ROUND) - _ROUND)  # piecewise constant: no gradient
    r = (x - n * _LN2_HI) - n * _LN2_LO
    p = _EXP_POLY[0]
    for c in _EXP_POLY[1:]:
        p = p * r + c
    p = (p * r * r + r) + 1.0
    scale = mx.view(mx.left_shift(n.astype(mx.int32) + 127, 23), mx.float32)  # 2**n, bit-exact
    return (p * scale).astype(dtype)


def softmax(x: mx.array, axis: int = -1) -> mx.array:
    """Softmax along ``axis``: ``mx.softmax`` on the GPU, max-shifted :func:`exp` elsewhere."""
    if native_transcendentals():
        return mx.softmax(x, axis=axis)
    e = exp(x - mx.stop_gradient(x.max(axis=axis, keepdims=True)))
    return e / e.sum(axis=axis, keepdims=True)


def sigmoid(x: mx.array) -> mx.array:
    """``1 / (1 + e**-x)``: ``mx.sigmoid`` on the GPU, via :func:`exp` elsewhere."""
    if native_transcendentals():
        return mx.sigmoid(x)
    return 1.0 / (1.0 + exp(-x))


# Abramowitz & Stegun 7.1.26: erfc(z) = t P(t) e**-z**2, t = 1 / (1 + p z), z >= 0, |error| <= 1.5e-7.
_ERFC_P = 0.3275911
_ERFC_POLY = (1.061405429, -1.453152027, 1.421413741, -0.284496736, 0.254829592)


def normal_cdf(x: mx.array) -> mx.array:
    """Standard normal CDF ``0.5 * (1 + erf(x / sqrt 2))``; a rational approximation times :func:`exp` off the GPU.

    Computed as ``0.5 * erfc(|x| / sqrt 2)`` for the tail, so it keeps its
    relative accuracy for negative ``x`` (no ``1 + erf`` cancellation);
    absolute error below 1e-7.
    """
    if native_transcendentals():
        return 0.5 * (1.0 + mx.erf(x * (1.0 / math.sqrt(2.0))))
    z = mx.abs(x) * (1.0 / math.sqrt(2.0))
    t = 1.0 / (1.0 + _ERFC_P * z)
    p = _ERFC_POLY[0]
    for c in _ERFC_POLY[1:]:
        p = p * t + c
    tail = 0.5 * (p * t) * exp(-(z * z))  # 0.5 * erfc(z)
    return mx.where(x >= 0, 1.0 - tail, tail)


# ---------------------------------------------------------------------------
# Activations
# ---------------------------------------------------------------------------


def hardswish(x: mx.array) -> mx.array:
    """``x * relu6(x + 3) / 6`` (torch.nn.Hardswish), used by the MIT B series."""
    return x * mx.clip(x + 3.0, 0.0, 6.0) / 6.0


def gelu_tanh(x: mx.array) -> mx.array:
    """GELU with the tanh approximation (torch ``approximate="tanh"``), MIT L series.

    ``0.5 x (1 + tanh(u)) = x * sigmoid(2u)``; the second (same function)
    form is used off the GPU, where ``mx.tanh`` is slow.
    """
    u = math.sqrt(2.0 / math.pi) * (x + 0.044715 * x * x * x)
    if native_transcendentals():
        return 0.5 * x * (1.0 + mx.tanh(u))
    return x * sigmoid(2.0 * u)


def gelu(x: mx.array) -> mx.array:
    """Exact (erf) GELU, ``x * Phi(x)``."""
    if native_transcendentals():
        return nn.gelu(x)
    return x * normal_cdf(x)


def relu(x: mx.array) -> mx.array:
    return mx.maximum(x, 0.0)


def elu_plus_one(x: mx.array) -> mx.array:
    """phi(x) = ELU(x) + 1 > 0: the feature map of the seed model's linear attention."""
    return mx.where(x > 0, x + 1.0, exp(mx.minimum(x, 0.0)))


ACTIVATIONS: dict[str, Callable[[mx.array], mx.array]] = {
    "relu": relu,
    "hswish": hardswish,
    "gelu_tanh": gelu_tanh,
    "gelu": gelu,
}


def get_act(name: Optional[str]) -> Activation:
    """Activation function by name (``None`` -> no activation)."""
    if name is None:
        return None
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; expected one of {sorted(ACTIVATIONS)}") from None


# ---------------------------------------------------------------------------
# Convolutions
# ---------------------------------------------------------------------------


def _scale_rows(w: mx.array, s: mx.array) -> mx.array:
    """Multiply ``w`` by ``s`` along its first (output-channel) axis."""
    return w * s.reshape((-1,) + (1,) * (w.ndim - 1)).astype(w.dtype)


def _patches(xp: mx.array, kh: int, kw: int, sh: int, sw: int) -> mx.array:
    """All ``kh x kw`` windows of the (already padded) ``(B, Hp, Wp, C)`` input at stride ``(sh, sw)``.

    A strided view ``(B, Ho, Wo, kh, kw, C)``, no copy: ``[b, i, j, u, v]`` is
    ``xp[b, i * sh + u, j * sw + v]``.
    """
    B, Hp, Wp, C = xp.shape
    Ho, Wo = (Hp - kh) // sh + 1, (Wp - kw) // sw + 1
    return mx.as_strided(xp, (B, Ho, Wo, kh, kw, C), (Hp * Wp * C, sh * Wp * C, sw * C, Wp * C, C, 1))


def _fusion_boundary(x: mx.array) -> mx.array:
    """``x`` unchanged, but ``mx.compile`` will not fuse across it.

    A flatten and un-flatten: reshapes are not fusable, copy nothing for the
    contiguous output of a fused kernel, are differentiable and, unlike
    ``mx.contiguous``, survive ``mx.export_function``.
    """
    return x.reshape(-1).reshape(x.shape)


class DepthwiseConv2d(nn.Module):
    """k x k convolution with ``groups == channels`` and symmetric ``k // 2`` padding.

    Weight ``(C, k, k, 1)`` as for ``nn.Conv2d(groups=C)``. On the GPU this
    calls MLX's grouped conv (dedicated depthwise kernel). The CPU backend
    runs grouped convolutions as a naive scalar loop, so elsewhere the
    convolution is written with other ops, exactly: small maps as one
    strided ``(B, Ho, Wo, k, k, C)`` view of the padded input, scaled and
    summed over the taps (a handful of graph nodes); large maps as a sum of
    ``k * k`` shifted, per-channel-scaled views, which ``mx.compile`` fuses
    into a few passes (:attr:`TAPS_PER_KERNEL` taps each) without
    materialising the ``k * k`` copies.
    """

    # CPU choice between the two forms by the number of tap products B * Ho * Wo * C * k * k,
    # measured on x86 in whole models: the strided view materialises the products, the shifted
    # sum costs about 2 k**2 graph nodes and a scalar fused kernel.
    STRIDED_VIEW_MAX = 1_000_000
    # Taps summed per fused kernel in the shifted form. MLX's CPU JIT turns a fused chain into one
    # strided loop with a pointer per input; past about 8 inputs (x tap + weight row per term) it
    # runs several times slower per element, so the sum is cut into kernels of 3 taps
    # (see :func:`_fusion_boundary`).
    # Measured on x86 in whole models at batch 16: B0 1.75x, B1 1.9x faster than one 9-tap kernel.
    TAPS_PER_KERNEL = 3

    def __init__(self, channels: int, kernel_size: int, stride: int = 1, bias: bool = False):
        super().__init__()
        self.channels = channels
        self.kernel_size = kernel_size
        self.stride = stride
        scale = 1.0 / math.sqrt(kernel_size * kernel_size)
        self.weight = mx.random.uniform(-scale, scale, (channels, kernel_size, kernel_size, 1))
        if bias:
            self.bias = mx.zeros((channels,))

    def _extra_repr(self) -> str:
        return f"{self.channels}, kernel_size={self.kernel_size}, stride={self.stride}, bias={'bias' in self}"

    def __call__(self, x: mx.array) -> mx.array:
        k, s, p = self.kernel_size, self.stride, self.kernel_size // 2
        if native_grouped_conv() or k == 1:
            y = mx.conv2d(x, self.weight, stride=s, padding=p, groups=self.channels)
        else:
            B, H, W, C = x.shape
            Ho, Wo = (H + 2 * p - k) // s + 1, (W + 2 * p - k) // s + 1
            xp = mx.pad(x, [(0, 0), (p, p), (p, p), (0, 0)])
            if B * Ho * Wo * C * k * k <= self.STRIDED_VIEW_MAX:
                taps = _patches(xp, k, k, s, s)
                y = (taps * self.weight.reshape(C, k, k).transpose(1, 2, 0)).sum(axis=(3, 4))
            else:
                # One split into k*k per-tap weight rows (views), not k*k gathers.
                w = mx.split(self.weight.reshape(C, k * k).T, k * k, axis=0)  # k*k x (1, C)
                y = None
                for n in range(k * k):
                    i, j = divmod(n, k)
                    tap = xp[:, i : i + s * (Ho - 1) + 1 : s, j : j + s * (Wo - 1) + 1 : s, :]
                    if n and n % self.TAPS_PER_KERNEL == 0:
                        y = _fusion_boundary(y)
                    term = tap * w[n]
                    y = term if y is None else y + term
        if "bias" in self:
            y = y + self.bias
        return y

    @staticmethod
    def torch_to_mlx(leaf: str, value):
        """PyTorch ``(C, 1, k, k)`` -> ``(C, k, k, 1)``."""
        return value.transpose(0, 2, 3, 1) if leaf == "weight" and value.ndim == 4 else value


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` (same parameters and semantics) that runs narrow dense convolutions as one GEMM on the CPU.

    For ``groups == 1`` and no dilation with ``in_channels * out_channels``
    at most :attr:`IM2COL_MAX_CHANNELS`, the CPU path builds the
    ``(B * Ho * Wo, k * k * C)`` patch matrix from one strided view of the
    padded input and multiplies it by the weight; that copy is faster than
    the one inside MLX's CPU convolution, which matters when the GEMM is
    small (stems, patch embeddings). Wider convolutions and the GPU use
    ``mx.conv2d``.
    """

    IM2COL_MAX_CHANNELS = 64 * 128  # measured crossover of in * out channels on x86

    def __call__(self, x: mx.array) -> mx.array:
        O, kh, kw, C = self.weight.shape
        dilation = (self.dilation,) * 2 if isinstance(self.dilation, int) else tuple(self.dilation)
        if native_grouped_conv() or self.groups != 1 or dilation != (1, 1) or C * O > self.IM2COL_MAX_CHANNELS:
            return super().__call__(x)
        (sh, sw), (ph, pw) = self.stride, self.padding
        xp = mx.pad(x, [(0, 0), (ph, ph), (pw, pw), (0, 0)]) if ph or pw else x
        windows = _patches(xp, kh, kw, sh, sw)
        B, Ho, Wo = windows.shape[:3]
        patches = windows.reshape(B * Ho * Wo, kh * kw * C)
        w = self.weight.reshape(O, kh * kw * C).T
        y = mx.addmm(self.bias, patches, w) if "bias" in self else patches @ w
        return y.reshape(B, Ho, Wo, O)


class GroupedPointwise(nn.Module):
    """1x1 convolution with ``groups`` groups, no bias: ``(B, H, W, C) -> (B, H, W, O)``.

    Weight ``(O, 1, 1, C / groups)`` (MLX conv layout). Off the GPU it runs as
    one batched matmul over the groups instead of MLX's grouped-conv loop.
    """

    def __init__(self, in_channels: int, out_channels: int, groups: int):
        super().__init__()
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"groups={groups} must divide in_channels={in_channels} and out_channels={out_channels}")
        self.groups = groups
        scale = 1.0 / math.sqrt(in_channels // groups)
        self.weight = mx.random.uniform(-scale, scale, (out_channels, 1, 1, in_channels // groups))

    def __call__(self, x: mx.array) -> mx.array:
        if native_grouped_conv():
            return mx.conv2d(x, self.weight, groups=self.groups)
        B, H, W, C = x.shape
        g, O = self.groups, self.weight.shape[0]
        xg = x.reshape(B * H * W, g, C // g).transpose(1, 0, 2)  # (g, N, C/g)
        wg = self.weight.reshape(g, O // g, C // g)  # (g, O/g, C/g)
        y = xg @ wg.transpose(0, 2, 1)  # (g, N, O/g)
        return y.transpose(1, 0, 2).reshape(B, H, W, O)

    @staticmethod
    def torch_to_mlx(leaf: str, value):
        return value.transpose(0, 2, 3, 1) if value.ndim == 4 else value


def torch_to_mlx(module: nn.Module, leaf: str, value):
    """Convert one PyTorch tensor (numpy array) for parameter ``leaf`` of ``module``.

    Decided by the type of the receiving module, never by shape: convolution
    weights go from OIHW to OHWI, pointwise convolutions that are ``nn.Linear``
    here drop their trailing 1x1, everything else is unchanged.
    """
    hook = getattr(module, "torch_to_mlx", None)
    if hook is not None:
        return hook(leaf, value)
    if isinstance(module, nn.Conv2d) and leaf == "weight" and value.ndim == 4:
        return value.transpose(0, 2, 3, 1)
    if isinstance(module, nn.Linear) and leaf == "weight" and value.ndim == 4:
        if value.shape[2:] != (1, 1):
            raise ValueError(f"expected a 1x1 convolution weight, got shape {tuple(value.shape)}")
        return value.reshape(value.shape[0], value.shape[1])
    return value


class ConvNorm(nn.Module):
    """Convolution, optional BatchNorm, optional activation (``conv``, ``norm`` children).

    The convolution is ``nn.Linear`` for 1x1/stride-1/ungrouped kernels,
    :class:`DepthwiseConv2d` when ``groups == in == out``, otherwise
    ``nn.Conv2d`` with symmetric ``k // 2`` padding (PyTorch semantics).
    :meth:`fuse` folds the BatchNorm into the convolution for inference.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 1,
        stride: int = 1,
        groups: int = 1,
        bias: bool = False,
        norm: bool = True,
        act: Activation = None,
        eps: float = 1e-5,
    ):
        super().__init__()
        if kernel_size == 1 and stride == 1 and groups == 1:
            self.conv = nn.Linear(in_channels, out_channels, bias=bias)
        elif groups == in_channels == out_channels:
            self.conv = DepthwiseConv2d(in_channels, kernel_size, stride, bias=bias)
        elif groups == 1:
            self.conv = Conv2d(in_channels, out_channels, kernel_size, stride, padding=kernel_size // 2, bias=bias)
        else:
            raise ValueError(f"unsupported grouped convolution: groups={groups}, {in_channels}->{out_channels}")
        self.norm = nn.BatchNorm(out_channels, eps=eps) if norm else None
        self.act = act

    def __call__(self, x: mx.array) -> mx.array:
        x = self.conv(x)
        if self.norm is not None:
            x = self.norm(x)
        if self.act is not None:
            x = self.act(x)
        return x

    def fuse(self) -> None:
        """Fold the eval-mode BatchNorm into the convolution (exact up to rounding)."""
        if self.norm is None:
            return
        scale, shift = bn_scale_shift(self.norm)
        conv = self.conv
        bias = conv.bias if "bias" in conv else mx.zeros_like(shift)
        conv.weight = _scale_rows(conv.weight, scale)
        conv.bias = (bias * scale + shift).astype(conv.weight.dtype)
        self.norm = None


def bn_scale_shift(bn: nn.BatchNorm) -> tuple[mx.array, mx.array]:
    """Eval-mode BatchNorm as an affine map ``y = x * scale + shift`` (float32)."""
    var = bn.running_var.astype(mx.float32)
    mean = bn.running_mean.astype(mx.float32)
    scale = mx.rsqrt(var + bn.eps)
    if "weight" in bn:
        scale = scale * bn.weight.astype(mx.float32)
    shift = -mean * scale
    if "bias" in bn:
        shift = shift + bn.bias.astype(mx.float32)
    return scale, shift


def fuse_modules(model: nn.Module) -> nn.Module:
    """Call ``fuse()`` on every sub-module that has one (BN folding for inference).

    Returns ``model``, modified in place; call it on an eval-mode model.
    """
    for _, module in model.named_modules():
        if module is not model and callable(getattr(module, "fuse", None)):
            module.fuse()
    return model


# ---------------------------------------------------------------------------
# Linear attention
# ---------------------------------------------------------------------------


def linear_attention(q: mx.array, k: mx.array, v: mx.array, eps: float) -> mx.array:
    """Kernelised attention in O(N): ``q (k^T v) / (q . sum_n k_n + eps)``, in float32.

    ``q, k``: ``(..., N, d)`` non-negative feature maps (already passed through
    the kernel function); ``v``: ``(..., N, dv)``. Returns ``(..., N, dv)`` in
    float32. ``k^T [v | 1]`` is one ``(d, dv + 1)`` matrix per head, so no
    ``N x N`` array is ever formed; its last column is the normaliser.
    """
    q = q.astype(mx.float32)
    k = k.astype(mx.float32)
    v = v.astype(mx.float32)
    ones = mx.ones(v.shape[:-1] + (1,), dtype=mx.float32)
    kv = k.swapaxes(-1, -2) @ mx.concatenate([v, ones], axis=-1)  # (..., d, dv + 1)
    out = q @ kv  # (..., N, dv + 1)
    return out[..., :-1] / (out[..., -1:] + eps)


# ---------------------------------------------------------------------------
# Input validation
# ---------------------------------------------------------------------------


def check_image_input(x: mx.array, in_channels: int, multiple: int = 1, min_size: int = 1) -> None:
    """Raise ``ValueError`` unless ``x`` is an NHWC batch the model can take.

    ``multiple``: height and width must be divisible by it (the total stride of
    models that need it); ``min_size``: smallest height/width accepted.
    """
    shape = tuple(getattr(x, "shape", ()))
    if len(shape) != 4:
        raise ValueError(
            f"expected a 4-D NHWC input (batch, height, width, {in_channels}), got shape {shape}"
        )
    B, H, W, C = shape
    if C != in_channels:
        hint = ""
        if H == in_channels:
            hint = " It looks like NCHW; transpose it with x.transpose(0, 2, 3, 1)."
        raise ValueError(
            f"expected {in_channels} channels in the last axis (NHWC), got shape {shape}.{hint}"
        )
    if H < min_size or W < min_size:
        raise ValueError(f"input {H}x{W} is too small: height and width must be at least {min_size}")
    if multiple > 1 and (H % multiple or W % multiple):
        raise ValueError(
            f"input height and width must be multiples of {multiple}, got {H}x{W}"
        )
