"""python -m mlx_evit.evaluate and mlx_evit.tasks.evaluation, on one process.

The accuracy figures are checked on held-out digits (examples/make_digits.py)
with a seed model fine-tuned on them (examples/finetune.py): the test
computes every image's top classes through the Python API (``mlx_evit.load``,
the model's eval transform, softmax) and derives the expected top-1, top-k,
per-class accuracies and confusion matrix itself. Class mapping rules and
the metrics' arithmetic are tested on their own; distributed runs are in
test_distributed.py.
"""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import mlx_evit  # before mlx.core
from mlx_evit.tasks.evaluation import (Dataset, Evaluation, EvaluationError, find_dataset, map_classes,
                               read_class_map)
from mlx_evit.tasks.labels import Label, imagenet_labels
from mlx_evit.tasks.transforms import eval_transform

import mlx.core as mx

ROOT = Path(__file__).resolve().parents[1]
PER_CLASS_TRAIN = 12


def run(args: list[str], check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)
    if check and proc.returncode != 0:
        pytest.fail(f"python {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def evaluate_cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return run(["-m", "mlx_evit.evaluate", *map(str, args)], check=check)


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> tuple[Path, Path]:
    """(held-out test folder, fine-tuned model): 3 digits, 12 training images each, 2 epochs at 32 px."""
    pytest.importorskip("sklearn")
    spec = __import__("importlib.util").util.spec_from_file_location("make_digits", ROOT / "examples/make_digits.py")
    make_digits = __import__("importlib.util").util.module_from_spec(spec)
    spec.loader.exec_module(make_digits)
    base = tmp_path_factory.mktemp("digits")
    make_digits.write_digits(base / "all", classes=3, test=10)
    train = base / "train"
    for folder in sorted((base / "all" / "train").iterdir()):
        (train / folder.name).mkdir(parents=True)
        for image in sorted(folder.iterdir())[:PER_CLASS_TRAIN]:
            shutil.copy(image, train / folder.name)
    model = base / "model"
    run(["examples/finetune.py", str(train), "--output", str(model), "--model", "seed", "--image-size", "32",
         "--epochs", "2", "--batch-size", "8"])
    return base / "all" / "test", model


def expected_predictions(data: Path, model_dir: Path) -> dict[str, tuple[str, list[int], np.ndarray]]:
    """file (relative) -> (true folder, class indices by score, probabilities), through the Python API."""
    model = mlx_evit.load(model_dir)
    transform = eval_transform(model.pretrained_cfg)
    files = sorted(p for p in data.rglob("*.png"))
    probs = np.array(mx.softmax(model(mx.array(np.stack([transform(f) for f in files]))), axis=-1))
    return {f.relative_to(data).as_posix(): (f.parent.name, list(np.argsort(-p, kind="stable")), p)
            for f, p in zip(files, probs)}


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


# ------------------------------------------------------------------------------------------ accuracy


def test_accuracy_figures_match_the_python_api(digits, tmp_path):
    data, model_dir = digits
    out = tmp_path / "report"
    proc = evaluate_cli(data, "--weights", model_dir, "--output", out, "--batch-size", "7")
    labels = mlx_evit.load(model_dir).labels
    expected = expected_predictions(data, model_dir)
    assert len(expected) == 30
    truth = {f: labels.index(folder) for f, (folder, _, _) in expected.items()}
    top1 = {f: order[0] == truth[f] for f, (_, order, _) in expected.items()}
    top3 = {f: truth[f] in order[:3] for f, (_, order, _) in expected.items()}
    assert 0.5 <= np.mean(list(top1.values())) < 1.0, "the model should be good but not perfect"

    summary = json.loads((out / "summary.json").read_text())
    assert summary["images"] == summary["evaluated"] == 30 and summary["skipped"] == 0
    assert summary["top_k"] == 3  # three classes
    assert summary["top1"] == pytest.approx(np.mean(list(top1.values())))
    assert summary["top5"] == pytest.approx(np.mean(list(top3.values()))) == 1.0
    per_class = {row["class"]: row for row in summary["per_class"]}
    for folder in ("zero", "one", "two"):
        mine = [f for f, (d, _, _) in expected.items() if d == folder]
        assert per_class[folder]["images"] == 10
        assert per_class[folder]["index"] == labels.index(folder)
        assert per_class[folder]["top1"] == pytest.approx(np.mean([top1[f] for f in mine]))
    assert summary["mean_per_class_accuracy"] == pytest.approx(np.mean([r["top1"] for r in per_class.values()]))
    assert summary["ranks"] == 1 and summary["images_per_second"] > 0 and summary["batch_size"] == 7

    rows = read_csv(out / "predictions.csv")
    assert [r["file"] for r in rows] == sorted(expected)
    for row in rows:
        folder, order, probs = expected[row["file"]]
        assert row["true_class"] == folder and int(row["true_index"]) == labels.index(folder)
        assert int(row["top1_correct"]) == top1[row["file"]]
        assert [int(row[f"pred{k}_index"]) for k in (1, 2, 3)] == order[:3]
        assert [row[f"pred{k}_label"] for k in (1, 2, 3)] == [labels[i] for i in order[:3]]
        assert [float(row[f"pred{k}_score"]) for k in (1, 2, 3)] == pytest.approx(probs[order[:3]], abs=1e-6)
        assert "pred4_index" not in row

    with open(out / "confusion.csv", newline="") as f:
        table = list(csv.reader(f))
    assert table[0] == ["true \\ predicted", "one", "two", "zero"]  # the model has no other classes
    counts = {r[0]: [int(c) for c in r[1:]] for r in table[1:]}
    columns = table[0][1:]
    for folder in columns:
        predicted = [labels[expected[f][1][0]] for f in expected if expected[f][0] == folder]
        assert counts[folder] == [predicted.count(c) for c in columns]
    assert "1 rank" in proc.stdout and "evaluated 30 images" in proc.stdout
    assert f"top-1 {100 * summary['top1']:.1f}%" in proc.stdout
    assert "read 30/30 images on 1 rank" in proc.stderr  # progress (not a terminal: plain lines)
    # --format json: the summary on stdout is what summary.json holds (issue 25); -q: nothing on stderr
    proc = evaluate_cli(data, "--weights", model_dir, "--format", "json", "-q", "--batch-size", "7")
    printed = json.loads(proc.stdout)
    assert {k: v for k, v in printed.items() if k not in ("seconds", "images_per_second")} == {
        k: v for k, v in summary.items() if k not in ("seconds", "images_per_second")}
    assert "read " not in proc.stderr and "evaluated" not in proc.stderr


# ------------------------------------------------------------------------------------------ class mapping


def test_folders_map_by_wordnet_id_name_synonym_and_class_map(tmp_path):
    labels = imagenet_labels()
    tabby = next(label for label in labels if label.name == "tabby")
    shark = next(label for label in labels if label.name == "great white shark")
    folders = [tabby.wnid, "Great_White_Shark", "tabby cat", "kitty"]
    assert map_classes(folders[:2], labels) == (tabby.index, shark.index)
    # "tabby cat" is a WordNet synonym of tabby (in its description); a second folder may not claim it.
    with pytest.raises(EvaluationError, match=r"folders mapped to the same class: n02123045, tabby cat -> 281"):
        map_classes([tabby.wnid, "tabby cat"], labels)
    with pytest.raises(EvaluationError) as e:
        map_classes(folders + ["crane", "zzz"], labels)
    message = str(e.value)
    assert "2 class folders match none of the model's 1000 classes: kitty, zzz" in message
    assert "crane (134 crane, 517 crane)" in message and "n01440764" in message
    # A class map entry wins; the others still match by id and name.
    assert map_classes(["kitty", "crane", shark.wnid], labels, {"kitty": 285, "crane": "n02012849"}) == (
        285, 134, shark.index)
    with pytest.raises(EvaluationError, match=r"kitty -> 'no such class' \(no such class\)"):
        map_classes(["kitty"], labels, {"kitty": "no such class"})
    with pytest.raises(EvaluationError, match=r"kitty -> 1000 \(the model has classes 0..999\)"):
        map_classes(["kitty"], labels, {"kitty": 1000})
    # A fine-tuned model's own labels (no WordNet ids).
    own = [Label(0, "cat"), Label(1, "dog")]
    assert map_classes(["dog", "Cat"], own) == (1, 0)
    with pytest.raises(EvaluationError, match=r"1 class folder match none of the model's 2 classes: bird "
                                              r"\(folders match by label name, or through a class map\)"):
        map_classes(["bird", "dog"], own)


@pytest.mark.parametrize("name, text", [
    ("map.json", '{"kitty": 285, "doggo": "golden retriever", "fish": "n01440764"}'),
    ("map.tsv", "# folder\tclass\nkitty\t285\n\ndoggo\tgolden retriever\nfish\tn01440764\n"),
    ("map.csv", "kitty,285\ndoggo,golden retriever\nfish,n01440764\n"),
])
def test_class_map_files(name, text, tmp_path):
    path = tmp_path / name
    path.write_text(text)
    mapping = read_class_map(path)
    assert mapping.keys() == {"kitty", "doggo", "fish"}
    assert map_classes(["doggo", "fish", "kitty"], imagenet_labels(), mapping) == (207, 0, 285)


def test_bad_class_map_files(tmp_path):
    (tmp_path / "a.tsv").write_text("kitty 285\n")
    with pytest.raises(EvaluationError, match=r"a.tsv:1: expected FOLDER and CLASS separated by a tab"):
        read_class_map(tmp_path / "a.tsv")
    (tmp_path / "b.json").write_text("[1, 2]")
    with pytest.raises(EvaluationError, match=r"b.json: expected a JSON object"):
        read_class_map(tmp_path / "b.json")
    with pytest.raises(EvaluationError, match=r"missing.json: no such file"):
        read_class_map(tmp_path / "missing.json")


# ------------------------------------------------------------------------------------------ metrics


def test_metrics_from_known_predictions():
    # 3 folders mapped to classes 4, 0, 2 of a 6-class model; 7 files, one unreadable.
    dataset = Dataset("d", ("a", "b", "c"), tuple(f"d/{x}" for x in "a/1 a/2 a/3 b/1 b/2 c/1 c/2".split()),
                      (0, 0, 0, 1, 1, 2, 2))
    labels = tuple(Label(i, f"l{i}") for i in range(6))
    top = np.array([[4, 0], [0, 4], [5, 4], [0, 1], [2, 0], [2, 1], [0, 0]], np.int32)
    status = np.array([1, 1, 1, 1, 1, 1, 2], np.int32)
    result = Evaluation(dataset, (4, 0, 2), labels, top, np.full(top.shape, 0.5, np.float32), status,
                        {6: "d/c/2: broken"}, seconds=2.0)
    assert result.count == 6
    assert result.top1 == pytest.approx(3 / 6)  # a/1, b/1, c/1
    assert result.top5 == 1.0  # top-2 here: every evaluated file has its class second at worst
    rows = {r["class"]: r for r in result.per_class()}
    assert (rows["a"]["top1"], rows["b"]["top1"], rows["c"]["top1"]) == pytest.approx((1 / 3, 1 / 2, 1.0))
    assert rows["c"]["images"] == 1
    assert result.mean_per_class_accuracy == pytest.approx((1 / 3 + 1 / 2 + 1) / 3)
    assert result.throughput == 3.0
    names, counts = result.confusion()
    assert names == ["a", "b", "c", "other"]
    assert counts.tolist() == [[1, 1, 0, 1], [0, 1, 1, 0], [0, 0, 1, 0]]
    summary = result.summary()
    assert summary["skipped"] == 1 and summary["errors"] == [{"file": "c/2", "message": "d/c/2: broken"}]


def test_find_dataset_lists_class_folders_and_nested_images(tmp_path):
    for path in ("b/x.png", "a/sub/y.jpg", "a/z.PNG", "a/.hidden.png", "a/notes.txt", ".git/q.png", "loose.png"):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_bytes(b"")
    (tmp_path / "empty").mkdir()
    ds = find_dataset(tmp_path)
    assert ds.folders == ("a", "b", "empty")
    assert [ds.relative(i) for i in range(len(ds))] == ["a/sub/y.jpg", "a/z.PNG", "b/x.png"]
    assert ds.targets == (0, 0, 1) and [Path(p).name for p in ds.ignored] == ["loose.png"]
    with pytest.raises(EvaluationError, match="no class subfolders"):
        find_dataset(tmp_path / "empty")
    with pytest.raises(EvaluationError, match="no such folder"):
        find_dataset(tmp_path / "missing")


# ------------------------------------------------------------------------------------------ command line


@pytest.fixture(scope="module")
def seed_model(tmp_path_factory) -> Path:
    """A random 3-class seed model at 32 px with class names (no training needed for these checks)."""
    mx.random.seed(1)
    model = mlx_evit.create_model("efficientvit_seed", num_classes=3, image_size=32, patch_size=4, embed_dim=16,
                                  depths=(1, 1), num_heads=(2, 2))
    model.pretrained_cfg = {"input_size": [3, 32, 32], "crop_pct": 1.0, "interpolation": "bilinear",
                            "mean": [0.5] * 3, "std": [0.25] * 3}
    return mlx_evit.save_model(model, tmp_path_factory.mktemp("seed") / "model", labels=["cat", "dog", "bird"])


def write_images(root: Path, counts: dict[str, int], seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for folder, n in counts.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (24, 20, 3), dtype=np.uint8)).save(root / folder / f"{i:03d}.png")
    return root


def test_unmapped_folders_are_one_clear_error(seed_model, tmp_path):
    data = write_images(tmp_path / "data", {"cat": 2, "horse": 2, "zebra": 1})
    proc = evaluate_cli(data, "--weights", seed_model, "--output", tmp_path / "out", check=False)
    assert proc.returncode == 2
    assert "2 class folders match none of the model's 3 classes: horse, zebra" in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
    # A class map fixes it, one class per folder.
    (tmp_path / "map.tsv").write_text("horse\tcat\nzebra\t2\n")
    proc = evaluate_cli(data, "--weights", seed_model, "--class-map", tmp_path / "map.tsv", check=False)
    assert proc.returncode == 2 and "folders mapped to the same class: cat, horse -> 0 cat" in proc.stderr
    (tmp_path / "map.tsv").write_text("horse\tdog\nzebra\t2\n")
    proc = evaluate_cli(data, "--weights", seed_model, "--class-map", tmp_path / "map.tsv", "--quiet")
    assert "evaluated 5 images of 3 classes on 1 rank" in proc.stdout
    # The same command as a subcommand of python -m mlx_evit.
    sub = run(["-m", "mlx_evit", "evaluate", str(data), "--weights", str(seed_model), "--class-map",
               str(tmp_path / "map.tsv"), "--quiet"])
    assert sub.stdout.splitlines()[2:] == proc.stdout.splitlines()[2:]  # per-class lines (no timings)


def test_unreadable_images_stop_the_run_or_are_skipped_and_counted(seed_model, tmp_path):
    data = write_images(tmp_path / "data", {"cat": 3, "dog": 2})
    (data / "dog" / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "out"
    proc = evaluate_cli(data, "--weights", seed_model, "--output", out, check=False)
    assert proc.returncode == 1 and "broken.png: not an image file" in proc.stderr
    assert "Traceback" not in proc.stderr and not out.exists()
    proc = evaluate_cli(data, "--weights", seed_model, "--output", out, "--skip-errors", "--batch-size", "2")
    assert "broken.png: not an image file" in proc.stderr and "1 unreadable skipped" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["images"], summary["evaluated"], summary["skipped"]) == (6, 5, 1)
    assert summary["errors"][0]["file"] == "dog/broken.png"
    assert len(read_csv(out / "predictions.csv")) == 5


def test_output_folder_is_checked_before_the_work(seed_model, tmp_path):
    data = write_images(tmp_path / "data", {"cat": 2, "dog": 1})
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    proc = evaluate_cli(data, "--weights", seed_model, "--output", out, check=False)
    # --force cannot help here, so it is not suggested (issue 25)
    assert proc.returncode == 2 and "not an evaluation output folder" in proc.stderr and "--force" not in proc.stderr
    proc = evaluate_cli(data, "--weights", seed_model, "--output", out, "--force", check=False)
    assert proc.returncode == 2 and "not an evaluation output folder" in proc.stderr
    proc = evaluate_cli(data, "--weights", seed_model, "--output", data / "report", check=False)
    assert proc.returncode == 2 and "lies inside the data folder" in proc.stderr
    assert not (data / "report").exists()
    fresh = tmp_path / "fresh"
    evaluate_cli(data, "--weights", seed_model, "--output", fresh, "--quiet")
    first = (fresh / "predictions.csv").read_text()
    proc = evaluate_cli(data, "--weights", seed_model, "--output", fresh, check=False)
    assert proc.returncode == 2 and "pass --force" in proc.stderr
    evaluate_cli(data, "--weights", seed_model, "--output", fresh, "--force", "--quiet")
    assert (fresh / "predictions.csv").read_text() == first
    assert sorted(p.name for p in fresh.iterdir()) == ["confusion.csv", "predictions.csv", "summary.json"]


def test_bad_arguments(seed_model, tmp_path):
    proc = evaluate_cli(tmp_path / "nothing", "--weights", seed_model, check=False)
    assert proc.returncode == 2 and "nothing: no such folder" in proc.stderr
    data = write_images(tmp_path / "data", {"cat": 1, "dog": 1})
    proc = evaluate_cli(data, "--weights", tmp_path / "no_weights", check=False)
    assert proc.returncode == 2 and "no_weights" in proc.stderr and "Traceback" not in proc.stderr
    proc = evaluate_cli(data, "--weights", seed_model, "--batch-size", "0", check=False)
    assert proc.returncode == 2 and "--batch-size" in proc.stderr
