"""python -m mlx_evit.classify: parity with timm's pipeline, output formats, inputs, errors.

The parity models get random weights (random BatchNorm statistics, head
scaled so that the top classes are well separated) and are written as
checkpoints in several layouts; the CLI's top-5 must equal what timm's own
transform + model give for the same photos.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
from PIL import Image

from mlx_evit.classify import Classifier, ClassifierError, expand_inputs
from mlx_evit.cli.classify_command import CSV_COLUMNS, main
from mlx_evit import convert
from mlx_evit.tasks.labels import imagenet_labels
from reference_models import PHOTOS, PHOTOS_DIR, peaked_timm_model, save_timm_folder, timm_probs

torch.set_num_threads(2)

TOP_K = 5
PROB_ATOL = 1e-4


# ---------------------------------------------------------------- parity with timm

# name, seed, checkpoint kind, how the CLI is run, whether --model is passed. The seeds give top-5
# probabilities at least 5e-4 apart (asserted below), so the order is decided by the model, not by rounding.
PARITY_CASES = {
    "b0-timm-folder": ("efficientvit_b0.r224_in1k", 1, "timm-folder", "module", False),
    "m0-pth": ("efficientvit_m0.r224_in1k", 1, "pth", "script", True),
    "b1r256-mlx-dir": ("efficientvit_b1.r256_in1k", 0, "mlx-dir", "inprocess", False),
    "m4-safetensors": ("efficientvit_m4.r224_in1k", 2, "safetensors", "inprocess", True),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, tuple[Path, np.ndarray]]:
    """Per parity case: (weights path for --weights, timm's probabilities for PHOTOS)."""
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("checkpoints")
    out = {}
    for case, (name, seed, kind, _, _) in PARITY_CASES.items():
        model = peaked_timm_model(name, seed)
        probs = timm_probs(model)
        if kind == "timm-folder":
            path = save_timm_folder(model, root / case)
        elif kind == "pth":
            path = root / f"{case}.pth"
            torch.save(model.state_dict(), path)
        elif kind == "safetensors":
            path = root / f"{case}.safetensors"
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
        else:
            path = root / case
            convert(save_timm_folder(model, root / f"{case}-timm"), path)
        out[case] = (path, probs)
    return out


def _run_cli(how: str, args: list[str], capsys=None) -> tuple[int, str, str]:
    """Run the CLI in-process (``main``), as ``python -m`` or as the console script."""
    if how == "inprocess":
        code = main(args)
        captured = capsys.readouterr()
        return code, captured.out, captured.err
    bindir = Path(sys.executable).parent
    command = [sys.executable, "-m", "mlx_evit.classify"] if how == "module" else [str(bindir / "mlx-evit-classify")]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run(command + args, capture_output=True, text=True, env=env, timeout=300)
    return proc.returncode, proc.stdout, proc.stderr


@pytest.mark.parametrize("case", list(PARITY_CASES))
def test_top5_matches_timm_pipeline(case, checkpoints, capsys):
    from timm.data import ImageNetInfo

    name, _, _, how, pass_model = PARITY_CASES[case]
    weights, expected = checkpoints[case]
    args = [*map(str, PHOTOS), "--weights", str(weights), "--format", "json", "--top-k", str(TOP_K)]
    if pass_model:
        args += ["--model", name]
    code, out, err = _run_cli(how, args, capsys)
    assert code == 0, err
    records = json.loads(out)
    assert [r["file"] for r in records] == [str(p) for p in PHOTOS]
    info = ImageNetInfo()
    for record, probs in zip(records, expected):
        assert record["model"] == name
        order = np.argsort(-probs)[:TOP_K + 1]
        assert np.diff(-probs[order]).min() > 5 * PROB_ATOL, "test setup: near-ties make the top-5 order arbitrary"
        order = order[:TOP_K]
        assert [p["index"] for p in record["top_k"]] == order.tolist()
        got = np.array([p["score"] for p in record["top_k"]])
        np.testing.assert_allclose(got, probs[order], rtol=0, atol=PROB_ATOL)
        # labels: WordNet ids as timm's own ImageNet table has them
        assert [p["wnid"] for p in record["top_k"]] == [info.index_to_label_name(int(i)) for i in order]


# ---------------------------------------------------------------- a small model for the rest


@pytest.fixture(scope="module")
def b0(checkpoints) -> Path:
    return checkpoints["b0-timm-folder"][0]


@pytest.fixture(scope="module")
def ten_class(tmp_path_factory) -> tuple[Path, np.ndarray]:
    """A 10-class fine-tuned M0 as a plain state-dict file, and timm's probabilities."""
    model = peaked_timm_model("efficientvit_m0.r224_in1k", 7, num_classes=10)
    path = tmp_path_factory.mktemp("ten") / "m0_10.pth"
    torch.save(model.state_dict(), path)
    return path, timm_probs(model)


def _json_run(b0: Path, capsys, *extra: str) -> list[dict]:
    code, out, err = _run_cli("inprocess", [*map(str, PHOTOS), "--weights", str(b0), "--format", "json", *extra], capsys)
    assert code == 0, err
    return json.loads(out)


def test_json_fields(b0, capsys):
    records = _json_run(b0, capsys, "--top-k", "3")
    assert len(records) == len(PHOTOS)
    names = {label.index: label for label in imagenet_labels()}
    for record in records:
        assert set(record) == {"file", "model", "top_k"}
        assert len(record["top_k"]) == 3
        scores = [p["score"] for p in record["top_k"]]
        assert scores == sorted(scores, reverse=True) and 0 < sum(scores) <= 1 + 1e-6
        for p in record["top_k"]:
            assert set(p) == {"index", "label", "wnid", "score"}
            assert isinstance(p["index"], int) and isinstance(p["score"], float)
            assert (p["label"], p["wnid"]) == (names[p["index"]].name, names[p["index"]].wnid)


def test_jsonl_csv_text_hold_the_json_results(b0, capsys):
    reference = _json_run(b0, capsys)
    base = [*map(str, PHOTOS), "--weights", str(b0)]

    code, out, err = _run_cli("inprocess", base + ["--format", "jsonl"], capsys)
    assert code == 0, err
    lines = out.splitlines()
    assert [json.loads(line) for line in lines] == reference

    code, out, err = _run_cli("inprocess", base + ["--format", "csv"], capsys)
    assert code == 0, err
    rows = list(csv.DictReader(io.StringIO(out)))
    assert tuple(csv.DictReader(io.StringIO(out)).fieldnames) == CSV_COLUMNS
    assert len(rows) == len(PHOTOS) * TOP_K
    for i, row in enumerate(rows):
        record, rank = reference[i // TOP_K], i % TOP_K
        p = record["top_k"][rank]
        assert (row["file"], row["model"], int(row["rank"])) == (record["file"], record["model"], rank + 1)
        assert (int(row["index"]), row["label"], row["wnid"], float(row["score"])) == (
            p["index"], p["label"], p["wnid"], p["score"])

    code, out, err = _run_cli("inprocess", base, capsys)  # text is the default
    assert code == 0, err
    lines = out.splitlines()
    assert len(lines) == len(PHOTOS) * (TOP_K + 1)
    for i, record in enumerate(reference):
        block = lines[i * (TOP_K + 1) : (i + 1) * (TOP_K + 1)]
        assert block[0] == record["file"]
        for line, p in zip(block[1:], record["top_k"]):
            match = re.fullmatch(r"  +(\d+\.\d)%  (.+)", line)
            assert match, line
            assert match[1] == f"{100 * p['score']:.1f}" and match[2] == p["label"]


def test_output_file_is_written_atomically(b0, capsys, tmp_path):
    target = tmp_path / "results.csv"  # format from the extension
    code, out, err = _run_cli("inprocess", [str(PHOTOS[0]), "--weights", str(b0), "--output", str(target)], capsys)
    assert code == 0, err
    assert out == ""
    rows = list(csv.DictReader(target.open(newline="")))
    assert len(rows) == TOP_K and rows[0]["file"] == str(PHOTOS[0])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.csv"]  # no temporary left behind

    # a failed run (no --skip-errors) leaves the previous file untouched
    before = target.read_bytes()
    bad = tmp_path / "bad.jpg"
    bad.write_text("not an image")
    code, _, err = _run_cli("inprocess", [str(PHOTOS[0]), str(bad), "--weights", str(b0), "-o", str(target),
                                          "--force"], capsys)
    assert code == 1 and "bad.jpg" in err
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jpg", "results.csv"]


def test_labels_file_for_a_fine_tuned_model(ten_class, capsys, tmp_path):
    weights, expected = ten_class
    names = [f"kind {i}" for i in range(10)]
    text = tmp_path / "classes.txt"
    text.write_text("# ten classes\n" + "\n".join(names) + "\n")
    code, out, err = _run_cli("inprocess", [str(PHOTOS[0]), "--weights", str(weights), "--model", "efficientvit_m0",
                                           "--labels", str(text), "--top-k", "50", "-f", "json"], capsys)
    assert code == 0, err
    (record,) = json.loads(out)
    assert len(record["top_k"]) == 10  # capped at the number of classes
    order = np.argsort(-expected[0])
    indices = [p["index"] for p in record["top_k"]]
    assert indices[:3] == order[:3].tolist() and sorted(indices) == list(range(10))  # the tail has near-ties
    assert [p["label"] for p in record["top_k"]] == [names[i] for i in indices]
    assert all(p["wnid"] is None for p in record["top_k"])
    np.testing.assert_allclose([p["score"] for p in record["top_k"]], expected[0][indices], atol=PROB_ATOL)

    as_json = tmp_path / "classes.json"
    as_json.write_text(json.dumps([{"name": n, "wnid": f"w{i}"} for i, n in enumerate(names)]))
    code, out, err = _run_cli("inprocess", [str(PHOTOS[0]), "--weights", str(weights), "--labels", str(as_json),
                                           "-k", "1", "-f", "jsonl"], capsys)
    assert code == 0, err
    top = json.loads(out)["top_k"][0]
    assert (top["label"], top["wnid"]) == (names[order[0]], f"w{order[0]}")

    short = tmp_path / "five.txt"
    short.write_text("\n".join(names[:5]))
    code, out, err = _run_cli("inprocess", [str(PHOTOS[0]), "--weights", str(weights), "--model", "efficientvit_m0",
                                           "--labels", str(short)], capsys)
    assert code == 2 and out == ""
    assert "5 labels" in err and "10 classes" in err and len(err.strip().splitlines()) == 1


def test_labels_from_the_model_config_or_generic(ten_class, capsys, tmp_path):
    from mlx_evit import load, save_model

    weights, expected = ten_class
    top = int(np.argmax(expected[0]))
    names = [f"breed {i}" for i in range(10)]
    folder = save_model(load(weights, model="efficientvit_m0", fuse=False), tmp_path / "named", labels=names)
    for source, label in ((folder, names[top]), (weights, f"class {top}")):
        args = [str(PHOTOS[0]), "--weights", str(source), "--model", "efficientvit_m0", "-k", "1", "-f", "jsonl"]
        code, out, err = _run_cli("inprocess", args, capsys)
        assert code == 0, err
        assert json.loads(out)["top_k"][0] == {"index": top, "label": label, "wnid": None,
                                               "score": pytest.approx(expected[0][top], abs=PROB_ATOL)}


# ---------------------------------------------------------------- bad inputs


def _png_header(width: int, height: int) -> bytes:
    """A tiny PNG file that declares a huge image (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.fixture
def bad_inputs(tmp_path) -> dict[str, Path]:
    good = tmp_path / "good.jpg"
    shutil.copy(PHOTOS_DIR / "rocket.jpg", good)
    text = tmp_path / "notes.jpg"
    text.write_text("this is not a picture\n")
    truncated = tmp_path / "truncated.jpg"
    data = good.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png_header(30000, 30000))
    return {"good": good, "text": text, "truncated": truncated, "bomb": bomb, "missing": tmp_path / "missing.jpg"}


EXPECTED_MESSAGES = {
    "text": "not an image file",
    "truncated": "cannot decode image",
    "bomb": "too large",
    "missing": "no such file",
}


def test_bad_inputs_are_reported_and_skipped(b0, bad_inputs, capsys):
    order = ["text", "good", "truncated", "missing", "bomb"]
    args = [str(bad_inputs[k]) for k in order] + ["--weights", str(b0), "--skip-errors", "-f", "jsonl", "-b", "2"]
    code, out, err = _run_cli("inprocess", args, capsys)
    assert code == 0, err
    records = [json.loads(line) for line in out.splitlines()]
    assert [r["file"] for r in records if "top_k" in r] == [str(bad_inputs["good"])]
    # the failures are records too (issue 13), the missing file first (found before the model runs)
    failed = [r["file"] for r in records if "error" in r]
    assert failed == [str(bad_inputs[k]) for k in ("missing", "text", "truncated", "bomb")]
    lines = err.strip().splitlines()
    assert "Traceback" not in err
    for key, message in EXPECTED_MESSAGES.items():
        (line,) = [line for line in lines if str(bad_inputs[key]) in line]
        assert message in line, line
    assert len(lines) == len(EXPECTED_MESSAGES)


@pytest.mark.parametrize("bad", ["text", "truncated", "bomb", "missing"])
def test_bad_input_without_skip_errors_fails(b0, bad_inputs, bad, capsys):
    args = [str(bad_inputs["good"]), str(bad_inputs[bad]), str(bad_inputs["good"]), "--weights", str(b0), "-f", "jsonl"]
    code, out, err = _run_cli("inprocess", args, capsys)
    assert code == 1
    assert EXPECTED_MESSAGES[bad] in err and str(bad_inputs[bad]) in err and "Traceback" not in err
    # stops at the bad file, which is the last record (a missing one is caught before loading the model)
    records = [json.loads(line) for line in out.splitlines()]
    assert len(records) <= 2 and records[-1]["file"] == str(bad_inputs[bad]) and "error" in records[-1]


def test_only_bad_inputs_with_skip_errors_fail(b0, bad_inputs, capsys):
    code, out, err = _run_cli("inprocess", [str(bad_inputs["text"]), "--weights", str(b0), "--skip-errors"], capsys)
    assert code == 1 and out == "" and "not an image file" in err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "efficientvit_b9"], "unknown model 'efficientvit_b9'"),
        (["--weights", "{tmp}/nowhere.safetensors"], "nowhere.safetensors"),
        (["--weights", "{tmp}/garbage.pth"], "garbage.pth"),
        (["--weights", "{b0}", "--model", "efficientvit_m1.r224_in1k"], "efficientvit_b0"),
        (["--weights", "{b0}", "--labels", "{tmp}/none.txt"], "none.txt"),
        (["--weights", "{b0}", "--output", "{tmp}/no/such/dir/out.json"], "does not exist"),
        (["--top-k", "0"], "--top-k"),
        (["--format", "xml"], "--format"),
    ],
)
def test_usage_and_model_errors(b0, tmp_path, capsys, args, message):
    (tmp_path / "garbage.pth").write_bytes(b"\x00" * 100)
    args = [a.format(tmp=tmp_path, b0=b0) for a in args]
    with_image = [str(PHOTOS[0]), *args]
    try:
        code = main(with_image)
    except SystemExit as e:  # argparse's own usage errors
        code = e.code
    out, err = capsys.readouterr()
    assert code == 2
    assert out == "" and message in err and "Traceback" not in err
    assert len([line for line in err.splitlines() if ": error:" in line]) == 1, err


# ---------------------------------------------------------------- inputs, progress, library


def test_expand_inputs(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "deep").mkdir()
    (tmp_path / ".hidden").mkdir()
    for rel in ["a/1.jpg", "a/2.PNG", "a/notes.txt", "a/.3.jpg", "a/deep/4.webp", ".hidden/5.jpg", "6.jpeg"]:
        (tmp_path / rel).write_bytes(b"")
    (tmp_path / "empty").mkdir()
    t = str(tmp_path)

    files, problems = expand_inputs([f"{t}/a"])
    assert files == [f"{t}/a/1.jpg", f"{t}/a/2.PNG"] and not problems
    files, _ = expand_inputs([f"{t}/a"], recursive=True)
    assert files == [f"{t}/a/1.jpg", f"{t}/a/2.PNG", f"{t}/a/deep/4.webp"]
    files, _ = expand_inputs([f"{t}/a/*.jpg", f"{t}/a/1.jpg", f"{t}/a/notes.txt"])
    assert files == [f"{t}/a/1.jpg", f"{t}/a/notes.txt"]  # no repeats; an explicit file is always tried
    files, _ = expand_inputs([f"{t}/**/*.webp"], recursive=True)
    assert files == [f"{t}/a/deep/4.webp"]
    files, problems = expand_inputs([f"{t}/empty", f"{t}/*.gif", f"{t}/gone.jpg", f"{t}/6.jpeg"])
    assert files == [f"{t}/6.jpeg"]
    assert [p.file for p in problems] == [f"{t}/empty", f"{t}/*.gif", f"{t}/gone.jpg"]
    assert "--recursive" in problems[0].message and "no image files match" in problems[1].message
    assert "no such file" in problems[2].message


def test_progress_goes_to_stderr_for_text_only(b0, capsys):
    args = [*map(str, PHOTOS), "--weights", str(b0), "--batch-size", "1"]
    code, out, err = _run_cli("inprocess", args, capsys)
    assert code == 0
    assert [line.split(" (")[0] for line in err.splitlines()] == [
        f"classified {i}/{len(PHOTOS)} images" for i in range(1, len(PHOTOS) + 1)]
    for extra in (["--quiet"], ["--format", "json"]):  # quiet; machine-readable stdout, stderr not a terminal
        code, out, err = _run_cli("inprocess", args + extra, capsys)
        assert code == 0 and err == ""


def test_library_api(b0):
    clf = Classifier.load(weights=b0)
    assert clf.name == "efficientvit_b0.r224_in1k"
    images = [Image.open(p) for p in PHOTOS]
    direct = clf.classify(images, top_k=3)
    streamed = list(clf.classify_files(PHOTOS, top_k=3, batch_size=2))
    assert [r.file for r in streamed] == [str(p) for p in PHOTOS]
    for a, b in zip(direct, streamed):
        assert [p.index for p in a] == [p.index for p in b.top_k]
        np.testing.assert_allclose([p.score for p in a], [p.score for p in b.top_k], atol=1e-5)  # other batching
    probs = clf.probabilities(np.stack([clf.transform(im) for im in images]))
    assert probs.shape == (len(PHOTOS), 1000) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
    with pytest.raises(ValueError, match="top_k"):
        clf.top_k(probs, 0)
    with pytest.raises(ClassifierError, match="3 labels but the model has 1000"):
        Classifier(clf.model, labels=["a", "b", "c"])


@pytest.fixture(scope="module")
def plain_b0(tmp_path_factory) -> Path:
    """B0 with random weights and random BatchNorm statistics only (well conditioned, unlike the peaked models)."""
    import timm
    from torch_utils import randomize_

    model = randomize_(timm.create_model("efficientvit_b0.r224_in1k", pretrained=False), 3)
    return save_timm_folder(model, tmp_path_factory.mktemp("plain") / "b0")


def test_half_precision_dtypes(plain_b0):
    """--dtype runs the model in half precision; log-probabilities stay within 0.05 of float32's.

    (Their spread over the classes is ~0.37 for this model, so a wrong cast cannot pass.)
    """
    reference = Classifier.load(weights=plain_b0)
    pixels = np.stack([reference.transform(p) for p in PHOTOS[:1]])
    expected = np.log(reference.probabilities(pixels))
    assert expected.std() > 0.2
    for dtype, name in (("float16", mx.float16), ("bfloat16", mx.bfloat16)):
        clf = Classifier.load(weights=plain_b0, dtype=dtype)
        assert clf.dtype == name
        got = clf.probabilities(pixels)
        assert got.dtype == np.float32
        np.testing.assert_allclose(got.sum(-1), 1.0, atol=1e-5)
        assert np.abs(np.log(got) - expected).max() < 0.05
