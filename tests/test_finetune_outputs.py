"""examples/finetune.py --output: checked before training, the trained model never lost (issue 13, item 5)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import mlx_evit
import numpy as np
import pytest
from PIL import Image

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "finetune.py"


@pytest.fixture(scope="module")
def finetune():
    spec = importlib.util.spec_from_file_location("finetune_example_outputs", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def data(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    for c, name in enumerate(("a", "b")):
        (tmp_path / "data" / name).mkdir(parents=True)
        for i in range(3):
            pixels = np.clip(rng.normal(60 + 120 * c, 20, (32, 32, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(tmp_path / "data" / name / f"{i}.png")
    return tmp_path / "data"


def _args(data: Path, out: Path, *extra) -> list[str]:
    return [str(data), "--output", str(out), "--model", "seed", "--image-size", "32", "--epochs", "1",
            "--batch-size", "4", *map(str, extra)]


def _no_training(monkeypatch, finetune):
    def train(*args, **kwargs):
        raise AssertionError("training started before the output was checked")

    monkeypatch.setattr(finetune, "train", train)


def test_non_model_folder_with_force_is_refused_before_training(finetune, data, tmp_path, monkeypatch, capsys):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "thesis.tex").write_text("keep")
    _no_training(monkeypatch, finetune)
    with pytest.raises(SystemExit) as e:
        finetune.main(_args(data, out, "--force"))
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "not an MLX model directory" in err and str(out) in err and "Traceback" not in err
    assert (out / "thesis.tex").read_text() == "keep"


def test_output_holding_the_data_or_being_a_file_is_refused(finetune, data, tmp_path, monkeypatch, capsys):
    _no_training(monkeypatch, finetune)
    (tmp_path / "config.json").write_text(json.dumps({"format": "mlx_evit"}))  # looks like a model folder
    for out, message in ((tmp_path, "input"), (data / "a" / "0.png", "file")):
        with pytest.raises(SystemExit) as e:
            finetune.main(_args(data, out, "--force"))
        assert e.value.code == 2 and message in capsys.readouterr().err
    assert len(list((data / "a").iterdir())) == 3


def test_trained_model_is_kept_when_the_output_cannot_be_written(finetune, data, tmp_path, monkeypatch, capsys):
    out = tmp_path / "model"
    real_train = finetune.train

    def train_then_block(*args, **kwargs):
        accuracy = real_train(*args, **kwargs)
        out.mkdir()
        (out / "notes.txt").write_text("someone else's")  # the target changed while training ran
        return accuracy

    monkeypatch.setattr(finetune, "train", train_then_block)
    with pytest.raises(SystemExit) as e:
        finetune.main(_args(data, out))
    message = str(e.value.code)
    assert "\n" not in message and str(out) in message and "saved the trained model to" in message
    saved = Path(message.split("saved the trained model to ")[1].split()[0].rstrip(";,"))
    assert saved.parent == tmp_path and saved != out
    model = mlx_evit.load(saved)
    assert model.num_classes == 2 and json.loads((saved / "config.json").read_text())["labels"] == ["a", "b"]
    assert (out / "notes.txt").read_text() == "someone else's"
    assert "Traceback" not in capsys.readouterr().err
