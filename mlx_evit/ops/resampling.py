"""Image-array resizing equal to ``torch.nn.functional.interpolate(..., align_corners=False)``, NHWC.

:func:`resize` is separable: one 1-D pass along the width, then one along
the height, the order in which PyTorch's CPU kernel accumulates. Each pass
is a sum of 2 (bilinear) or 4 (bicubic) taps; the source indices and tap
weights are computed once per (input size, output size) in float32 exactly
as PyTorch computes them: ``scale = float32(in) / out`` and
``src = scale * (dst + 0.5) - 0.5``, cubic convolution with ``A = -0.75``,
taps clamped at the borders. (Passing a float32 ``scale_factor = out / in``
to a generic upsampler instead is off by up to 5e-4 for non-integer factors.)

Integer upsampling factors (the segmentation head's x2 and x4) repeat the
same weights in every period, so they run as shifted slices of the
edge-padded input (fused by ``mx.compile``, no gathers); other sizes gather
the taps along the axis with ``mx.take``.

:func:`resize_argmax` resizes class logits and takes the argmax in bands
of output rows, so the full-size logits never exist at once.
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence, Union

import mlx.core as mx
import numpy as np

__all__ = ["resize", "resize_argmax", "source_taps", "MODES"]

MODES = ("bicubic", "bilinear")
_CUBIC_A = np.float32(-0.75)
_HALF = np.float32(0.5)


def _fma(a, b, c) -> np.ndarray:
    """float32 ``a * b + c`` rounded once (a fused multiply-add): the float64 product of float32 values is exact."""
    return (np.asarray(a, np.float32).astype(np.float64) * np.asarray(b, np.float32) + np.float64(c)).astype(np.float32)


def _cubic_weights(t: np.ndarray) -> np.ndarray:
    """The 4 cubic-convolution weights (``A = -0.75``) for fractional offsets ``t``, float32 ``(n, 4)``.

    Evaluated as PyTorch's compiled kernel does (Horner steps contracted to
    fused multiply-adds); the polynomials cancel heavily near ``|x| = 1``, so
    plain float32 evaluation differs from it by up to 1e-6.
    """
    A = float(_CUBIC_A)
    one = np.float32(1.0)

    def near(x):  # |x| <= 1: ((A + 2) x - (A + 3)) x x + 1
        return _fma(_fma(A + 2, x, -(A + 3)) * x, x, 1.0)

    def far(x):  # 1 < |x| < 2: ((A x - 5 A) x + 8 A) x - 4 A
        return _fma(_fma(_fma(A, x, -5 * A), x, 8 * A), x, -4 * A)

    return np.stack([far(t + one), near(t), near(one - t), far((one - t) + one)], axis=-1)


@functools.lru_cache(maxsize=256)
def source_taps(in_size: int, out_size: int, mode: str = "bicubic") -> tuple[np.ndarray, np.ndarray]:
    """Source indices ``(out_size, taps)`` int32 and weights ``(out_size, taps)`` float32 of one axis.

    ``taps`` is 4 for bicubic and 2 for bilinear; indices are clamped to
    ``[0, in_size - 1]`` (so border taps repeat the edge, as PyTorch does).
    The arrays are cached and read-only.
    """
    if mode not in MODES:
        raise ValueError(f"unsupported resize mode {mode!r}; expected one of {', '.join(MODES)}")
    if in_size < 1 or out_size < 1:
        raise ValueError(f"resize sizes must be positive, got {in_size} -> {out_size}")
    if mode == "bilinear" and in_size == out_size:  # PyTorch copies (no index arithmetic)
        idx = np.stack([np.arange(out_size)] * 2, axis=-1)
        w = np.stack([np.ones(out_size, np.float32), np.zeros(out_size, np.float32)], axis=-1)
    else:
        idx, w = _unclamped(in_size, out_size, mode)
    idx = np.clip(idx, 0, in_size - 1).astype(np.int32)
    idx.flags.writeable = False
    w.flags.writeable = False
    return idx, w


@functools.lru_cache(maxsize=256)
def _periodic(in_size: int, out_size: int, mode: str) -> Optional[tuple[int, int, np.ndarray, np.ndarray]]:
    """For an integer upsampling factor ``s``: ``(s, pad, offsets (s, taps), weights (s, taps))``.

    Output ``s * m + r`` is ``sum_j w[r, j] * xpad[m + off[r, j]]`` with
    ``xpad`` the input edge-padded by ``pad`` on both sides; ``None`` when the
    factor is not an integer or the pattern does not hold exactly.
    """
    if out_size <= in_size or out_size % in_size:
        return None
    s = out_size // in_size
    pad = 2
    base_idx, base_w = _unclamped(in_size, out_size, mode)
    taps = base_idx.shape[1]
    periods = base_idx.reshape(in_size, s, taps) - np.arange(in_size)[:, None, None]
    off = periods[0]
    if not ((periods == off).all() and (base_w.reshape(in_size, s, taps) == base_w[:s]).all()):
        return None
    if off.min() < -pad or off.max() > pad:
        return None
    return s, pad, (off + pad).astype(np.int64), base_w[:s].copy()


def _source_index(in_size: int, out_size: int) -> np.ndarray:
    """``scale * (dst + 0.5) - 0.5`` in float32 with ``scale = float32(in) / out``, as PyTorch's CPU kernel.

    PyTorch's kernel is compiled with fused multiply-adds, so the product is
    not rounded before the subtraction: the float64 product of the two
    float32 factors is exact, and one rounding to float32 follows.
    """
    scale = np.float32(in_size) / np.float32(out_size)
    dst = np.arange(out_size, dtype=np.float32) + _HALF  # exact
    return (np.float64(scale) * dst.astype(np.float64) - 0.5).astype(np.float32)


def _unclamped(in_size: int, out_size: int, mode: str) -> tuple[np.ndarray, np.ndarray]:
    """Tap positions before border clamping, and their weights (see :func:`source_taps`)."""
    real = _source_index(in_size, out_size)
    if mode == "bilinear":
        real = np.maximum(real, np.float32(0))
    base = np.minimum(np.floor(real).astype(np.int64), in_size - 1)
    t = np.clip(real - base.astype(np.float32), np.float32(0), np.float32(1)).astype(np.float32)
    if mode == "bicubic":
        return base[:, None] + np.arange(-1, 3)[None, :], _cubic_weights(t)
    # Bilinear's second tap is the next index (clamped to the last one, as PyTorch does, by the caller).
    return np.stack([base, base + 1], axis=-1), np.stack([np.float32(1) - t, t], axis=-1).astype(np.float32)


def _axis_pass(x: mx.array, axis: int, out_size: int, mode: str) -> mx.array:
    """Resize one spatial axis (1 = height, 2 = width) of an NHWC array."""
    in_size = x.shape[axis]
    if in_size == out_size:
        return x
    shape = [1] * x.ndim
    periodic = _periodic(in_size, out_size, mode)
    if periodic is not None:
        s, pad, off, w = periodic
        widths = [(0, 0)] * x.ndim
        widths[axis] = (pad, pad)
        xp = mx.pad(x, widths, mode="edge")
        phases = []
        for r in range(s):
            y = None
            for j in range(off.shape[1]):
                if w[r, j] == 0:
                    continue
                start = int(off[r, j])
                index = [slice(None)] * x.ndim
                index[axis] = slice(start, start + in_size)
                term = xp[tuple(index)] * mx.array(w[r, j], dtype=x.dtype)
                y = term if y is None else y + term
            phases.append(y)
        y = mx.stack(phases, axis=axis + 1)  # (..., in, s, ...)
        out_shape = list(x.shape)
        out_shape[axis] = out_size
        return y.reshape(out_shape)
    idx, w = source_taps(in_size, out_size, mode)
    shape[axis] = out_size
    y = None
    for j in range(idx.shape[1]):
        term = mx.take(x, mx.array(idx[:, j]), axis=axis) * mx.array(w[:, j].reshape(shape), dtype=x.dtype)
        y = term if y is None else y + term
    return y


def _check(x: mx.array, size: Sequence[int], mode: str) -> tuple[int, int]:
    if mode not in MODES:
        raise ValueError(f"unsupported resize mode {mode!r}; expected one of {', '.join(MODES)}")
    if getattr(x, "ndim", None) != 4:
        raise ValueError(f"resize expects an NHWC array (B, H, W, C), got shape {tuple(getattr(x, 'shape', ()))}")
    try:
        h, w = (int(s) for s in size)
    except (TypeError, ValueError):
        raise ValueError(f"size must be (height, width), got {size!r}") from None
    if h < 1 or w < 1:
        raise ValueError(f"size must be positive, got {h}x{w}")
    return h, w


def resize(x: Union[mx.array, np.ndarray], size: Sequence[int], mode: str = "bicubic") -> mx.array:
    """Resize an NHWC array ``(B, H, W, C)`` to ``(B, size[0], size[1], C)``.

    Equal to ``torch.nn.functional.interpolate(x_nchw, size=size, mode=mode,
    align_corners=False)`` (modes ``"bicubic"``, ``"bilinear"``; no
    antialiasing) up to float32 rounding. Half-precision inputs are resized
    in float32 and cast back. The same size returns ``x`` unchanged.
    """
    x = mx.array(x) if isinstance(x, np.ndarray) else x
    h, w = _check(x, size, mode)
    if (h, w) == tuple(x.shape[1:3]):
        return x
    dtype = x.dtype
    y = x.astype(mx.float32) if dtype != mx.float32 else x
    y = _axis_pass(_axis_pass(y, 2, w, mode), 1, h, mode)
    return y.astype(dtype) if dtype != mx.float32 else y


def resize_argmax(
    logits: Union[mx.array, np.ndarray],
    size: Sequence[int],
    mode: str = "bicubic",
    max_elements: int = 1 << 24,
) -> np.ndarray:
    """``argmax(resize(logits, size, mode), axis=-1)`` as a ``(B, H, W)`` numpy array, memory-bounded.

    The width pass runs on the small input; the height pass and the argmax
    then run in bands of output rows holding at most ``max_elements``
    float32 values each (64 MB by default). Classes fit in uint8 up to 256,
    else int32.
    """
    x = mx.array(logits) if isinstance(logits, np.ndarray) else logits
    h, w = _check(x, size, mode)
    B, H, _, C = x.shape
    x = x.astype(mx.float32)
    xw = _axis_pass(x, 2, w, mode)  # (B, H, w, C)
    mx.eval(xw)
    out = np.empty((B, h, w), np.uint8 if C <= 256 else np.int32)
    rows = max(1, min(h, max_elements // max(1, B * w * C)))
    if H == h:
        for r0 in range(0, h, rows):
            out[:, r0 : r0 + rows] = np.asarray(mx.argmax(xw[:, r0 : r0 + rows], axis=-1)).astype(out.dtype)
        return out
    idx, wt = source_taps(H, h, mode)
    for r0 in range(0, h, rows):
        r1 = min(h, r0 + rows)
        y = None
        for j in range(idx.shape[1]):
            term = mx.take(xw, mx.array(idx[r0:r1, j]), axis=1) * mx.array(wt[r0:r1, j].reshape(1, -1, 1, 1))
            y = term if y is None else y + term
        out[:, r0:r1] = np.asarray(mx.argmax(y, axis=-1)).astype(out.dtype)
    return out
