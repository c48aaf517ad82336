"""convert OUT_DIR / save_model: the output folder never destroys data (issue 13, item 3)."""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import mlx_evit
import pytest

from mlx_evit.errors import ConversionError

from mlx_evit import convert

from mlx_evit.cli.convert_command import main


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A small seed model as an MLX model directory (a valid convert SRC)."""
    model = mlx_evit.create_model(
        "efficientvit_seed", num_classes=3, embed_dim=16, depths=(1, 1, 1), num_heads=(1, 1, 2),
        image_size=32, patch_size=4,
    )
    return mlx_evit.save_model(model, tmp_path_factory.mktemp("tiny") / "model")


def _model_dir(path: Path, src: Path) -> Path:
    shutil.copytree(src, path)
    return path


def test_source_inside_the_replaced_folder_is_refused(tiny, tmp_path, capsys):
    out = _model_dir(tmp_path / "out", tiny)
    src = out / "original.safetensors"
    shutil.copy(tiny / "model.safetensors", src)
    assert main([str(src), str(out), "--force", "-q"]) == 2  # output refused: usage (issue 25)
    err = capsys.readouterr().err
    assert "input" in err and str(out) in err and len(err.strip().splitlines()) == 1
    assert src.exists()  # before: --force replaced the folder and deleted the source


def test_converting_a_folder_onto_itself_is_refused(tiny, tmp_path):
    out = _model_dir(tmp_path / "m", tiny)
    with pytest.raises(ConversionError, match="input"):
        convert(out, out, force=True)
    assert (out / "model.safetensors").exists()


def test_symlinked_out_dir_is_written_through(tiny, tmp_path):
    real = _model_dir(tmp_path / "real", tiny)
    link = tmp_path / "link"
    link.symlink_to(real)
    convert(tiny, link, force=True, dtype="float16")
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert json.loads((real / "config.json").read_text())["dtype"] == "float16"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]


def test_replaced_out_dir_keeps_its_mode(tiny, tmp_path):
    out = _model_dir(tmp_path / "out", tiny)
    os.chmod(out, 0o700)
    convert(tiny, out, force=True)
    assert stat.S_IMODE(out.stat().st_mode) == 0o700


def test_save_model_refuses_a_non_model_folder_and_files(tmp_path):
    model = mlx_evit.create_model("efficientvit_seed", num_classes=2, embed_dim=16, depths=(1, 1, 1),
                                  num_heads=(1, 1, 2), image_size=32, patch_size=4)
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep")
    with pytest.raises(ConversionError, match="not an MLX model directory"):
        mlx_evit.save_model(model, precious, force=True)
    (tmp_path / "file").write_text("keep")
    with pytest.raises(ConversionError, match="file"):
        mlx_evit.save_model(model, tmp_path / "file", force=True)
    assert (precious / "notes.txt").read_text() == "keep" and (tmp_path / "file").read_text() == "keep"
