"""The README's offline fine-tuning block ("Fine-tune on your own data"), run as it is written.

Every line of the fenced block after "Offline, on synthetic shapes" runs in
a temporary folder (``python`` is this interpreter; ``examples/`` is linked
there, as in a clone). Then the model folders it wrote are loaded with
``Segmenter.from_pretrained`` and ``SamPredictor.from_pretrained`` and
measured on the validation images the block made: their mIoU and box IoU
must be the ones the commands reported and well above the untrained
model's, which the commands measured on the same images before training.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

import mlx_evit  # noqa: F401  (before mlx.core)

ROOT = Path(__file__).resolve().parents[1]


def readme_block() -> list[str]:
    """The command lines of the README's offline fine-tuning block."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    after = text[text.index("Offline, on synthetic shapes"):]
    block = re.search(r"```bash\n(.*?)```", after, re.S)
    assert block, "no fenced bash block after 'Offline, on synthetic shapes'"
    return [line for line in block.group(1).splitlines() if line.strip() and not line.startswith("#")]


def _run(line: str, cwd: Path) -> str:
    args = shlex.split(line)
    assert args[0] == "python", line
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, *args[1:]], cwd=cwd, capture_output=True, text=True, timeout=600,
                          stdin=subprocess.DEVNULL, env=env)
    assert done.returncode == 0, f"{line}\n{done.stderr[-2000:]}"
    return done.stdout + done.stderr


def _before_after(output: str, label: str) -> tuple[float, float]:
    found = re.search(rf"{label} ([0-9.]+) -> ([0-9.]+)", output)
    assert found, output[-2000:]
    return float(found.group(1)), float(found.group(2))


def _seg_miou(folder: Path, val: Path) -> float:
    from mlx_evit.tasks.segmenter import Segmenter

    seg = Segmenter.from_pretrained(folder)
    classes = len(seg.classes)
    inter, union = np.zeros(classes), np.zeros(classes)
    for image in sorted((val / "images").iterdir()):
        label = np.asarray(Image.open(val / "labels" / f"{image.stem}.png"))
        pred = seg(np.asarray(Image.open(image).convert("RGB"))).labels
        keep = label != 255
        for c in range(classes):
            p, t = (pred == c) & keep, (label == c) & keep
            inter[c] += (p & t).sum()
            union[c] += (p | t).sum()
    present = union > 0
    return float((inter[present] / union[present]).mean())


def _sam_box_iou(folder: Path, val: Path) -> float:
    from mlx_evit.sam import SamPredictor

    predictor = SamPredictor.from_pretrained(folder)
    ious = []
    for image in sorted((val / "images").iterdir()):
        predictor.set_image(np.asarray(Image.open(image).convert("RGB")))
        for mask_file in sorted((val / "masks").glob(f"{image.stem}_*.png")):
            mask = np.asarray(Image.open(mask_file)) > 0
            ys, xs = np.nonzero(mask)
            box = np.array([xs.min(), ys.min(), xs.max(), ys.max()], np.float32)
            pred = predictor.predict(box=box, multimask_output=False)[0][0]
            ious.append((pred & mask).sum() / max((pred | mask).sum(), 1))
    return float(np.mean(ious))


def test_the_readme_training_block_runs_as_written_and_gains(tmp_path):
    lines = readme_block()
    assert any(".segment train " in line for line in lines) and any(".sam train " in line for line in lines)
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    outputs = [_run(line, tmp_path) for line in lines]
    seg_log = next(o for line, o in zip(lines, outputs) if ".segment train " in line)
    sam_log = next(o for line, o in zip(lines, outputs) if ".sam train " in line)
    seg_folder = Path(shlex.split(next(line for line in lines if ".segment train " in line)).pop())
    sam_folder = Path(shlex.split(next(line for line in lines if ".sam train " in line)).pop())

    before, after = _before_after(seg_log, "mIoU")
    measured = _seg_miou(tmp_path / seg_folder, tmp_path / "shapes_seg" / "val")
    assert abs(measured - after) < 0.03, (measured, after)
    assert measured > before + 0.2 and measured > 2 * before, (before, after, measured)

    before, after = _before_after(sam_log, "mask IoU")
    measured = _sam_box_iou(tmp_path / sam_folder, tmp_path / "shapes_sam" / "val")
    assert abs(measured - after) < 0.05, (measured, after)
    assert measured > before + 0.1 and measured > 1.5 * before, (before, after, measured)
