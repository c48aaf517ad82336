"""Semantic segmentation with EfficientViT-Seg: the library behind ``python -m mlx_evit.segment``.

Python::

    from mlx_evit.tasks.segmenter import Segmenter

    seg = Segmenter.from_pretrained("efficientvit_seg_b0_cityscapes")   # or "model.pt" / "converted_dir"
    result = seg(image)                # a file path, PIL image, (H, W, 3) uint8 array; a list gives a list
    result.labels                      # (H, W) class index per pixel, at the image size
    result.logits                      # (H/8', W/8', classes) float32 at the model's stride 8
    result.colorize(), result.overlay(image, alpha=0.5), result.class_fractions()

Each image goes through the original evaluation's steps: the dataset's
resize (Cityscapes: to 1024x2048; ADE20K: short side 512, long side to a
multiple of 32) with OpenCV's cubic filter reproduced in numpy
(:func:`cv2_resize_cubic`), ImageNet normalisation, the model, a bicubic
resize of the logits to the image size (:func:`mlx_evit.ops.resampling.resize`,
equal to PyTorch's) and the argmax, done in bands of rows so the full-size
logits never exist at once. :func:`evaluate` scores label maps with the
original conventions (:mod:`mlx_evit.tasks.seg_datasets`).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import mlx.core as mx
import numpy as np
from PIL import Image

from mlx_evit.errors import DatasetWarning, ImageLoadError, SegmenterError
from mlx_evit.tasks.images import ImageLike, as_batch, rgb_array
from mlx_evit.tasks.inference import prepare
from mlx_evit.tasks.transforms import load_image
from mlx_evit.tasks.pretrained import load_for_task
from mlx_evit.models.registry import IMAGENET_MEAN, IMAGENET_STD, get_pretrained_cfg, split_name
from mlx_evit.ops.resampling import resize, resize_argmax
from mlx_evit.ops.resampling import cv2_resize_cubic
from mlx_evit.tasks.seg_datasets import (DATASETS, IGNORE, Dataset, IoUMeter, custom_dataset, get_dataset,
                                        input_size_for)

__all__ = [
    "DEFAULT_MODEL",
    "Segmenter",
    "Segmentation",
    "SegmenterError",
    "cv2_resize_cubic",
    "get_dataset",
    "IoUMeter",
    "IGNORE",
    "DATASETS",
    "input_size_for",
]

CACHE_LIMIT = 256 << 20
"""MLX buffer cache (bytes) a :class:`Segmenter` asks for: at 1024x2048 a larger cache fills with
freed buffers of other sizes (1 GiB: peak RSS 3x the arrays' peak) without making it faster."""

DEFAULT_MODEL = "efficientvit_seg_b1_cityscapes"
"""80.5 mIoU on Cityscapes (original README), 4.8M parameters."""

@dataclass
class Segmentation:
    """One image's result. ``labels``: ``(H, W)`` class indices at the image size (uint8 up to 256
    classes); ``logits``: ``(h, w, classes)`` float32 at stride 8 of the model input ``input_size``."""

    labels: np.ndarray
    logits: np.ndarray
    input_size: tuple[int, int]
    dataset: Dataset = field(repr=False)
    file: Optional[str] = None

    @property
    def size(self) -> tuple[int, int]:
        return tuple(self.labels.shape)  # type: ignore[return-value]

    def class_fractions(self) -> np.ndarray:
        """Fraction of the image's pixels per class, ``(classes,)`` float64 (sums to 1)."""
        counts = np.bincount(self.labels.ravel(), minlength=self.logits.shape[-1])
        return counts / max(1, self.labels.size)

    def colorize(self) -> np.ndarray:
        """The label map in the dataset's colours, ``(H, W, 3)`` uint8."""
        return self.dataset.palette[self.labels]

    def palette_image(self) -> Image.Image:
        """The label map as a palette (``P`` mode) PIL image: pixel values are the class indices."""
        if self.logits.shape[-1] > 256:
            raise SegmenterError("a palette PNG holds at most 256 classes")
        img = Image.fromarray(self.labels.astype(np.uint8), mode="P")
        palette = np.zeros((256, 3), np.uint8)
        palette[: len(self.dataset.palette)] = self.dataset.palette
        img.putpalette(palette.ravel().tolist())
        return img

    def overlay(self, image: ImageLike, alpha: float = 0.5) -> np.ndarray:
        """``alpha * colours + (1 - alpha) * image``, truncated to uint8 (the original demo's canvas)."""
        if not 0.0 <= alpha <= 1.0:
            raise SegmenterError(f"alpha must be in [0, 1], got {alpha}")
        pixels = _as_uint8(image)
        if pixels.shape[:2] != self.size:
            raise SegmenterError(f"image size {pixels.shape[:2]} differs from the label map's {self.size}")
        return (self.colorize() * alpha + pixels * (1.0 - alpha)).astype(np.uint8)

    def resized_logits(self) -> np.ndarray:
        """Logits at the image size, ``(H, W, classes)`` float32 (bicubic; large: H * W * classes floats)."""
        return np.asarray(resize(mx.array(self.logits[None]), self.size))[0]


def _as_uint8(image: ImageLike) -> np.ndarray:
    """An image argument as ``(H, W, 3)`` uint8 RGB (:func:`mlx_evit.tasks.images.rgb_array`)."""
    return rgb_array(image, error=SegmenterError)


class Segmenter:
    """A segmentation model ready for inference, with its dataset's preprocessing, classes and colours.

    ``model``: an :class:`~mlx_evit.models.seg_model.EfficientViTSeg` (or any NHWC model
    returning stride-8 logits); it is prepared in place
    (:func:`mlx_evit.tasks.inference.prepare`: BatchNorms folded, compiled).
    ``dataset``: ``"cityscapes"`` / ``"ade20k"`` (default: the model's).
    ``preprocess``: a segmentation pretrained cfg (default:
    ``model.pretrained_cfg``; ``None`` there: the image is only padded up
    to multiples of 32 by resizing, no dataset resize). ``resize_method``:
    ``"ipp"`` or ``"opencv"`` (:func:`cv2_resize_cubic`).
    """

    def __init__(self, model: Any, *, dataset: Optional[str] = None, preprocess: Any = None,
                 resize_method: str = "ipp", name: Optional[str] = None):
        num_classes = getattr(model, "num_classes", 0)
        if not num_classes:
            raise SegmenterError("the model has no classifier (num_classes is 0)")
        cfg = preprocess if preprocess is not None else getattr(model, "pretrained_cfg", None)
        cfg = cfg.to_dict() if hasattr(cfg, "to_dict") else (dict(cfg) if cfg else None)
        dataset = dataset or (cfg or {}).get("dataset") or getattr(model, "dataset", None)
        if dataset is None:
            raise SegmenterError("the model names no dataset; pass dataset='cityscapes' or 'ade20k'")
        labels = getattr(model, "labels", None)
        if dataset not in DATASETS and labels:  # a fine-tuned model with its own classes (and palette)
            self.dataset = custom_dataset(dataset, labels, (cfg or {}).get("palette"))
        else:
            try:
                self.dataset = get_dataset(dataset)
            except ValueError as e:
                raise SegmenterError(str(e)) from None
        if self.dataset.num_classes != num_classes:
            raise SegmenterError(f"the model has {num_classes} classes, {dataset} has {self.dataset.num_classes}")
        if resize_method not in ("ipp", "opencv"):
            raise SegmenterError(f"resize_method must be 'ipp' or 'opencv', got {resize_method!r}")
        self.cfg = cfg
        self.resize_method = resize_method
        self.model = model
        self.name = name or getattr(model, "arch_name", type(model).__name__)
        mean = (cfg or {}).get("mean", IMAGENET_MEAN)
        std = (cfg or {}).get("std", IMAGENET_STD)
        self._mean = np.asarray(mean, np.float32) * np.float32(255)
        self._inv_std = np.float32(1) / (np.asarray(std, np.float32) * np.float32(255))
        self._predict = prepare(model, cache_limit=CACHE_LIMIT)
        self.dtype = self._predict.dtype

    @classmethod
    def from_pretrained(cls, name_or_path: Optional[Union[str, os.PathLike]] = None, *,
                        weights: Optional[Union[str, os.PathLike]] = None, dtype: str = "float32",
                        dataset: Optional[str] = None, revision: str = "main",
                        log: Optional[Callable[[str], None]] = None, **kwargs: Any) -> "Segmenter":
        """A segmenter from a registered name or a local checkpoint / MLX model folder.

        ``name_or_path``: a registered segmentation name (weights from the
        Hub, converted once and cached by :func:`mlx_evit.load`), an
        original ``.pt``, any checkpoint the converter reads, or a converted
        folder; default :data:`DEFAULT_MODEL`. ``weights``: a local file or
        folder, with ``name_or_path`` the name it must hold. Other keyword
        arguments go to :class:`Segmenter`. A name of another kind
        (classification, SAM) is refused before any download. Raises
        :class:`SegmenterError` and :class:`~mlx_evit.errors.HubError`.
        """
        net, requested = load_for_task(name_or_path, kind="segmentation", error=SegmenterError,
                                       default=DEFAULT_MODEL, weights=weights, dtype=dtype, revision=revision,
                                       log=log)
        tagged = requested is not None and split_name(requested)[1] is not None
        return cls(net, dataset=dataset, preprocess=get_pretrained_cfg(requested) if tagged else None,
                   name=requested if tagged else None, **kwargs)

    @classmethod
    def load(cls, model: Optional[str] = None, *, weights: Optional[Union[str, os.PathLike]] = None,
             dtype: str = "float32", dataset: Optional[str] = None, revision: str = "main",
             log: Optional[Callable[[str], None]] = None, **kwargs: Any) -> "Segmenter":
        """The same as :meth:`from_pretrained` (the earlier name, kept): ``model`` is ``name_or_path``."""
        return cls.from_pretrained(model, weights=weights, dtype=dtype, dataset=dataset, revision=revision,
                                   log=log, **kwargs)

    @property
    def classes(self) -> tuple[str, ...]:
        return self.dataset.classes

    @property
    def palette(self) -> np.ndarray:
        return self.dataset.palette

    def input_size(self, height: int, width: int) -> tuple[int, int]:
        """The model input size for an image of ``height x width`` (see :func:`input_size_for`)."""
        return input_size_for(height, width, self.cfg)

    def preprocess(self, image: ImageLike) -> tuple[np.ndarray, np.ndarray]:
        """(``(1, h, w, 3)`` float32 normalised model input, the ``(H, W, 3)`` uint8 image)."""
        pixels = _as_uint8(image)
        size = self.input_size(*pixels.shape[:2])
        resized = cv2_resize_cubic(pixels, size, self.resize_method) if size != pixels.shape[:2] else pixels
        x = (resized.astype(np.float32) - self._mean) * self._inv_std
        return x[None], pixels

    def logits(self, x: Union[np.ndarray, mx.array]) -> mx.array:
        """Stride-8 logits ``(B, h / 8, w / 8, classes)`` of normalised ``(B, h, w, 3)`` inputs."""
        return self._predict(mx.array(x))

    def __call__(self, images: Union[ImageLike, Sequence[ImageLike]]) -> Union[Segmentation, list[Segmentation]]:
        """Segment one image, or each image of a list (a list of results).

        An image is a file path, a PIL image, a uint8 ``(H, W, 3)`` array or
        a ``[0, 1]`` float array (:mod:`mlx_evit.tasks.images`); another type
        raises :class:`~mlx_evit.errors.InputTypeError`.
        """
        items, batch = as_batch(images)
        results = [self._segment_one(image) for image in items]
        return results if batch else results[0]

    def _segment_one(self, image: ImageLike) -> Segmentation:
        file = os.fspath(image) if isinstance(image, (str, os.PathLike)) else None
        x, pixels = self.preprocess(image)
        logits = self.logits(x).astype(mx.float32)
        labels = resize_argmax(logits, pixels.shape[:2])[0]
        return Segmentation(labels, np.asarray(logits[0]), tuple(x.shape[1:3]), self.dataset, file)

    segment = __call__

    def segment_files(self, files: Iterable[str], on_error: Optional[Callable[[str, str], None]] = None):
        """Yield a :class:`Segmentation` per readable file; unreadable ones go to ``on_error(file, message)``
        (which may raise to stop) and are skipped."""
        for name in files:
            try:
                pixels = np.asarray(load_image(name))
            except ImageLoadError as e:
                if on_error is None:
                    raise
                on_error(name, str(e))
                continue
            result = self(pixels)
            result.file = name
            yield result

    def evaluate(self, pairs: Iterable[tuple[str, str]], on_image: Optional[Callable[[str, dict], None]] = None,
                 on_error: Optional[Callable[[str, str], None]] = None, *, allow_size_mismatch: bool = False,
                 on_warning: Optional[Callable[[str], None]] = None) -> dict[str, Any]:
        """mIoU, pixel accuracy and per-class IoU over ``(image file, label file)`` pairs.

        Labels follow :meth:`Dataset.to_train_ids`; the logits are resized to
        the label's size (as the original evaluation). A label map whose size
        differs from its image's is an error naming both files, unless
        ``allow_size_mismatch``: then the prediction is scored at the label's
        size. A label file named against the dataset's scheme (a Cityscapes
        ``*_gtFine_labelIds.png`` under ADE20K rules, or a name without
        ``_labelIds``/``_labelTrainIds`` under Cityscapes rules) gives one
        warning, to ``on_warning(message)`` (default: :func:`warnings.warn`
        with :class:`~mlx_evit.errors.DatasetWarning`); the report lists the
        warnings under ``"warnings"``. ``on_image(file, stats)`` is called
        after each image; unreadable or mismatched pairs go to ``on_error``
        (or raise without it: :class:`~mlx_evit.errors.ImageLoadError`,
        :class:`SegmenterError`).
        """
        meter = IoUMeter(self.dataset.num_classes)
        notes: list[str] = []
        for image_file, label_file in pairs:
            try:
                pixels = np.asarray(load_image(image_file))
                raw = _read_label(label_file)
                if raw.shape[:2] != pixels.shape[:2] and not allow_size_mismatch:
                    (lh, lw), (ih, iw) = raw.shape[:2], pixels.shape[:2]
                    raise SegmenterError(f"{label_file}: the label map is {lw}x{lh} but its image {image_file} is "
                                         f"{iw}x{ih} (allow_size_mismatch=True scores at the label's size)")
                target = self.dataset.to_train_ids(raw, os.path.basename(label_file))
            except (ImageLoadError, ValueError) as e:
                if on_error is None:
                    raise
                on_error(image_file, str(e))
                continue
            problem = self.dataset.naming_problem(label_file)
            if problem is not None and not notes:
                notes.append(f"{problem} (reported for the first such file only)")
                if on_warning is not None:
                    on_warning(notes[-1])
                else:
                    warnings.warn(notes[-1], DatasetWarning, stacklevel=2)
            x, _ = self.preprocess(pixels)
            logits = self.logits(x).astype(mx.float32)
            prediction = resize_argmax(logits, target.shape)[0]
            meter.update(prediction, target)
            if on_image is not None:
                on_image(image_file, {"pixels": int((target != IGNORE).sum())})
        return {**meter.summary(self.dataset.classes), "warnings": notes}


def _read_label(path: str) -> np.ndarray:
    """A ground-truth PNG as its raw integer values (palette indices for ``P`` images, never colours)."""
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode in ("P", "L", "I", "I;16", "I;16B", "I;16L"):
                return np.asarray(img)
            if img.mode in ("RGB", "RGBA", "LA"):
                return np.asarray(img)
            raise ValueError(f"{path}: unsupported label image mode {img.mode!r}")
    except FileNotFoundError:
        raise ImageLoadError(f"{path}: no such label file") from None
    except OSError as e:
        raise ImageLoadError(f"{path}: cannot read label image ({' '.join(str(e).split())})") from None
