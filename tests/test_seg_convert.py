"""Original EfficientViT-Seg checkpoints (.pt): detection, conversion CLI, mlx_evit.load, Hub, hostile files."""

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

import mlx.core as mx

import mlx_evit
import synthetic
from precision import tol
from mlx_evit.cli.convert_command import main as convert_main

FIXTURE = "seg_b0_city_128x128"
B0 = "efficientvit_seg_b0_cityscapes"


def b0_state() -> dict[str, np.ndarray]:
    """The synthetic seg-b0-cityscapes state dict (int64 num_batches_tracked included), as the fixture's .pt."""
    return synthetic.state_dict(synthetic.all_shapes()["efficientvit-seg-b0-cityscapes"])


def save(obj, path: Path) -> Path:
    torch.save(obj, path)
    return path


def torch_dict(state):
    return {k: torch.from_numpy(v) for k, v in state.items()}


@pytest.fixture(scope="module")
def b0_pt(tmp_path_factory) -> Path:
    """``torch.save({"state_dict": sd})``: the layout of the released files and of the fixture's .pt."""
    return save({"state_dict": torch_dict(b0_state())}, tmp_path_factory.mktemp("seg") / "efficientvit_seg_b0.pt")


def fixture_logits(model) -> tuple[np.ndarray, np.ndarray]:
    ref = synthetic.fixture(FIXTURE)
    x = synthetic.synthetic_normal(f"input/{FIXTURE}/x", (1, 3, 128, 128))
    return np.asarray(model(mx.array(synthetic.nhwc(x)))), synthetic.nhwc(ref["logits"])


def assert_fixture(model):
    got, ref = fixture_logits(model)
    assert np.abs(got - ref).max() <= tol(1e-5) * np.abs(ref).max()


@pytest.mark.parity
def test_cli_converts_the_original_file_and_reproduces_the_fixture(b0_pt, tmp_path, capsys):
    out = tmp_path / "b0"
    assert convert_main([str(b0_pt), str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"{B0}.r1024x2048" in printed and "mit-han-lab seg (B series)" in printed and "706,691" in printed
    model = mlx_evit.load(out)
    assert model.arch_name == B0 and model.pretrained_cfg["dataset"] == "cityscapes"
    assert model.pretrained_cfg["hf_filename"] == "efficientvit_seg_b0_cityscapes.pt"
    assert_fixture(model)
    # --model verifies; the wrong variant is a one-line error naming the file and what it looks like.
    assert convert_main([str(b0_pt), str(tmp_path / "v"), "--model", B0, "-q"]) == 0
    assert convert_main([str(b0_pt), str(tmp_path / "w"), "--model", "efficientvit_seg_b1_cityscapes", "-q"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(b0_pt) in err[0] and B0 in err[0]
    assert not (tmp_path / "w").exists()


@pytest.mark.parity
def test_load_reads_bare_and_wrapped_files_directly(b0_pt, tmp_path):
    bare = save(torch_dict(b0_state()), tmp_path / "bare.pt")
    for path in (b0_pt, bare):
        model = mlx_evit.load(path, fuse=False)
        assert model.arch_name == B0 and model.num_classes == 19
        assert_fixture(model)
    half = mlx_evit.load(b0_pt, dtype="float16")
    got, ref = fixture_logits(half)
    assert np.abs(got.astype(np.float32) - ref).max() <= 2e-2 * np.abs(ref).max()


def test_every_variant_is_detected_from_its_keys(tmp_path):
    from mlx_evit.loading.identify import detect_model

    shapes = synthetic.all_shapes()
    for name in ("efficientvit-seg-b1-ade20k", "efficientvit-seg-b1-cityscapes", "efficientvit-seg-l2-cityscapes",
                 "efficientvit-seg-l2-ade20k"):
        state = {k: np.zeros(s, np.float32 if d == "float32" else np.int64) for k, (s, d) in shapes[name].items()}
        assert detect_model(state) == name.replace("-", "_")


def test_custom_class_count_is_taken_from_the_checkpoint(tmp_path):
    """A fine-tuned head with 7 classes: detected as the variant with num_classes=7."""
    state = b0_state()
    state["head.output_ops.0.op_list.1.conv.weight"] = state["head.output_ops.0.op_list.1.conv.weight"][:7]
    state["head.output_ops.0.op_list.1.conv.bias"] = state["head.output_ops.0.op_list.1.conv.bias"][:7]
    model = mlx_evit.load(save({"state_dict": torch_dict(state)}, tmp_path / "c7.pt"))
    assert model.num_classes == 7 and model(mx.zeros((1, 64, 64, 3))).shape == (1, 8, 8, 7)


class _Payload:
    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def broken_checkpoints(tmp_path: Path, marker: Path) -> dict[str, tuple[Path, str]]:
    state = b0_state()
    good = save({"state_dict": torch_dict(state)}, tmp_path / "good.pt")
    missing = dict(state)
    del missing["head.middle.op_list.0.main.depth_conv.conv.weight"]
    wrong = dict(state)
    wrong["head.input_ops.2.conv.weight"] = np.zeros((32, 16, 1, 1), np.float32)
    extra = dict(state, **{"head.output_ops.0.op_list.2.conv.weight": np.zeros((19, 19, 1, 1), np.float32)})
    hostile = {"state_dict": torch_dict(state), "optimizer": _Payload(os.system, f"touch {marker}")}
    return {
        "hostile": (save(hostile, tmp_path / "hostile.pt"), "refus"),
        "hostile_plain": (_write(tmp_path / "plain.pt", pickle.dumps({"state_dict": _Payload(os.system, "true")})),
                          "refus"),
        "truncated": (_write(tmp_path / "trunc.pt", good.read_bytes()[:5000]), "corrupt or truncated"),
        "missing": (save({"state_dict": torch_dict(missing)}, tmp_path / "missing.pt"), "missing"),
        "wrong_shape": (save({"state_dict": torch_dict(wrong)}, tmp_path / "wrong.pt"), "wrong shape"),
        "extra": (save({"state_dict": torch_dict(extra)}, tmp_path / "extra.pt"), "unexpected"),
    }


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_hostile_and_broken_seg_checkpoints_get_one_line_errors(tmp_path, capsys):
    marker = tmp_path / "marker"
    for case, (path, problem) in broken_checkpoints(tmp_path, marker).items():
        assert convert_main([str(path), str(tmp_path / f"out_{case}"), "-q"]) == 1, case
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "Traceback" not in err[0], (case, err)
        assert problem in err[0] and str(path) in err[0], (case, err[0])
        assert not (tmp_path / f"out_{case}").exists()
        with pytest.raises(Exception) as info:
            mlx_evit.load(path)
        assert "\n" not in str(info.value).strip() and str(path) in str(info.value), case
    assert not marker.exists()


def test_hub_download_of_the_released_file(tmp_path, monkeypatch, b0_pt):
    """``load(name)`` fetches han-cai/efficientvit-seg/<name>.pt once, converts and caches it; offline uses it."""
    from huggingface_hub import constants

    from fake_hub import FakeHub
    from mlx_evit.loading.hub import CACHE_ENV, HubError
    from mlx_evit.loading.pipeline import pretrained_dir

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "mlx"))
    hub = FakeHub().start()
    try:
        with pytest.raises(HubError, match="no such repository"):
            pretrained_dir(B0, endpoint=hub.endpoint)
        commit = hub.publish("han-cai/efficientvit-seg", {"efficientvit_seg_b0_cityscapes.pt": b0_pt.read_bytes()})
        converted = pretrained_dir(B0, endpoint=hub.endpoint)
        assert converted.name == commit and "efficientvit_seg_b0_cityscapes" in str(converted)
        with pytest.raises(HubError, match="no such file"):
            pretrained_dir("efficientvit_seg_b1_ade20k", endpoint=hub.endpoint)
    finally:
        hub.stop()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    model = mlx_evit.load(B0)
    assert model.arch_name == B0
    assert_fixture(model)
    with pytest.raises(HubError, match="not cached and offline mode") as info:
        pretrained_dir("efficientvit_seg_l1_cityscapes")
    assert "hf download han-cai/efficientvit-seg efficientvit_seg_l1_cityscapes.pt" in str(info.value)
