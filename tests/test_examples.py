"""The examples run as users run them (subprocesses, small settings) and do what they claim.

The offline block of examples/README.md is executed verbatim; the other tests
check each example's results against the library computed here: the top 5
of classify_image.py against :class:`mlx_evit.classify.Classifier`, the
panels of features.py against ``forward_features``, the exported ``.mlxfn``
against the model's logits (bit for bit in Python; from C++, when a compiler and
MLX's headers are there, to float32 round-off: libmlx's own BLAS), and what fine-tuning changes (only the classifier
with ``--head-only``; weights and BatchNorm statistics otherwise).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from PIL import Image

import mlx_evit  # before mlx.core
from mlx_evit.classify import Classifier
from mlx_evit.tasks.labels import imagenet_labels
from mlx_evit.tasks.transforms import eval_transform, load_image

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
README = EXAMPLES / "README.md"
CAT = EXAMPLES / "images" / "cat.jpg"
DEMO_HEADING = "## Try everything offline"


def run(args: list[str], cwd: Path = ROOT, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``python ARGS`` with this interpreter, as a user would; fails the test on an error exit."""
    proc = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        pytest.fail(f"python {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def load_example(name: str) -> ModuleType:
    """Import ``examples/<name>.py`` as a module (its ``main`` does not run)."""
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def readme_commands(heading: str) -> list[list[str]]:
    """The ``python ...`` commands of the bash block under ``heading`` in the README, without ``python``.

    Other lines may only be ``pip install`` lines (the test extras have what they install) or comments.
    """
    text = README.read_text(encoding="utf-8")
    block = re.search(re.escape(heading) + r"\n.*?```bash\n(.*?)```", text, re.S)
    assert block, f"{README}: no bash block under {heading!r}"
    lines = [line for line in block.group(1).splitlines() if line.strip() and not line.startswith("#")]
    assert all(line.startswith(("python ", "pip ")) for line in lines), lines
    return [shlex.split(line, comments=True)[1:] for line in lines if line.startswith("python ")]


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[Path, dict[str, subprocess.CompletedProcess]]:
    """The README's offline block, run in a fresh folder (``examples`` linked in); outputs by script."""
    cwd = tmp_path_factory.mktemp("demo")
    (cwd / "examples").symlink_to(EXAMPLES, target_is_directory=True)
    results = {}
    for args in readme_commands(DEMO_HEADING):
        script = args[1] if args[0] == "-m" else Path(args[0]).name
        results[script] = run(args, cwd=cwd)
    return cwd, results


@pytest.fixture(scope="module")
def b0_dir(tmp_path_factory) -> Path:
    """A random EfficientViT-B0 (ImageNet head) saved as an MLX model directory.

    BatchNorm statistics are random (so folding them and keeping them frozen
    matter) and the classifier weights are scaled up, so the top-5 classes
    are well separated.
    """
    mx.random.seed(3)
    model = mlx_evit.create_model("efficientvit_b0.r224_in1k")
    for _, module in model.named_modules():
        if isinstance(module, nn.BatchNorm):
            n = module.running_mean.shape[0]
            module.running_mean = 0.2 * mx.random.normal((n,))
            module.running_var = mx.random.uniform(0.5, 2.0, (n,))
    classifier = model.head.classifier[4]
    classifier.weight = 30 * classifier.weight
    return mlx_evit.save_model(model, tmp_path_factory.mktemp("weights") / "b0")


@pytest.fixture(scope="module")
def small_digits(demo, tmp_path_factory) -> Path:
    """8 training digits per class, taken from the demo's image folder."""
    cwd, _ = demo
    out = tmp_path_factory.mktemp("small") / "digits"
    for folder in sorted((cwd / "digits" / "train").iterdir()):
        (out / folder.name).mkdir(parents=True)
        for image in sorted(folder.iterdir())[:8]:
            shutil.copy(image, out / folder.name)
    return out


# ------------------------------------------------------------------------------------------ README demo


def test_readme_demo_finetune_learns_the_digits(demo):
    cwd, results = demo
    out = results["finetune.py"].stdout
    accuracy = float(re.search(r"validation accuracy ([0-9.]+)", out).group(1))
    assert accuracy >= 0.8, out  # 3 classes: chance is 0.33
    assert re.search(r"epoch (\d+)/\1 \[#+\] .* loss [0-9.]+ acc [0-9.]+", results["finetune.py"].stderr)  # progress
    model = mlx_evit.load(cwd / "digits_model")
    assert model.labels == sorted(p.name for p in (cwd / "digits" / "train").iterdir()) == ["one", "two", "zero"]
    assert model.pretrained_cfg["input_size"] == [3, 32, 32]
    source = json.loads((cwd / "digits_model" / "config.json").read_text())["source"]
    assert source["finetuned_from"] == "seed" and source["validation_accuracy"] == pytest.approx(accuracy, abs=5e-4)


def test_readme_demo_cli_labels_held_out_digits_with_the_new_classes(demo):
    cwd, _ = demo
    records = json.loads((cwd / "predictions.json").read_text())
    assert len(records) == 30  # 10 held-out images per class, never seen in training
    truth = [Path(r["file"]).parent.name for r in records]
    predicted = [r["top_k"][0]["label"] for r in records]
    assert set(predicted) <= {"zero", "one", "two"}
    assert np.mean([p == t for p, t in zip(predicted, truth)]) >= 0.8


def test_readme_demo_other_examples_use_the_finetuned_model(demo):
    cwd, results = demo
    lines = results["classify_image.py"].stdout.splitlines()
    assert len(lines) == 3 and {line.split()[-1] for line in lines} == {"zero", "one", "two"}
    assert lines[0].split()[-1] == "two"  # the README's image is a held-out two
    with Image.open(cwd / "features.png") as image:
        assert image.width > 4 * 128  # the input and three stages
    assert (cwd / "digits_app" / "model.mlxfn").stat().st_size > 0
    assert "re-imported in a fresh process" in results["export.py"].stdout


# ------------------------------------------------------------------------------------------ README, Hub weights


@pytest.fixture(scope="module")
def hub_b0(tmp_path_factory):
    """A local Hub serving timm/efficientvit_b0.r224_in1k (random timm weights, peaked on the photos).

    Yields the environment for subprocesses that should use it and timm's
    probabilities for the example photo.
    """
    import torch

    from fake_hub import FakeHub
    from reference_models import peaked_timm_model, save_timm_folder, timm_probs

    torch.set_num_threads(2)
    model = peaked_timm_model("efficientvit_b0", 5)
    folder = save_timm_folder(model, tmp_path_factory.mktemp("timm") / "b0")
    hub = FakeHub().start()
    try:
        hub.publish("timm/efficientvit_b0.r224_in1k",
                    {name: (folder / name).read_bytes() for name in ("config.json", "model.safetensors")})
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("HF_", "HUGGINGFACE_", "MLX_EVIT_")) and "proxy" not in k.lower()}
        env.update(HF_ENDPOINT=hub.endpoint, HF_HOME=str(tmp_path_factory.mktemp("hf")),
                   NO_PROXY="127.0.0.1,localhost", HF_HUB_DISABLE_TELEMETRY="1")
        yield env, timm_probs(model, [CAT])[0]
    finally:
        hub.stop()


def test_readme_commands_with_the_default_hub_weights(hub_b0, tmp_path):
    """The first command of each section (default tag, weights from the Hub) as the README gives it."""
    env, timm_top = hub_b0
    (tmp_path / "examples").symlink_to(EXAMPLES, target_is_directory=True)
    outputs = {}
    for section in ("## classify_image.py", "## features.py", "## export.py"):
        args = readme_commands(section)[0]
        assert "--weights" not in args
        proc = subprocess.run([sys.executable, *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, proc.stderr
        outputs[section] = proc.stdout
    # classify_image.py prints timm's top 5 for the photo (timm's weights, loader and transform).
    rows = [re.fullmatch(r"\s*([0-9.]+)%  (.+)", line).groups()
            for line in outputs["## classify_image.py"].splitlines()]
    names = [label.name for label in imagenet_labels()]
    order = np.argsort(-timm_top)[:5]
    assert [name for _, name in rows] == [names[i] for i in order]
    assert [float(pct) for pct, _ in rows] == pytest.approx(100 * timm_top[order], abs=0.006)
    assert timm_top[order[0]] > 2 * timm_top[order[4]]
    assert (tmp_path / "features.png").is_file() and (tmp_path / "b0_app" / "model.mlxfn").is_file()
    assert "re-imported in a fresh process" in outputs["## export.py"]


def test_finetune_starts_from_the_hub_weights_of_a_tag(hub_b0, small_digits, tmp_path):
    env, _ = hub_b0
    out = tmp_path / "b0_digits"
    proc = subprocess.run([sys.executable, "examples/finetune.py", str(small_digits), "--output", str(out),
                           "--model", "efficientvit_b0.r224_in1k", "--head-only", "--epochs", "1",
                           "--batch-size", "8", "--image-size", "64"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    (converted,) = Path(env["HF_HOME"]).glob("mlx_evit/models--timm--efficientvit_b0.r224_in1k/snapshots/*")
    before, after = _params(converted), _params(out)
    assert set(before) == set(after)
    for key in before:
        if not key.startswith("head.classifier.4."):
            assert np.array_equal(after[key], before[key]), key
    assert mlx_evit.load(out).labels == ["one", "two", "zero"]


# ------------------------------------------------------------------------------------------ classify_image.py


def test_classify_image_prints_the_top5_of_the_model(b0_dir):
    out = run(["examples/classify_image.py", str(CAT), "--weights", str(b0_dir)]).stdout
    rows = [re.fullmatch(r"\s*([0-9.]+)%  (.+)", line).groups() for line in out.splitlines()]
    expected = Classifier.load(weights=b0_dir).classify([CAT], top_k=5)[0]
    assert [name for _, name in rows] == [p.label for p in expected]
    assert [float(pct) for pct, _ in rows] == pytest.approx([100 * p.score for p in expected], abs=0.006)
    assert expected[0].score > 2 * expected[4].score  # a real ranking, not near-ties


@pytest.mark.parametrize(
    "args, message",
    [
        (["examples/classify_image.py", "missing.jpg", "--weights", "{b0}"], "missing.jpg: no such file"),
        (["examples/features.py", str(CAT), "--weights", "no_such_dir"], "no_such_dir"),
        (["examples/finetune.py", "{one_class}", "--output", "{tmp}/out"], "need at least 2 class subfolders"),
        (["examples/finetune.py", "{one_class}", "--output", "{tmp}/out", "--head-only"], "--head-only needs"),
    ],
)
def test_bad_input_gives_one_line_errors(args, message, b0_dir, tmp_path):
    (tmp_path / "data" / "cats").mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (8, 8)).save(tmp_path / "data" / "cats" / f"{i}.png")
    args = [a.format(b0=b0_dir, one_class=tmp_path / "data", tmp=tmp_path) for a in args]
    proc = run(args, check=False)
    assert proc.returncode != 0
    assert message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


# ------------------------------------------------------------------------------------------ features.py


def test_features_png_shows_each_stage_at_its_resolution(b0_dir, tmp_path):
    features = load_example("features")
    out = tmp_path / "features.png"
    stdout = run(["examples/features.py", str(CAT), "--weights", str(b0_dir), "--image-size", "96",
                  "--output", str(out)]).stdout

    model = mlx_evit.load(b0_dir)
    cfg = dict(model.pretrained_cfg, input_size=(3, 96, 96))
    transform = eval_transform(cfg)
    maps = [np.array(f[0]) for f in model.forward_features(mx.array(transform(CAT))[None])]
    assert [m.shape[:2] for m in maps] == [(24, 24), (12, 12), (6, 6), (3, 3)]
    for i, m in enumerate(maps):
        assert f"stage {i}: {m.shape[0]}x{m.shape[1]} positions x {m.shape[2]} channels" in stdout

    png = np.asarray(Image.open(out).convert("RGB"))
    step = 96 + features.GAP
    assert png.shape == (96 + features.CAPTION, 5 * step - features.GAP, 3)
    assert np.array_equal(png[:96, :96], transform.crop_uint8(load_image(CAT)))
    for i, m in enumerate(maps, 1):
        panel = png[:96, i * step : i * step + 96]
        block = 96 // m.shape[0]
        # Nearest-neighbour enlargement of an h x w map: constant blocks of 96 / h pixels...
        assert np.array_equal(panel, np.repeat(np.repeat(panel[::block, ::block], block, 0), block, 1))
        # ... whose colours are the PCA of this stage's features.
        assert np.array_equal(panel[::block, ::block], features.pca_rgb(m))


def test_pca_rgb_gives_similar_features_similar_colours():
    pca_rgb = load_example("features").pca_rgb
    rng = np.random.default_rng(0)
    regions = np.zeros((12, 12), int)
    regions[:, 6:] = 1
    regions[8:, :] = 2
    centres = rng.normal(size=(3, 16)) * 5
    maps = centres[regions] + 0.01 * rng.normal(size=(12, 12, 16))
    rgb = pca_rgb(maps.astype(np.float32)).astype(int)
    assert rgb.shape == (12, 12, 3)
    means = np.array([rgb[regions == r].mean(axis=0) for r in range(3)])
    for r in range(3):
        assert np.abs(rgb[regions == r] - means[r]).max() <= 3  # one colour per region
    for a, b in ((0, 1), (0, 2), (1, 2)):
        assert np.abs(means[a] - means[b]).max() >= 100  # and different regions, different colours
    # A feature that grows along x becomes a monotonic first component (red).
    ramp = np.broadcast_to(np.linspace(0, 1, 10)[None, :, None] * rng.normal(size=8), (4, 10, 8))
    red = pca_rgb(ramp + 1e-3 * rng.normal(size=ramp.shape))[..., 0].astype(int)
    assert np.all(np.diff(red, axis=1) >= 0) or np.all(np.diff(red, axis=1) <= 0)
    assert abs(red[0, -1] - red[0, 0]) >= 250
    assert np.array_equal(pca_rgb(np.ones((1, 1, 4), np.float32)), np.full((1, 1, 3), 128, np.uint8))


# ------------------------------------------------------------------------------------------ export.py


def test_export_reproduces_the_logits_exactly(b0_dir, tmp_path):
    out = tmp_path / "b0_app"
    run(["examples/export.py", "--weights", str(b0_dir), "--output", str(out), "--batch-size", "2",
         "--image-size", "64"])
    forward = mx.import_function(str(out / "model.mlxfn"))
    model = mlx_evit.load(b0_dir)
    x = mx.random.normal((2, 64, 64, 3), key=mx.random.key(7))
    expected = model(x)
    (got,) = forward(x)
    assert got.dtype == mx.float32 and got.shape == (2, 1000)
    assert mx.array_equal(got, expected).item()  # same process, same BLAS: bit for bit
    spec = json.loads((out / "export.json").read_text())
    assert spec["functions"]["model"]["inputs"] == [{"name": "images", "shape": [2, 64, 64, 3], "dtype": "float32"}]
    assert spec["functions"]["model"]["outputs"] == [{"name": "logits", "shape": [2, 1000], "dtype": "float32"}]
    resize = next(s for s in spec["preprocessing"] if s["step"] == "resize")
    assert resize["crop_pct"] == model.pretrained_cfg["crop_pct"] and spec["input_size"] == [64, 64]
    assert resize["scale_size"] == [int(64 / model.pretrained_cfg["crop_pct"])] * 2
    assert spec["classes"] == [label.name for label in imagenet_labels()]
    with pytest.raises(ValueError):  # the file is for one input shape
        forward(mx.zeros((1, 64, 64, 3)))


def _mlx_dir() -> Path:
    return Path(mx.__file__).parent


@pytest.mark.skipif(shutil.which("c++") is None or not (_mlx_dir() / "include" / "mlx" / "mlx.h").is_file(),
                    reason="needs a C++ compiler and the MLX headers of the mlx wheel")
def test_readme_cpp_program_runs_the_exported_model(demo, tmp_path):
    cwd, _ = demo
    code = re.search(r"```cpp\n(.*?)```", README.read_text(encoding="utf-8"), re.S).group(1)
    (tmp_path / "run.cpp").write_text(code)
    build = code.splitlines()[0].removeprefix("// ")  # the build command, first line of the snippet
    subprocess.run(shlex.split(build.replace("$MLX", str(_mlx_dir()))), cwd=tmp_path, check=True, timeout=300)
    images = np.random.default_rng(0).standard_normal((1, 32, 32, 3)).astype(np.float32)
    np.save(tmp_path / "images.npy", images)
    # The C++ program runs libmlx's bundled BLAS, Python an OpenBLAS (mlx_evit.blas_info()): the logits
    # agree to float32 round-off, not bit for bit.
    expected = np.array(mlx_evit.load(cwd / "digits_model")(mx.array(images)))
    proc = subprocess.run([str(tmp_path / "run"), str(cwd / "digits_app" / "model.mlxfn"), "images.npy",
                           "logits.npy"], cwd=tmp_path, capture_output=True, text=True, timeout=120, check=True)
    assert json.loads(proc.stdout.splitlines()[0])["function"] == "model"
    got = np.load(tmp_path / "logits.npy")
    assert got.shape == expected.shape == (1, 3)
    assert np.abs(got - expected).max() <= 1e-5 * np.abs(expected).max()


# ------------------------------------------------------------------------------------------ finetune.py


def _params(path: Path) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in tree_flatten(mlx_evit.load(path, fuse=False).parameters())}


def test_finetune_head_only_trains_the_classifier_alone(b0_dir, small_digits, tmp_path):
    out = tmp_path / "b0_digits"
    run(["examples/finetune.py", str(small_digits), "--output", str(out), "--weights", str(b0_dir),
         "--head-only", "--epochs", "2", "--batch-size", "8", "--image-size", "64"])
    before, after = _params(b0_dir), _params(out)
    classifier = {k for k in after if k.startswith("head.classifier.4.")}
    assert classifier == {"head.classifier.4.weight", "head.classifier.4.bias"}
    assert after["head.classifier.4.weight"].shape == (3, before["head.classifier.4.weight"].shape[1])
    assert set(after) == set(before)
    for key in sorted(set(after) - classifier):  # weights and BatchNorm statistics: untouched
        assert np.array_equal(after[key], before[key]), key
    model = mlx_evit.load(out)
    assert model.labels == ["one", "two", "zero"] and model.num_classes == 3
    assert model.pretrained_cfg["input_size"] == [3, 64, 64]
    assert model.pretrained_cfg["crop_pct"] == mlx_evit.get_pretrained_cfg("efficientvit_b0.r224_in1k").crop_pct


def test_finetune_full_trains_weights_and_batchnorm_statistics(b0_dir, small_digits, tmp_path):
    out = tmp_path / "b0_digits"
    run(["examples/finetune.py", str(small_digits), "--output", str(out), "--weights", str(b0_dir),
         "--epochs", "1", "--batch-size", "8", "--image-size", "64"])
    before, after = _params(b0_dir), _params(out)
    stem = "stem.in_conv"
    assert not np.array_equal(after[f"{stem}.conv.weight"], before[f"{stem}.conv.weight"])
    assert not np.array_equal(after[f"{stem}.norm.running_mean"], before[f"{stem}.norm.running_mean"])
    assert not np.array_equal(after[f"{stem}.norm.running_var"], before[f"{stem}.norm.running_var"])
    assert after["head.classifier.4.weight"].shape[0] == 3
