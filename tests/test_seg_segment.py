"""Segmenter API, the segment command (label maps, overlays, fractions, safety) and --eval mIoU."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import mlx.core as mx

import mlx_evit
import synthetic
from mlx_evit.cli.segment_command import label_file_for, main, output_names
from mlx_evit.tasks.segmenter import (IGNORE, IoUMeter, Segmenter, SegmenterError, cv2_resize_cubic, get_dataset,
                              input_size_for)

B0 = "efficientvit-seg-b0-cityscapes"
# Cityscapes train id -> label id (cityscapesScripts), written by the test without the package's table.
TRAIN_TO_LABEL_ID = [7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33]


@pytest.fixture(scope="module")
def small_model_dir(tmp_path_factory) -> Path:
    """Synthetic seg-B0 converted, with its config's preprocessing shrunk to 64x128 (a custom model)."""
    root = tmp_path_factory.mktemp("segmodel")
    sd = synthetic.state_dict(synthetic.all_shapes()[B0])
    torch.save({"state_dict": {k: torch.from_numpy(v) for k, v in sd.items()}}, root / "b0.pt")
    mlx_evit.convert(root / "b0.pt", root / "b0")
    config = json.loads((root / "b0" / "config.json").read_text())
    config["pretrained_cfg"]["input_size"] = [3, 64, 128]
    (root / "b0" / "config.json").write_text(json.dumps(config))
    return root / "b0"


@pytest.fixture(scope="module")
def segmenter(small_model_dir):
    return Segmenter(mlx_evit.load(small_model_dir))


def photo(key: str, h: int, w: int) -> np.ndarray:
    return synthetic.synthetic_image(key, h, w)


# ----------------------------------------------------------------------------- library


def test_segmenter_takes_pil_or_arrays_and_returns_image_sized_labels(segmenter):
    img = photo("seg/api", 45, 70)
    result = segmenter(img)
    assert result.labels.shape == (45, 70) and result.labels.dtype == np.uint8
    assert result.input_size == (64, 128) and result.logits.shape == (8, 16, 19)
    same = segmenter(Image.fromarray(img))
    np.testing.assert_array_equal(same.labels, result.labels)
    # The steps, spelled out: cubic resize to the config's size, ImageNet normalisation, model, bicubic, argmax.
    x = cv2_resize_cubic(img, (64, 128)).astype(np.float32) / 255
    x = (x - np.array([0.485, 0.456, 0.406], np.float32)) / np.array([0.229, 0.224, 0.225], np.float32)
    logits = segmenter.model(mx.array(x[None]))
    np.testing.assert_allclose(result.logits, np.asarray(logits[0]), atol=2e-4)
    full = np.asarray(mlx_evit.resize(logits, (45, 70)))[0]
    assert (full.argmax(-1) != result.labels).mean() < 1e-3
    np.testing.assert_allclose(result.resized_logits(), full, atol=2e-4)
    fractions = result.class_fractions()
    assert fractions.shape == (19,) and math.isclose(fractions.sum(), 1.0)
    np.testing.assert_array_equal(result.colorize(), get_dataset("cityscapes").palette[result.labels])
    blend = result.overlay(img, alpha=0.25)
    np.testing.assert_array_equal(blend, (result.colorize() * 0.25 + img * 0.75).astype(np.uint8))
    with pytest.raises(SegmenterError, match="uint8"):
        segmenter(img.astype(np.float32))


def test_input_sizes_follow_the_original_evaluation():
    city = mlx_evit.get_pretrained_cfg("efficientvit_seg_b0_cityscapes").to_dict()
    ade = mlx_evit.get_pretrained_cfg("efficientvit_seg_b1_ade20k").to_dict()
    assert input_size_for(1024, 2048, city) == (1024, 2048) and input_size_for(720, 1280, city) == (1024, 2048)
    assert input_size_for(512, 683, ade) == (512, 704)  # ceil(683 / 512 * 512 / 32) * 32
    assert input_size_for(375, 500, ade) == (512, 704)
    assert input_size_for(800, 600, ade) == (704, 512)
    assert input_size_for(300, 300, ade) == (512, 512)
    assert input_size_for(50, 70, None) == (64, 96)
    assert ade["hf_hub_id"] == "han-cai/efficientvit-seg" and ade["hf_filename"] == "efficientvit_seg_b1_ade20k.pt"


def test_dataset_tables():
    city, ade = get_dataset("cityscapes"), get_dataset("ade20k")
    assert city.num_classes == 19 and ade.num_classes == 150
    assert city.classes[0] == "road" and city.classes[-1] == "bicycle" and ade.classes[0] == "wall"
    assert tuple(city.palette[0]) == (128, 64, 128) and tuple(ade.palette[-1]) == (92, 0, 255)
    ids = np.arange(256).reshape(16, 16)
    train = city.to_train_ids(ids, "x_gtFine_labelIds.png")
    for train_id, label_id in enumerate(TRAIN_TO_LABEL_ID):
        assert train.ravel()[label_id] == train_id
    assert (np.isin(np.arange(256), TRAIN_TO_LABEL_ID) == (train.ravel() != IGNORE)).all()
    np.testing.assert_array_equal(city.to_train_ids(np.array([[0, 18, 19, 255]]), "x_labelTrainIds.png"),
                                  [[0, 18, IGNORE, IGNORE]])
    np.testing.assert_array_equal(ade.to_train_ids(np.array([[0, 1, 150, 151]])), [[IGNORE, 0, 149, IGNORE]])


def test_iou_meter_against_a_direct_count():
    rng = np.random.default_rng(0)
    meter = IoUMeter(5)
    preds, targets = [], []
    for _ in range(3):
        p = rng.integers(0, 5, (20, 30))
        t = np.where(rng.random((20, 30)) < 0.2, IGNORE, rng.integers(0, 4, (20, 30)))
        meter.update(p, t)
        preds.append(p)
        targets.append(t)
    p, t = np.concatenate([a.ravel() for a in preds]), np.concatenate([a.ravel() for a in targets])
    keep = t != IGNORE
    out = meter.summary()
    ious = []
    for c in range(5):
        inter = np.sum((p == c) & (t == c) & keep)
        union = np.sum(((p == c) | (t == c)) & keep)
        assert out["per_class"][c]["iou"] == (inter / union if union else None)
        if union:
            ious.append(inter / union)
    assert math.isclose(out["miou"], np.mean(ious)) and out["classes_present"] == len(ious)
    assert math.isclose(out["pixel_accuracy"], np.sum((p == t) & keep) / keep.sum())


# ----------------------------------------------------------------------------- OpenCV's cubic resize


def _cv2():
    return pytest.importorskip("cv2", reason="opencv-python-headless (test extra) checks the numpy cubic resize")


@pytest.mark.parity
def test_cubic_resize_is_opencvs():
    cv2 = _cv2()
    rng = np.random.default_rng(3)
    ipp_off = ipp_total = 0
    for i in range(24):
        H, W = (int(v) for v in rng.integers(1, 160, 2))
        h, w = (int(v) for v in rng.integers(1, 200, 2))
        img = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
        try:
            cv2.ipp.setUseIPP(False)  # OpenCV's own algorithm: bit-exact
            np.testing.assert_array_equal(cv2_resize_cubic(img, (h, w), "opencv"),
                                          cv2.resize(img, (w, h), interpolation=cv2.INTER_CUBIC))
        finally:
            cv2.ipp.setUseIPP(True)
        ref = cv2.resize(img, (w, h), interpolation=cv2.INTER_CUBIC)  # the default x86 build: IPP
        got = cv2_resize_cubic(img, (h, w))
        assert np.abs(got.astype(int) - ref).max() <= 1
        ipp_off += int((got != ref).sum())
        ipp_total += ref.size
    assert ipp_off <= 1e-4 * ipp_total, ipp_off / ipp_total
    grey = rng.integers(0, 256, (30, 41), dtype=np.uint8)
    assert cv2_resize_cubic(grey, (17, 60)).shape == (17, 60)


# ----------------------------------------------------------------------------- command line


def write_images(folder: Path, count: int, h: int = 45, w: int = 70, suffix: str = ".png") -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = folder / f"img{i}{suffix}"
        Image.fromarray(photo(f"seg/cli/{i}", h, w)).save(path)
        paths.append(path)
    return paths


def run(argv, capsys):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_segment_command_writes_label_maps_overlays_and_fractions(small_model_dir, segmenter, tmp_path, capsys):
    images = write_images(tmp_path / "in", 2)
    out = tmp_path / "out"
    code, _, err = run([*images, "--weights", small_model_dir, "--output-dir", out, "--format", "json",
                        "--alpha", "0.6", "-q"], capsys)
    assert code == 0, err
    for path in images:
        labels = Image.open(out / f"{path.stem}.png")
        assert labels.mode == "P" and labels.size == (70, 45)
        want = segmenter(np.asarray(Image.open(path).convert("RGB")))
        np.testing.assert_array_equal(np.asarray(labels), want.labels)
        palette = np.array(labels.getpalette()[: 19 * 3], np.uint8).reshape(19, 3)
        np.testing.assert_array_equal(palette, get_dataset("cityscapes").palette)
        overlay = np.asarray(Image.open(out / f"{path.stem}_overlay.png"))
        np.testing.assert_array_equal(overlay, want.overlay(np.asarray(Image.open(path).convert("RGB")), 0.6))
        record = json.loads((out / f"{path.stem}.json").read_text())
        fractions = np.array([c["fraction"] for c in record["classes"]])
        np.testing.assert_allclose(fractions, np.bincount(want.labels.ravel(), minlength=19) / want.labels.size)
        assert record["classes"][13]["name"] == "car" and record["file"] == str(path)
    # Nothing is replaced without --force; csv and --no-overlay with it.
    code, _, err = run([images[0], "--weights", small_model_dir, "-o", out, "-q"], capsys)
    assert code == 2 and "--force" in err and len(err.strip().splitlines()) == 1
    code, _, err = run([images[0], "--weights", small_model_dir, "-o", out, "--force", "--format", "csv",
                        "--no-overlay", "-q"], capsys)
    assert code == 0, err
    rows = (out / "img0.csv").read_text().splitlines()
    assert rows[0] == "file,index,class,fraction" and len(rows) == 20


def test_segment_command_safety_and_errors(small_model_dir, tmp_path, capsys):
    images = write_images(tmp_path / "in", 2)
    (tmp_path / "in" / "broken.png").write_bytes(b"not a png")
    # The output folder may not hold an input; checked before the model loads.
    code, _, err = run([tmp_path / "in", "--weights", small_model_dir, "-o", tmp_path / "in", "--force", "-q"],
                       capsys)
    assert code == 2 and "input" in err
    code, _, err = run([*images, "--weights", small_model_dir, "-q"], capsys)
    assert code == 2 and "--output DIR is required" in err
    code, _, err = run([tmp_path / "in", "--weights", small_model_dir, "-o", tmp_path / "o1", "-q"], capsys)
    assert code == 1 and "broken.png" in err
    code, _, err = run([tmp_path / "in", "--weights", small_model_dir, "-o", tmp_path / "o2", "--skip-errors",
                        "-q"], capsys)
    assert code == 0 and "broken.png" in err
    assert sorted(p.name for p in (tmp_path / "o2").iterdir()) == [
        "img0.png", "img0_overlay.png", "img1.png", "img1_overlay.png"]
    link = tmp_path / "link_out"
    link.symlink_to(tmp_path / "real_out")
    (tmp_path / "real_out").mkdir()
    code, _, err = run([images[0], "--weights", small_model_dir, "-o", link, "-q"], capsys)
    assert code == 0 and (tmp_path / "real_out" / "img0.png").is_file() and link.is_symlink()
    code, _, err = run([images[0], "--weights", tmp_path / "missing.pt", "-o", tmp_path / "o3", "-q"], capsys)
    assert code == 2 and "missing.pt" in err and len(err.strip().splitlines()) == 1
    code, _, err = run([images[0], "--model", "efficientvit_seg_b9_cityscapes", "-o", tmp_path / "o4"], capsys)
    assert code == 2 and "unknown model" in err
    assert output_names(["a/x.png", "b/x.jpg", "c/y.png"]) == ["x", "x_2", "y"]


def test_segment_command_reports_a_broken_checkpoint_in_one_line(tmp_path):
    sd = synthetic.state_dict(synthetic.all_shapes()[B0])
    sd["head.input_ops.2.conv.weight"] = np.zeros((32, 16, 1, 1), np.float32)
    torch.save({"state_dict": {k: torch.from_numpy(v) for k, v in sd.items()}}, tmp_path / "bad.pt")
    image = write_images(tmp_path, 1)[0]
    proc = subprocess.run([sys.executable, "-m", "mlx_evit.segment", str(image), "--weights", str(tmp_path / "bad.pt"),
                           "--output-dir", str(tmp_path / "o")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "wrong shape" in lines[0] and "Traceback" not in proc.stderr
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------- evaluation


def expected_report(preds, targets, n: int):
    """IoU per class counted directly from (prediction, ground truth) pairs (ignore = IGNORE)."""
    p = np.concatenate([a.ravel() for a in preds]).astype(int)
    t = np.concatenate([a.ravel() for a in targets]).astype(int)
    keep = t != IGNORE
    iou = {}
    for c in range(n):
        union = int(np.sum(((p == c) | (t == c)) & keep))
        if union:
            iou[c] = np.sum((p == c) & (t == c) & keep) / union
    return iou, np.sum((p == t) & keep) / keep.sum()


def test_eval_cityscapes_layout(small_model_dir, segmenter, tmp_path, capsys):
    """leftImg8bit/<city>/X_leftImg8bit.png with gtFine/<city>/X_gtFine_labelIds.png, labels made from the
    model's own predictions with known changes; the report must equal a direct count."""
    rng = np.random.default_rng(0)
    images_dir, labels_dir = tmp_path / "leftImg8bit" / "val", tmp_path / "gtFine" / "val"
    preds, targets = [], []
    for i, city in enumerate(["aachen", "aachen", "bremen"]):
        img = photo(f"seg/eval/{i}", 40 + 8 * i, 64)
        path = images_dir / city / f"{city}_{i:06d}_000019_leftImg8bit.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(path)
        pred = segmenter(img).labels.astype(int)
        target = pred.copy()
        target[: 10 + i] = rng.integers(0, 19, (10 + i, target.shape[1]))  # wrong in places
        target[-6:, :20] = IGNORE  # void
        label_ids = np.where(target == IGNORE, 0, np.array(TRAIN_TO_LABEL_ID)[np.minimum(target, 18)])
        (labels_dir / city).mkdir(parents=True, exist_ok=True)
        Image.fromarray(label_ids.astype(np.uint8)).save(labels_dir / city / f"{city}_{i:06d}_000019_gtFine_labelIds.png")
        preds.append(pred)
        targets.append(target)
    code, out, err = run(["--eval", images_dir, "--labels-dir", labels_dir, "--weights", small_model_dir,
                          "--report", "json", "--output", tmp_path / "report", "-q"], capsys)
    assert code == 0, err
    report = json.loads(out)
    assert report == {**json.loads((tmp_path / "report" / "summary.json").read_text()), "seconds": report["seconds"]}
    iou, acc = expected_report(preds, targets, 19)
    assert report["images"] == 3 and report["dataset"] == "cityscapes"
    assert math.isclose(report["miou"], float(np.mean(list(iou.values()))), rel_tol=1e-12)
    assert math.isclose(report["pixel_accuracy"], float(acc), rel_tol=1e-12)
    for c in report["per_class"]:
        assert (c["iou"] is None) == (c["index"] not in iou)
        if c["iou"] is not None:
            assert math.isclose(c["iou"], float(iou[c["index"]]), rel_tol=1e-12)
    code, text, _ = run(["--eval", images_dir, "--labels-dir", labels_dir, "--weights", small_model_dir, "-q"],
                        capsys)
    assert code == 0 and f"mIoU            {100 * report['miou']:6.2f}" in text and "road" in text


def test_eval_ade20k_conventions_and_missing_labels(small_model_dir, tmp_path, capsys):
    """ADE20K labels are value - 1 with 0 ignored; an unpaired image stops the run (or is skipped)."""
    # A 150-class model: the synthetic B1-ADE20K checkpoint, at a small short side.
    sd = synthetic.state_dict(synthetic.all_shapes()["efficientvit-seg-b1-ade20k"])
    torch.save({"state_dict": {k: torch.from_numpy(v) for k, v in sd.items()}}, tmp_path / "b1.pt")
    model_dir = tmp_path / "b1"
    mlx_evit.convert(tmp_path / "b1.pt", model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    config["pretrained_cfg"]["input_size"] = [3, 64, 64]
    (model_dir / "config.json").write_text(json.dumps(config))
    seg = Segmenter(mlx_evit.load(model_dir))
    assert seg.input_size(45, 70) == (64, 128)  # short side 64, long side ceil(70 / 45 * 64 / 32) * 32
    images_dir, labels_dir = tmp_path / "images" / "validation", tmp_path / "annotations" / "validation"
    images_dir.mkdir(parents=True)
    labels_dir.mkdir(parents=True)
    preds, targets = [], []
    for i in range(2):
        img = photo(f"seg/ade/{i}", 45, 70)
        Image.fromarray(img).save(images_dir / f"ADE_val_{i:08d}.jpg", quality=95)
        pred = seg(np.asarray(Image.open(images_dir / f"ADE_val_{i:08d}.jpg").convert("RGB"))).labels.astype(int)
        png = pred + 1
        png[:5] = 0  # "other": ignored
        png[5:9, :30] = 7  # class 6
        Image.fromarray(png.astype(np.uint8)).save(labels_dir / f"ADE_val_{i:08d}.png")
        preds.append(pred)
        targets.append(np.where(png == 0, IGNORE, png - 1))
    code, out, err = run(["--eval", images_dir, "--labels-dir", labels_dir, "--weights", model_dir,
                          "--report", "json", "-q"], capsys)
    assert code == 0, err
    report = json.loads(out)
    iou, acc = expected_report(preds, targets, 150)
    assert report["num_classes"] == 150 and report["classes_present"] == len(iou)
    assert math.isclose(report["miou"], float(np.mean(list(iou.values()))), rel_tol=1e-12)
    assert math.isclose(report["pixel_accuracy"], float(acc), rel_tol=1e-12)
    Image.fromarray(photo("seg/ade/x", 40, 40)).save(images_dir / "unpaired.jpg")
    code, _, err = run(["--eval", images_dir, "--labels-dir", labels_dir, "--weights", model_dir, "-q"], capsys)
    assert code == 1 and "unpaired.jpg" in err
    code, out, err = run(["--eval", images_dir, "--labels-dir", labels_dir, "--weights", model_dir,
                          "--skip-errors", "--report", "json", "-q"], capsys)
    assert code == 0 and json.loads(out)["images"] == 2 and "unpaired.jpg" in err
    assert label_file_for(images_dir / "ADE_val_00000000.jpg", images_dir, labels_dir).name == "ADE_val_00000000.png"


def test_example_script(small_model_dir, segmenter, tmp_path):
    image = write_images(tmp_path, 1)[0]
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, str(root / "examples" / "segment_image.py"), str(image),
                           "--weights", str(small_model_dir), "--output", str(tmp_path / "seg.png")],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    want = segmenter(np.asarray(Image.open(image).convert("RGB")))
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "seg.png")), want.colorize())
    assert (tmp_path / "seg_overlay.png").is_file()
    top = int(np.argmax(want.class_fractions()))
    assert proc.stdout.splitlines()[0].endswith(get_dataset("cityscapes").classes[top])


def readme_block(heading: str) -> list[list[str]]:
    """The ``python ...`` commands of the bash block under ``heading`` in README.md (argument lists)."""
    import re
    import shlex

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    section = text[text.index(heading):]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [shlex.split(line)[1:] for line in block.splitlines() if line.startswith("python ")]


@pytest.mark.slow
def test_readme_offline_block_runs_verbatim(tmp_path):
    """The README's segment demo: make the data, segment it, evaluate it (a random-weight model)."""
    commands = readme_block("### Try it offline")
    assert len(commands) == 3 and commands[1][:2] == ["-m", "mlx_evit.segment"]
    (tmp_path / "examples").symlink_to(Path(__file__).resolve().parents[1] / "examples")
    outputs = []
    for argv in commands:
        proc = subprocess.run([sys.executable, *argv], cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, (argv, proc.stderr)
        outputs.append(proc.stdout)
    images = sorted((tmp_path / "seg_demo" / "images").rglob("*_leftImg8bit.png"))
    assert len(images) == 4
    for image in images:
        name = image.stem
        labels = Image.open(tmp_path / "seg_demo" / "out" / f"{name}.png")
        assert labels.mode == "P" and labels.size == Image.open(image).size
        assert (tmp_path / "seg_demo" / "out" / f"{name}_overlay.png").is_file()
        assert (tmp_path / "seg_demo" / "out" / f"{name}.csv").read_text().startswith("file,index,class,fraction")
    report = json.loads(outputs[2])
    assert report["images"] == 4 and report["dataset"] == "cityscapes" and 0.0 <= report["miou"] <= 1.0
    present = {c["name"] for c in report["per_class"] if c["pixels"]}
    assert {"road", "sidewalk", "sky", "car"} <= present  # the demo's labels map to their train ids


def test_segment_is_a_subcommand_of_python_m_mlx_evit(capsys):
    from mlx_evit.cli.commands import main as mlx_evit_main

    assert mlx_evit_main(["segment", "--help"]) == 0
    assert "--labels-dir" in capsys.readouterr().out


def test_a_stopped_segment_run_leaves_no_half_set_of_outputs(small_model_dir, tmp_path, capsys):
    """Issue 25: a run that stops on a bad image removes the files it created; the rerun needs no --force."""
    write_images(tmp_path / "in", 2)
    (tmp_path / "in" / "zz_broken.png").write_bytes(b"not a png")  # after the good ones
    out = tmp_path / "out"
    code, _, err = run([tmp_path / "in", "--weights", small_model_dir, "-o", out, "-q"], capsys)
    assert code == 1 and "zz_broken.png" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
    out.mkdir()  # an existing empty folder stays, empty
    code, _, err = run([tmp_path / "in", "--weights", small_model_dir, "-o", out, "-q"], capsys)
    assert code == 1 and list(out.iterdir()) == []
    (tmp_path / "in" / "zz_broken.png").unlink()
    code, _, err = run([tmp_path / "in", "--weights", small_model_dir, "-o", out, "-q"], capsys)
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["img0.png", "img0_overlay.png", "img1.png", "img1_overlay.png"]
