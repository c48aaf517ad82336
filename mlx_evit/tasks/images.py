"""The one image-input convention of every task object (classifier, segmenter, SAM predictor, mask generator).

An *image* is any of:

* a file path (``str`` or ``os.PathLike``): decoded by
  :func:`mlx_evit.tasks.transforms.load_image` (EXIF orientation applied,
  any mode to 8-bit RGB);
* a ``PIL.Image.Image`` in any mode (converted by
  :func:`~mlx_evit.tasks.transforms.to_rgb`);
* a ``uint8`` numpy array ``(H, W, 3)`` RGB (``(H, W)`` grey and
  ``(H, W, 4)`` RGBA are taken too, alpha dropped as Pillow does);
* a floating numpy array of the same shapes with values in ``[0, 1]`` (as
  matplotlib and scikit-image give), scaled to ``0..255`` and rounded.

A batch call takes a ``list`` or ``tuple`` of images (or a ``(B, H, W, 3)``
array) and returns a list of results; a single image gives a single result.
Anything else raises :class:`~mlx_evit.errors.InputTypeError` (a
``TypeError``) naming the type; an array of the wrong shape, dtype or range
raises the task's own ``ValueError`` subclass.
"""

from __future__ import annotations

import os
from typing import Any, Union

import numpy as np
from PIL import Image

from mlx_evit.errors import ImageInputError, InputTypeError
from mlx_evit.tasks.transforms import load_image, to_rgb

__all__ = ["ImageLike", "is_image", "as_batch", "rgb_array", "rgb_image", "describe_type"]

ImageLike = Union[str, "os.PathLike[str]", Image.Image, np.ndarray]
"""What every task object takes as one image (see the module docstring)."""

_ACCEPTED = "a file path, a PIL image or an (H, W, 3) uint8 or [0, 1] float numpy array"


def describe_type(value: Any) -> str:
    """``module.Name`` of ``value``'s type (builtins without a module)."""
    kind = type(value)
    module = kind.__module__
    return kind.__qualname__ if module == "builtins" else f"{module}.{kind.__qualname__}"


def is_image(value: Any) -> bool:
    """Whether ``value`` is one image of an accepted type (not checked further)."""
    return isinstance(value, (str, os.PathLike, Image.Image)) or (
        isinstance(value, np.ndarray) and value.ndim != 4)  # a 4-D array is a batch


def _type_error(value: Any, what: str) -> InputTypeError:
    hint = ""
    if type(value).__module__.startswith("mlx"):
        hint = " (convert an mlx array with numpy.asarray)"
    elif type(value).__module__.startswith("torch"):
        hint = " (convert a tensor with .numpy(), channels last)"
    return InputTypeError(f"{what} must be {_ACCEPTED}, or a list of them; got {describe_type(value)}{hint}")


def as_batch(images: Any, what: str = "image") -> tuple[list[Any], bool]:
    """``(list of single images, is_batch)``: a list/tuple (or a 4-D array) is a batch, one image is not.

    Raises :class:`InputTypeError` for a value, or a list element, of another type.
    """
    if is_image(images):
        return [images], False
    if isinstance(images, np.ndarray) and images.ndim == 4:
        return list(images), True
    if isinstance(images, (list, tuple)):
        for i, item in enumerate(images):
            if not is_image(item):
                raise _type_error(item, f"{what}s[{i}]")
        return list(images), True
    raise _type_error(images, what)


def rgb_array(image: Any, *, image_format: str = "RGB", error: type = ImageInputError,
              what: str = "image") -> np.ndarray:
    """One image as a C-contiguous ``(H, W, 3)`` uint8 RGB array.

    ``image_format``: ``"BGR"`` swaps the channels of an array input (files
    and PIL images are RGB). ``error``: the ``ValueError`` subclass raised
    for an array of the wrong shape, dtype or value range (default
    :class:`ImageInputError`); an unreadable file raises
    :class:`~mlx_evit.errors.ImageLoadError`, another type :class:`InputTypeError`.
    """
    if image_format not in ("RGB", "BGR"):
        raise error(f"image_format must be 'RGB' or 'BGR', got {image_format!r}")
    if isinstance(image, (str, os.PathLike)):
        return np.asarray(load_image(image))
    if isinstance(image, Image.Image):
        return np.asarray(to_rgb(image))
    if not isinstance(image, np.ndarray):
        raise _type_error(image, what)
    pixels = image
    if pixels.ndim == 3 and pixels.shape[2] == 1:
        pixels = pixels[:, :, 0]
    if pixels.ndim == 2:
        pixels = np.repeat(pixels[:, :, None], 3, axis=2)
    if pixels.ndim != 3 or pixels.shape[2] not in (3, 4):
        raise error(f"{what}: expected an (H, W, 3) RGB image array, got shape {image.shape}")
    if pixels.shape[0] < 1 or pixels.shape[1] < 1:
        raise error(f"{what}: empty image of size {pixels.shape[0]}x{pixels.shape[1]}")
    pixels = pixels[:, :, :3]
    if pixels.dtype != np.uint8:
        pixels = _float_to_uint8(pixels, error, what)
    if image_format == "BGR":
        pixels = pixels[:, :, ::-1]
    return np.ascontiguousarray(pixels)


def _float_to_uint8(pixels: np.ndarray, error: type, what: str) -> np.ndarray:
    if not np.issubdtype(pixels.dtype, np.floating):
        raise error(f"{what}: expected a uint8 image array (0-255) or a float one (0-1), got dtype {pixels.dtype}")
    if not np.isfinite(pixels).all():
        raise error(f"{what}: the float image array holds NaN or infinite values")
    low, high = float(pixels.min()), float(pixels.max())
    if low < 0.0 or high > 1.0:
        raise error(f"{what}: a float image array must hold values in [0, 1], got {low:g}..{high:g} "
                    "(pass 0-255 values as a uint8 array)")
    return np.rint(pixels.astype(np.float64) * 255.0).astype(np.uint8)


def rgb_image(image: Any, *, error: type = ImageInputError, what: str = "image") -> Image.Image:
    """One image as an RGB PIL image (a PIL input is converted, not copied, when already RGB)."""
    if isinstance(image, (str, os.PathLike)):
        return load_image(image)
    if isinstance(image, Image.Image):
        return to_rgb(image)
    return Image.fromarray(rgb_array(image, error=error, what=what))
