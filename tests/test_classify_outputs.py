"""python -m mlx_evit.classify: --output never destroys data, failures are records (issue 13, items 3-4).

A tiny random seed model (32 px, 3 classes) stands in for a real one: these
tests are about where and what the command writes, not about accuracy.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import mlx_evit
import pytest

from mlx_evit.cli.classify_command import main

PHOTOS_DIR = Path(__file__).resolve().parent / "data" / "images"
PHOTO = sorted(p for p in PHOTOS_DIR.iterdir() if p.suffix in (".png", ".jpg"))[0]
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    model = mlx_evit.create_model(
        "efficientvit_seed", num_classes=3, embed_dim=16, depths=(1, 1, 1), num_heads=(1, 1, 2),
        image_size=32, patch_size=4,
    )
    model.pretrained_cfg = dict(input_size=(3, 32, 32), interpolation="bilinear", mean=MEAN, std=STD, crop_pct=1.0)
    return mlx_evit.save_model(model, tmp_path_factory.mktemp("seed") / "model", labels=["cat", "dog", "eel"])


@pytest.fixture
def photos(tmp_path) -> dict[str, Path]:
    good = tmp_path / "good.jpg"
    shutil.copy(PHOTO, good)
    bad = tmp_path / "bad.jpg"
    bad.write_text("not a picture\n")
    return {"good": good, "bad": bad, "missing": tmp_path / "missing.jpg"}


def run(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ---------------------------------------------------------------- item 3: where results go


def test_dash_means_stdout(weights, photos, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    code, out, err = run(capsys, photos["good"], "-w", weights, "-o", "-", "-f", "json")
    assert code == 0, err
    assert json.loads(out)[0]["file"] == str(photos["good"])
    assert not os.path.lexists(tmp_path / "-")


def test_dev_stdout_is_not_replaced(weights, photos, capsys):
    before = os.lstat("/dev/stdout")
    code, out, err = run(capsys, photos["good"], "-w", weights, "-o", "/dev/stdout", "-f", "jsonl")
    assert code == 0, err
    assert json.loads(out)["file"] == str(photos["good"])
    after = os.lstat("/dev/stdout")
    assert stat.S_ISLNK(after.st_mode) and after.st_ino == before.st_ino


def test_dev_stdout_in_a_subprocess_goes_to_the_pipe(weights, photos):
    command = [sys.executable, "-m", "mlx_evit.classify", str(photos["good"]), "-w", str(weights),
               "-o", "/dev/stdout", "-f", "jsonl", "-q"]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["file"] == str(photos["good"])
    assert os.path.islink("/dev/stdout")


def test_symlink_is_written_through(weights, photos, capsys, tmp_path):
    real = tmp_path / "kept" / "results.csv"
    real.parent.mkdir()
    real.write_text("old\n")
    link = tmp_path / "link.csv"
    link.symlink_to(real)
    code, out, err = run(capsys, photos["good"], "-w", weights, "-o", link)
    assert code == 2 and "--force" in err and real.read_text() == "old\n"  # replaced only with --force (issue 25)
    code, out, err = run(capsys, photos["good"], "-w", weights, "-o", link, "--force")
    assert code == 0, err
    assert link.is_symlink() and os.readlink(link) == str(real)
    rows = list(csv.DictReader(real.open(newline="")))
    assert rows[0]["file"] == str(photos["good"])


def test_device_is_written_not_replaced(weights, photos, capsys, tmp_path):
    link = tmp_path / "null.json"
    link.symlink_to("/dev/null")
    node = tmp_path / "null-node"
    try:
        os.mknod(node, 0o666 | stat.S_IFCHR, os.makedev(1, 3))  # the null device
    except OSError:
        node = None
    for target in filter(None, (link, node)):
        code, out, err = run(capsys, photos["good"], "-w", weights, "-o", target, "-f", "json")
        assert code == 0, err
    assert link.is_symlink() and os.readlink(link) == "/dev/null"
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)
    if node is not None:
        assert stat.S_ISCHR(os.lstat(node).st_mode)


@pytest.mark.parametrize("how", ["same", "hardlink", "symlink"])
def test_an_input_is_never_overwritten(weights, photos, capsys, tmp_path, how):
    victim = photos["good"]
    original = victim.read_bytes()
    target = victim
    if how == "hardlink":
        target = tmp_path / "out.txt"
        os.link(victim, target)
    elif how == "symlink":
        target = tmp_path / "out.txt"
        target.symlink_to(victim)
    code, out, err = run(capsys, victim, "-w", weights, "-o", target)
    assert code == 2
    assert "input" in err and str(target) in err and "Traceback" not in err
    assert victim.read_bytes() == original


def test_output_is_checked_before_loading_the_model(photos, capsys, tmp_path):
    code, _, err = run(capsys, photos["good"], "-w", tmp_path / "no-such-model", "-o", photos["good"])
    assert code == 2
    assert "input" in err and "no-such-model" not in err  # the output was refused first


def test_replaced_output_keeps_mode_and_hard_links(weights, photos, capsys, tmp_path):
    out = tmp_path / "results.txt"
    out.write_text("old\n")
    os.chmod(out, 0o600)
    other = tmp_path / "other-name.txt"
    os.link(out, other)
    code, _, err = run(capsys, photos["good"], "-w", weights, "-o", out, "--force")
    assert code == 0, err
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert out.stat().st_nlink == 2 and other.read_text() == out.read_text()
    assert str(photos["good"]) in other.read_text()
    os.unlink(other)
    code, _, err = run(capsys, photos["good"], "-w", weights, "-o", out, "-f", "json", "--force")
    assert code == 0, err
    assert stat.S_IMODE(out.stat().st_mode) == 0o600 and json.loads(out.read_text())


# ---------------------------------------------------------------- item 4: failures are records


def _records(fmt: str, text: str) -> list[dict]:
    if fmt == "json":
        return json.loads(text)
    if fmt == "jsonl":
        return [json.loads(line) for line in text.splitlines()]
    rows = list(csv.DictReader(io.StringIO(text)))
    assert rows and list(rows[0]) == ["file", "model", "rank", "index", "label", "wnid", "score", "error"]
    out = []
    for row in rows:
        if row["error"]:
            assert row["rank"] == row["score"] == ""
            out.append({"file": row["file"], "error": row["error"]})
        elif row["rank"] == "1":
            out.append({"file": row["file"], "top_k": [row]})
    return out


@pytest.mark.parametrize("fmt", ["json", "jsonl", "csv"])
@pytest.mark.parametrize("to_file", [False, True], ids=["stdout", "file"])
def test_failures_are_records_with_skip_errors(weights, photos, capsys, tmp_path, fmt, to_file):
    args = [photos["good"], photos["bad"], photos["missing"], photos["good"].with_name("good2.jpg"), "-w", weights,
            "-f", fmt, "--skip-errors", "-b", "1"]
    shutil.copy(photos["good"], photos["good"].with_name("good2.jpg"))
    out_file = tmp_path / f"results.{fmt}"
    code, out, err = run(capsys, *args, *(["-o", out_file] if to_file else []))
    assert code == 0, err
    records = _records(fmt, out_file.read_text() if to_file else out)
    by_file = {r["file"]: r for r in records}
    assert len(records) == 4 and len(by_file) == 4
    assert "not an image" in by_file[str(photos["bad"])]["error"]
    assert "no such file" in by_file[str(photos["missing"])]["error"]
    assert "top_k" in by_file[str(photos["good"])] and "error" not in by_file[str(photos["good"])]
    # failures are still reported on stderr
    assert str(photos["bad"]) in err and str(photos["missing"]) in err


@pytest.mark.parametrize("fmt", ["json", "jsonl", "csv"])
def test_a_failure_without_skip_errors_is_the_last_record(weights, photos, capsys, fmt):
    code, out, err = run(capsys, photos["good"], photos["bad"], photos["good"], "-w", weights, "-f", fmt, "-b", "1")
    assert code == 1 and str(photos["bad"]) in err
    records = _records(fmt, out)  # json: a valid document, not nothing
    assert [r["file"] for r in records] == [str(photos["good"]), str(photos["bad"])]
    assert "error" in records[-1] and "top_k" in records[0]


def test_missing_input_without_skip_errors_is_valid_json(weights, photos, capsys):
    code, out, err = run(capsys, photos["good"], photos["missing"], "-w", weights, "-f", "json")
    assert code == 1 and "no such file" in err
    (record,) = json.loads(out)
    assert record["file"] == str(photos["missing"]) and "no such file" in record["error"]


def test_a_stopped_run_leaves_the_output_file(weights, photos, capsys, tmp_path):
    out = tmp_path / "results.json"
    out.write_text("[]\n")
    code, _, _ = run(capsys, photos["good"], photos["bad"], "-w", weights, "-o", out, "--force")
    assert code == 1 and out.read_text() == "[]\n"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
