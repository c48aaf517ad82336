"""Image loading and evaluation preprocessing, matching timm's eval transform.

The pipeline reproduces what timm does at inference time for a pretrained
tag (``resolve_data_config`` + ``create_transform(is_training=False)``) with
Pillow and numpy only, and returns NHWC-ready float32 arrays:

1. :func:`load_image`: decode the file, apply the EXIF orientation, convert
   to 8-bit RGB (:func:`to_rgb`).
2. resize with PIL (``crop_mode`` ``center``: short side to
   ``floor(size / crop_pct)``; ``squash``: both sides to that size;
   ``border``: long side to it),
3. center crop to ``input_size`` (zero padding where the resized image is
   smaller; mean-colour padding in ``border`` mode),
4. scale to [0, 1] and normalize with the tag's ``mean`` / ``std``.

Steps 2-4 are pixel-for-pixel timm's (tested against it); step 1 differs
from timm's dataset loader (``Image.open(path).convert("RGB")``) only where
that loader gives a wrong picture: EXIF orientation is honoured, and 16-bit
or float images are rescaled to 8 bits instead of being clipped at 255.
Alpha is dropped exactly as ``convert("RGB")`` drops it (the colour stored
under transparent pixels is kept, not composited on a background), so RGBA,
LA and transparent palette images give timm's numbers.
"""

from __future__ import annotations

import math
import os
import stat
import struct
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from mlx_evit.errors import ImageLoadError, one_line
from mlx_evit.models.specs import IMAGENET_MEAN, IMAGENET_STD, PretrainedCfg

__all__ = [
    "ImageLoadError",
    "EvalTransform",
    "INTERPOLATIONS",
    "CROP_MODES",
    "load_image",
    "MAX_IMAGE_SIDE",
    "MAX_ASPECT_RATIO",
    "MAX_RESIZED_PIXELS",
    "MAX_INPUT_SIDE",
    "to_rgb",
    "eval_transform",
    "preprocess",
    "preprocess_batch",
]

PathLike = Union[str, "os.PathLike[str]"]
ImageInput = Union[Image.Image, str, "os.PathLike[str]"]

# timm's interpolation names and the PIL filters torchvision uses for them.
INTERPOLATIONS: dict[str, Image.Resampling] = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
    "lanczos": Image.Resampling.LANCZOS,
}
CROP_MODES = ("center", "squash", "border")

_DEFAULT_CROP_PCT = 0.875  # timm's value when a config gives none
_DEFAULT_SIZE = 224
_LOAD_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error)

MAX_IMAGE_SIDE = 1 << 16
"""Longest accepted image side, in pixels."""
MAX_ASPECT_RATIO = 100
"""Largest accepted ratio of an image's long side to its short side."""
MAX_RESIZED_PIXELS = 1 << 26
"""Largest image the evaluation resize may produce (before the center crop)."""
MAX_INPUT_SIDE = 8192
"""Largest side of a preprocessing config's ``input_size`` and of its resize target."""


# ---------------------------------------------------------------- loading


def load_image(path: PathLike) -> Image.Image:
    """Decode an image file into an 8-bit RGB PIL image, upright.

    The file must be a regular file (a FIFO or device is refused before it
    is opened: opening a FIFO blocks). Its size, read from the header before
    any pixel is decoded, must be within :data:`MAX_IMAGE_SIDE` per side,
    :data:`MAX_ASPECT_RATIO` between the sides and ``PIL.Image.MAX_IMAGE_PIXELS``
    pixels (Pillow's decompression-bomb limit, enforced from the limit on).
    The whole file is decoded here (so a truncated file fails now, not later),
    the EXIF orientation tag is applied, and the pixels go through
    :func:`to_rgb`. The returned image's ``filename`` is ``path``.
    Raises :class:`ImageLoadError` for a missing, unreadable, non-image,
    corrupt or oversized file.
    """
    name = os.fspath(path)
    try:
        with _open_regular(name) as f, warnings.catch_warnings():
            # Silences Pillow's bomb warning only; _check_size decides.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(f) as img:
                _check_size(name, img.width, img.height)
                img.load()
                rgb = to_rgb(ImageOps.exif_transpose(img))
                rgb.filename = name  # what later size errors name (PIL's own attribute for a file's path)
                return rgb
    except ImageLoadError:
        raise
    except FileNotFoundError:
        raise ImageLoadError(f"{name}: no such file") from None
    except IsADirectoryError:
        raise ImageLoadError(f"{name}: is a directory, not an image file") from None
    except PermissionError:
        raise ImageLoadError(f"{name}: permission denied") from None
    except UnidentifiedImageError:
        raise ImageLoadError(f"{name}: not an image file Pillow can read") from None
    except Image.DecompressionBombError as e:
        raise ImageLoadError(f"{name}: image too large to decode safely ({one_line(e, 200)})") from None
    except _LOAD_ERRORS as e:
        raise ImageLoadError(f"{name}: cannot decode image ({one_line(e, 200)})") from None


def _open_regular(name: str) -> Any:
    """``name`` opened for reading if it is a regular file; anything else is refused before ``open``."""
    st = os.stat(name)
    if stat.S_ISDIR(st.st_mode):
        raise IsADirectoryError(name)
    if not stat.S_ISREG(st.st_mode):
        raise ImageLoadError(f"{name}: not a regular file (a FIFO, device or socket), not an image file")
    fd = os.open(name, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))  # never blocks, even if swapped for a FIFO
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ImageLoadError(f"{name}: not a regular file (a FIFO, device or socket), not an image file")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _check_size(name: str, width: int, height: int) -> None:
    """Bound an image's sides, aspect ratio and pixel count before it is decoded."""
    if width < 1 or height < 1:
        raise ImageLoadError(f"{name}: image of {width}x{height} pixels is empty")
    if max(width, height) > MAX_IMAGE_SIDE:
        raise ImageLoadError(f"{name}: image of {width}x{height} pixels has a side over {MAX_IMAGE_SIDE} pixels")
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise ImageLoadError(
            f"{name}: image of {width}x{height} pixels has an aspect ratio over {MAX_ASPECT_RATIO}:1 "
            "(too narrow to resize for a model)"
        )
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and width * height > limit:
        raise ImageLoadError(f"{name}: image too large: {width}x{height} = {width * height} pixels is over the "
                             f"limit of {limit} pixels (a decompression bomb?)")


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB.

    Most modes (L, 1, P, RGBA, LA, CMYK, YCbCr, ...) use Pillow's
    ``convert("RGB")``, as timm's loader does (alpha dropped, not blended).
    Deep modes are rescaled instead of clipped: 16-bit (``I;16*``) maps
    0..65535 to 0..255; 32-bit ``I`` is read as 8-bit when all values fit
    in 0..255, else as 16-bit; float ``F`` is read as 0..1 when its maximum
    is at most 1, else as 0..255. Raises ``ValueError`` for a mode Pillow
    cannot convert.
    """
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        return Image.fromarray(_deep_to_uint8(image), mode="L").convert("RGB")
    if isinstance(image.info.get("transparency"), bytes):
        # A per-entry palette alpha table: convert("RGB") ignores it for the
        # colours but warns; drop it from a copy (alpha is dropped anyway).
        image = image.copy()
        del image.info["transparency"]
    try:
        return image.convert("RGB")
    except ValueError as e:
        raise ValueError(f"cannot convert image mode {image.mode!r} to RGB ({e})") from None


def _deep_to_uint8(image: Image.Image) -> np.ndarray:
    """(H, W) uint8 from a 16-bit, 32-bit integer or float single-channel image."""
    values = np.asarray(image)
    if image.mode == "F":
        values = np.nan_to_num(values.astype(np.float64), nan=0.0)
        top = 1.0 if values.size and values.max() <= 1.0 else 255.0
        return np.rint(np.clip(values, 0.0, top) * (255.0 / top)).astype(np.uint8)
    values = values.astype(np.int64)
    if image.mode == "I" and (values.size == 0 or values.max() <= 255):
        return np.clip(values, 0, 255).astype(np.uint8)
    values = np.clip(values, 0, 65535)
    return ((values * 255 + 32767) // 65535).astype(np.uint8)  # round(v / 257)


# ---------------------------------------------------------------- transform


@dataclass(frozen=True)
class EvalTransform:
    """timm's evaluation transform for one preprocessing config.

    Calling it on a PIL image (or a path) returns ``(H, W, 3)`` float32,
    normalized, where ``(H, W)`` is ``size``. Build it with
    :func:`eval_transform`, which validates the config.
    """

    size: tuple[int, int]  # (H, W) of the output
    crop_pct: float = _DEFAULT_CROP_PCT
    crop_mode: str = "center"
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    @property
    def scale_size(self) -> tuple[int, int]:
        """(H, W) the image is resized towards before cropping: ``floor(size / crop_pct)``."""
        return tuple(math.floor(s / self.crop_pct) for s in self.size)  # type: ignore[return-value]

    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) of a ``width x height`` image after the resize step."""
        scale_h, scale_w = self.scale_size
        if self.crop_mode == "squash":
            return scale_w, scale_h
        if self.crop_mode == "center" and scale_h == scale_w:
            # torchvision Resize(int): short side to the size, long side truncated.
            short, long = min(width, height), max(width, height)
            new_long = int(scale_h * long / short)
            return (scale_h, new_long) if width <= height else (new_long, scale_h)
        # timm ResizeKeepRatio: one ratio for both sides, fitted on the short
        # side (center) or on the long side (border); sides rounded half-even.
        ratio_h, ratio_w = height / scale_h, width / scale_w
        ratio = max(ratio_h, ratio_w) if self.crop_mode == "border" else min(ratio_h, ratio_w)
        return max(1, round(width / ratio)), max(1, round(height / ratio))

    def check_size(self, width: int, height: int, name: str = "image") -> None:
        """Refuse a ``width x height`` image whose resize would exceed :data:`MAX_RESIZED_PIXELS`."""
        new_w, new_h = self.resized_size(width, height)
        if new_w * new_h > MAX_RESIZED_PIXELS:
            raise ImageLoadError(
                f"{name}: image of {width}x{height} pixels would be resized to {new_w}x{new_h}, over the limit of "
                f"{MAX_RESIZED_PIXELS} pixels for input_size {self.size[0]}x{self.size[1]} (aspect ratio too extreme)"
            )

    def crop_uint8(self, image: Image.Image) -> np.ndarray:
        """Resize and center-crop an RGB image: ``(H, W, 3)`` uint8, before scaling."""
        self.check_size(*image.size, name=getattr(image, "filename", None) or "image")
        new_size = self.resized_size(*image.size)
        if new_size != image.size:
            image = image.resize(new_size, INTERPOLATIONS[self.interpolation])
        pixels = np.asarray(image, dtype=np.uint8)
        fill = [round(255 * m) for m in self.mean] if self.crop_mode == "border" else 0
        return _center_crop_or_pad(pixels, self.size, fill)

    def __call__(self, image: ImageInput) -> np.ndarray:
        if isinstance(image, (str, os.PathLike)):
            image = load_image(image)
        elif not isinstance(image, Image.Image):
            raise TypeError(f"expected a PIL image or a file path, got {type(image).__name__}")
        pixels = self.crop_uint8(to_rgb(image))
        mean = np.asarray(self.mean, dtype=np.float32)
        std = np.asarray(self.std, dtype=np.float32)
        return (pixels.astype(np.float32) / np.float32(255.0) - mean) / std


def _center_crop_or_pad(pixels: np.ndarray, size: tuple[int, int], fill: Any) -> np.ndarray:
    """torchvision's CenterCrop on ``(h, w, 3)``: pad (split floor/ceil) if smaller, then crop.

    The crop offset is ``round((h - H) / 2)`` with Python's half-even rounding.
    """
    out_h, out_w = size
    h, w = pixels.shape[:2]
    if out_h > h or out_w > w:
        pad_h, pad_w = max(out_h - h, 0), max(out_w - w, 0)
        padded = np.empty((h + pad_h, w + pad_w, 3), dtype=np.uint8)
        padded[...] = np.asarray(fill, dtype=np.uint8)
        top, left = pad_h // 2, pad_w // 2
        padded[top : top + h, left : left + w] = pixels
        pixels, (h, w) = padded, padded.shape[:2]
    top = int(round((h - out_h) / 2.0))
    left = int(round((w - out_w) / 2.0))
    return pixels[top : top + out_h, left : left + out_w]


def eval_transform(cfg: Union[PretrainedCfg, Mapping[str, Any], EvalTransform]) -> EvalTransform:
    """The evaluation transform of a preprocessing config.

    ``cfg``: a :class:`~mlx_evit.models.registry.PretrainedCfg`, its ``to_dict()``
    (``model.pretrained_cfg``), or a timm-style data config dict with keys
    ``input_size`` (int, ``(H, W)`` or ``(3, H, W)``), ``crop_pct``,
    ``crop_mode``, ``interpolation``, ``mean``, ``std``; missing keys take
    timm's defaults, other keys are ignored. Raises ``ValueError`` naming
    a bad option.
    """
    if isinstance(cfg, EvalTransform):
        return cfg
    if isinstance(cfg, PretrainedCfg):
        cfg = cfg.to_dict()
    if not isinstance(cfg, Mapping):
        raise TypeError(f"expected a PretrainedCfg or a dict, got {type(cfg).__name__}")

    size = _parse_size(cfg.get("input_size", _DEFAULT_SIZE))
    crop_pct = cfg.get("crop_pct") or _DEFAULT_CROP_PCT  # timm: None/0 -> default
    if isinstance(crop_pct, bool) or not isinstance(crop_pct, (int, float)) or not 0 < crop_pct < math.inf:
        raise ValueError(f"crop_pct must be a positive number, got {crop_pct!r}")
    crop_mode = cfg.get("crop_mode") or "center"
    if crop_mode not in CROP_MODES:
        raise ValueError(f"unknown crop_mode {crop_mode!r}; expected one of {', '.join(CROP_MODES)}")
    interpolation = cfg.get("interpolation") or "bicubic"
    if interpolation not in INTERPOLATIONS:
        known = ", ".join(INTERPOLATIONS)
        raise ValueError(f"unknown interpolation {interpolation!r}; expected one of {known}")
    transform = EvalTransform(
        size=size,
        crop_pct=float(crop_pct),
        crop_mode=crop_mode,
        interpolation=interpolation,
        mean=_parse_triple("mean", cfg.get("mean") or IMAGENET_MEAN),
        std=_parse_triple("std", cfg.get("std") or IMAGENET_STD),
    )
    if min(transform.scale_size) < 1:
        raise ValueError(f"input_size {size} with crop_pct {crop_pct} resizes to nothing")
    if max(transform.scale_size) > MAX_INPUT_SIDE:
        raise ValueError(f"input_size {size} with crop_pct {crop_pct} resizes to {transform.scale_size}, over "
                         f"{MAX_INPUT_SIDE} pixels a side")
    if any(s == 0 for s in transform.std):
        raise ValueError(f"std must be non-zero, got {transform.std}")
    return transform


def _parse_size(value: Any) -> tuple[int, int]:
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        sizes: Sequence[Any] = (value, value)
    elif isinstance(value, str) or not isinstance(value, Sequence):
        raise ValueError(f"input_size must be an int, (H, W) or (3, H, W), got {value!r}")
    elif len(value) == 3:
        if value[0] != 3:
            raise ValueError(f"input_size {tuple(value)} must have 3 channels (C, H, W)")
        sizes = value[1:]
    elif len(value) == 2:
        sizes = value
    else:
        raise ValueError(f"input_size must be an int, (H, W) or (3, H, W), got {value!r}")
    if not all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) and s > 0 for s in sizes):
        raise ValueError(f"input_size must hold positive integers, got {one_line(repr(value), 80)}")
    if max(sizes) > MAX_INPUT_SIDE:
        raise ValueError(f"input_size {tuple(int(s) for s in sizes)} is over {MAX_INPUT_SIDE} pixels a side")
    return int(sizes[0]), int(sizes[1])


def _parse_triple(key: str, value: Any) -> tuple[float, float, float]:
    try:
        triple = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        triple = ()
    if len(triple) != 3 or not all(math.isfinite(v) for v in triple):
        raise ValueError(f"{key} must be 3 finite numbers (one per RGB channel), got {value!r}")
    return triple  # type: ignore[return-value]


def preprocess(image: ImageInput, cfg: Union[PretrainedCfg, Mapping[str, Any], EvalTransform]) -> np.ndarray:
    """One image (PIL image or path) -> ``(H, W, 3)`` float32, as timm's eval transform."""
    return eval_transform(cfg)(image)


def preprocess_batch(
    images: Sequence[ImageInput], cfg: Union[PretrainedCfg, Mapping[str, Any], EvalTransform]
) -> np.ndarray:
    """Several images (PIL images or paths) -> ``(B, H, W, 3)`` float32."""
    transform = eval_transform(cfg)
    if len(images) == 0:
        raise ValueError("preprocess_batch needs at least one image")
    return np.stack([transform(image) for image in images])
