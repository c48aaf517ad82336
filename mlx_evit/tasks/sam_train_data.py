"""SAM training data: images with instance masks, checked up front and prepared in SAM's frames.

Layouts (:func:`find_instances`):

* ``DATA/images/<stem>.{jpg,png,...}`` with ``DATA/masks/<stem>_<k>.png``
  (one binary mask per instance, any non-zero value is inside);
* a COCO-style JSON (``DATA/*.json``, or ``annotations=FILE``): ``images``
  (``id``, ``file_name`` under ``DATA/images`` or ``DATA``) and
  ``annotations`` (``image_id``, ``segmentation`` as polygons, or RLE with
  ``counts`` a list or COCO's compressed string).

:func:`prepare_item` turns an image and its masks into what training reads:
targets at the decoder's 256x256 output frame (the 1024 prompt frame / 4,
image at the top left as the predictor pads it), the valid region and the
boxes in the 1024 frame. Every problem (a mask with no image, a size that
differs from its image, an empty mask, unreadable files, bad JSON) is
collected into one line before training.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import numpy as np
from PIL import Image, ImageDraw

from mlx_evit.models.sam_model import PROMPT_FRAME
from mlx_evit.tasks.classifier import IMAGE_EXTENSIONS
from mlx_evit.tasks.sam_predictor import preprocess_shape

__all__ = ["Instances", "find_instances", "decode_rle", "polygons_to_mask", "prepare_item", "Prepared", "LOW_RES"]

LOW_RES = 256  # the mask decoder's output frame
MAX_LISTED = 5


@dataclass
class Instances:
    """One image and its instance masks: PNG paths or COCO segmentations (with the image size)."""

    image: Path
    masks: list[Union[Path, dict]] = field(default_factory=list)
    size: Optional[tuple[int, int]] = None  # (h, w) from the COCO record


def _fail(where: Path, problems: list[str]) -> ValueError:
    more = f"; and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
    return ValueError(f"{where}: {len(problems)} problem{'s' if len(problems) > 1 else ''}: "
                      + "; ".join(problems[:MAX_LISTED]) + more)


def _images(folder: Path) -> dict[str, Path]:
    return {p.stem: p for p in sorted(folder.iterdir()) if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
            and not p.name.startswith(".")}


def find_instances(root: Path, annotations: Optional[Path] = None) -> list[Instances]:
    """The images and their masks under ``root`` (see the module docstring); ``ValueError`` names problems."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"{root}: not a folder")
    if annotations is None and (root / "masks").is_dir():
        if not (root / "images").is_dir():
            raise ValueError(f"{root}: masks/ without images/")
        images = _images(root / "images")
        items = {stem: Instances(path) for stem, path in images.items()}
        problems = []
        for mask in sorted((root / "masks").glob("*.png")):
            stem, _, k = mask.stem.rpartition("_")
            if not stem or not k.isdigit():
                problems.append(f"masks/{mask.name}: expected the name <image stem>_<k>.png")
            elif stem not in items:
                problems.append(f"masks/{mask.name}: no image images/{stem}.*")
            else:
                items[stem].masks.append(mask)
        if problems:
            raise _fail(root, problems)
        return [items[s] for s in sorted(items) if items[s].masks]
    if annotations is None:
        candidates = sorted(root.glob("*.json"))
        if len(candidates) != 1:
            raise ValueError(f"{root}: expected images/ and masks/ folders, or one COCO-style .json file "
                             f"(found {len(candidates)} .json files; name one with --annotations)")
        annotations = candidates[0]
    return _coco(root, Path(annotations))


def _coco(root: Path, path: Path) -> list[Instances]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        images, annotations = data["images"], data["annotations"]
        records = {int(im["id"]): im for im in images}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a COCO-style annotation file ({' '.join(str(e).split())[:120]})") from None
    base = root / "images" if (root / "images").is_dir() else root
    items, problems = {}, []
    for image_id, record in records.items():
        file = base / str(record.get("file_name", ""))
        if not file.is_file():
            problems.append(f"image id {image_id}: no file {file}")
            continue
        size = (record.get("height"), record.get("width"))
        items[image_id] = Instances(file, [], tuple(size) if all(isinstance(s, int) for s in size) else None)
    for i, ann in enumerate(annotations):
        image_id = ann.get("image_id") if isinstance(ann, dict) else None
        if image_id not in records:
            problems.append(f"annotation {i}: unknown image_id {image_id!r}")
        elif image_id in items:
            if not isinstance(ann.get("segmentation"), (list, dict)):
                problems.append(f"annotation {i}: no segmentation (polygons or RLE)")
            else:
                items[image_id].masks.append(ann["segmentation"])
    if problems:
        raise _fail(path, problems)
    return [items[k] for k in sorted(items) if items[k].masks]


def decode_rle(rle: dict) -> np.ndarray:
    """A COCO RLE (``counts`` a list, or the compressed string) -> bool ``(h, w)``; runs go down columns,
    alternating background and mask, background first."""
    h, w = (int(v) for v in rle["size"])
    counts = rle["counts"]
    if isinstance(counts, str):
        counts = _rle_counts(counts)
    counts = np.asarray(counts, np.int64)
    if counts.min(initial=0) < 0 or counts.sum() != h * w:
        raise ValueError(f"RLE counts sum to {int(counts.sum())}, not {h}x{w}")
    values = np.zeros(len(counts), bool)
    values[1::2] = True
    return np.repeat(values, counts).reshape(w, h).T


def _rle_counts(text: str) -> list[int]:
    """COCO's compressed counts: 5 bits per character (offset 48), 0x20 = more characters follow,
    0x10 in the last one = negative; from the third count on, each is a difference from the one two before."""
    counts, p = [], 0
    while p < len(text):
        value, shift, more = 0, 0, True
        while more:
            if p >= len(text):
                raise ValueError("truncated RLE string")
            c = ord(text[p]) - 48
            value |= (c & 0x1F) << shift
            more = bool(c & 0x20)
            p, shift = p + 1, shift + 5
            if not more and c & 0x10:
                value |= -1 << shift
        if len(counts) > 2:
            value += counts[-2]
        counts.append(value)
    return counts


def polygons_to_mask(polygons: list, size: tuple[int, int]) -> np.ndarray:
    """COCO polygons (``[[x0, y0, x1, y1, ...], ...]``) -> bool ``(h, w)`` (their union)."""
    h, w = size
    canvas = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(canvas)
    for poly in polygons:
        xy = np.asarray(poly, np.float64).reshape(-1, 2)
        if len(xy) < 3:
            raise ValueError("a polygon needs at least 3 points")
        draw.polygon([tuple(p) for p in xy], fill=255, outline=255)
    return np.asarray(canvas) > 0


def read_mask(source: Union[Path, dict, list], size: tuple[int, int]) -> np.ndarray:
    """One instance mask as bool ``(h, w)`` for an image of ``size`` (h, w); ``ValueError`` names the problem."""
    if isinstance(source, Path):
        try:
            with Image.open(source) as img:
                img.load()
                values = np.asarray(img)
        except (OSError, ValueError) as e:
            raise ValueError(f"{source.name}: cannot read it ({' '.join(str(e).split())[:80]})") from None
        mask = values.any(axis=-1) if values.ndim == 3 else values != 0
        name = source.name
    elif isinstance(source, dict):
        mask, name = decode_rle(source), "RLE"
    else:
        mask, name = polygons_to_mask(source, size), "polygons"
    if mask.shape != tuple(size):
        raise ValueError(f"{name}: mask size {mask.shape[1]}x{mask.shape[0]} differs from its image's {size[1]}x{size[0]}")
    if not mask.any():
        raise ValueError(f"{name}: empty mask")
    return mask


@dataclass
class Prepared:
    """An image in SAM's frames: ``targets (K, 256, 256)`` bool, ``valid (h, w)`` of the 256 frame,
    ``boxes (K, 4)`` XYXY in the 1024 frame, ``size`` of the image."""

    targets: np.ndarray
    valid: tuple[int, int]
    boxes: np.ndarray
    size: tuple[int, int]


def prepare_item(masks: list[np.ndarray], size: tuple[int, int]) -> Prepared:
    """Masks of one image (bool, image size) -> :class:`Prepared`."""
    h, w = size
    nh, nw = preprocess_shape(h, w, PROMPT_FRAME)
    lh, lw = max(1, round(nh * LOW_RES / PROMPT_FRAME)), max(1, round(nw * LOW_RES / PROMPT_FRAME))
    targets = np.zeros((len(masks), LOW_RES, LOW_RES), bool)
    boxes = np.zeros((len(masks), 4), np.float32)
    for k, mask in enumerate(masks):
        small = Image.fromarray(mask.astype(np.uint8) * 255).resize((lw, lh), Image.Resampling.BILINEAR)
        targets[k, :lh, :lw] = np.asarray(small) >= 128
        ys, xs = np.nonzero(mask)
        boxes[k] = (xs.min() * nw / w, ys.min() * nh / h, xs.max() * nw / w, ys.max() * nh / h)
    return Prepared(targets, (lh, lw), boxes, (h, w))


def check_and_prepare(root: Path, items: list[Instances], load) -> list[tuple[Path, Prepared]]:
    """Read every image header and mask now: one ``ValueError`` listing the bad files, else the prepared items.

    ``load(path)``: the image as a uint8 array (only its size is kept here).
    """
    out, problems = [], []
    for item in items:
        try:
            size = tuple(np.asarray(load(item.image)).shape[:2])
        except ValueError as e:
            problems.append(" ".join(str(e).split()))
            continue
        if item.size is not None and tuple(item.size) != size:
            problems.append(f"{item.image.name}: the annotation says {item.size[1]}x{item.size[0]}, "
                            f"the image is {size[1]}x{size[0]}")
            continue
        masks, bad = [], False
        for source in item.masks:
            try:
                masks.append(read_mask(source, size))
            except (ValueError, KeyError, TypeError) as e:
                problems.append(f"{item.image.name}: " + " ".join(str(e).split()))
                bad = True
        if not bad:
            out.append((item.image, prepare_item(masks, size)))
    if problems:
        raise _fail(root, problems)
    if not out:
        raise ValueError(f"{root}: no images with masks")
    return out
