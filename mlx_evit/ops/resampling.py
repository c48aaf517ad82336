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

The same per-axis taps give the dense 1-D matrices of :func:`resize_matrix`,
used where a resize is better written as a GEMM: EfficientViT-SAM's neck
(:func:`resize_by_matrix`) and mask postprocess, and the bicubic resize of
EfficientViT-M attention-bias tables.

The second rule here is OpenCV's: :func:`cv2_resize_cubic` reproduces
``cv2.resize(..., interpolation=cv2.INTER_CUBIC)`` on uint8 images in numpy
(the original EfficientViT-Seg evaluation's preprocessing; no OpenCV needed).
Two implementations exist inside OpenCV, and which one runs depends on how
it was built:

* ``method="ipp"`` (default): Intel IPP's cubic resize, which x86-64
  OpenCV wheels from PyPI call by default, and therefore what the original
  evaluation ran. It computes in floating point and rounds to the nearest
  level; this implementation does the same in float64 and agrees with it on
  all but about 4 in a million values (off by one level there; IPP's
  internal rounding is not published). Sources narrower than 4 pixels take
  OpenCV's own algorithm, as OpenCV does.
* ``method="opencv"``: OpenCV's own algorithm, which runs where IPP is not
  built in (or ``cv2.ipp.setUseIPP(False)``): 11-bit fixed-point tap
  weights, an integer horizontal pass and a float32 vertical pass (an
  integer one for the last few values of each row, as its SIMD loop leaves
  them). Bit-exact with OpenCV's x86 build.

Both use OpenCV's sample positions ``(dst + 0.5) * in / out - 0.5`` with the
cubic kernel ``A = -0.75`` and replicated borders, and saturate to 0..255.
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence, Union

import mlx.core as mx
import numpy as np

__all__ = ["resize", "resize_argmax", "source_taps", "resize_matrix", "resize_by_matrix", "cv2_resize_cubic", "MODES",
           "METHODS"]

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


@functools.lru_cache(maxsize=64)
def _dense(in_size: int, out_size: int, mode: str) -> np.ndarray:
    idx, w = source_taps(in_size, out_size, mode)
    out = np.zeros((out_size, in_size), np.float32)
    for j in range(idx.shape[1]):
        np.add.at(out, (np.arange(out_size), idx[:, j]), w[:, j])
    out.flags.writeable = False
    return out


def resize_matrix(n_in: int, n_out: int, mode: str = "bicubic") -> np.ndarray:
    """``(n_out, n_in)`` float32 matrix of torch's 1-D resize (:func:`source_taps`, border taps summed); read-only."""
    return _dense(int(n_in), int(n_out), mode)


def resize_by_matrix(x: mx.array, size: Sequence[int], mode: str = "bicubic") -> mx.array:
    """:func:`resize` written as two GEMMs with :func:`resize_matrix` (height pass first), float32 inside.

    For small maps resized to a fixed grid (SAM's neck: 16x16 or 32x32 to
    64x64), where each pass is one matmul over all the channels at once.
    """
    B, h, w, C = x.shape
    H, W = (int(s) for s in size)
    if (h, w) == (H, W):
        return x
    dtype = x.dtype
    x = x.astype(mx.float32)
    if h != H:
        x = (mx.array(resize_matrix(h, H, mode)) @ x.reshape(B, h, w * C)).reshape(B, H, w, C)
    if w != W:
        x = mx.array(resize_matrix(w, W, mode)) @ x.reshape(B * H, w, C)
    return x.reshape(B, H, W, C).astype(dtype)


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


# ---------------------------------------------------------------------------
# OpenCV's cubic rule (uint8 images, numpy)
# ---------------------------------------------------------------------------

METHODS = ("ipp", "opencv")
_CV2_A = -0.75
_COEF_BITS = 11  # OpenCV's INTER_RESIZE_COEF_BITS
_IPP_MIN_SIDE = 4  # OpenCV calls IPP only when both source sides have at least 4 pixels (measured)
_SIMD_LANES = 8  # int16 lanes of the 128-bit vertical loop (the rest of a row takes the scalar path)


def _positions(in_size: int, out_size: int, float32: bool) -> tuple[np.ndarray, np.ndarray]:
    """(first source index - 1 of the 4 taps, fractional offset) per output index."""
    scale = 1.0 / (out_size / in_size)  # OpenCV: scale = 1 / inv_scale, inv_scale = out / in (double)
    f = (np.arange(out_size) + 0.5) * scale - 0.5
    if float32:
        f = f.astype(np.float32)
    base = np.floor(f).astype(np.int64)
    return base, f - base.astype(f.dtype)


def _cubic(x: np.ndarray) -> np.ndarray:
    """The 4 cubic weights for offsets ``x`` (in ``x``'s dtype); OpenCV's ``interpolateCubic``."""
    dt = x.dtype.type
    a, one = dt(_CV2_A), dt(1)
    x1 = x + one
    c0 = ((a * x1 - dt(5) * a) * x1 + dt(8) * a) * x1 - dt(4) * a
    c1 = ((a + dt(2)) * x - (a + dt(3))) * x * x + one
    y = one - x
    c2 = ((a + dt(2)) * y - (a + dt(3))) * y * y + one
    c3 = one - c0 - c1 - c2
    return np.stack([c0, c1, c2, c3], axis=-1)


def _taps(in_size: int, out_size: int, float32: bool) -> tuple[np.ndarray, np.ndarray]:
    base, frac = _positions(in_size, out_size, float32)
    idx = np.clip(base[:, None] + np.arange(-1, 3)[None, :], 0, in_size - 1)
    return idx, _cubic(frac)


def _resize_float(img: np.ndarray, h: int, w: int) -> np.ndarray:
    H, W, _ = img.shape
    ix, cx = _taps(W, w, float32=False)
    iy, cy = _taps(H, h, float32=False)
    src = img.astype(np.float64)
    rows = sum(src[:, ix[:, j], :] * cx[None, :, j, None] for j in range(4))  # (H, w, C)
    out = sum(rows[iy[:, j]] * cy[:, j, None, None] for j in range(4))
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _resize_fixed_point(img: np.ndarray, h: int, w: int) -> np.ndarray:
    H, W, C = img.shape
    scale = 1 << _COEF_BITS
    ix, cx = _taps(W, w, float32=True)
    iy, cy = _taps(H, h, float32=True)
    ax = np.rint(cx * np.float32(scale)).astype(np.int64)  # saturate_cast<short>: round half to even
    ay = np.rint(cy * np.float32(scale)).astype(np.int64)
    src = img.astype(np.int64)
    rows = sum(src[:, ix[:, j], :] * ax[None, :, j, None] for j in range(4)).reshape(H, w * C)  # exact ints
    n = w * C
    vec = n - n % _SIMD_LANES if n >= _SIMD_LANES else 0
    # Vertical SIMD loop: float32 products of the int rows and beta / 2**22, summed from the last tap.
    beta = (ay.astype(np.float32) * np.float32(1.0 / (scale * scale))).astype(np.float32)  # (h, 4)
    taps = [rows[iy[:, j], :vec].astype(np.float32) for j in range(4)]  # (h, vec) each
    acc = taps[3] * beta[:, 3:4]
    for j in (2, 1, 0):
        acc = taps[j] * beta[:, j : j + 1] + acc
    out = np.empty((h, n), np.uint8)
    out[:, :vec] = np.clip(np.rint(acc), 0, 255).astype(np.uint8)
    if vec < n:  # scalar tail: integer sum, rounded shift by 22 bits
        tail = sum(rows[iy[:, j], vec:] * ay[:, j : j + 1] for j in range(4))
        out[:, vec:] = np.clip((tail + (1 << (2 * _COEF_BITS - 1))) >> (2 * _COEF_BITS), 0, 255).astype(np.uint8)
    return out.reshape(h, w, C)


def cv2_resize_cubic(image: np.ndarray, size: Sequence[int], method: str = "ipp") -> np.ndarray:
    """``cv2.resize(image, (size[1], size[0]), interpolation=cv2.INTER_CUBIC)`` for uint8 ``(H, W[, C])``.

    ``size``: ``(height, width)`` (numpy order; OpenCV's ``dsize`` is
    ``(width, height)``). ``method``: ``"ipp"`` or ``"opencv"`` (module
    docstring). The same size returns a copy.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
    img = np.asarray(image)
    if img.dtype != np.uint8 or img.ndim not in (2, 3) or min(img.shape[:2]) < 1:
        raise ValueError(f"expected a uint8 (H, W) or (H, W, C) image, got {img.dtype} {img.shape}")
    h, w = (int(s) for s in size)
    if h < 1 or w < 1:
        raise ValueError(f"size must be positive, got {h}x{w}")
    squeeze = img.ndim == 2
    img = img[:, :, None] if squeeze else img
    if (h, w) == img.shape[:2]:
        out = img.copy()
    elif method == "ipp" and min(img.shape[:2]) >= _IPP_MIN_SIDE:
        out = _resize_float(img, h, w)
    else:
        out = _resize_fixed_point(img, h, w)
    return out[:, :, 0] if squeeze else out
