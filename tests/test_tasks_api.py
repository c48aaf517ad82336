"""The task API convention: the inputs every task object takes, one error hierarchy, from_pretrained by family.

Issue 25: ``Classifier.classify([uint8 array])`` raised TypeError,
``classify("cat.jpg")`` iterated the string, ``SamPredictor.set_image("cat.jpg")``
failed on shape ``()``; errors differed by task; a classifier name given to
the segmenter went to the Hub. Each check below failed before the fix.
"""

from __future__ import annotations

import ast
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import mlx.core as mx

import mlx_evit
import synthetic
from mlx_evit import errors
from mlx_evit.classify import Classifier, ClassifierError
from mlx_evit.models.registry import build_model
from mlx_evit.sam import SamAutomaticMaskGenerator, SamError, SamPredictor
from mlx_evit.segment import Segmenter, SegmenterError
from mlx_evit.tasks.images import as_batch, rgb_array

CAT = Path(__file__).parent / "data" / "images" / "cat.png"
TASKS = Path(mlx_evit.__file__).parent / "tasks"


@pytest.fixture(scope="module")
def classifier():
    mx.random.seed(3)
    return Classifier(mlx_evit.create_model("efficientvit_b0"))


@pytest.fixture(scope="module")
def seed_dir(tmp_path_factory) -> Path:
    """A tiny classification model folder (the seed architecture, random weights)."""
    mx.random.seed(4)
    model = build_model("efficientvit_seed", num_classes=3)
    return mlx_evit.save_model(model, tmp_path_factory.mktemp("seed") / "seed", labels=["a", "b", "c"])


# ----------------------------------------------------------------------------- inputs


def test_classifier_takes_paths_pil_arrays_and_lists(classifier):
    pil = Image.open(CAT).convert("RGB")
    pixels = np.asarray(pil)
    from_list = classifier.classify([CAT, str(CAT), pil, pixels], top_k=3)
    assert len(from_list) == 4 and all(row == from_list[0] for row in from_list)
    assert classifier.classify(str(CAT), top_k=3) == from_list[0]  # one path: one result, not its letters
    assert classifier.classify(pixels, top_k=3) == from_list[0]
    assert classifier.classify(pixels / np.float32(255), top_k=3) == from_list[0]  # [0, 1] floats
    assert classifier.classify(np.stack([pixels, pixels]), top_k=3) == from_list[:2]  # (B, H, W, 3)
    assert classifier.classify([], top_k=3) == []


@pytest.mark.parametrize("bad, name", [(42, "int"), ({"x": 1}, "dict"), (b"cat.png", "bytes"),
                                       (mx.zeros((8, 8, 3)), "mlx.core.array")])
def test_other_inputs_are_one_type_error_naming_the_type(classifier, bad, name):
    with pytest.raises(TypeError, match=name) as e:
        classifier.classify(bad)
    assert isinstance(e.value, errors.MlxEvitError) and "\n" not in str(e.value)
    with pytest.raises(TypeError, match=rf"images\[1\] .*{name}"):
        classifier.classify([CAT, bad])


def test_image_array_rules():
    grey = np.arange(12, dtype=np.uint8).reshape(3, 4)
    np.testing.assert_array_equal(rgb_array(grey), np.repeat(grey[:, :, None], 3, axis=2))
    rgba = np.zeros((3, 4, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 7
    assert rgb_array(rgba)[0, 0].tolist() == [200, 0, 0]
    assert rgb_array(np.full((2, 2, 3), 0.5))[0, 0].tolist() == [128, 128, 128]  # rint(127.5)
    bgr = np.zeros((2, 2, 3), np.uint8)
    bgr[..., 0] = 9
    assert rgb_array(bgr, image_format="BGR")[0, 0].tolist() == [0, 0, 9]
    with pytest.raises(SegmenterError, match=r"values in \[0, 1\].*uint8"):
        rgb_array(np.full((2, 2, 3), 255.0), error=SegmenterError)
    with pytest.raises(errors.ImageInputError, match="int64"):
        rgb_array(np.zeros((2, 2, 3), np.int64))
    with pytest.raises(errors.ImageInputError, match="NaN"):
        rgb_array(np.full((2, 2, 3), np.nan))
    with pytest.raises(errors.ImageInputError, match=r"\(H, W, 3\)"):
        rgb_array(np.zeros((2, 2, 5), np.uint8))
    with pytest.raises(errors.ImageLoadError, match="no such file"):
        rgb_array("no/such/picture.png")
    assert as_batch(CAT) == ([CAT], False) and as_batch((CAT,)) == ([CAT], True)
    with pytest.raises(TypeError, match="generator"):
        as_batch(x for x in [CAT])


def test_sam_predictor_takes_a_path():
    model = build_model("efficientvit_sam_l0", image_size=64)
    predictor = SamPredictor(model, compile=False)
    predictor.set_image(np.asarray(Image.open(CAT).convert("RGB")))
    expected = np.asarray(predictor.get_image_embedding())
    predictor.set_image(str(CAT))
    np.testing.assert_array_equal(np.asarray(predictor.get_image_embedding()), expected)
    predictor.set_image(CAT)
    np.testing.assert_array_equal(np.asarray(predictor.get_image_embedding()), expected)
    with pytest.raises(TypeError, match="one image"):
        predictor.set_image([CAT])
    with pytest.raises(TypeError, match="int"):
        predictor.set_image(7)
    with pytest.raises(errors.ImageLoadError, match="no such file"):
        predictor.set_image("missing.jpg")
    predictor.reset_image()
    with pytest.raises(errors.ImageNotSetError, match="set_image") as e:
        predictor.predict(box=np.array([1, 1, 5, 5]))
    assert isinstance(e.value, RuntimeError) and isinstance(e.value, SamError)
    with pytest.raises(TypeError, match="EfficientViT-SAM"):
        SamPredictor(build_model("efficientvit_seed", num_classes=2))
    with pytest.raises(TypeError, match="list"):
        SamAutomaticMaskGenerator(predictor, points_per_side=1).generate([CAT, 5])


def test_segmenter_takes_paths_and_lists(tmp_path):
    mx.random.seed(5)
    net = build_model("efficientvit_seg_b0_cityscapes")
    cfg = mlx_evit.get_pretrained_cfg("efficientvit_seg_b0_cityscapes").to_dict()
    seg = Segmenter(net, preprocess=dict(cfg, input_size=[3, 64, 128]))
    img = synthetic.synthetic_image("tasks/seg", 30, 50)
    Image.fromarray(img).save(tmp_path / "a.png")
    one = seg(tmp_path / "a.png")
    assert one.file == str(tmp_path / "a.png")
    both = seg([str(tmp_path / "a.png"), img])
    assert isinstance(both, list) and len(both) == 2
    np.testing.assert_array_equal(both[0].labels, one.labels)
    np.testing.assert_array_equal(both[1].labels, one.labels)
    with pytest.raises(TypeError, match="float"):
        seg(3.5)


# ----------------------------------------------------------------------------- errors


def test_one_error_hierarchy_keeping_the_builtins():
    for name, builtin in [("CheckpointError", ValueError), ("CheckpointMismatchError", ValueError),
                          ("ConversionError", ValueError), ("HubError", RuntimeError),
                          ("InputTypeError", TypeError), ("ImageInputError", ValueError),
                          ("ImageLoadError", ValueError), ("ClassifierError", ValueError),
                          ("SegmenterError", ValueError), ("SamError", ValueError),
                          ("ImageNotSetError", RuntimeError), ("EvaluationError", ValueError)]:
        kind = getattr(errors, name)
        assert issubclass(kind, errors.MlxEvitError) and issubclass(kind, builtin), name
    from mlx_evit.evaluate import EvaluationError, ImageFailed
    from mlx_evit.tasks.transforms import ImageLoadError

    assert EvaluationError is errors.EvaluationError and issubclass(ImageFailed, errors.MlxEvitError)
    assert ImageLoadError is errors.ImageLoadError and ClassifierError is errors.ClassifierError
    assert SegmenterError is errors.SegmenterError and SamError is errors.SamError
    with pytest.raises(SamError, match="points_per_batch"):
        SamAutomaticMaskGenerator(build_model("efficientvit_sam_l0", image_size=64), points_per_batch=0)


def test_library_messages_name_api_arguments_not_options(tmp_path):
    from mlx_evit.evaluate import map_classes, read_class_map
    from mlx_evit.tasks.labels import Label

    with pytest.raises(errors.EvaluationError) as e:
        map_classes(["bird"], [Label(0, "cat")])
    assert "--" not in str(e.value)
    with pytest.raises(errors.EvaluationError) as e:
        read_class_map(tmp_path / "missing.tsv")
    assert "--" not in str(e.value)


# ----------------------------------------------------------------------------- from_pretrained


@pytest.fixture
def no_download(monkeypatch):
    """Any attempt to load or fetch fails the test."""
    import mlx_evit.tasks.pretrained as pretrained

    def refuse(*args, **kwargs):
        raise AssertionError(f"tried to load {args} {kwargs}")

    monkeypatch.setattr(pretrained, "load", refuse)
    monkeypatch.setattr(pretrained, "pretrained_weights", refuse)


@pytest.mark.parametrize("task, name, message", [
    (Segmenter, "efficientvit_b0", "efficientvit_b0 is a classification model, not a segmentation model"),
    (Segmenter, "timm/efficientvit_b1.r224_in1k", "is a classification model, not a segmentation model"),
    (Classifier, "efficientvit_sam_l0", "efficientvit_sam_l0 is a SAM model, not a classification model"),
    (Classifier, "efficientvit_seg_b1_ade20k", "is a segmentation model, not a classification model"),
    (SamPredictor, "efficientvit_seg_b0_cityscapes", "is a segmentation model, not a SAM model"),
    (SamAutomaticMaskGenerator, "efficientvit_m0", "is a classification model, not a SAM model"),
])
def test_a_name_of_another_family_is_refused_before_any_download(no_download, task, name, message):
    error = {Segmenter: SegmenterError, Classifier: ClassifierError}.get(task, SamError)
    with pytest.raises(error, match=message):
        task.from_pretrained(name)


def test_unknown_names_get_suggestions_of_the_tasks_family(no_download):
    with pytest.raises(SegmenterError, match="did you mean") as e:
        Segmenter.from_pretrained("efficientvit_seg_zz")
    suggested = str(e.value).split("did you mean:")[1]
    assert "efficientvit_seg_" in suggested and "sam" not in suggested and "seed" not in suggested
    with pytest.raises(SamError, match="did you mean: .*efficientvit_sam_l0") as e:
        SamPredictor.from_pretrained("efficientvit_sam_l9")
    assert "seg" not in str(e.value).split("did you mean:")[1]
    with pytest.raises(ClassifierError, match="no such file or folder"):
        Classifier.from_pretrained("models/zzz/qqq.pt")


def test_registered_names_go_to_mlx_evit_load(monkeypatch):
    """A name (timm/ dropped) is handed to the one loader, which resolves the Hub; no task reads it itself."""
    import mlx_evit.tasks.pretrained as pretrained

    seen = []

    def fake_load(source, dtype=None, model=None, fuse=True):
        seen.append((source, model, fuse))
        return build_model(model)

    monkeypatch.setattr(pretrained, "load", fake_load)
    clf = Classifier.from_pretrained("timm/efficientvit_b0.r224_in1k")
    assert seen[-1] == ("efficientvit_b0.r224_in1k", "efficientvit_b0.r224_in1k", False)
    assert clf.name == "efficientvit_b0.r224_in1k"
    predictor = SamPredictor.from_pretrained("efficientvit_sam_l0", compile=False)
    assert seen[-1][0] == "efficientvit_sam_l0" and isinstance(predictor, SamPredictor)


def test_from_pretrained_local_folder_and_aliases(seed_dir):
    clf = Classifier.from_pretrained(seed_dir)
    assert [label.name for label in clf.labels] == ["a", "b", "c"]
    assert Classifier.load(weights=seed_dir).labels == clf.labels  # the earlier name, kept
    assert Classifier.from_pretrained("efficientvit_seed", weights=seed_dir).num_classes == 3
    with pytest.raises(SegmenterError, match="holds efficientvit_seed, a classification model, not a segmentation"):
        Segmenter.from_pretrained(seed_dir)
    with pytest.raises(SamError, match="not a SAM model"):
        SamPredictor.from_pretrained(str(seed_dir))
    from mlx_evit.evaluate import as_classifier

    assert as_classifier(clf) is clf and as_classifier(seed_dir).num_classes == 3
    with pytest.raises(TypeError, match="classifier must be"):
        as_classifier(3)


def test_task_modules_do_not_read_checkpoints_the_hub_or_model_folders():
    """Loading is mlx_evit.api.load's; the task modules import none of mlx_evit.loading."""
    for path in sorted(TASKS.glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            assert not any(n.startswith("mlx_evit.loading") or n == "mlx_evit.cli" or n.startswith("mlx_evit.cli.")
                           for n in names), (path.name, names)
    for cls in (Classifier, Segmenter, SamPredictor, SamAutomaticMaskGenerator):
        assert callable(getattr(cls, "from_pretrained")), cls


# ----------------------------------------------------------------------------- segmentation evaluation data


@pytest.fixture(scope="module")
def small_segmenter():
    mx.random.seed(6)
    net = build_model("efficientvit_seg_b0_cityscapes")
    cfg = mlx_evit.get_pretrained_cfg("efficientvit_seg_b0_cityscapes").to_dict()
    return Segmenter(net, preprocess=dict(cfg, input_size=[3, 64, 128]))


def write_pair(folder: Path, stem: str, label_name: str, size=(48, 96), label_size=None) -> tuple[str, str]:
    folder.mkdir(parents=True, exist_ok=True)
    image = folder / f"{stem}.png"
    Image.fromarray(synthetic.synthetic_image(f"tasks/eval/{stem}", *size)).save(image)
    lh, lw = label_size or size
    label = folder / label_name
    Image.fromarray(np.full((lh, lw), 7, np.uint8)).save(label)  # label id 7: road
    return str(image), str(label)


def test_a_label_of_another_size_is_an_error_naming_both_files(small_segmenter, tmp_path):
    pair = write_pair(tmp_path, "a_leftImg8bit", "a_gtFine_labelIds.png", size=(48, 96), label_size=(25, 50))
    with pytest.raises(SegmenterError) as e:
        small_segmenter.evaluate([pair])
    message = str(e.value)
    assert pair[0] in message and pair[1] in message and "50x25" in message and "96x48" in message
    failures = []
    report = small_segmenter.evaluate([pair], on_error=lambda f, m: failures.append((f, m)))
    assert report["images"] == 0 and failures and pair[1] in failures[0][1]
    # Only with the explicit option: scored at the label's size, every labelled pixel counted once.
    report = small_segmenter.evaluate([pair], allow_size_mismatch=True)
    assert report["images"] == 1 and sum(c["pixels"] for c in report["per_class"]) == 25 * 50
    good = write_pair(tmp_path, "b_leftImg8bit", "b_gtFine_labelIds.png")
    assert small_segmenter.evaluate([good])["images"] == 1


def test_label_names_against_the_dataset_scheme_warn(small_segmenter, tmp_path):
    city = write_pair(tmp_path / "c", "x_leftImg8bit", "x_gtFine_labelIds.png")
    plain = write_pair(tmp_path / "p", "frame", "frame.png")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        report = small_segmenter.evaluate([city])
    assert not seen and report["warnings"] == []
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        report = small_segmenter.evaluate([plain, plain])
    assert len(seen) == 1 and issubclass(seen[0].category, errors.DatasetWarning)
    assert "frame.png" in str(seen[0].message) and "not a Cityscapes label name" in str(seen[0].message)
    assert report["warnings"] == [str(seen[0].message)]
    # ADE20K rules on Cityscapes-named files.
    from mlx_evit.tasks.seg_datasets import get_dataset

    ade = get_dataset("ade20k")
    assert "Cityscapes label name" in ade.naming_problem(city[1])
    assert ade.naming_problem("ADE_val_00000001.png") is None
    assert get_dataset("cityscapes").naming_problem("x_labelTrainIds.png") is None
    messages = []
    small_segmenter.evaluate([plain], on_warning=messages.append)
    assert len(messages) == 1 and "frame.png" in messages[0]

