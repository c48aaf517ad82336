"""The chunked mask generator against the whole-batch algorithm it replaced, on real (synthetic-weight) SAM models.

The reference below is the generator as it was before chunking: every
candidate of a point batch upsampled to full size at once, padded to the
image for crops, then run-length encoded. Both run on the same decoder
outputs (one decode per crop and batch, memoised), so any difference comes
from the chunked post-processing. A spy on the predictor checks the memory
bound: no call upsamples more masks than ``chunk_bytes`` allows.
"""

from __future__ import annotations

import numpy as np
import pytest

import mlx.core as mx

import synthetic
from mlx_evit.models.keymap import load_state_dict
from mlx_evit.models.registry import build_model
from mlx_evit.sam import SamAutomaticMaskGenerator, SamPredictor
from mlx_evit.tasks.mask_generator import (box_area, box_nms, generate_crop_boxes, is_box_near_crop_edge, mask_to_rle,
                                           masks_to_boxes, rle_area, rle_to_mask, stability_score, _xywh)


class MemoPredictor(SamPredictor):
    """A predictor whose decoder outputs are memoised per (image, prompts), and whose upsampling is watched."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.memo: dict = {}
        self.upsampled: list[int] = []  # masks per postprocess call
        self.upsampled_bytes: list[int] = []  # their full-size float32 logits
        self.image_key = None

    def set_image(self, image, image_format="RGB"):
        super().set_image(image, image_format)
        self.image_key = (np.asarray(image).shape, synthetic.crc32(np.ascontiguousarray(image)))

    def decode(self, points, boxes, masks, multimask_output=True):
        key = (self.image_key, np.asarray(points[0]).tobytes(), bool(multimask_output))
        if key not in self.memo:
            low, iou = super().decode(points, boxes, masks, multimask_output)
            mx.eval(low, iou)
            self.memo[key] = (low, iou)
        return self.memo[key]

    def postprocess(self, low_res):
        self.upsampled.append(int(low_res.shape[0]))
        self.upsampled_bytes.append(int(low_res.shape[0]) * 4 * self.original_size[0] * self.original_size[1])
        return super().postprocess(low_res)


def reference_generate(gen: SamAutomaticMaskGenerator, image: np.ndarray) -> list[dict]:
    """The generator before chunking (whole batches upsampled at once), output_mode uncompressed_rle."""
    h, w = image.shape[:2]
    crop_boxes, layers = generate_crop_boxes((h, w), gen.crop_n_layers, gen.crop_overlap_ratio)
    keys = ("rles", "boxes", "iou", "stability", "points", "crops")
    parts = []
    for crop_box, layer in zip(crop_boxes, layers):
        x0, y0, x1, y1 = crop_box
        crop = np.ascontiguousarray(image[y0:y1, x0:x1])
        ch, cw = crop.shape[:2]
        p = gen.predictor
        p.set_image(crop)
        points = gen.point_grids[layer] * np.array([[cw, ch]], np.float64)
        out = {k: [] for k in keys[:-1]}
        for start in range(0, len(points), gen.points_per_batch):
            batch = points[start : start + gen.points_per_batch]
            n = len(batch)
            coords = mx.array(p.apply_coords(batch[:, None, :]).astype(np.float32))
            low, iou = p.decode((coords, mx.ones((n, 1), mx.int32)), None, None, multimask_output=True)
            C = low.shape[1]
            low = low.reshape(n * C, *low.shape[2:])
            iou = np.asarray(iou.reshape(-1))
            pts = np.repeat(batch, C, axis=0)
            keep = np.flatnonzero(iou > gen.pred_iou_thresh) if gen.pred_iou_thresh > 0 else np.arange(n * C)
            if not len(keep):
                continue
            logits = p.postprocess(low[mx.array(keep)][:, None])[:, 0]
            thr = p.model.mask_threshold
            stab = np.asarray(stability_score(logits, thr, gen.stability_score_offset))
            if gen.stability_score_thresh > 0:
                ok = stab >= gen.stability_score_thresh
                keep, stab = keep[ok], stab[ok]
                if not len(keep):
                    continue
                logits = logits[mx.array(np.flatnonzero(ok))]
            masks = np.asarray(logits > thr)
            boxes = masks_to_boxes(masks)
            edge = is_box_near_crop_edge(boxes, crop_box, [0, 0, w, h])
            for j in np.flatnonzero(~edge):
                m = masks[j]
                if (x0, y0, x1, y1) != (0, 0, w, h):
                    m = np.pad(m, ((y0, h - y1), (x0, w - x1)))
                out["rles"].append(mask_to_rle(m))
                out["boxes"].append(boxes[j])
                out["iou"].append(iou[keep[j]])
                out["stability"].append(stab[j])
                out["points"].append(pts[keep[j]])
        p.reset_image()
        if out["boxes"]:
            kept = box_nms(np.asarray(out["boxes"]), np.asarray(out["iou"]), gen.box_nms_thresh)
            out = {k: [v[i] for i in kept] for k, v in out.items()}
        shift = np.array([x0, y0, x0, y0])
        out["boxes"] = [b + shift for b in out["boxes"]]
        out["points"] = [pt + shift[:2] for pt in out["points"]]
        out["crops"] = [list(crop_box)] * len(out["rles"])
        parts.append(out)
    data = {k: [x for part in parts for x in part[k]] for k in keys}
    if len(crop_boxes) > 1 and data["boxes"]:
        kept = box_nms(np.asarray(data["boxes"]), 1.0 / box_area(np.asarray(data["crops"])), gen.crop_nms_thresh)
        data = {k: [v[i] for i in kept] for k, v in data.items()}
    return [{"segmentation": rle, "area": rle_area(rle), "bbox": _xywh(box), "predicted_iou": float(iou),
             "point_coords": [[float(pt[0]), float(pt[1])]], "stability_score": float(stab), "crop_box": _xywh(crop)}
            for rle, box, iou, stab, pt, crop in zip(*(data[k] for k in keys))]


@pytest.fixture(scope="module")
def predictor():
    model = build_model("efficientvit_sam_l0", image_size=64)
    load_state_dict(model, synthetic.state_dict(synthetic.keys_file("efficientvit-sam-l0")))
    return MemoPredictor(model.eval(), compile=False)


def thresholds_between(records: list[dict], key: str) -> float:
    """A threshold that keeps some and drops some of the thresholds-0 records' ``key`` values."""
    values = sorted(r[key] for r in records if np.isfinite(r[key]))
    return float(np.mean(values[len(values) // 3 : len(values) // 3 + 2]))


CASES = [  # (image key, size, generator options)
    ("amg/wide", (37, 61), dict(points_per_side=4, points_per_batch=6)),
    ("amg/tall", (70, 41), dict(points_per_side=3, points_per_batch=4, crop_n_layers=1,
                                crop_n_points_downscale_factor=2, crop_overlap_ratio=0.25)),
]


@pytest.mark.parametrize("key,size,options", CASES, ids=[c[0] for c in CASES])
def test_chunked_generator_equals_the_whole_batch_algorithm(predictor, key, size, options):
    image = synthetic.synthetic_image(key, *size)
    zero = dict(options, pred_iou_thresh=0.0, stability_score_thresh=0.0, output_mode="uncompressed_rle")
    gen = SamAutomaticMaskGenerator(predictor, **zero)
    expected = reference_generate(gen, image)
    assert len(expected) >= 2, "thresholds 0 keep several masks"
    # Candidates upsampled one at a time, two at a time (kept as low-res logits until they survive NMS:
    # rle_limit 0), and all at once: the same records.
    for masks_per_chunk, rle_limit in ((1, None), (2, 0), (10**6, None)):
        gen.chunk_bytes = masks_per_chunk * 4 * size[0] * size[1]
        gen.rle_limit_bytes = SamAutomaticMaskGenerator.rle_limit_bytes if rle_limit is None else rle_limit
        predictor.upsampled.clear()
        predictor.upsampled_bytes.clear()
        progress: list[tuple[int, int]] = []
        ours = gen.generate(image, progress=lambda d, t: progress.append((d, t)))
        assert ours == expected
        if masks_per_chunk < 10**6:  # crops are smaller than the image: more of their masks fit
            assert max(predictor.upsampled_bytes) <= gen.chunk_bytes
        total = sum(len(gen.point_grids[layer]) for layer in
                    generate_crop_boxes(size, gen.crop_n_layers, gen.crop_overlap_ratio)[1])
        assert progress[-1] == (total, total) and [d for d, _ in progress] == sorted({d for d, _ in progress})
    # Thresholds that keep some candidates and drop others, and binary output.
    iou_thr, stab_thr = thresholds_between(expected, "predicted_iou"), thresholds_between(expected, "stability_score")
    for extra in (dict(pred_iou_thresh=iou_thr), dict(stability_score_thresh=stab_thr),
                  dict(pred_iou_thresh=iou_thr, stability_score_thresh=stab_thr, box_nms_thresh=0.5)):
        filtered = SamAutomaticMaskGenerator(predictor, **dict(zero, **extra))
        filtered.chunk_bytes = 4 * size[0] * size[1]
        expected_filtered = reference_generate(filtered, image)
        assert 0 < len(expected_filtered) < len(expected) or extra.get("box_nms_thresh")
        assert filtered.generate(image) == expected_filtered
    binary = SamAutomaticMaskGenerator(predictor, **dict(zero, output_mode="binary_mask"))
    binary.chunk_bytes = 4 * size[0] * size[1]
    for got, want in zip(binary.generate(image), expected):
        np.testing.assert_array_equal(got["segmentation"], rle_to_mask(want["segmentation"]))


def test_whole_batch_upsampling_is_what_the_bound_prevents(predictor):
    """The spy sees the difference: the reference upsamples a whole batch in one call."""
    image = synthetic.synthetic_image("amg/wide", 37, 61)
    gen = SamAutomaticMaskGenerator(predictor, points_per_side=4, points_per_batch=6, pred_iou_thresh=0.0,
                                    stability_score_thresh=0.0, output_mode="uncompressed_rle")
    predictor.upsampled.clear()
    reference_generate(gen, image)
    assert max(predictor.upsampled) == 18  # 6 points x 3 masks
    gen.chunk_bytes = 4 * 37 * 61 * 5
    predictor.upsampled.clear()
    gen.generate(image)
    assert max(predictor.upsampled) == 5
