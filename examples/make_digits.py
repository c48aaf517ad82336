"""Write scikit-learn's handwritten digits as an image folder, for trying examples/finetune.py offline.

    pip install scikit-learn
    python examples/make_digits.py digits --classes 3

makes ``digits/train/zero/0000.png``, ..., ``digits/test/two/...``: the 8x8
grey-level scans (1797 in all, about 180 per digit) enlarged to 32x32 RGB
PNGs, one subfolder per class, ``--test`` images of each class held out in
``test/`` (never seen by training or its validation split).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def write_digits(out: Path, classes: int = 10, test: int = 10, size: int = 32) -> None:
    """Digits ``0 .. classes - 1`` as ``out/{train,test}/<name>/<index>.png``; ``test`` per class held out."""
    from sklearn.datasets import load_digits  # imported here: only this example needs scikit-learn

    digits = load_digits()
    for label in range(classes):
        indices = np.flatnonzero(digits.target == label)
        for n, i in enumerate(indices):
            folder = out / ("test" if n < test else "train") / NAMES[label]
            folder.mkdir(parents=True, exist_ok=True)
            pixels = np.round(digits.images[i] * (255 / 16)).astype(np.uint8)  # 0..16 -> 0..255
            image = Image.fromarray(pixels).resize((size, size), Image.Resampling.BILINEAR)
            image.convert("RGB").save(folder / f"{i:04d}.png")


def main() -> None:
    parser = argparse.ArgumentParser(description="Write scikit-learn's digits as a folder of PNG images.")
    parser.add_argument("output", type=Path, help="folder to create (train/ and test/ inside)")
    parser.add_argument("--classes", type=int, default=10, choices=range(2, 11), metavar="2..10",
                        help="digits 0 .. N-1 (default 10)")
    parser.add_argument("--test", type=int, default=10, help="images per class held out in test/ (default 10)")
    args = parser.parse_args()
    if args.output.exists():
        parser.error(f"{args.output} already exists")
    write_digits(args.output, args.classes, args.test)
    print(f"wrote {args.output}/train and {args.output}/test ({args.classes} classes)")


if __name__ == "__main__":
    main()
