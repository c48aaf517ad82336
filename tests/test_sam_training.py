"""Fine-tuning EfficientViT-SAM (``python -m mlx_evit.sam train``) on synthetic instance masks.

A random SAM-L0 with a 64-pixel encoder keeps runs short (the decoder's cost
does not depend on it). Checked: decoder training lowers the validation
loss from box prompts (the IoU gain: tests/test_readme_training.py); the
output loads in SamPredictor, the automatic mask generator and the
command; COCO RLE (pycocotools' encoding) and
polygons decode to the masks they encode; bad data stops the run with one
line before any step.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import mlx_evit  # before mlx.core
from mlx_evit.cli.sam_command import main as sam_main
from mlx_evit.tasks.sam_train_data import decode_rle, find_instances, polygons_to_mask
from mlx_evit.tasks.sam_training import SamTrainConfig, train_sam

import mlx.core as mx
from mlx.utils import tree_flatten

ROOT = Path(__file__).resolve().parents[1]
MODEL = "efficientvit_sam_l0"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    spec = importlib.util.spec_from_file_location("make_train_data", ROOT / "examples" / "make_train_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    root = tmp_path_factory.mktemp("sam") / "shapes"
    module.make("sam", root, train=6, val=3, size=(64, 64), seed=2)
    return root


def _config(data: Path, out: Path, **kw) -> SamTrainConfig:
    """Training on ``data`` (a training folder)."""
    options = dict(data=data, output=out, model=MODEL, pretrained=False, image_size=64, batch_size=2,
                   masks_per_image=2, prompts=("box",), corrections=0, lr=1e-3, warmup=2, steps=2,
                   progress=False, log=lambda m: None)
    options.update(kw)
    return SamTrainConfig(**options)


def test_decoder_training_lowers_the_box_loss_and_the_output_loads_as_it_is(data, tmp_path):
    """From random weights a few steps lower the validation loss from box prompts (the mask IoU gain, which
    needs longer, is checked on the README's example by tests/test_readme_training.py)."""
    out = tmp_path / "sam"
    result = train_sam(_config(data / "train", out, steps=6, batch_size=1, masks_per_image=1, val=data / "val"))
    assert result["val_loss"] < 0.8 * result["val_loss_before"], result
    assert 0 <= result["iou"] <= 1 and 0 <= result["iou_before"] <= 1
    trained = {k: np.array(v) for k, v in tree_flatten(mlx_evit.load(out, fuse=False).parameters())}
    mx.random.seed(0)
    start = {k: np.array(v) for k, v in tree_flatten(mlx_evit.create_model(MODEL, image_size=64).parameters())}
    changed = {k.split(".")[0] for k in trained if not np.array_equal(trained[k], start[k]) and "running" not in k}
    assert changed == {"mask_decoder"}  # the encoder's weights stayed frozen
    # a random frozen encoder gets BatchNorm statistics from the training images, and only those
    stats = [k for k in trained if "running" in k]
    assert stats and all(k.startswith("image_encoder.") for k in stats)
    assert all(not np.array_equal(trained[k], start[k]) for k in stats if k.endswith("running_var"))
    # the folder loads as it is: predictor, mask generator, command
    from mlx_evit.sam import SamAutomaticMaskGenerator, SamPredictor

    image = np.asarray(Image.open(next((data / "val" / "images").iterdir())).convert("RGB"))
    predictor = SamPredictor(mlx_evit.load(out))
    predictor.set_image(image)
    masks, iou, _ = predictor.predict(box=np.array([5, 5, 40, 40]), multimask_output=False)
    assert masks.shape == (1, *image.shape[:2]) and iou.shape == (1,)
    SamAutomaticMaskGenerator(mlx_evit.load(out), points_per_side=2).generate(image)
    code = sam_main([str(next((data / "val" / "images").iterdir())), "--weights", str(out), "--box", "5,5,40,40",
                     "--output-dir", str(tmp_path / "masks"), "--quiet"])
    assert code == 0 and any(p.name.endswith("_mask0.png") for p in (tmp_path / "masks").iterdir())


def test_coco_rle_and_polygons_decode_to_their_masks():
    coco = pytest.importorskip("pycocotools.mask")
    rng = np.random.default_rng(0)
    for shape in ((7, 5), (40, 33), (64, 64)):
        mask = rng.random(shape) < 0.3
        mask[:3] = True  # long runs too
        rle = coco.encode(np.asfortranarray(mask.astype(np.uint8)))
        compressed = {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
        assert np.array_equal(decode_rle(compressed), mask)
        assert np.array_equal(coco.decode(rle).astype(bool), decode_rle(compressed))
    polygon = [[2, 2, 20, 2, 20, 12, 2, 12]]
    expected = coco.decode(coco.merge(coco.frPyObjects(polygon, 16, 24))).astype(bool)
    ours = polygons_to_mask(polygon, (16, 24))
    assert np.array_equal(ours[3:12, 3:20], expected[3:12, 3:20])  # interiors agree (edges: rasteriser rules)
    assert abs(int(ours.sum()) - int(expected.sum())) <= 2 * (18 + 10)


def test_coco_json_layout_reads_rle_and_polygons(data, tmp_path):
    coco = pytest.importorskip("pycocotools.mask")
    root = tmp_path / "coco"
    shutil.copytree(data / "train" / "images", root / "images")
    images, annotations = [], []
    for i, path in enumerate(sorted((root / "images").iterdir())):
        w, h = Image.open(path).size
        images.append({"id": i, "file_name": path.name, "height": h, "width": w})
        for k, mask_file in enumerate(sorted((data / "train" / "masks").glob(f"{path.stem}_*.png"))):
            mask = np.asarray(Image.open(mask_file)) > 0
            rle = coco.encode(np.asfortranarray(mask.astype(np.uint8)))
            annotations.append({"id": len(annotations), "image_id": i,
                                "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()}})
    (root / "instances.json").write_text(json.dumps({"images": images, "annotations": annotations}))
    from_json = find_instances(root)
    from_pngs = find_instances(data / "train")
    assert [i.image.name for i in from_json] == [i.image.name for i in from_pngs]
    assert [len(i.masks) for i in from_json] == [len(i.masks) for i in from_pngs]
    result = train_sam(_config(root, tmp_path / "out", steps=1, batch_size=1, masks_per_image=1))
    assert result["step"] == 1 and (tmp_path / "out" / "model.safetensors").is_file()


@pytest.mark.parametrize("damage, expected", [
    ("orphan", "masks/zz_0.png: no image images/zz.*"),
    ("name", "masks/nounderscore.png: expected the name <image stem>_<k>.png"),
    ("size", "mask size 10x10 differs from its image's"),
    ("empty", "empty mask"),
    ("unreadable", "images/train_0001.jpg: not an image file"),
])
def test_bad_data_is_one_line_before_any_step(data, tmp_path, capsys, damage, expected):
    root = tmp_path / "bad"
    shutil.copytree(data / "train", root)
    masks = root / "masks"
    if damage == "orphan":
        Image.fromarray(np.full((8, 8), 255, np.uint8)).save(masks / "zz_0.png")
    if damage == "name":
        Image.fromarray(np.full((8, 8), 255, np.uint8)).save(masks / "nounderscore.png")
    if damage == "size":
        Image.fromarray(np.full((10, 10), 255, np.uint8)).save(masks / "train_0000_0.png")
    if damage == "empty":
        first = sorted(masks.iterdir())[0]
        Image.fromarray(np.zeros(np.asarray(Image.open(first)).shape, np.uint8)).save(first)
    if damage == "unreadable":
        (root / "images" / "train_0001.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    out = tmp_path / "out"
    code = sam_main(["train", str(root), "--output", str(out), "--model", MODEL, "--no-pretrained",
                     "--image-size", "64", "--steps", "1"])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("python -m mlx_evit.sam train: error: "), err
    assert expected in lines[0], err
    assert not out.exists()


def test_focal_weight_scales_the_focal_term_and_bad_values_stop_the_run(data, tmp_path):
    """loss(w) - loss(0) is w times the focal loss (alpha 0.25, gamma 2, mean over the 256x256 logits),
    recomputed here in float64; a negative weight is an error before any step."""
    from mlx_evit.tasks.sam_training import _losses, build_sam_model
    from mlx_evit.tasks.training import TrainingError

    model = build_sam_model(_config(data / "train", tmp_path / "unused"))
    rng = np.random.default_rng(3)
    embeddings = mx.array(rng.standard_normal((1, 64, 64, 256)).astype(np.float32))
    boxes = mx.array(np.array([[100, 120, 500, 400], [300, 50, 900, 700]], np.float32))
    targets = (rng.random((2, 256, 256)) < 0.2).astype(np.float32)
    index = mx.zeros((2,), mx.int32)
    dice_only, low = _losses(model, embeddings, index, {"boxes": boxes}, mx.array(targets), False, 0.0)
    weighted, _ = _losses(model, embeddings, index, {"boxes": boxes}, mx.array(targets), False, 7.0)
    x = np.array(low).astype(np.float64)
    p = 1 / (1 + np.exp(-x))
    ce = np.logaddexp(0, x) - x * targets
    pt = np.where(targets > 0, p, 1 - p)
    focal = (np.where(targets > 0, 0.25, 0.75) * (1 - pt) ** 2 * ce).mean(axis=(1, 2))
    np.testing.assert_allclose(np.array(weighted) - np.array(dice_only), 7.0 * focal, rtol=1e-4, atol=1e-6)
    with pytest.raises(TrainingError, match="--focal-weight"):
        train_sam(_config(data / "train", tmp_path / "out", focal_weight=-1.0))
    assert not (tmp_path / "out").exists()
