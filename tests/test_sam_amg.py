"""The automatic mask generator's post-processing, against Meta's segment_anything 1.0 (torch, torchvision).

With random weights SAM finds almost nothing, so the generator is driven by
constructed logits: a fake decoder returns, for each grid point, three
disks of different radius and edge sharpness around it. Meta's generator
runs on the same logits (its predictor replaced by one that upsamples them
with torch), and both must return the same records, with crops.
"""

from __future__ import annotations

import numpy as np
import pytest

import mlx.core as mx

from mlx_evit.models.registry import build_model
from mlx_evit.sam import SamPredictor
from mlx_evit.tasks.mask_generator import (
    SamAutomaticMaskGenerator,
    box_nms,
    build_all_layer_point_grids,
    generate_crop_boxes,
    is_box_near_crop_edge,
    mask_to_rle,
    masks_to_boxes,
    rle_area,
    rle_to_mask,
    stability_score,
)
from mlx_evit.tasks.sam_predictor import preprocess_shape

torch = pytest.importorskip("torch")
amg = pytest.importorskip("segment_anything.utils.amg")
torchvision = pytest.importorskip("torchvision")


def random_masks(n=6, h=37, w=53, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    m = rng.random((n, h, w)) < rng.random((n, 1, 1))
    m[0] = False  # empty
    m[1] = True  # full
    m[2] = False
    m[2, 5:9, 40:44] = True  # one block
    return m


def test_rle_round_trip_and_area_match_meta():
    masks = random_masks()
    ref = amg.mask_to_rle_pytorch(torch.from_numpy(masks))
    for m, r in zip(masks, ref):
        rle = mask_to_rle(m)
        assert rle == r
        np.testing.assert_array_equal(rle_to_mask(rle), m)
        assert rle_area(rle) == int(m.sum()) == amg.area_from_rle(r)
    with pytest.raises(ValueError, match="RLE counts"):
        rle_to_mask({"size": [3, 3], "counts": [4, 4]})


def test_stability_score_matches_meta():
    logits = np.random.default_rng(1).standard_normal((5, 40, 30)).astype(np.float32) * 3
    ref = amg.calculate_stability_score(torch.from_numpy(logits), 0.0, 1.0).numpy()
    np.testing.assert_allclose(stability_score(logits, 0.0, 1.0), ref, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(stability_score(mx.array(logits), 0.0, 1.0)), ref, rtol=1e-6)
    # Independent: the inner mask is a subset of the outer one.
    inner, outer = (logits > 1).sum((1, 2)), (logits > -1).sum((1, 2))
    np.testing.assert_allclose(ref, inner / outer, rtol=1e-6)


def test_masks_to_boxes_matches_meta():
    masks = random_masks()
    ref = amg.batched_mask_to_box(torch.from_numpy(masks)).numpy()
    np.testing.assert_array_equal(masks_to_boxes(masks), ref)
    np.testing.assert_array_equal(masks_to_boxes(masks[2:3])[0], [40, 5, 43, 8])


def test_box_nms_matches_torchvision():
    rng = np.random.default_rng(2)
    xy = rng.uniform(0, 80, (200, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(5, 40, (200, 2))], axis=1).astype(np.float32)
    scores = rng.random(200).astype(np.float32)
    for thr in (0.3, 0.5, 0.7):
        ref = torchvision.ops.nms(torch.from_numpy(boxes), torch.from_numpy(scores), thr).numpy()
        np.testing.assert_array_equal(box_nms(boxes, scores, thr), ref)


def test_crop_boxes_grids_and_edges_match_meta():
    for size, layers in (((480, 640), 2), ((101, 1000), 1), ((333, 333), 3)):
        assert generate_crop_boxes(size, layers, 512 / 1500) == amg.generate_crop_boxes(size, layers, 512 / 1500)
    for ours, ref in zip(build_all_layer_point_grids(16, 2, 2), amg.build_all_layer_point_grids(16, 2, 2)):
        np.testing.assert_array_equal(ours, ref)
    boxes = np.array([[0, 0, 30, 30], [100, 100, 180, 150], [5, 200, 60, 239], [250, 10, 300, 40]])
    crop, orig = [100, 0, 320, 240], [0, 0, 320, 240]
    ref = amg.is_box_near_crop_edge(torch.from_numpy(boxes).float(), crop, orig).numpy()
    np.testing.assert_array_equal(is_box_near_crop_edge(boxes, crop, orig), ref)
    assert ref.any() and not ref.all()


# ---------------------------------------------------------------------------
# The whole generator on constructed logits
# ---------------------------------------------------------------------------

SLOPES = (0.4, 2.0, 8.0)  # logit slope at the disk edge per mask: low slope = unstable


def disk_logits(points_1024: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(B, 3, 256, 256) logits of disks around each point (1024 frame), and (B, 3) IoU predictions."""
    yy, xx = np.mgrid[0:256, 0:256].astype(np.float32)
    out, iou = [], []
    for x, y in points_1024.reshape(-1, 2) / 4:
        cx, cy = np.round(x / 64) * 64, np.round(y / 64) * 64  # nearby points share a disk: NMS has work
        d = np.sqrt((xx - cx) ** 2 + (yy - cy) ** 2)
        out.append([(r - d) * s for r, s in zip((6.0, 14.0, 30.0), SLOPES)])
        iou.append([0.8 + 0.1 * np.sin(x / 7 + k) for k in range(3)])
    return np.asarray(out, np.float32), np.asarray(iou, np.float32)


class DiskPredictor(SamPredictor):
    """Our predictor with the image encoder and decoder replaced by :func:`disk_logits`."""

    def set_image(self, image, image_format="RGB"):
        self.reset_image()
        self.original_size = tuple(image.shape[:2])
        self.input_size = preprocess_shape(*self.original_size, 1024)
        self.features = mx.zeros((1, 64, 64, 256))
        self.is_image_set = True

    def decode(self, points, boxes, masks, multimask_output=True):
        low, iou = disk_logits(np.asarray(points[0]))
        return mx.array(low), mx.array(iou)


class MetaDiskPredictor:
    """The same logits for Meta's generator, upsampled by torch as the original predictor does."""

    mask_threshold = 0.0
    device = "cpu"

    def __init__(self):
        from segment_anything.utils.transforms import ResizeLongestSide

        self.transform = ResizeLongestSide(1024)
        self.model = self

    def set_image(self, image):
        self.original_size = image.shape[:2]
        self.input_size = self.transform.get_preprocess_shape(*self.original_size, 1024)

    def reset_image(self):
        pass

    def predict_torch(self, point_coords, point_labels, multimask_output=True, return_logits=False):
        low, iou = disk_logits(point_coords.numpy())
        F = torch.nn.functional
        masks = F.interpolate(torch.from_numpy(low), (1024, 1024), mode="bilinear", align_corners=False)
        masks = masks[..., : self.input_size[0], : self.input_size[1]]
        masks = F.interpolate(masks, self.original_size, mode="bilinear", align_corners=False)
        return masks, torch.from_numpy(iou), torch.from_numpy(low)


@pytest.mark.parity
@pytest.mark.parametrize("crop_n_layers,size", [(0, (150, 200)), (1, (120, 170))])
def test_generator_matches_meta_on_constructed_logits(crop_n_layers, size):
    from segment_anything.automatic_mask_generator import SamAutomaticMaskGenerator as MetaGenerator

    kw = dict(points_per_side=6, points_per_batch=10, pred_iou_thresh=0.75, stability_score_thresh=0.8,
              box_nms_thresh=0.7, crop_n_layers=crop_n_layers, crop_n_points_downscale_factor=2,
              output_mode="uncompressed_rle")
    meta = MetaGenerator.__new__(MetaGenerator)
    meta.point_grids = amg.build_all_layer_point_grids(6, crop_n_layers, 2)
    for k, v in dict(points_per_batch=10, pred_iou_thresh=0.75, stability_score_thresh=0.8,
                     stability_score_offset=1.0, box_nms_thresh=0.7, crop_n_layers=crop_n_layers,
                     crop_nms_thresh=0.7, crop_overlap_ratio=512 / 1500, crop_n_points_downscale_factor=2,
                     min_mask_region_area=0, output_mode="uncompressed_rle").items():
        setattr(meta, k, v)
    meta.predictor = MetaDiskPredictor()
    image = np.zeros(size + (3,), np.uint8)
    ref = meta.generate(image)

    ours = SamAutomaticMaskGenerator(DiskPredictor(build_model("efficientvit_sam_l0", image_size=64),
                                                   compile=False), **kw).generate(image)
    assert len(ref) > 3, "the constructed case should keep several masks"
    assert len(ours) == len(ref)
    for a, b in zip(ours, ref):
        assert a["segmentation"] == b["segmentation"]
        assert a["area"] == b["area"] and a["bbox"] == b["bbox"] and a["crop_box"] == b["crop_box"]
        assert a["point_coords"][0] == pytest.approx(b["point_coords"][0])
        assert a["predicted_iou"] == pytest.approx(b["predicted_iou"], abs=1e-6)
        assert a["stability_score"] == pytest.approx(b["stability_score"], abs=1e-6)
    # Some candidates were dropped by each filter (the test exercises them).
    stabilities = [r["stability_score"] for r in ref]
    assert min(stabilities) >= 0.8 and min(r["predicted_iou"] for r in ref) > 0.75

    binary = SamAutomaticMaskGenerator(DiskPredictor(build_model("efficientvit_sam_l0", image_size=64),
                                                     compile=False), **dict(kw, output_mode="binary_mask"))
    masks = binary.generate(image)
    for a, b in zip(masks, ref):
        np.testing.assert_array_equal(a["segmentation"], amg.rle_to_mask(b["segmentation"]))


def test_generator_argument_errors():
    model = build_model("efficientvit_sam_l0", image_size=64)
    with pytest.raises(ValueError, match="exactly one"):
        SamAutomaticMaskGenerator(model, points_per_side=None)
    with pytest.raises(ValueError, match="output_mode"):
        SamAutomaticMaskGenerator(model, output_mode="coco")
    with pytest.raises(ValueError, match="min_mask_region_area"):
        SamAutomaticMaskGenerator(model, min_mask_region_area=100)
