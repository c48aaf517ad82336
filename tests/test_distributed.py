"""Evaluation and fine-tuning on 2 ranks (mx.distributed, ring backend on 127.0.0.1) against one process.

Runs go through ``mlx.launch --backend ring -n 2`` as a user would, on free
ports, every subprocess bounded in time (stdin closed: the launcher
forwards it). ``mlx.launch`` exits 0 even when a rank fails, so the failure
tests also start the two ranks directly with the environment the ring
backend reads (``MLX_RANK``, ``MLX_HOSTFILE``) to check each rank's exit
status; a rank is made to die, hang or fail by a small wrapper that patches
the library on that rank only.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import mlx_evit  # before mlx.core
from mlx_evit.tasks.distributed import EXIT_RANK_FAILED

import mlx.core as mx
from mlx.utils import tree_flatten

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = Path(sys.executable).with_name("mlx.launch")
TIMEOUT = 180

pytestmark = pytest.mark.skipif(not LAUNCH.exists(), reason="mlx.launch is not installed beside this Python")


def free_ports(n: int = 2) -> int:
    """A first port of ``n`` consecutive free TCP ports on 127.0.0.1."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            first = s.getsockname()[1]
        if first + n > 65535:
            continue
        try:
            sockets = []
            for port in range(first, first + n):
                s = socket.socket()
                sockets.append(s)
                s.bind(("127.0.0.1", port))
            return first
        except OSError:
            continue
        finally:
            for s in sockets:
                s.close()
    raise RuntimeError("no free ports")


def launch(args: list[str], n: int = 2) -> subprocess.CompletedProcess:
    """``mlx.launch --backend ring -n N python ARGS`` on 127.0.0.1."""
    cmd = [str(LAUNCH), "--backend", "ring", "-n", str(n), "--starting-port", str(free_ports(n)),
           sys.executable, *map(str, args)]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT, stdin=subprocess.DEVNULL)


def single(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=TIMEOUT, stdin=subprocess.DEVNULL)


def ranks_directly(args: list[str], tmp_path: Path, n: int = 2, timeout: float = 60) -> list[subprocess.Popen]:
    """Start ``n`` ranks without the launcher (the ring backend's environment); returns them finished."""
    first = free_ports(n)
    hostfile = tmp_path / "hosts.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{first + r}"] for r in range(n)]))
    procs = []
    for rank in range(n):
        env = dict(os.environ, MLX_RANK=str(rank), MLX_HOSTFILE=str(hostfile))
        procs.append(subprocess.Popen([sys.executable, *map(str, args)], cwd=ROOT, env=env, text=True,
                                      stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    for p in procs:
        try:
            p.out, p.err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail(f"a rank did not finish within {timeout} s")
    return procs


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    assert "[WARN] Node with rank" not in proc.stderr, proc.stderr  # the launcher's note on a failed rank
    return proc


# A rank patched to misbehave: ``die N RANK`` (os._exit(9)) or ``hang N RANK`` (sleep) at its N-th image load.
WRAPPER = textwrap.dedent("""
    import os, sys, threading, time
    import mlx_evit
    import mlx_evit.tasks.classifier as loading  # evaluation's loader threads read files through it
    how, nth, rank, *rest = sys.argv[1:]
    if os.environ.get("MLX_RANK") == rank:
        original, calls, lock = loading.load_image, [0], threading.Lock()
        def load_image(path):
            with lock:
                calls[0] += 1
                count = calls[0]
            if count == int(nth):
                if how == "die":
                    os._exit(9)
                time.sleep(3600)
            return original(path)
        loading.load_image = load_image
    from mlx_evit.cli.evaluate_command import main
    sys.exit(main(rest))
""")


# ------------------------------------------------------------------------------------------ data


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A random 3-class seed model at 32 px with class names."""
    mx.random.seed(2)
    model = mlx_evit.create_model("efficientvit_seed", num_classes=3, image_size=32, patch_size=4, embed_dim=16,
                                  depths=(1, 1), num_heads=(2, 2))
    model.pretrained_cfg = {"input_size": [3, 32, 32], "crop_pct": 0.9, "interpolation": "bicubic",
                            "mean": [0.5] * 3, "std": [0.25] * 3}
    return mlx_evit.save_model(model, tmp_path_factory.mktemp("seed") / "model", labels=["cat", "dog", "bird"])


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """45 random images of several sizes in 3 class folders (one nested), and one broken file."""
    root = tmp_path_factory.mktemp("images") / "data"
    rng = np.random.default_rng(0)
    for c, folder in enumerate(("cat", "dog", "bird/inner")):
        (root / folder).mkdir(parents=True)
        for i in range(15):
            h, w = rng.integers(20, 48, size=2)
            pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8) // (c + 1)
            Image.fromarray(pixels).save(root / folder / f"{i:02d}.png")
    (root / "dog" / "zz_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    return root


def read_rows(path: Path) -> list[tuple[str, ...]]:
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    return [rows[0]] + sorted(map(tuple, rows[1:]))


# ------------------------------------------------------------------------------------------ evaluation


def test_evaluation_on_two_ranks_equals_one_process(model_dir, images, tmp_path):
    common = ["-m", "mlx_evit.evaluate", images, "--weights", model_dir, "--batch-size", "4", "--skip-errors"]
    one = ok(single(common + ["--output", tmp_path / "one"]))
    two = ok(launch(common + ["--output", tmp_path / "two"]))
    assert "on 1 rank" in one.stdout and "on 2 ranks" in two.stdout
    assert "read 46/46 images on 2 ranks" in two.stderr  # progress, from rank 0 only
    assert two.stdout.count("evaluated 45 images") == 1 and "1 unreadable skipped" in two.stdout
    assert two.stderr.count("zz_broken.png") == 1  # reported once, by the rank that read it
    first, second = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("one", "two"))
    assert (first.pop("ranks"), second.pop("ranks")) == (1, 2)
    for key in ("seconds", "images_per_second"):
        first.pop(key), second.pop(key)
    assert first == second
    assert first["evaluated"] == 45 and first["skipped"] == 1 and 0 < first["top1"] < 1
    assert read_rows(tmp_path / "one" / "predictions.csv") == read_rows(tmp_path / "two" / "predictions.csv")
    assert len(read_rows(tmp_path / "two" / "predictions.csv")) == 46  # header + 45 images
    assert (tmp_path / "one" / "confusion.csv").read_text() == (tmp_path / "two" / "confusion.csv").read_text()


def test_a_dying_rank_fails_the_run_before_anything_is_written(model_dir, images, tmp_path):
    args = ["-c", WRAPPER, "die", "9", "1", images, "--weights", model_dir, "--batch-size", "4", "--skip-errors",
            "--output", tmp_path / "out", "--rank-timeout", "30"]
    # Under the launcher: rank 1 dies loading its third batch; rank 0 says why it stops, nothing is written.
    proc = launch(args)
    assert "Node with rank 1 exited with code 9" in proc.stderr
    assert "mlx_evit.evaluate: rank 0: error:" in proc.stderr and "nothing written" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "out").exists()
    # Without it, rank 0's own exit status says so too.
    rank0, rank1 = ranks_directly(args, tmp_path)
    assert rank1.returncode == 9
    assert rank0.returncode == EXIT_RANK_FAILED, rank0.err
    assert re.search(r"rank 0: error: (lost the connection to another rank|no answer from the other ranks)",
                     rank0.err) and "nothing written" in rank0.err, rank0.err
    assert not (tmp_path / "out").exists()


def test_a_hanging_rank_times_out(model_dir, images, tmp_path):
    args = ["-c", WRAPPER, "hang", "6", "1", images, "--weights", model_dir, "--batch-size", "4", "--skip-errors",
            "--output", tmp_path / "out", "--rank-timeout", "4"]
    first = free_ports(2)
    hostfile = tmp_path / "hosts.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{first}"], [f"127.0.0.1:{first + 1}"]]))
    procs = [subprocess.Popen([sys.executable, *map(str, args)], cwd=ROOT, text=True, stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env=dict(os.environ, MLX_RANK=str(r), MLX_HOSTFILE=str(hostfile)))
             for r in range(2)]
    try:
        _, err = procs[0].communicate(timeout=60)
    finally:
        procs[1].kill()
        procs[1].communicate(timeout=30)
    assert procs[0].returncode == EXIT_RANK_FAILED, err
    assert "rank 0: error: no answer from the other ranks within 4 s" in err and "nothing written" in err
    assert not (tmp_path / "out").exists()


def test_an_unreadable_image_on_one_rank_stops_all(model_dir, images, tmp_path):
    """Without --skip-errors the rank that read the broken file names it; the other one stops too."""
    args = ["-m", "mlx_evit.evaluate", images, "--weights", model_dir, "--batch-size", "4",
            "--output", tmp_path / "out"]
    procs = ranks_directly(args, tmp_path)
    # 46 files sorted: bird/inner (15), cat (15), dog (16): the broken one is the last, in batch 11 (rank 1).
    assert procs[1].returncode == 1 and "rank 1: error:" in procs[1].err and "zz_broken.png" in procs[1].err
    assert procs[0].returncode == EXIT_RANK_FAILED and "rank 0: error: rank 1 failed" in procs[0].err
    assert not (tmp_path / "out").exists()


def test_a_bad_output_on_rank_0_stops_the_other_ranks_before_the_work(model_dir, images, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("keep")
    procs = ranks_directly(["-m", "mlx_evit.evaluate", images, "--weights", model_dir, "--output", tmp_path / "out"],
                           tmp_path)
    assert procs[0].returncode == 2 and "rank 0: error: --output" in procs[0].err
    assert "not an evaluation output folder" in procs[0].err and "--force" not in procs[0].err  # it could not help
    assert procs[1].returncode == EXIT_RANK_FAILED and "rank 1: error: rank 0 failed" in procs[1].err
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["notes.txt"]


def test_ranks_must_see_the_same_files(model_dir, images, tmp_path):
    """A rank whose copy of the data differs is found before any image is read."""
    other = tmp_path / "data"
    shutil.copytree(images, other)
    (other / "cat" / "00.png").unlink()
    code = textwrap.dedent(f"""
        import os, sys
        import mlx_evit
        from mlx_evit.cli.evaluate_command import main
        data = {str(images)!r} if os.environ["MLX_RANK"] == "0" else {str(other)!r}
        sys.exit(main([data, "--weights", {str(model_dir)!r}, "--skip-errors"]))
    """)
    procs = ranks_directly(["-c", code], tmp_path)
    for p in procs:
        assert p.returncode == EXIT_RANK_FAILED and "different class folders or files on rank(s) 1" in p.err


# ------------------------------------------------------------------------------------------ fine-tuning


@pytest.fixture(scope="module")
def train_dir(tmp_path_factory) -> Path:
    """3 classes of 10 images, each class its own colour pattern."""
    root = tmp_path_factory.mktemp("train") / "data"
    rng = np.random.default_rng(1)
    for c, name in enumerate(("red", "green", "blue")):
        (root / name).mkdir(parents=True)
        for i in range(10):
            pixels = rng.integers(0, 90, (36, 36, 3), dtype=np.uint8)
            pixels[..., c] += 160
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


def _weights(path: Path) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in tree_flatten(mlx_evit.load(path, fuse=False).parameters())}


def test_finetune_on_two_ranks_reaches_the_weights_of_one_process(train_dir, tmp_path):
    common = ["examples/finetune.py", train_dir, "--model", "seed", "--image-size", "32", "--epochs", "2",
              "--batch-size", "6", "--seed", "3"]
    one = ok(single(common + ["--output", tmp_path / "one"]))
    two = ok(launch(common + ["--output", tmp_path / "two"]))
    assert "1 rank" in one.stdout and "2 ranks" in two.stdout
    assert two.stdout.count("saved") == 1 and "2 ranks" in two.stderr  # rank 0 reports
    a, b = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    assert a.keys() == b.keys()
    worst = max(float(np.abs(a[k] - b[k]).max()) for k in a)
    assert worst < 2e-5, worst  # float32 round-off (reduction order), over 8 AdamW steps
    # Training moved the weights far more than that: a wrong gradient average would show.
    spec = importlib.util.spec_from_file_location("finetune", ROOT / "examples" / "finetune.py")
    finetune = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(finetune)
    args = finetune.parse_args([str(a) for a in common[1:]] + ["--output", str(tmp_path / "unused")])
    mx.random.seed(3)
    initial, _ = finetune.build_model(args, 3)
    start = {k: np.array(v) for k, v in tree_flatten(initial.parameters())}
    assert max(float(np.abs(a[k] - start[k]).max()) for k in a) > 1000 * max(worst, 1e-7)
    assert json.loads((tmp_path / "two" / "config.json").read_text())["labels"] == ["blue", "green", "red"]


def test_finetune_rank_failure_saves_nothing(train_dir, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(train_dir, data)
    (data / "red" / "0.png").write_bytes(b"broken")
    args = ["examples/finetune.py", data, "--model", "seed", "--image-size", "32", "--epochs", "1",
            "--batch-size", "6", "--output", tmp_path / "out"]
    procs = ranks_directly(args, tmp_path)
    codes = sorted(p.returncode for p in procs)
    errors = "".join(p.err for p in procs)
    assert codes[0] != 0 and codes[1] != 0, errors
    assert "0.png: not an image file" in errors
    assert re.search(r"error: rank \d: rank \d failed \(see its message\); stopping, nothing saved", errors), errors
    assert "Traceback" not in errors and not (tmp_path / "out").exists()
