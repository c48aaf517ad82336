"""ImageNet-1k label table and --labels files."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from mlx_evit.tasks.labels import Label, LabelFileError, imagenet_labels, read_labels

ROOT = Path(__file__).resolve().parents[1]


def test_imagenet_table():
    labels = imagenet_labels()
    assert len(labels) == 1000
    assert [label.index for label in labels] == list(range(1000))
    assert labels[0] == Label(
        0,
        "tench",
        "n01440764",
        "tench, Tinca tinca",
        "freshwater dace-like game fish of Europe and western Asia noted for ability to survive outside water",
    )
    assert (labels[281].wnid, labels[281].name, labels[281].description) == ("n02123045", "tabby", "tabby, tabby cat")
    assert (labels[999].wnid, labels[999].name) == ("n15075141", "toilet tissue")
    wnids = [label.wnid for label in labels]
    assert wnids == sorted(wnids) and len(set(wnids)) == 1000
    assert str(labels[1]) == "goldfish"
    assert imagenet_labels() is not imagenet_labels()  # callers get their own list


def test_imagenet_table_agrees_with_timm():
    """Same classes, order and descriptions as timm's ImageNetInfo (independent reader)."""
    timm_data = pytest.importorskip("timm.data")
    info = timm_data.ImageNetInfo("imagenet-1k")
    labels = imagenet_labels()
    assert [label.wnid for label in labels] == info.label_names()
    assert [label.description for label in labels] == info.label_descriptions()
    detailed = info.label_descriptions(detailed=True)
    assert [f"{label.description}: {label.definition}" for label in labels] == detailed
    assert all(label.description.split(", ")[0] == label.name for label in labels)


def test_shipped_table_is_what_the_generator_writes():
    pytest.importorskip("timm")
    spec = importlib.util.spec_from_file_location("make_imagenet_labels", ROOT / "tools" / "make_imagenet_labels.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    shipped = (ROOT / "mlx_evit" / "data" / "imagenet1k_labels.tsv").read_text(encoding="utf-8")
    assert tool.build_table(tool.timm_info_dir()) == shipped


# ---------------------------------------------------------------- read_labels


def _write(tmp_path: Path, name: str, content) -> Path:
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif isinstance(content, str):
        path.write_text(content, encoding="utf-8")
    else:
        path.write_text(json.dumps(content), encoding="utf-8")
    return path


def test_text_file(tmp_path):
    text = "\ufeff# my classes\n  cat \n\ndog\n# trailing comment\nsea lion\r\nhot dog, frankfurter\n"
    path = _write(tmp_path, "classes.txt", text)
    labels = read_labels(path)
    assert [(label.index, label.name) for label in labels] == [
        (0, "cat"),
        (1, "dog"),
        (2, "sea lion"),
        (3, "hot dog, frankfurter"),
    ]
    assert labels[0].wnid is None


def test_json_list_of_names(tmp_path):
    labels = read_labels(_write(tmp_path, "l.json", ["cat", "dog"]))
    assert [label.name for label in labels] == ["cat", "dog"]


def test_json_list_of_objects(tmp_path):
    entries = [{"name": "cat", "wnid": "n02121808"}, {"index": 1, "name": "dog", "description": "dog, domestic dog"}]
    labels = read_labels(_write(tmp_path, "l.JSON", entries))
    assert labels == [
        Label(0, "cat", "n02121808"),
        Label(1, "dog", None, "dog, domestic dog"),
    ]


def test_json_index_map(tmp_path):
    labels = read_labels(_write(tmp_path, "l.json", {"1": "dog", "0": "cat", "2": {"name": "fox"}}))
    assert [label.name for label in labels] == ["cat", "dog", "fox"]


def test_json_keras_class_index(tmp_path):
    data = {"0": ["n01440764", "tench"], "1": ["n01443537", "goldfish"]}
    labels = read_labels(_write(tmp_path, "imagenet_class_index.json", data))
    assert labels == [Label(0, "tench", "n01440764"), Label(1, "goldfish", "n01443537")]


@pytest.mark.parametrize(
    "filename, content, fragment",
    [
        ("empty.txt", "# only a comment\n\n", "no labels"),
        ("empty.json", [], "no labels"),
        ("latin1.txt", b"cat\ndog\ncaf\xe9\n", ":3: not UTF-8"),
        ("bad.json", '[\n  "cat",\n  "dog"\n  "fox"\n]', ":4:3: invalid JSON"),
        ("number.json", 3, "expected a JSON list or object"),
        ("entry.json", ["cat", 7], "entry 1: expected a name"),
        ("noname.json", [{"wnid": "n0"}], "entry 0: missing or empty 'name'"),
        ("typo.json", [{"nmae": "cat"}], "unknown keys ['nmae']"),
        ("wrongtype.json", [{"name": "cat", "wnid": 5}], "'wnid' must be a string"),
        ("index.json", [{"name": "cat", "index": 3}], "'index' 3 does not match its position 0"),
        ("gap.json", {"0": "cat", "2": "dog"}, "missing [1]"),
        ("key.json", {"zero": "cat"}, "key 'zero' is not a class index"),
        ("classes.txt", '["cat", "dog"]\n', ":1: looks like JSON"),
    ],
)
def test_bad_label_files(tmp_path, filename, content, fragment):
    path = _write(tmp_path, filename, content)
    with pytest.raises(LabelFileError) as info:
        read_labels(path)
    message = str(info.value)
    assert message.startswith(str(path)) and fragment in message, message


def test_missing_and_directory(tmp_path):
    with pytest.raises(LabelFileError, match="no such label file"):
        read_labels(tmp_path / "missing.txt")
    with pytest.raises(LabelFileError, match="is a directory"):
        read_labels(tmp_path)
