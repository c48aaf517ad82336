"""Segment everything: Segment Anything's automatic mask generator for EfficientViT-SAM (numpy, no torch).

A grid of foreground points is decoded in batches on each crop of the image
(one crop, the whole image, by default); masks are kept by predicted IoU and
stability score, dropped when they touch an inner crop edge, de-duplicated
by box non-maximum suppression (per crop, then across crops) and returned as
records like Meta's: ``segmentation`` (bool mask or uncompressed RLE),
``area``, ``bbox`` (XYWH), ``predicted_iou``, ``stability_score``,
``point_coords`` and ``crop_box`` (XYWH).

The IoU filter runs on the decoder's outputs before the masks are upsampled;
the rest runs in small chunks of masks (upsample, stability score inside
MLX, threshold, box, run-length encoding), so the full-size masks of a whole
batch never exist at once and each candidate is kept as its run lengths. The
results equal the reference order of operations; memory beyond the image and
the returned masks does not grow with the image size or the number of points.
"""

from __future__ import annotations

import math
import os
from itertools import product
from typing import Any, Callable, Optional, Sequence, Union

import mlx.core as mx
import numpy as np

from mlx_evit.errors import SamError
from mlx_evit.tasks.images import ImageLike, as_batch
from mlx_evit.tasks.sam_predictor import SamPredictor, as_rgb_uint8

__all__ = [
    "SamAutomaticMaskGenerator",
    "build_point_grid",
    "build_all_layer_point_grids",
    "generate_crop_boxes",
    "stability_score",
    "masks_to_boxes",
    "box_nms",
    "mask_to_rle",
    "rle_counts",
    "rle_to_mask",
    "rle_area",
    "is_box_near_crop_edge",
]


# ---------------------------------------------------------------------------
# Point grids and crops
# ---------------------------------------------------------------------------


def build_point_grid(n_per_side: int) -> np.ndarray:
    """``(n * n, 2)`` (x, y) cell centres of an n x n grid over [0, 1]^2, x varying fastest."""
    offset = 1.0 / (2 * n_per_side)
    side = np.linspace(offset, 1 - offset, n_per_side)
    xs = np.tile(side[None, :], (n_per_side, 1))
    ys = np.tile(side[:, None], (1, n_per_side))
    return np.stack([xs, ys], axis=-1).reshape(-1, 2)


def build_all_layer_point_grids(n_per_side: int, n_layers: int, scale_per_layer: int) -> list[np.ndarray]:
    """One grid per crop layer, ``n_per_side / scale_per_layer ** i`` points per side on layer i."""
    return [build_point_grid(int(n_per_side / (scale_per_layer**i))) for i in range(n_layers + 1)]


def generate_crop_boxes(im_size: tuple[int, int], n_layers: int,
                        overlap_ratio: float) -> tuple[list[list[int]], list[int]]:
    """XYXY crop boxes and their layer: the whole image, then 2^i x 2^i overlapping crops on layer i."""
    h, w = im_size
    boxes, layers = [[0, 0, w, h]], [0]
    short = min(h, w)
    for i in range(n_layers):
        n = 2 ** (i + 1)
        overlap = int(overlap_ratio * short * (2 / n))
        crop_w = int(math.ceil((overlap * (n - 1) + w) / n))
        crop_h = int(math.ceil((overlap * (n - 1) + h) / n))
        x0s = [int((crop_w - overlap) * k) for k in range(n)]
        y0s = [int((crop_h - overlap) * k) for k in range(n)]
        for x0, y0 in product(x0s, y0s):
            boxes.append([x0, y0, min(x0 + crop_w, w), min(y0 + crop_h, h)])
            layers.append(i + 1)
    return boxes, layers


# ---------------------------------------------------------------------------
# Mask post-processing (numpy)
# ---------------------------------------------------------------------------


def stability_score(logits, threshold: float, offset: float):
    """IoU of the masks thresholded at ``threshold + offset`` and ``threshold - offset``; ``(N, H, W) -> (N,)``.

    Works on numpy or MLX arrays (returns the same kind).
    """
    if isinstance(logits, mx.array):
        inter = (logits > threshold + offset).astype(mx.int32).sum(axis=(-1, -2))
        union = (logits > threshold - offset).astype(mx.int32).sum(axis=(-1, -2))
        return inter.astype(mx.float32) / union.astype(mx.float32)
    logits = np.asarray(logits)
    inter = (logits > threshold + offset).sum(axis=(-1, -2), dtype=np.int64)
    union = (logits > threshold - offset).sum(axis=(-1, -2), dtype=np.int64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (inter / union).astype(np.float32)


def masks_to_boxes(masks: np.ndarray) -> np.ndarray:
    """``(N, H, W)`` bool -> ``(N, 4)`` int XYXY boxes with inclusive far edges; empty masks give zeros."""
    masks = np.asarray(masks, bool)
    n, h, w = masks.shape
    out = np.zeros((n, 4), np.int64)
    rows = masks.any(axis=2)
    cols = masks.any(axis=1)
    nonempty = rows.any(axis=1)
    if nonempty.any():
        r, c = rows[nonempty], cols[nonempty]
        out[nonempty, 0] = c.argmax(axis=1)
        out[nonempty, 1] = r.argmax(axis=1)
        out[nonempty, 2] = w - 1 - c[:, ::-1].argmax(axis=1)
        out[nonempty, 3] = h - 1 - r[:, ::-1].argmax(axis=1)
    return out


def box_area(boxes: np.ndarray) -> np.ndarray:
    boxes = np.asarray(boxes, np.float64)
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def box_nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Indices kept by greedy non-maximum suppression (highest score first), as torchvision's ``nms``.

    A box is suppressed when its IoU with a kept box exceeds ``iou_threshold``.
    Returned in decreasing score order.
    """
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    order = np.argsort(-np.asarray(scores, np.float64), kind="stable")
    area = box_area(boxes)
    suppressed = np.zeros(len(boxes), bool)
    keep = []
    for pos, i in enumerate(order):
        if suppressed[i]:
            continue
        keep.append(i)
        rest = order[pos + 1 :]
        rest = rest[~suppressed[rest]]
        if not len(rest):
            continue
        x0 = np.maximum(boxes[i, 0], boxes[rest, 0])
        y0 = np.maximum(boxes[i, 1], boxes[rest, 1])
        x1 = np.minimum(boxes[i, 2], boxes[rest, 2])
        y1 = np.minimum(boxes[i, 3], boxes[rest, 3])
        inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
        with np.errstate(invalid="ignore", divide="ignore"):
            iou = inter / (area[i] + area[rest] - inter)
        suppressed[rest[iou > iou_threshold]] = True
    return np.asarray(keep, np.int64)


def is_box_near_crop_edge(boxes: np.ndarray, crop_box: Sequence[int], orig_box: Sequence[int],
                          atol: float = 20.0) -> np.ndarray:
    """Boxes (crop coordinates) within ``atol`` of an edge of the crop that is not an image edge."""
    crop = np.asarray(crop_box, np.float64)
    orig = np.asarray(orig_box, np.float64)
    boxes = np.asarray(boxes, np.float64) + np.array([crop[0], crop[1], crop[0], crop[1]])
    near_crop = np.abs(boxes - crop[None]) <= atol
    near_image = np.abs(boxes - orig[None]) <= atol
    return (near_crop & ~near_image).any(axis=1)


def mask_to_rle(mask: np.ndarray) -> dict[str, Any]:
    """Bool ``(H, W)`` -> uncompressed RLE ``{"size": [H, W], "counts": [...]}`` (column-major, starts with zeros)."""
    mask = np.asarray(mask, bool)
    return {"size": list(mask.shape), "counts": rle_counts(mask).tolist()}


def rle_counts(mask: np.ndarray) -> np.ndarray:
    """The run lengths of :func:`mask_to_rle` as a compact int array (int32 below 2**31 pixels)."""
    mask = np.asarray(mask, bool)
    h, w = mask.shape
    flat = mask.T.ravel()
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    counts = np.diff(np.concatenate([[0], change, [h * w]]))
    if flat.size and flat[0]:
        counts = np.concatenate([[0], counts])
    return counts.astype(np.int32 if h * w < 2**31 else np.int64)


def rle_to_mask(rle: dict[str, Any]) -> np.ndarray:
    """Uncompressed RLE -> bool ``(H, W)``."""
    h, w = rle["size"]
    counts = np.asarray(rle["counts"], np.int64)
    values = np.arange(len(counts)) % 2 == 1
    flat = np.repeat(values, counts)
    if flat.size != h * w:
        raise ValueError(f"RLE counts sum to {flat.size}, expected {h * w} for size {h}x{w}")
    return flat.reshape(w, h).T


def rle_area(rle: dict[str, Any]) -> int:
    """Pixels set in an uncompressed RLE."""
    return int(np.sum(np.asarray(rle["counts"], np.int64)[1::2]))


def _xywh(box: Sequence[float]) -> list:
    x0, y0, x1, y1 = (int(v) for v in box)
    return [x0, y0, x1 - x0, y1 - y0]


# ---------------------------------------------------------------------------
# Generator
# ---------------------------------------------------------------------------


class SamAutomaticMaskGenerator:
    """Masks for everything in an image, from a grid of point prompts.

    ``model_or_predictor``: an :class:`~mlx_evit.models.sam_model.EfficientViTSam` or a
    :class:`SamPredictor` (:meth:`from_pretrained` loads one by name or path).
    Arguments and defaults as Meta's / EfficientViT-SAM's generator:
    ``points_per_side`` (or explicit ``point_grids``, one ``(N, 2)`` array in
    [0, 1] per crop layer), ``points_per_batch``, ``pred_iou_thresh``,
    ``stability_score_thresh``, ``stability_score_offset``,
    ``box_nms_thresh``, ``crop_n_layers``, ``crop_nms_thresh``,
    ``crop_overlap_ratio``, ``crop_n_points_downscale_factor``,
    ``min_mask_region_area`` (only 0: removing small regions needs connected
    components, not implemented), ``output_mode`` ``"binary_mask"`` or
    ``"uncompressed_rle"``. ``progress(done, total)``: called after each
    batch of points with the points decoded so far and the image's total
    (all crops).

    Memory: full-size logits exist for at most :attr:`chunk_bytes` worth of
    masks at a time (at least one mask); each kept candidate is stored as
    its run lengths, or as its low-res logits when those are smaller
    (:attr:`rle_limit_bytes`), so what a run holds beyond the image and the
    returned masks does not grow with the image size.
    """

    chunk_bytes = 64 << 20
    """Full-size float32 logits upsampled, scored and thresholded together (at least one mask)."""

    rle_limit_bytes = 256 * 256 * 4
    """A candidate whose run lengths take more than this is kept as its low-res logits instead (the
    decoder's ``256 x 256`` float32, upsampled again if it survives the crop's NMS): what a candidate
    holds does not grow with the image size."""

    def __init__(self, model_or_predictor, points_per_side: Optional[int] = 32, points_per_batch: int = 64,
                 pred_iou_thresh: float = 0.88, stability_score_thresh: float = 0.95,
                 stability_score_offset: float = 1.0, box_nms_thresh: float = 0.7, crop_n_layers: int = 0,
                 crop_nms_thresh: float = 0.7, crop_overlap_ratio: float = 512 / 1500,
                 crop_n_points_downscale_factor: int = 1, point_grids: Optional[list[np.ndarray]] = None,
                 min_mask_region_area: int = 0, output_mode: str = "binary_mask",
                 progress: Optional[Callable[[int, int], None]] = None):
        if (points_per_side is None) == (point_grids is None):
            raise SamError("give exactly one of points_per_side and point_grids")
        if output_mode not in ("binary_mask", "uncompressed_rle"):
            raise SamError(f"output_mode must be 'binary_mask' or 'uncompressed_rle', got {output_mode!r}")
        if min_mask_region_area:
            raise SamError("min_mask_region_area > 0 is not supported (it needs connected components)")
        if points_per_batch < 1:
            raise SamError(f"points_per_batch must be at least 1, got {points_per_batch}")
        if points_per_side is not None:
            if points_per_side < 1:
                raise SamError(f"points_per_side must be at least 1, got {points_per_side}")
            point_grids = build_all_layer_point_grids(points_per_side, crop_n_layers,
                                                      crop_n_points_downscale_factor)
        elif len(point_grids) != crop_n_layers + 1:
            raise SamError(f"point_grids needs {crop_n_layers + 1} grids (one per crop layer), got {len(point_grids)}")
        self.point_grids = [np.asarray(g, np.float64).reshape(-1, 2) for g in point_grids]
        self.predictor = (model_or_predictor if isinstance(model_or_predictor, SamPredictor)
                          else SamPredictor(model_or_predictor))
        self.points_per_batch = points_per_batch
        self.pred_iou_thresh = pred_iou_thresh
        self.stability_score_thresh = stability_score_thresh
        self.stability_score_offset = stability_score_offset
        self.box_nms_thresh = box_nms_thresh
        self.crop_n_layers = crop_n_layers
        self.crop_nms_thresh = crop_nms_thresh
        self.crop_overlap_ratio = crop_overlap_ratio
        self.output_mode = output_mode
        self.progress = progress

    @classmethod
    def from_pretrained(cls, name_or_path: Optional[Union[str, os.PathLike]] = None, *,
                        weights: Optional[Union[str, os.PathLike]] = None, dtype: Optional[Any] = None,
                        revision: str = "main", log: Optional[Callable[[str], None]] = None,
                        **options: Any) -> "SamAutomaticMaskGenerator":
        """A generator over :meth:`SamPredictor.from_pretrained` (same ``name_or_path``, ``weights``,
        ``dtype``); ``options`` are the generator's arguments. Raises :class:`SamError` and
        :class:`~mlx_evit.errors.HubError`."""
        predictor = SamPredictor.from_pretrained(name_or_path, weights=weights, dtype=dtype, revision=revision,
                                                 log=log)
        return cls(predictor, **options)

    def generate(self, image: Union[ImageLike, Sequence[ImageLike]], image_format: str = "RGB", *,
                 progress: Optional[Callable[[int, int], None]] = None) -> list:
        """Records for every mask found in one image, or a list of such lists for a list of images.

        An image is a file path, a PIL image or an ``(H, W, 3)`` uint8 (or
        ``[0, 1]`` float) array (:mod:`mlx_evit.tasks.images`).
        ``progress``: overrides the constructor's for this call.
        """
        items, batch = as_batch(image)
        tick = progress if progress is not None else self.progress
        results = [self._generate_one(as_rgb_uint8(item, image_format), tick) for item in items]
        return results if batch else results[0]

    def _generate_one(self, image: np.ndarray, progress: Optional[Callable[[int, int], None]]) -> list[dict]:
        h, w = image.shape[:2]
        crop_boxes, layers = generate_crop_boxes((h, w), self.crop_n_layers, self.crop_overlap_ratio)
        counter = _Counter(sum(len(self.point_grids[layer]) for layer in layers), progress)
        parts = [self._process_crop(image, box, layer, counter) for box, layer in zip(crop_boxes, layers)]
        data = {k: [x for p in parts for x in p[k]] for k in ("rles", "boxes", "iou", "stability", "points", "crops")}
        if len(crop_boxes) > 1 and data["boxes"]:
            keep = box_nms(np.asarray(data["boxes"]), 1.0 / box_area(np.asarray(data["crops"])),
                           self.crop_nms_thresh)
            data = {k: [v[i] for i in keep] for k, v in data.items()}
        records = []
        for counts, box, iou, stab, point, crop in zip(*(data[k] for k in ("rles", "boxes", "iou", "stability",
                                                                               "points", "crops"))):
            rle = {"size": [h, w], "counts": counts.tolist()}
            seg = rle_to_mask(rle) if self.output_mode == "binary_mask" else rle
            records.append({
                "segmentation": seg,
                "area": int(counts[1::2].sum(dtype=np.int64)),
                "bbox": _xywh(box),
                "predicted_iou": float(iou),
                "point_coords": [[float(point[0]), float(point[1])]],
                "stability_score": float(stab),
                "crop_box": _xywh(crop),
            })
        return records

    def _process_crop(self, image: np.ndarray, crop_box: list[int], layer: int, counter: "_Counter") -> dict[str, list]:
        x0, y0, x1, y1 = crop_box
        crop = np.ascontiguousarray(image[y0:y1, x0:x1])
        ch, cw = crop.shape[:2]
        p = self.predictor
        p.set_image(crop)
        points = self.point_grids[layer] * np.array([[cw, ch]], np.float64)
        out = {k: [] for k in ("rles", "boxes", "iou", "stability", "points")}
        for start in range(0, len(points), self.points_per_batch):
            batch = points[start : start + self.points_per_batch]
            self._process_batch(batch, (ch, cw), crop_box, image.shape[:2], out)
            counter.add(len(batch))
        if out["boxes"]:
            keep = box_nms(np.asarray(out["boxes"]), np.asarray(out["iou"]), self.box_nms_thresh)
            out = {k: [v[i] for i in keep] for k, v in out.items()}
        thr = p.model.mask_threshold
        for i, stored in enumerate(out["rles"]):
            if isinstance(stored, _LowRes):  # upsampled again, alone: the same mask as in its chunk
                logits = p.postprocess(mx.array(stored.logits)[None, None])[:, 0]
                out["rles"][i] = rle_counts(np.asarray(logits > thr)[0])
        p.reset_image()
        h, w = image.shape[:2]
        if (x0, y0, x1, y1) != (0, 0, w, h):  # run lengths of the crop -> of the image (survivors only)
            pad = ((y0, h - y1), (x0, w - x1))
            out["rles"] = [rle_counts(np.pad(_decode_counts(c, ch, cw), pad)) for c in out["rles"]]
        shift = np.array([x0, y0, x0, y0])
        out["boxes"] = [b + shift for b in out["boxes"]]
        out["points"] = [pt + shift[:2] for pt in out["points"]]
        out["crops"] = [list(crop_box)] * len(out["rles"])
        return out

    def _process_batch(self, points: np.ndarray, crop_size: tuple[int, int], crop_box: list[int],
                       orig_size: tuple[int, int], out: dict[str, list]) -> None:
        """Decode one batch of points; keep each passing mask as run lengths of the crop (boxes in crop pixels).

        The candidates are upsampled, scored and thresholded in chunks of
        :attr:`chunk_bytes`, so the full-size logits of a whole batch never
        exist at once; each chunk's masks are the same as the whole batch's.
        """
        p = self.predictor
        n = len(points)
        coords = mx.array(p.apply_coords(points[:, None, :]).astype(np.float32))
        labels = mx.ones((n, 1), mx.int32)
        low, iou = p.decode((coords, labels), None, None, multimask_output=True)
        C = low.shape[1]
        low = low.reshape(n * C, *low.shape[2:])
        iou = np.asarray(iou.reshape(-1))
        pts = np.repeat(points, C, axis=0)
        keep = np.flatnonzero(iou > self.pred_iou_thresh) if self.pred_iou_thresh > 0 else np.arange(n * C)
        ch, cw = crop_size
        per_chunk = max(1, self.chunk_bytes // (4 * ch * cw))
        h, w = orig_size
        thr = p.model.mask_threshold
        for start in range(0, len(keep), per_chunk):
            chosen = keep[start : start + per_chunk]
            logits = p.postprocess(low[mx.array(chosen)][:, None])[:, 0]  # (K, ch, cw) at the crop's size
            stab = np.asarray(stability_score(logits, thr, self.stability_score_offset))
            if self.stability_score_thresh > 0:
                ok = stab >= self.stability_score_thresh
                chosen, stab = chosen[ok], stab[ok]
                if not len(chosen):
                    continue
                logits = logits[mx.array(np.flatnonzero(ok))]
            masks = np.asarray(logits > thr)
            del logits
            boxes = masks_to_boxes(masks)
            edge = is_box_near_crop_edge(boxes, crop_box, [0, 0, w, h])
            for j in np.flatnonzero(~edge):
                counts = rle_counts(masks[j])
                if counts.nbytes > self.rle_limit_bytes:
                    counts = _LowRes(np.asarray(low[int(chosen[j])]))
                out["rles"].append(counts)
                out["boxes"].append(boxes[j])
                out["iou"].append(iou[chosen[j]])
                out["stability"].append(stab[j])
                out["points"].append(pts[chosen[j]])


def _decode_counts(counts: np.ndarray, h: int, w: int) -> np.ndarray:
    """Run lengths (column-major, zeros first) -> bool ``(h, w)``."""
    values = np.arange(len(counts)) % 2 == 1
    return np.repeat(values, counts).reshape(w, h).T


class _LowRes:
    """A candidate kept as its decoder logits ``(256, 256)`` float32 until it survives NMS."""

    __slots__ = ("logits",)

    def __init__(self, logits: np.ndarray):
        self.logits = logits


class _Counter:
    """Points decoded so far for one image, reported to a ``progress(done, total)`` callback."""

    def __init__(self, total: int, progress: Optional[Callable[[int, int], None]]):
        self.total, self.done, self.progress = total, 0, progress

    def add(self, points: int) -> None:
        self.done += points
        if self.progress is not None:
            self.progress(self.done, self.total)
