"""Cityscapes and ADE20K as the original evaluation uses them: classes, colours, labels, input sizes, mIoU.

Class names and palettes ship as package data (``mlx_evit/data/<dataset>_classes.tsv``:
index, name, red, green, blue). Ground-truth labels follow the original
evaluation's conventions, with 255 as the ignore value here:

* Cityscapes ``*_gtFine_labelIds.png``: the 34 label ids map to the 19
  train ids (road 7 -> 0, ..., bicycle 33 -> 18); every other id is
  ignored. ``*_labelTrainIds.png`` files are taken as train ids already.
* ADE20K annotation PNGs: ``label - 1`` (0, "other", is ignored).

:class:`IoUMeter` accumulates intersections and unions over a data set
(the original's ``SegIOU``, summed before dividing) and reports mIoU,
pixel accuracy and per-class IoU.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from importlib import resources
from typing import Any, Optional

import numpy as np

__all__ = ["IGNORE", "Dataset", "DATASETS", "get_dataset", "custom_dataset", "default_palette", "IoUMeter", "input_size_for"]

IGNORE = 255
"""Label value of pixels that do not count (void, unlabelled)."""

# Cityscapes label id -> train id (cityscapesScripts' labels.py; -1: not evaluated).
_CITYSCAPES_TRAIN_IDS = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11,
                         25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}

DATASETS = ("cityscapes", "ade20k")


@dataclass(frozen=True)
class Dataset:
    """One segmentation data set: ``classes`` (names), ``palette`` ``(N, 3)`` uint8 RGB."""

    name: str
    classes: tuple[str, ...]
    palette: np.ndarray

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def naming_problem(self, label_file: str) -> Optional[str]:
        """Why a label file's name does not fit this dataset's naming scheme, or None.

        Cityscapes labels are ``*_gtFine_labelIds.png`` (label ids) or
        ``*_labelTrainIds.png`` (train ids); ADE20K labels carry no Cityscapes
        suffix. A misfit is worth a warning: the values are read by this
        dataset's rules all the same.
        """
        name = os.path.basename(label_file)
        lower = name.lower()
        cityscapes_like = any(part in lower for part in ("_gtfine_", "labelids", "labeltrainids", "leftimg8bit"))
        if self.name == "cityscapes" and "labelids" not in lower and "trainids" not in lower:
            return (f"{label_file}: not a Cityscapes label name (*_gtFine_labelIds.png or *_labelTrainIds.png); "
                    "its values are read as Cityscapes label ids")
        if self.name == "ade20k" and cityscapes_like:
            return (f"{label_file}: a Cityscapes label name, but the dataset is ade20k; "
                    "its values are read as ADE20K labels (value - 1, 0 ignored)")
        return None

    def to_train_ids(self, label: np.ndarray, filename: str = "") -> np.ndarray:
        """Ground-truth PNG values -> class indices (uint8), :data:`IGNORE` where not evaluated."""
        label = np.asarray(label)
        if label.ndim == 3:  # an RGB(A) copy of a grey label map
            if not (label[..., :1] == label[..., 1:3]).all():
                raise ValueError(f"{filename or 'label'}: expected a single-channel label map, got a colour image")
            label = label[..., 0]
        if not np.issubdtype(label.dtype, np.integer):
            raise ValueError(f"{filename or 'label'}: expected integer labels, got {label.dtype}")
        values = label.astype(np.int64)
        if self.name not in DATASETS:  # a fine-tuned model's own classes: labels hold the class indices
            out = np.where((values >= 0) & (values < self.num_classes), values, IGNORE)
        elif self.name == "cityscapes":
            if "trainids" in filename.lower():
                out = np.where((values >= 0) & (values < self.num_classes), values, IGNORE)
            else:
                table = np.full(256, IGNORE, np.int64)
                for label_id, train_id in _CITYSCAPES_TRAIN_IDS.items():
                    table[label_id] = train_id
                out = np.where((values >= 0) & (values < 256), table[np.clip(values, 0, 255)], IGNORE)
        else:  # ADE20K: 0 is "other", 1..150 are the classes
            out = np.where((values >= 1) & (values <= self.num_classes), values - 1, IGNORE)
        return out.astype(np.uint8)


@functools.lru_cache(maxsize=None)
def get_dataset(name: str) -> Dataset:
    """The :class:`Dataset` called ``name`` (``"cityscapes"`` or ``"ade20k"``)."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {', '.join(DATASETS)}")
    text = resources.files("mlx_evit").joinpath("data", f"{name}_classes.tsv").read_text(encoding="utf-8")
    rows = [line.split("\t") for line in text.splitlines() if line and not line.startswith("#")]
    if [int(r[0]) for r in rows] != list(range(len(rows))):
        raise RuntimeError(f"mlx_evit/data/{name}_classes.tsv: indices are not 0..{len(rows) - 1}")
    palette = np.array([[int(c) for c in r[2:5]] for r in rows], np.uint8)
    palette.flags.writeable = False
    return Dataset(name, tuple(r[1] for r in rows), palette)


def default_palette(n: int) -> np.ndarray:
    """``(n, 3)`` uint8 colours well apart: PASCAL VOC's scheme (the bits of ``i + 1`` spread over R, G, B)."""
    out = np.zeros((n, 3), np.uint8)
    for i in range(n):
        c, rgb = i + 1, [0, 0, 0]
        for shift in range(7, -1, -1):
            for channel in range(3):
                rgb[channel] |= ((c >> channel) & 1) << shift
            c >>= 3
        out[i] = rgb
    return out


def custom_dataset(name: str, classes: "tuple[str, ...] | list[str]", palette: Any = None) -> Dataset:
    """The classes of a fine-tuned model (``config.json`` labels, ``pretrained_cfg["palette"]``).

    Label PNGs of such a data set hold the class indices (255 and values
    past the last class are ignored). Without a usable palette the colours
    of the PASCAL VOC scheme are used.
    """
    n = len(classes)
    colours = np.asarray(palette, dtype=np.int64) if palette is not None else None
    if colours is None or colours.shape != (n, 3) or colours.min(initial=0) < 0 or colours.max(initial=0) > 255:
        colours = default_palette(n)
    colours = colours.astype(np.uint8)
    colours.flags.writeable = False
    return Dataset(name, tuple(classes), colours)


def input_size_for(height: int, width: int, cfg: Optional[dict[str, Any]]) -> tuple[int, int]:
    """The model input size of an image under a segmentation tag's preprocessing (the original's).

    ``crop_mode`` ``"resize"`` (Cityscapes): ``input_size[1:]`` (1024x2048).
    ``"short_side"`` (ADE20K): the short side becomes ``input_size[1]``
    (512), the long side ``ceil(long / short * 512 / 32) * 32``. Without a
    config (custom models): the image size rounded up to multiples of 32.
    """
    if not cfg:
        return math.ceil(height / 32) * 32, math.ceil(width / 32) * 32
    mode = cfg.get("crop_mode")
    _, H, W = cfg["input_size"]
    multiple = int(cfg.get("size_multiple") or 32)
    if mode == "resize":
        return int(H), int(W)
    if mode == "short_side":
        short = int(H)
        if height < width:
            return short, math.ceil(width / height * short / multiple) * multiple
        return math.ceil(height / width * short / multiple) * multiple, short
    raise ValueError(f"unknown segmentation crop_mode {mode!r} in the model's pretrained_cfg")


class IoUMeter:
    """Intersection and union per class, summed over images (``update(prediction, target)``).

    ``target`` pixels equal to :data:`IGNORE` are left out, from the
    prediction too (as the original ``SegIOU``). :meth:`summary`: mIoU (the
    mean over the classes that occur in the targets or the predictions;
    the original divides summed intersections by summed unions and averages
    over every class, which is the same on a full data set), pixel
    accuracy, per-class IoU (``None`` for a class with an empty union).
    """

    def __init__(self, num_classes: int):
        self.num_classes = num_classes
        self.intersection = np.zeros(num_classes, np.int64)
        self.union = np.zeros(num_classes, np.int64)
        self.target_pixels = np.zeros(num_classes, np.int64)
        self.images = 0

    def update(self, prediction: np.ndarray, target: np.ndarray) -> None:
        prediction = np.asarray(prediction).astype(np.int64)
        target = np.asarray(target).astype(np.int64)
        if prediction.shape != target.shape:
            raise ValueError(f"prediction {prediction.shape} and target {target.shape} differ in shape")
        valid = target != IGNORE
        p, t = prediction[valid], target[valid]
        if t.size and (t.max() >= self.num_classes or t.min() < 0):
            raise ValueError(f"target classes must be in 0..{self.num_classes - 1} or {IGNORE}")
        n = self.num_classes
        inter = np.bincount(t[p == t], minlength=n)[:n]
        pred = np.bincount(p[(p >= 0) & (p < n)], minlength=n)[:n]
        true = np.bincount(t, minlength=n)[:n]
        self.intersection += inter
        self.union += pred + true - inter
        self.target_pixels += true
        self.images += 1

    def summary(self, classes: Optional[tuple[str, ...]] = None) -> dict[str, Any]:
        present = self.union > 0
        iou = np.where(present, self.intersection / np.maximum(self.union, 1), np.nan)
        total = int(self.target_pixels.sum())
        per_class = []
        for i in range(self.num_classes):
            per_class.append({
                "index": i,
                "name": classes[i] if classes else str(i),
                "iou": None if not present[i] else float(iou[i]),
                "pixels": int(self.target_pixels[i]),
            })
        return {
            "images": self.images,
            "miou": float(np.nanmean(iou)) if present.any() else None,
            "pixel_accuracy": float(self.intersection.sum() / total) if total else None,
            "classes_present": int(present.sum()),
            "num_classes": self.num_classes,
            "per_class": per_class,
        }
