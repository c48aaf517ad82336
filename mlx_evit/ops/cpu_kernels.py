"""CPU formulations of the ops whose MLX built-ins are slow on MLX's CPU backend (all NHWC).

MLX's CPU backend evaluates ``exp``/``erf``/``tanh`` at 20-40 ns per element
(their polynomials call a software ``fma``) and runs every grouped
convolution as a scalar loop. The functions here compute the same results
with ops the CPU backend does fast (adds, multiplies, shifts, GEMMs), which
``mx.compile`` fuses. :mod:`mlx_evit.ops.layers` chooses between these and the
built-ins through :func:`mlx_evit.ops.backend.use_native`; nothing here looks at
the device.
"""

from __future__ import annotations

import math
from typing import Optional

import mlx.core as mx

__all__ = [
    "EXP_CLAMP",
    "exp",
    "softmax",
    "sigmoid",
    "normal_cdf",
    "gelu",
    "gelu_tanh",
    "patches",
    "fusion_boundary",
    "depthwise_conv2d",
    "im2col_conv2d",
]

EXP_CLAMP = 88.0
"""Both :func:`exp` forms clamp their argument to ``[-EXP_CLAMP, EXP_CLAMP]``."""

# exp(x) = 2**n * e**r, n = round(x / ln 2), r = x - n ln 2 in [-ln2/2, ln2/2]
# (Cody-Waite: ln 2 split in a high part exact in float32 and a low part).
_LOG2E = 1.4426950408889634
_LN2_HI = 0.693145751953125
_LN2_LO = 1.428606765330187e-06
_ROUND = 12582912.0  # 1.5 * 2**23: (t + _ROUND) - _ROUND rounds t to an integer
# e**r - 1 - r = r**2 * P(r) on [-ln2/2, ln2/2] (Cephes expf coefficients).
_EXP_POLY = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1)

# Abramowitz & Stegun 7.1.26: erfc(z) = t P(t) e**-z**2, t = 1 / (1 + p z), z >= 0, |error| <= 1.5e-7.
_ERFC_P = 0.3275911
_ERFC_POLY = (1.061405429, -1.453152027, 1.421413741, -0.284496736, 0.254829592)


def exp(x: mx.array) -> mx.array:
    """``e**x`` as a float32 polynomial with exact power-of-two scaling (relative error < 1e-7).

    Made of adds, multiplies and one integer shift. The argument is clamped to
    ``[-88, 88]``: above, results saturate at ``e**88`` = 1.65e38; below about
    ``e**-87.3`` (the float32 normal range) they flush to zero.
    """
    dtype = x.dtype
    x = mx.clip(x.astype(mx.float32), -EXP_CLAMP, EXP_CLAMP)
    n = mx.stop_gradient((x * _LOG2E + _ROUND) - _ROUND)  # piecewise constant: no gradient
    r = (x - n * _LN2_HI) - n * _LN2_LO
    p = _EXP_POLY[0]
    for c in _EXP_POLY[1:]:
        p = p * r + c
    p = (p * r * r + r) + 1.0
    scale = mx.view(mx.left_shift(n.astype(mx.int32) + 127, 23), mx.float32)  # 2**n, bit-exact
    return (p * scale).astype(dtype)


def softmax(x: mx.array, axis: int = -1) -> mx.array:
    """Softmax along ``axis`` through the max-shifted :func:`exp`."""
    e = exp(x - mx.stop_gradient(x.max(axis=axis, keepdims=True)))
    return e / e.sum(axis=axis, keepdims=True)


def sigmoid(x: mx.array) -> mx.array:
    """``1 / (1 + e**-x)`` through :func:`exp`."""
    return 1.0 / (1.0 + exp(-x))


def normal_cdf(x: mx.array) -> mx.array:
    """Standard normal CDF as ``0.5 * erfc(|x| / sqrt 2)`` for the tail (absolute error < 1e-7).

    The tail form keeps its relative accuracy for negative ``x`` (no
    ``1 + erf`` cancellation).
    """
    z = mx.abs(x) * (1.0 / math.sqrt(2.0))
    t = 1.0 / (1.0 + _ERFC_P * z)
    p = _ERFC_POLY[0]
    for c in _ERFC_POLY[1:]:
        p = p * t + c
    tail = 0.5 * (p * t) * exp(-(z * z))  # 0.5 * erfc(z)
    return mx.where(x >= 0, 1.0 - tail, tail)


def gelu(x: mx.array) -> mx.array:
    """Exact (erf) GELU ``x * Phi(x)`` through :func:`normal_cdf`."""
    return x * normal_cdf(x)


def gelu_tanh(x: mx.array) -> mx.array:
    """Tanh-approximated GELU as ``x * sigmoid(2u)`` (``= 0.5 x (1 + tanh u)``, no ``mx.tanh``)."""
    u = math.sqrt(2.0 / math.pi) * (x + 0.044715 * x * x * x)
    return x * sigmoid(2.0 * u)


def patches(xp: mx.array, kh: int, kw: int, sh: int, sw: int) -> mx.array:
    """All ``kh x kw`` windows of the (already padded) ``(B, Hp, Wp, C)`` input at stride ``(sh, sw)``.

    A strided view ``(B, Ho, Wo, kh, kw, C)``, no copy: ``[b, i, j, u, v]`` is
    ``xp[b, i * sh + u, j * sw + v]``.
    """
    B, Hp, Wp, C = xp.shape
    Ho, Wo = (Hp - kh) // sh + 1, (Wp - kw) // sw + 1
    return mx.as_strided(xp, (B, Ho, Wo, kh, kw, C), (Hp * Wp * C, sh * Wp * C, sw * C, Wp * C, C, 1))


def fusion_boundary(x: mx.array) -> mx.array:
    """``x`` unchanged, but ``mx.compile`` will not fuse across it.

    A flatten and un-flatten: reshapes are not fusable, copy nothing for the
    contiguous output of a fused kernel, are differentiable and, unlike
    ``mx.contiguous``, survive ``mx.export_function``.
    """
    return x.reshape(-1).reshape(x.shape)


def depthwise_conv2d(x: mx.array, weight: mx.array, stride: int, strided_view_max: int,
                     taps_per_kernel: int) -> mx.array:
    """``mx.conv2d(x, weight, stride, padding=k // 2, groups=C)`` without the grouped conv.

    ``x``: ``(B, H, W, C)``; ``weight``: ``(C, k, k, 1)``. Small maps (at most
    ``strided_view_max`` tap products ``B * Ho * Wo * C * k * k``) as one
    strided window view scaled and summed over the taps; larger ones as a
    sum of ``k * k`` shifted, per-channel-scaled views, cut by
    :func:`fusion_boundary` into fused kernels of ``taps_per_kernel`` taps.
    """
    C, k = weight.shape[0], weight.shape[1]
    s, p = stride, k // 2
    B, H, W, _ = x.shape
    Ho, Wo = (H + 2 * p - k) // s + 1, (W + 2 * p - k) // s + 1
    xp = mx.pad(x, [(0, 0), (p, p), (p, p), (0, 0)])
    if B * Ho * Wo * C * k * k <= strided_view_max:
        return (patches(xp, k, k, s, s) * weight.reshape(C, k, k).transpose(1, 2, 0)).sum(axis=(3, 4))
    # One split into k*k per-tap weight rows (views), not k*k gathers. The rows are tiled along the
    # output width, so every operand of the fused multiply-adds runs contiguously over (W, C) and the
    # kernels loop over whole rows instead of C-long pieces: 1.2-1.3x faster for the seg models at
    # 1024x2048 (few channels, wide maps), measured on x86.
    rows = mx.broadcast_to(weight.reshape(C, k * k).T.reshape(k * k, 1, C), (k * k, Wo, C))
    w = mx.split(fusion_boundary(rows), k * k, axis=0)  # k*k x (1, Wo, C), materialised
    y: Optional[mx.array] = None
    for n in range(k * k):
        i, j = divmod(n, k)
        tap = xp[:, i : i + s * (Ho - 1) + 1 : s, j : j + s * (Wo - 1) + 1 : s, :]
        if n and n % taps_per_kernel == 0:
            y = fusion_boundary(y)
        term = tap * w[n]
        y = term if y is None else y + term
    return y


def im2col_conv2d(x: mx.array, weight: mx.array, bias: Optional[mx.array],
                  stride: tuple[int, int], padding: tuple[int, int]) -> mx.array:
    """Dense (``groups == 1``, no dilation) convolution as one GEMM of the patch matrix.

    ``x``: ``(B, H, W, C)``; ``weight``: ``(O, kh, kw, C)``. The
    ``(B * Ho * Wo, kh * kw * C)`` patch matrix comes from one strided view of
    the padded input.
    """
    O, kh, kw, C = weight.shape
    (sh, sw), (ph, pw) = stride, padding
    xp = mx.pad(x, [(0, 0), (ph, ph), (pw, pw), (0, 0)]) if ph or pw else x
    windows = patches(xp, kh, kw, sh, sw)
    B, Ho, Wo = windows.shape[:3]
    cols = windows.reshape(B * Ho * Wo, kh * kw * C)
    w = weight.reshape(O, kh * kw * C).T
    y = mx.addmm(bias, cols, w) if bias is not None else cols @ w
    return y.reshape(B, Ho, Wo, O)
