"""Segmentation training data: finding image/label pairs, checking them all up front, augmenting.

Layouts (:func:`find_pairs`):

* ours: ``DATA/images/*.{jpg,png,...}`` and ``DATA/labels/<same stem>.png``
  holding class indices (255 = ignore);
* Cityscapes: ``DATA/leftImg8bit/<split>/<city>/*_leftImg8bit.png`` with
  ``DATA/gtFine/<split>/<city>/*_gtFine_labelTrainIds.png`` (or ``_labelIds``);
* ADE20K (ADEChallengeData2016): ``DATA/images/<split>/*.jpg`` with
  ``DATA/annotations/<split>/*.png``.

Every problem (a missing or extra label, a label whose size differs from
its image, values out of range, unreadable files) is collected by
:func:`check_pairs` and reported in one line before training starts.

:func:`augment`: random scale (0.5-2.0 of the base size, whose short side
is the crop's), random crop (padded with the ignore value), horizontal flip
and photometric jitter (brightness, contrast, saturation).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from PIL import Image

from mlx_evit.tasks.classifier import IMAGE_EXTENSIONS
from mlx_evit.tasks.transforms import ImageLoadError, load_image
from mlx_evit.tasks.seg_datasets import IGNORE, default_palette, get_dataset

__all__ = ["Pair", "SegData", "find_pairs", "check_pairs", "read_label", "augment", "default_palette",
           "read_classes"]

MAX_LISTED = 5  # problems named in the one-line message (the count says how many more)


@dataclass(frozen=True)
class Pair:
    image: Path
    label: Path


@dataclass
class SegData:
    """Pairs of one split and how their label values map to class indices (``dataset``: None = as stored)."""

    pairs: list[Pair]
    layout: str  # "folders", "cityscapes" or "ade20k"
    dataset: Optional[str]


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                  and not p.name.startswith("."))


def _problem(where: Path, problems: list[str]) -> ValueError:
    more = f"; and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
    return ValueError(f"{where}: {len(problems)} problem{'s' if len(problems) > 1 else ''}: "
                      + "; ".join(problems[:MAX_LISTED]) + more)


def find_pairs(root: Path, split: str = "train") -> SegData:
    """The image/label pairs under ``root`` (see the module docstring); ``ValueError`` names what is wrong."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"{root}: not a folder")
    if (root / "leftImg8bit").is_dir() and (root / "gtFine").is_dir():
        images_dir = root / "leftImg8bit" / split
        if not images_dir.is_dir():
            raise ValueError(f"{root}: Cityscapes layout without leftImg8bit/{split}")
        pairs, problems = [], []
        for image in _images(images_dir):
            rel = image.relative_to(images_dir)
            base = image.name.removesuffix(".png").removesuffix("_leftImg8bit")
            folder = root / "gtFine" / split / rel.parent
            label = next((c for c in (folder / f"{base}_gtFine_labelTrainIds.png",
                                      folder / f"{base}_gtFine_labelIds.png") if c.is_file()), None)
            if label is None:
                problems.append(f"{image.relative_to(root)}: no gtFine label file")
            else:
                pairs.append(Pair(image, label))
        if problems:
            raise _problem(root, problems)
        return _nonempty(root, SegData(pairs, "cityscapes", "cityscapes"))
    if (root / "images").is_dir() and (root / "annotations").is_dir():
        names = {"train": "training", "val": "validation"}
        images_dir, labels_dir = root / "images" / names.get(split, split), root / "annotations" / names.get(split, split)
        if not images_dir.is_dir():
            raise ValueError(f"{root}: ADE20K layout without images/{names.get(split, split)}")
        return _nonempty(root, SegData(_match(root, images_dir, labels_dir), "ade20k", "ade20k"))
    if (root / "images").is_dir() and (root / "labels").is_dir():
        return _nonempty(root, SegData(_match(root, root / "images", root / "labels"), "folders", None))
    raise ValueError(f"{root}: expected images/ and labels/ folders (or the Cityscapes or ADE20K layout)")


def _nonempty(root: Path, data: SegData) -> SegData:
    if not data.pairs:
        raise ValueError(f"{root}: no images")
    return data


def _match(root: Path, images_dir: Path, labels_dir: Path) -> list[Pair]:
    """Images and label PNGs of the same relative path and stem; every unmatched file is a problem."""
    images = {p.relative_to(images_dir).with_suffix(""): p for p in _images(images_dir)}
    labels = {p.relative_to(labels_dir).with_suffix(""): p for p in labels_dir.rglob("*.png")
              if p.is_file() and not p.name.startswith(".")}
    problems = [f"{images[k].relative_to(root)}: no label {labels_dir.name}/{k}.png" for k in sorted(images)
                if k not in labels]
    problems += [f"{labels[k].relative_to(root)}: no image of that name" for k in sorted(labels) if k not in images]
    if problems:
        raise _problem(root, problems)
    return [Pair(images[k], labels[k]) for k in sorted(images)]


def read_label(path: Path, dataset: Optional[str]) -> np.ndarray:
    """A label PNG as class indices ``(H, W)`` uint8 (:data:`IGNORE` = ignored): Cityscapes/ADE20K
    through their conventions, else the stored single-channel values."""
    try:
        with Image.open(path) as img:
            img.load()
            values = np.asarray(img)
    except FileNotFoundError:
        raise ImageLoadError(f"{path}: no such label file") from None
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise ImageLoadError(f"{path}: cannot read label image ({' '.join(str(e).split())})") from None
    if dataset is not None:
        return get_dataset(dataset).to_train_ids(values, path.name)
    if values.ndim == 3:
        if not (values[..., :1] == values[..., 1:3]).all():
            raise ValueError(f"{path}: expected a single-channel label map (class indices), got a colour image")
        values = values[..., 0]
    if not np.issubdtype(values.dtype, np.integer) or values.ndim != 2:
        raise ValueError(f"{path}: expected a single-channel integer label map, got {values.dtype} {values.shape}")
    if values.max(initial=0) > 255:
        raise ValueError(f"{path}: label value {int(values.max())} out of range (class indices, 255 = ignore)")
    return values.astype(np.uint8)


def check_pairs(root: Path, data: SegData, num_classes: Optional[int]) -> int:
    """Read every label and every image header; one ``ValueError`` naming every bad file (up to
    :data:`MAX_LISTED`). Returns the largest class index seen (for a class count when none is given)."""
    problems, largest = [], -1
    for pair in data.pairs:
        try:
            with Image.open(pair.image) as img:
                img.load()  # the whole file: a truncated one fails now, not mid-training
                size = img.size[::-1] if img.getexif().get(0x0112) in (5, 6, 7, 8) else img.size
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            problems.append(f"{_rel(pair.image, root)}: not a readable image ({' '.join(str(e).split())[:80]})")
            continue
        try:
            label = read_label(pair.label, data.dataset)
        except (ImageLoadError, ValueError) as e:
            problems.append(str(e).replace(str(pair.label), _rel(pair.label, root)))
            continue
        if label.shape != (size[1], size[0]):
            problems.append(f"{_rel(pair.label, root)}: label size {label.shape[1]}x{label.shape[0]} differs from "
                            f"its image's {size[0]}x{size[1]}")
            continue
        values = np.unique(label)
        values = values[values != IGNORE]
        if values.size:
            largest = max(largest, int(values.max()))
            if num_classes is not None and values.max() >= num_classes:
                bad = values[values >= num_classes].tolist()
                problems.append(f"{_rel(pair.label, root)}: label value{'s' if len(bad) > 1 else ''} "
                                f"{', '.join(map(str, bad[:4]))} out of range 0..{num_classes - 1} (255 = ignore)")
    if problems:
        raise _problem(root, problems)
    return largest


def _rel(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


def read_classes(path: Path) -> list[str]:
    """Class names, one per non-empty line of ``path``."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"--classes {path}: cannot read it ({' '.join(str(e).split())})") from None
    names = [line.strip() for line in lines if line.strip()]
    if len(names) < 2:
        raise ValueError(f"--classes {path}: needs at least 2 class names, one per line (found {len(names)})")
    if len(names) > 255:
        raise ValueError(f"--classes {path}: at most 255 classes (255 is the ignore value), found {len(names)}")
    return names


def augment(image: np.ndarray, label: np.ndarray, crop: tuple[int, int], rng: np.random.Generator,
            scale: tuple[float, float] = (0.5, 2.0), mean: Sequence[float] = (0.0, 0.0, 0.0),
            flip: bool = True, jitter: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """One training sample: uint8 ``(H, W, 3)`` image and ``(H, W)`` label -> ``(h, w, 3)`` uint8 and
    ``(h, w)`` uint8 at the ``crop`` size (h, w); padding is ``mean`` (image, in 0..1) and :data:`IGNORE`."""
    ch, cw = crop
    h, w = label.shape
    ratio = rng.uniform(*scale)
    factor = ratio * min(ch, cw) / min(h, w)
    nh, nw = max(1, round(h * factor)), max(1, round(w * factor))
    img = np.asarray(Image.fromarray(image).resize((nw, nh), Image.Resampling.BILINEAR))
    lab = np.asarray(Image.fromarray(label).resize((nw, nh), Image.Resampling.NEAREST))
    ph, pw = max(ch, nh), max(cw, nw)
    if (ph, pw) != (nh, nw):
        fill = np.round(np.asarray(mean) * 255).astype(np.uint8)
        canvas = np.empty((ph, pw, 3), np.uint8)
        canvas[:] = fill
        canvas[:nh, :nw] = img
        lab_canvas = np.full((ph, pw), IGNORE, np.uint8)
        lab_canvas[:nh, :nw] = lab
        img, lab = canvas, lab_canvas
    top, left = int(rng.integers(0, ph - ch + 1)), int(rng.integers(0, pw - cw + 1))
    img, lab = img[top:top + ch, left:left + cw], lab[top:top + ch, left:left + cw]
    if flip and rng.random() < 0.5:
        img, lab = img[:, ::-1], lab[:, ::-1]
    if jitter:
        x = img.astype(np.float32)
        if rng.random() < 0.5:  # brightness
            x = x + rng.uniform(-32, 32)
        if rng.random() < 0.5:  # contrast
            x = (x - x.mean()) * rng.uniform(0.5, 1.5) + x.mean()
        if rng.random() < 0.5:  # saturation
            grey = x @ np.array([0.299, 0.587, 0.114], np.float32)
            x = grey[..., None] + (x - grey[..., None]) * rng.uniform(0.5, 1.5)
        img = np.clip(np.rint(x), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(img), np.ascontiguousarray(lab)


def input_size(height: int, width: int, short: int, multiple: int = 32) -> tuple[int, int]:
    """Evaluation size: short side ``short``, long side the next multiple of ``multiple`` (ADE20K's rule)."""
    if height < width:
        return short, math.ceil(width / height * short / multiple) * multiple
    return math.ceil(height / width * short / multiple) * multiple, short


def load_pair(pair: Pair, dataset: Optional[str]) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 RGB image, class-index label) of one pair."""
    return np.asarray(load_image(pair.image)), read_label(pair.label, dataset)
