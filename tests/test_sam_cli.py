"""EfficientViT-SAM checkpoints (original .pt files, MLX folders, broken and hostile files) and the CLI.

Real PyTorch files are built here: the synthetic L0 state dict, ``torch.save``-d
bare and wrapped in ``{"state_dict": ...}`` as the released files may be.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import zipfile

import numpy as np
import pytest
from PIL import Image

import mlx_evit

import synthetic
from mlx_evit.models.registry import build_model
from mlx_evit.sam import EfficientViTSam, SamPredictor
from mlx_evit.models.keymap import load_state_dict

torch = pytest.importorskip("torch")
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd()] + sys.path))


@pytest.fixture(scope="module")
def l0_state():
    return synthetic.state_dict(synthetic.keys_file("efficientvit-sam-l0"))


@pytest.fixture(scope="module")
def l0_files(tmp_path_factory, l0_state):
    d = tmp_path_factory.mktemp("sam_ckpt")
    tensors = {k: torch.from_numpy(v) for k, v in l0_state.items()}
    torch.save(tensors, d / "efficientvit_sam_l0.pt")
    torch.save({"state_dict": tensors}, d / "wrapped.pt")
    return d


def run(*args, cwd=None):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=ENV, cwd=cwd, timeout=600)


def one_line_error(result) -> str:
    err = result.stderr.strip()
    assert result.returncode != 0 and "Traceback" not in err, err
    lines = err.splitlines()
    assert len([l for l in lines if "error" in l]) == 1, err
    return err


# ---------------------------------------------------------------------------
# Conversion
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["efficientvit_sam_l0.pt", "wrapped.pt"])
def test_original_pt_loads_with_detection(l0_files, l0_state, name):
    net = mlx_evit.load(l0_files / name, fuse=False)
    assert isinstance(net, EfficientViTSam) and net.arch_name == "efficientvit_sam_l0"
    assert net.image_size == 512
    up = np.asarray(net.mask_decoder.output_upscaling[3].weight)
    np.testing.assert_array_equal(up, l0_state["mask_decoder.output_upscaling.3.weight"].transpose(1, 2, 3, 0))
    g = np.asarray(net.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix)
    np.testing.assert_array_equal(g, l0_state["prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"])
    var = np.asarray(net.image_encoder.neck.middle.op_list[2].main.spatial_conv.norm.running_var)
    np.testing.assert_array_equal(var, l0_state["image_encoder.neck.middle.op_list.2.main.spatial_conv.norm.running_var"])


def test_convert_cli_round_trip(l0_files, l0_state, tmp_path):
    out = tmp_path / "l0_mlx"
    r = run("-m", "mlx_evit", "convert", str(l0_files / "wrapped.pt"), str(out))
    assert r.returncode == 0, r.stderr
    assert "efficientvit_sam_l0" in r.stdout + r.stderr
    net = mlx_evit.load(out, fuse=False)
    assert isinstance(net, EfficientViTSam)
    ref = build_model("efficientvit_sam_l0")
    load_state_dict(ref, l0_state)
    from mlx.utils import tree_flatten

    ours = dict(tree_flatten(net.parameters()))
    for k, v in tree_flatten(ref.parameters()):
        np.testing.assert_array_equal(np.asarray(ours[k]), np.asarray(v), err_msg=k)
    assert not run("-m", "mlx_evit", "convert", str(l0_files / "wrapped.pt"), str(out)).returncode == 0  # no --force


# ---------------------------------------------------------------------------
# Broken and hostile checkpoints: one-line errors
# ---------------------------------------------------------------------------


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > pwned.txt",))


def _broken_files(d, state):
    tensors = {k: torch.from_numpy(v) for k, v in state.items()}
    files = {}
    shaped = dict(tensors)
    shaped["mask_decoder.output_upscaling.0.weight"] = torch.zeros(64, 256, 2, 2)  # not (256, 64, 2, 2)
    torch.save(shaped, d / "wrong_shape.pt")
    files["wrong_shape.pt"] = "output_upscaling.0.weight"
    missing = {k: v for k, v in tensors.items() if not k.startswith("mask_decoder.iou_prediction_head")}
    torch.save(missing, d / "missing.pt")
    files["missing.pt"] = "iou_prediction_head"
    torch.save(tensors, d / "full.pt")
    data = (d / "full.pt").read_bytes()
    (d / "truncated.pt").write_bytes(data[: len(data) // 3])
    files["truncated.pt"] = "truncated.pt"
    with zipfile.ZipFile(d / "evil.pt", "w") as z:
        z.writestr("evil/data.pkl", pickle.dumps({"state_dict": _Evil()}, protocol=2))
        z.writestr("evil/version", "3\n")
    files["evil.pt"] = "evil.pt"
    return files


@pytest.fixture(scope="module")
def broken(tmp_path_factory, l0_state):
    d = tmp_path_factory.mktemp("sam_broken")
    return d, _broken_files(d, l0_state)


def test_broken_checkpoints_raise_clear_errors(broken):
    d, files = broken
    for name, needle in files.items():
        with pytest.raises((ValueError, OSError)) as e:
            mlx_evit.load(d / name, model="efficientvit_sam_l0")
        message = str(e.value)
        assert needle in message, (name, message)
        assert "\n" not in message.strip() or name in ("wrong_shape.pt", "missing.pt"), (name, message)
    assert not (d / "pwned.txt").exists() and not os.path.exists("pwned.txt")


@pytest.mark.slow
def test_cli_broken_weights_one_line(broken, tmp_path):
    d, files = broken
    image = tmp_path / "img.png"
    Image.fromarray(np.zeros((40, 60, 3), np.uint8)).save(image)
    for name, needle in files.items():
        r = run("-m", "mlx_evit.sam", str(image), "--point", "10,10", "--weights", str(d / name),
                "-o", str(tmp_path / "out"), cwd=tmp_path)
        err = one_line_error(r)
        assert r.returncode == 2 and needle in err, (name, err)
    assert not (tmp_path / "pwned.txt").exists()
    # A classifier's checkpoint is not a SAM model.
    cls = build_model("efficientvit_b0")
    mlx_evit.save_model(cls, tmp_path / "b0")
    r = run("-m", "mlx_evit.sam", str(image), "--point", "10,10", "--weights", str(tmp_path / "b0"),
            "-o", str(tmp_path / "out"))
    assert "holds efficientvit_b0, a classification model, not a SAM model" in one_line_error(r)


# ---------------------------------------------------------------------------
# CLI end to end (an L0 saved with a 128 encoder size keeps it fast)
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_model_dir(tmp_path_factory, l0_state):
    d = tmp_path_factory.mktemp("sam_small") / "l0_128"
    net = build_model("efficientvit_sam_l0", image_size=128)
    load_state_dict(net, l0_state)
    mlx_evit.save_model(net, d)
    return d


def test_cli_prompts_end_to_end(small_model_dir, tmp_path):
    rgb = synthetic.synthetic_image("input/test_sam_cli/image", 75, 110)
    image = tmp_path / "photo.png"
    Image.fromarray(rgb).save(image)
    out = tmp_path / "out"
    args = ["-m", "mlx_evit.sam", str(image), "--point", "50,30", "--point", "10,60,0", "--box", "5,5,100,70",
            "--multimask", "--weights", str(small_model_dir), "-o", str(out)]
    r = run(*args)
    assert r.returncode == 0, r.stderr
    report = json.loads((out / "photo.json").read_text())
    assert report["model"] == "efficientvit_sam_l0" and report["size"] == [75, 110]
    assert len(report["masks"]) == 3 and report["prompts"][0]["labels"] == [1, 0]
    net = mlx_evit.load(small_model_dir)
    p = SamPredictor(net)
    p.set_image(rgb)
    masks, iou, _ = p.predict(np.array([[50, 30], [10, 60]]), np.array([1, 0]), np.array([5, 5, 100, 70]))
    for k, entry in enumerate(report["masks"]):
        png = np.asarray(Image.open(out / entry["file"])) > 0
        assert (png != masks[k]).mean() <= 1e-3
        assert entry["predicted_iou"] == pytest.approx(float(iou[k]), abs=1e-4)
        assert entry["area"] == int(png.sum())
    overlay = np.asarray(Image.open(out / "photo_overlay.png"))
    assert overlay.shape == (75, 110, 3) and not np.array_equal(overlay, rgb)

    # Existing outputs are not replaced without --force; the input is never an output.
    r = run(*args)
    assert r.returncode == 2 and "--force" in one_line_error(r)
    assert run(*args, "--force").returncode == 0
    r = run("-m", "mlx_evit.sam", str(image), "--point", "1,1", "--weights", str(small_model_dir),
            "-o", str(tmp_path), "--force")
    assert r.returncode == 2 and "input" in one_line_error(r)

    # Several boxes: one batch, one result per box.
    r = run("-m", "mlx_evit.sam", str(image), "--box", "5,5,50,50", "--box", "40,10,100,70",
            "--weights", str(small_model_dir), "-o", str(tmp_path / "boxes"))
    assert r.returncode == 0, r.stderr
    report = json.loads((tmp_path / "boxes" / "photo.json").read_text())
    assert [m["prompt"] for m in report["masks"]] == [0, 1]


def test_cli_everything(small_model_dir, tmp_path):
    rgb = synthetic.synthetic_image("input/test_sam_cli/everything", 64, 96)
    image = tmp_path / "scene.png"
    Image.fromarray(rgb).save(image)
    r = run("-m", "mlx_evit.sam", str(image), "--everything", "--points-per-side", "4", "--pred-iou-thresh", "0",
            "--stability-thresh", "0", "--weights", str(small_model_dir), "-o", str(tmp_path / "all"))
    assert r.returncode == 0, r.stderr
    report = json.loads((tmp_path / "all" / "scene.json").read_text())
    assert report["mode"] == "everything" and report["masks"]
    for entry in report["masks"]:
        assert {"bbox", "area", "predicted_iou", "stability_score", "point_coords", "crop_box"} <= set(entry)
        png = np.asarray(Image.open(tmp_path / "all" / entry["file"])) > 0
        assert int(png.sum()) == entry["area"]


def test_cli_usage_errors(tmp_path):
    image = tmp_path / "x.png"
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(image)
    cases = [
        (["--point", "1,2,7"], "label"),
        (["--box", "5,5,1,1"], "X0 < X1"),
        (["--box", "5,5,5,9"], "non-zero area"),
        (["--box", "-5,0,9,9"], "not inside the 30x20 image"),
        (["--point", "-5,10"], "outside"),
        (["--point", "1,1", "--points-per-side", "8"], "only with --everything"),
        ([], "no prompt"),
        (["--everything", "--point", "1,1"], "--everything"),
        (["--point", "500,2"], "outside"),
        (["--point", "1,1", "--model", "efficientvit_b0"], "a classification model; this command takes SAM models"),
    ]
    for extra, needle in cases:
        r = run("-m", "mlx_evit.sam", str(image), *extra, "-o", str(tmp_path / "o"))
        assert r.returncode == 2 and needle in r.stderr, (extra, r.stderr)
        assert "Traceback" not in r.stderr
    r = run("-m", "mlx_evit.sam", str(tmp_path / "missing.png"), "--point", "1,1", "-o", str(tmp_path / "o"))
    assert r.returncode == 1 and "missing.png" in r.stderr


def test_cli_offline_without_cache_says_what_to_download(tmp_path):
    image = tmp_path / "x.png"
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(image)
    env = dict(ENV, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), MLX_EVIT_CACHE=str(tmp_path / "cache"))
    r = subprocess.run([sys.executable, "-m", "mlx_evit.sam", str(image), "--point", "1,1", "--model",
                        "efficientvit_sam_xl0", "-o", str(tmp_path / "o")], capture_output=True, text=True, env=env)
    err = one_line_error(r)
    assert r.returncode == 2 and "mit-han-lab/efficientvit-sam efficientvit_sam_xl0.pt" in err, err


@pytest.mark.slow
def test_cli_hub_download_once_then_offline(l0_files, tmp_path):
    """Without --weights the released file comes from the Hub (fake, local), converted once and cached."""
    from fake_hub import FakeHub

    data = (l0_files / "efficientvit_sam_l0.pt").read_bytes()
    image = tmp_path / "x.png"
    Image.fromarray(synthetic.synthetic_image("input/test_sam_cli/hub", 40, 60)).save(image)
    hub = FakeHub().start()
    try:
        commit = hub.publish("mit-han-lab/efficientvit-sam", {"efficientvit_sam_l0.pt": data})
        env = {k: v for k, v in ENV.items() if not k.startswith(("HF_", "HUGGINGFACE_", "MLX_EVIT_"))
               and "proxy" not in k.lower()}
        env.update(HF_HOME=str(tmp_path / "hf"), HF_ENDPOINT=hub.endpoint, NO_PROXY="127.0.0.1,localhost",
                   HF_HUB_DISABLE_TELEMETRY="1")
        args = [sys.executable, "-m", "mlx_evit.sam", str(image), "--point", "30,20"]
        first = subprocess.run(args + ["-o", str(tmp_path / "a")], capture_output=True, text=True, env=env)
        assert first.returncode == 0, first.stderr
        assert "converting" in first.stderr and (tmp_path / "a" / "x_mask0.png").exists()
        assert any(p.endswith("/efficientvit_sam_l0.pt") for _, m, p, _ in hub.requests if m == "GET")
        env["HF_HUB_OFFLINE"] = "1"
        second = subprocess.run(args + ["-o", str(tmp_path / "b")], capture_output=True, text=True, env=env)
        assert second.returncode == 0, second.stderr
        assert "converting" not in second.stderr
        same = [np.asarray(Image.open(tmp_path / d / "x_mask0.png")) for d in ("a", "b")]
        np.testing.assert_array_equal(*same)
        assert commit
    finally:
        hub.stop()
