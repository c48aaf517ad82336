"""OpenCV's ``cv2.resize(..., interpolation=cv2.INTER_CUBIC)`` on uint8 images, in numpy (no OpenCV needed).

The original EfficientViT-Seg evaluation resizes ADE20K images (and any
Cityscapes frame that is not 1024x2048) with OpenCV's cubic resize before
normalising them. Two implementations exist inside OpenCV, and which one
runs depends on how OpenCV was built:

* ``method="ipp"`` (default): Intel IPP's cubic resize, which x86-64
  OpenCV wheels from PyPI (``opencv-python``, ``-headless``) call by
  default, and therefore what the original evaluation ran. It computes in
  floating point and rounds to the nearest level; this implementation does
  the same in float64 and agrees with it on all but about 4 in a million
  values (off by one level there; IPP's internal rounding is not published).
  Sources narrower than 4 pixels take OpenCV's own algorithm, as OpenCV does.
* ``method="opencv"``: OpenCV's own algorithm, which runs where IPP is not
  built in (or ``cv2.ipp.setUseIPP(False)``): 11-bit fixed-point tap
  weights, an integer horizontal pass and a float32 vertical pass (an
  integer one for the last few values of each row, as its SIMD loop
  leaves them). Bit-exact with OpenCV's x86 build.

Both use OpenCV's sample positions ``(dst + 0.5) * in / out - 0.5`` with the
cubic kernel ``A = -0.75`` and replicated borders, and saturate to 0..255.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = ["cv2_resize_cubic", "METHODS"]

METHODS = ("ipp", "opencv")
_A = -0.75
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
    a, one = dt(_A), dt(1)
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
