"""``python -m mlx_evit export``: the exported functions, followed from export.json alone, give the library's outputs.

SAM L0 (at 512) and Seg B0 with synthetic weights are exported by the command; a subprocess that
imports only ``mlx.core`` and ``numpy`` reads ``export.json``, does the preprocessing and prompt
encoding it describes, runs the files, and must reproduce :class:`~mlx_evit.sam.SamPredictor`'s
embeddings, low-resolution masks (single and multimask) and IoU predictions, and
:class:`~mlx_evit.segment.Segmenter`'s logits, to 1e-5 relative. The C++ SAM app
(``examples/sam_app``) is built and run from its README and must give SamPredictor's masks.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import mlx_evit
import mlx.core as mx

import synthetic
from mlx_evit.models.keymap import load_state_dict
from mlx_evit.models.registry import build_model
from mlx_evit.outputs import OutputError
from mlx_evit.sam import SamPredictor
from mlx_evit.tasks.app_export import ExportError, export_model, relative_error
from mlx_evit.tasks.segmenter import Segmenter

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT)] + sys.path))
RTOL = 1e-5


def run(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=ENV, cwd=cwd, timeout=1200)


@pytest.fixture(scope="module")
def l0_dir(tmp_path_factory) -> Path:
    net = build_model("efficientvit_sam_l0")
    load_state_dict(net, synthetic.state_dict(synthetic.keys_file("efficientvit-sam-l0")))
    return mlx_evit.save_model(net, tmp_path_factory.mktemp("sam") / "l0")


@pytest.fixture(scope="module")
def sam_export(l0_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sam_export") / "l0_app"
    r = run("-m", "mlx_evit", "export", str(l0_dir), str(out), "--points", "2,3")
    assert r.returncode == 0, r.stderr
    assert "image_encoder.mlxfn" in r.stdout and "prompt_decoder_3.mlxfn" in r.stdout
    return out


@pytest.fixture(scope="module")
def predictor(l0_dir) -> SamPredictor:
    return SamPredictor(mlx_evit.load(l0_dir), compile=False)


# What an app does, written from export.json alone: only mlx.core, numpy and json.
SAM_APP = r"""
import json, sys
import numpy as np
import mlx.core as mx
folder, image_file, prompts_file, out_file = sys.argv[1:5]
spec = json.load(open(folder + "/export.json"))
steps = {s["step"]: s for s in spec["preprocessing"]}
S = spec["functions"]["image_encoder"]["inputs"][0]["shape"][1]
rgb = np.load(image_file)
h, w = rgb.shape[:2]
assert steps["resize"]["rule"] == "long_side" and max(h, w) == steps["resize"]["size"] == S  # no resize needed
norm = steps["normalize"]
x = (rgb.astype(np.float32) / np.float32(255) - np.float32(norm["mean"])) / np.float32(norm["std"])
padded = np.zeros((1, S, S, 3), np.float32)
padded[0, :h, :w] = x
encoder = mx.import_function(folder + "/" + spec["functions"]["image_encoder"]["file"])
(embeddings,) = encoder(mx.array(padded))
frame = spec["prompts"]["frame"]
nh, nw = int(h * (frame / max(h, w)) + 0.5), int(w * (frame / max(h, w)) + 0.5)
decoders = {f["points"]: f for f in spec["functions"].values() if "points" in f}
out = {"embeddings": np.array(embeddings)}
for k, prompt in enumerate(json.load(open(prompts_file))):
    coords = [[px * (nw / w), py * (nh / h)] for px, py in prompt["points"]]
    labels = list(prompt["labels"])
    if prompt.get("box"):
        x0, y0, x1, y1 = prompt["box"]
        coords += [[x0 * (nw / w), y0 * (nh / h)], [x1 * (nw / w), y1 * (nh / h)]]
        labels += [2, 3]
    else:
        coords.append([0.0, 0.0])
        labels.append(-1)
    decoder = decoders[len(labels)]
    low = decoder["inputs"][3]["shape"][1]
    mask = np.zeros((1, low, low, 1), np.float32) if prompt.get("mask") is None else np.load(prompt["mask"])
    fn = mx.import_function(folder + "/" + decoder["file"])
    masks, iou = fn(embeddings, mx.array(np.float32(coords)[None]), mx.array(np.float32(labels)[None]),
                    mx.array(mask), mx.array(np.float32([prompt.get("mask") is not None])))
    out[f"masks{k}"], out[f"iou{k}"] = np.array(masks), np.array(iou)
assert not [m for m in sys.modules if m.startswith(("mlx_evit", "PIL", "torch"))]
np.savez(out_file, **out)
"""


def test_sam_export_json_describes_the_functions(sam_export):
    spec = json.loads((sam_export / "export.json").read_text())
    assert spec["mlx_version"] == mx.__version__ and spec["family"] == "sam"
    assert sorted(spec["functions"]) == ["image_encoder", "prompt_decoder_2", "prompt_decoder_3"]
    enc = spec["functions"]["image_encoder"]
    assert enc["inputs"] == [{"name": "image", "shape": [1, 512, 512, 3], "dtype": "float32"}]
    assert enc["outputs"] == [{"name": "image_embeddings", "shape": [1, 64, 64, 256], "dtype": "float32"}]
    dec = spec["functions"]["prompt_decoder_3"]
    assert dec["points"] == 3
    assert [(i["name"], i["shape"]) for i in dec["inputs"]] == [
        ("image_embeddings", [1, 64, 64, 256]), ("point_coords", [1, 3, 2]), ("point_labels", [1, 3]),
        ("mask_input", [1, 256, 256, 1]), ("has_mask_input", [1])]
    assert [(o["name"], o["shape"]) for o in dec["outputs"]] == [("masks", [1, 4, 256, 256]),
                                                                 ("iou_predictions", [1, 4])]
    steps = {s["step"]: s for s in spec["preprocessing"]}
    assert steps["resize"]["interpolation"] == "pillow_bilinear" and steps["pad"]["value"] == 0.0
    assert steps["normalize"]["mean"] == pytest.approx([0.485, 0.456, 0.406])
    assert spec["prompts"]["frame"] == 1024
    assert {s["step"] for s in spec["postprocessing"]} >= {"upscale", "crop", "resize", "threshold"}
    assert all(0 <= e <= RTOL for e in spec["check"]["max_relative_error"].values()), spec["check"]
    assert sorted(p.name for p in sam_export.iterdir()) == ["check.safetensors", "export.json", "image_encoder.mlxfn",
                                                          "prompt_decoder_2.mlxfn", "prompt_decoder_3.mlxfn"]
    examples = mx.load(str(sam_export / "check.safetensors"))  # one call per function, the library's answers
    assert examples["prompt_decoder_3/masks"].shape == (1, 4, 256, 256) and examples["image/rgb"].dtype == mx.uint8
    (embeddings,) = mx.import_function(str(sam_export / "image_encoder.mlxfn"))(examples["image_encoder/image"])
    assert relative_error(np.array(embeddings), np.array(examples["image_encoder/image_embeddings"])) <= RTOL


def test_sam_export_reproduces_the_predictor_from_export_json_alone(sam_export, predictor, tmp_path):
    rgb = synthetic.synthetic_image("input/test_export/sam", 384, 512)
    np.save(tmp_path / "image.npy", rgb)
    predictor.set_image(rgb)
    _, _, first = predictor.predict(np.array([[300.0, 200.0]]), np.array([1]), multimask_output=False)
    np.save(tmp_path / "mask.npy", first[0][None, :, :, None])
    prompts = [
        {"points": [[300.0, 200.0]], "labels": [1]},  # one click (+ padding point): N = 2
        {"points": [], "labels": [], "box": [50.0, 40.0, 400.0, 300.0]},  # a box: N = 2
        {"points": [[300.0, 200.0], [120.5, 330.25]], "labels": [1, 0]},  # two clicks: N = 3
        {"points": [[120.5, 330.25]], "labels": [0], "box": [50.0, 40.0, 400.0, 300.0]},  # click + box: N = 3
        {"points": [[300.0, 200.0]], "labels": [1], "mask": str(tmp_path / "mask.npy")},  # with a mask input
    ]
    (tmp_path / "prompts.json").write_text(json.dumps(prompts))
    r = subprocess.run([sys.executable, "-I", "-c", SAM_APP, str(sam_export), str(tmp_path / "image.npy"),
                        str(tmp_path / "prompts.json"), str(tmp_path / "out.npz")],
                       capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stderr
    got = np.load(tmp_path / "out.npz")

    assert relative_error(got["embeddings"], np.array(predictor.get_image_embedding())) <= RTOL
    for k, p in enumerate(prompts):
        args = dict(point_coords=np.array(p["points"]).reshape(-1, 2) if p["points"] else None,
                    point_labels=np.array(p["labels"]) if p["points"] else None,
                    box=np.array(p["box"]) if p.get("box") else None,
                    mask_input=first if p.get("mask") else None)
        _, iou1, low1 = predictor.predict(**args, multimask_output=False)
        _, iou3, low3 = predictor.predict(**args, multimask_output=True)
        masks, iou = got[f"masks{k}"], got[f"iou{k}"]
        assert masks.shape == (1, 4, 256, 256) and iou.shape == (1, 4)
        assert relative_error(masks[0, :1], low1) <= RTOL, k
        assert relative_error(masks[0, 1:], low3) <= RTOL, k
        assert relative_error(iou[0, :1], iou1) <= RTOL and relative_error(iou[0, 1:], iou3) <= RTOL, k
        assert not np.allclose(masks[0, 0], masks[0, 1], atol=1e-3)  # four different masks, not one repeated
    assert relative_error(got["masks4"], got["masks0"]) > 1e-3  # the mask input changed the answer


# ------------------------------------------------------------------------------------------ segmentation

SEG_APP = r"""
import json, sys
import numpy as np
import mlx.core as mx
folder, image_file, out_file = sys.argv[1:4]
spec = json.load(open(folder + "/export.json"))
steps = {s["step"]: s for s in spec["preprocessing"]}
fn = spec["functions"]["model"]
rgb = np.load(image_file)
assert list(rgb.shape[:2]) == steps["resize"]["size"] == fn["inputs"][0]["shape"][1:3]  # no resize needed
m = np.float32(steps["normalize"]["mean"]) * np.float32(255)
r = np.float32(1) / (np.float32(steps["normalize"]["std"]) * np.float32(255))
x = ((rgb.astype(np.float32) - m) * r)[None]
(logits,) = mx.import_function(folder + "/" + fn["file"])(mx.array(x))
assert not [m for m in sys.modules if m.startswith(("mlx_evit", "PIL", "torch"))]
np.save(out_file, np.array(logits))
"""


def test_seg_export_reproduces_the_segmenter_from_export_json_alone(tmp_path):
    net = build_model("efficientvit_seg_b0_cityscapes")
    load_state_dict(net, synthetic.state_dict(synthetic.all_shapes()["efficientvit-seg-b0-cityscapes"]))
    model_dir = mlx_evit.save_model(net, tmp_path / "seg_b0")
    out = tmp_path / "seg_app"
    r = run("-m", "mlx_evit", "export", str(model_dir), str(out), "--image-size", "128x256")
    assert r.returncode == 0, r.stderr
    spec = json.loads((out / "export.json").read_text())
    assert spec["functions"]["model"]["outputs"] == [{"name": "logits", "shape": [1, 16, 32, 19], "dtype": "float32"}]
    seg = Segmenter(mlx_evit.load(model_dir), preprocess={"input_size": (3, 128, 256), "crop_mode": "resize"})
    assert spec["classes"] == list(seg.classes) and spec["palette"] == seg.palette.tolist()

    rgb = synthetic.synthetic_image("input/test_export/seg", 128, 256)
    np.save(tmp_path / "image.npy", rgb)
    r = subprocess.run([sys.executable, "-I", "-c", SEG_APP, str(out), str(tmp_path / "image.npy"),
                        str(tmp_path / "logits.npy")], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    expected = seg(rgb).logits
    assert relative_error(np.load(tmp_path / "logits.npy")[0], expected) <= RTOL


# ------------------------------------------------------------------------------------------ library, errors


@pytest.fixture(scope="module")
def b0_model_dir(tmp_path_factory) -> Path:
    mx.random.seed(5)
    return mlx_evit.save_model(mlx_evit.create_model("efficientvit_b0.r224_in1k"),
                               tmp_path_factory.mktemp("b0") / "b0")


@pytest.mark.parametrize("options", [dict(), dict(dtype="float16"), dict(quantize=8)])
def test_classification_export_checks_itself(b0_model_dir, tmp_path, options):
    out = export_model(b0_model_dir, tmp_path / "app", image_size=32, batch_size=2, **options)
    spec = json.loads((out / "export.json").read_text())
    assert spec["family"] == "classification" and spec["dtype"] == options.get("dtype", "float32")
    assert spec["functions"]["model"]["inputs"][0]["shape"] == [2, 32, 32, 3]
    assert 0 <= spec["check"]["max_relative_error"]["model"] <= spec["check"]["tolerance"]


def test_an_export_that_does_not_reproduce_the_library_is_not_written(b0_model_dir, tmp_path, monkeypatch):
    real = mx.export_function

    def perturbed(path, fn, *args, **kwargs):  # the exported function is 0.1% off the library's
        return real(path, lambda *a: tuple(o * 1.001 for o in fn(*a)), *args, **kwargs)

    monkeypatch.setattr(mx, "export_function", perturbed)
    with pytest.raises(ExportError, match="do not reproduce the library"):
        export_model(b0_model_dir, tmp_path / "app", image_size=32)
    assert not (tmp_path / "app").exists() and list(tmp_path.iterdir()) == []


def test_outputs_are_checked_first_and_replaced_only_with_force(b0_model_dir, tmp_path):
    out = export_model(b0_model_dir, tmp_path / "app", image_size=32)
    with pytest.raises(OutputError, match="--force"):
        export_model(b0_model_dir, out, image_size=32)
    before = (out / "export.json").read_text()
    export_model(b0_model_dir, out, image_size=48, force=True)
    assert (out / "export.json").read_text() != before
    with pytest.raises(OutputError, match="input"):  # never into the model's own folder
        export_model(b0_model_dir, b0_model_dir, force=True)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="not an mlx_evit export folder"):
        export_model(b0_model_dir, tmp_path / "other", force=True)
    with pytest.raises(ExportError, match="points applies to Segment Anything"):
        export_model(b0_model_dir, tmp_path / "app", image_size=32, points=(2,), force=True)


@pytest.mark.parametrize("args, status, message", [
    (["--points", "0"], 2, "positive"),
    (["--image-size", "big"], 2, "SIZE or HxW"),
    (["--quantize", "8"], 1, "quantize applies to classification and segmentation"),
    (["--batch-size", "2"], 1, "batch_size must be 1"),
    (["--image-size", "512x256"], 1, "square"),
])
def test_cli_errors_are_one_line(l0_dir, tmp_path, args, status, message):
    r = run("-m", "mlx_evit", "export", str(l0_dir), str(tmp_path / "out"), "-q", *args)
    assert r.returncode == status and message in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------ C++ app

SAM_APP_DIR = ROOT / "examples" / "sam_app"


def _mlx_dir() -> Path:
    return Path(mx.__file__).parent


@pytest.mark.skipif(shutil.which("c++") is None or not (_mlx_dir() / "include" / "mlx" / "mlx.h").is_file(),
                    reason="needs a C++ compiler and the MLX headers of the mlx wheel")
def test_cpp_sam_app_from_its_readme_gives_the_predictor_masks(l0_dir, tmp_path):
    # The same L0 at encoder size 128 (the app reads S from export.json): MLX's bundled BLAS, which the
    # C++ program uses, is slow, and the 230x300 photo then goes through Pillow's downscaling filter.
    sam_export = export_model(l0_dir, tmp_path / "l0_128", image_size=128, points=(2, 3))
    model = mlx_evit.load(l0_dir)
    model.image_size = 128
    predictor = SamPredictor(model, compile=False)
    block = re.search(r"```bash\n(.*?)```", (SAM_APP_DIR / "README.md").read_text(encoding="utf-8"), re.S).group(1)
    lines = block.splitlines()
    (tmp_path / "examples").symlink_to(ROOT / "examples", target_is_directory=True)
    build = next(line for line in lines if line.startswith("c++ "))
    subprocess.run(shlex.split(build.replace("$MLX", str(_mlx_dir()))), cwd=tmp_path, check=True, timeout=600)
    rgb = synthetic.synthetic_image("input/test_export/cpp", 230, 300)
    Image.fromarray(rgb).save(tmp_path / "photo.ppm")
    predictor.set_image(rgb)
    runs = [shlex.split(line) for line in lines if line.startswith("./sam_app ")]
    assert len(runs) == 2
    for args in runs:
        args = [str(sam_export) if a == "sam_l0" else a for a in args]
        args = args + ["--logits", "logits.npy"] if "--logits" not in args else args
        proc = subprocess.run([str(tmp_path / "sam_app"), *args[1:]], cwd=tmp_path, capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, proc.stderr
        report = json.loads(proc.stdout)
        clicks = [[float(v) for v in args[i + 1].split(",")] for i, a in enumerate(args) if a == "--point"]
        box = [np.array([float(v) for v in args[i + 1].split(",")]) for i, a in enumerate(args) if a == "--box"]
        multimask = "--multimask" in args
        logits, iou, _ = predictor.predict(np.array([c[:2] for c in clicks]),
                                           np.array([int(c[2]) if len(c) > 2 else 1 for c in clicks]),
                                           box=box[0] if box else None, multimask_output=multimask,
                                           return_logits=True)
        k = int(np.argmax(iou)) if multimask else 0
        assert report["mask"] == (k + 1 if multimask else 0) and report["points"] == len(clicks) + (2 if box else 1)
        assert report["iou"] == pytest.approx(float(iou[k]), rel=1e-4, abs=1e-5)
        got = np.load(tmp_path / args[args.index("--logits") + 1])
        assert got.shape == (230, 300) and relative_error(got, logits[k]) <= RTOL
        png = np.asarray(Image.open(tmp_path / args[3]))
        expected = logits[k] > 0
        assert png.dtype == np.uint8 and set(np.unique(png)) <= {0, 255}
        # Same pixels, except where the logit is within float32 round-off of the threshold (a handful).
        clear = np.abs(logits[k]) > RTOL * np.abs(logits[k]).max()
        assert np.array_equal((png > 0)[clear], expected[clear]) and (~clear).mean() < 1e-3
        assert 0 < expected.sum() < expected.size and report["area"] == int((png > 0).sum())
