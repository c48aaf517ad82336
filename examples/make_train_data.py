"""Make a small synthetic data set to try fine-tuning on: shapes on noisy backgrounds.

    python examples/make_train_data.py seg demo_seg      # demo_seg/{train,val}/{images,labels}, classes.txt
    python examples/make_train_data.py sam demo_sam      # demo_sam/{train,val}/{images,masks}

seg: each image holds a few discs, rectangles and triangles; the label PNG
gives every pixel its class (0 background, 1 disc, 2 rectangle, 3
triangle), with a 2-pixel band of 255 (ignore) around each shape. Each kind
of shape has its own range of colours and the background is noisy, so the
classes can be learnt from a few hundred crops.

sam: one or two larger shapes on a plain dark background; every shape is
one instance mask, ``masks/<stem>_<k>.png`` (0/255). Plain and large
because the README trains the decoder on a frozen image encoder with random
weights (no pretrained model offline): such an encoder's embedding shows
a shape well only when it stands out (a linear read-out of the shapes from
it: IoU 0.82 on these images at 256 px, 0.35 with the seg kind's busy backgrounds).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

CLASSES = ("background", "disc", "rectangle", "triangle")
HUES = {1: (200, 60, 50), 2: (50, 170, 60), 3: (60, 80, 200)}  # base colour per shape kind


def scene(rng: np.random.Generator, size: tuple[int, int], shapes: int, plain: bool = False,
          radius: tuple[int, int] = (10, 4)) -> tuple[np.ndarray, np.ndarray, list]:
    """(image uint8 (H, W, 3), class map uint8 (H, W), [(class, instance mask bool)]).

    ``plain``: a dark grey background with little noise instead of a random colour gradient;
    ``radius``: shape radii from min(H, W) // radius[0] to min(H, W) // radius[1].
    """
    h, w = size
    if plain:
        background, noise = np.full((h, w, 3), 50.0), 6
    else:
        base = rng.integers(60, 200, 3)
        yy, xx = np.mgrid[0:h, 0:w]
        background = base + (xx / w * rng.integers(-60, 60) + yy / h * rng.integers(-60, 60))[..., None]
        noise = 18
    image = Image.fromarray(np.clip(background + rng.normal(0, noise, (h, w, 3)), 0, 255).astype(np.uint8))
    classes = np.zeros((h, w), np.uint8)
    instances = []
    for _ in range(shapes):
        kind = int(rng.integers(1, 4))
        r = int(rng.integers(min(h, w) // radius[0], min(h, w) // radius[1]))
        cx, cy = int(rng.integers(r, w - r)), int(rng.integers(r, h - r))
        mask_img = Image.new("L", (w, h), 0)
        draw = ImageDraw.Draw(mask_img)
        if kind == 1:
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        elif kind == 2:
            a = int(rng.integers(r // 2, r + 1))
            draw.rectangle([cx - r, cy - a, cx + r, cy + a], fill=255)
        else:
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=255)
        mask = np.asarray(mask_img) > 0
        colour = np.clip(np.array(HUES[kind]) + rng.integers(-40, 40, 3), 0, 255)
        pixels = np.asarray(image).copy()
        pixels[mask] = np.clip(colour + rng.normal(0, 12, (mask.sum(), 3)), 0, 255).astype(np.uint8)
        image = Image.fromarray(pixels)
        for _, earlier in instances:  # occluded parts belong to the new shape
            earlier &= ~mask
        instances.append((kind, mask))
        classes[mask] = kind
    return np.asarray(image.filter(ImageFilter.GaussianBlur(0.7))), classes, [i for i in instances if i[1].any()]


def ignore_band(classes: np.ndarray) -> np.ndarray:
    """255 on a 2-pixel band around every class boundary (ambiguous after the blur)."""
    label = Image.fromarray(classes)
    grown = np.asarray(label.filter(ImageFilter.MaxFilter(5)))
    shrunk = np.asarray(label.filter(ImageFilter.MinFilter(5)))
    out = classes.copy()
    out[grown != shrunk] = 255
    return out


def make(kind: str, out: Path, train: int, val: int, size: tuple[int, int], seed: int) -> None:
    rng = np.random.default_rng(seed)
    for split, count in (("train", train), ("val", val)):
        images = out / split / "images"
        targets = out / split / ("labels" if kind == "seg" else "masks")
        images.mkdir(parents=True, exist_ok=True)
        targets.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            h, w = (int(rng.integers(size[0] * 3 // 4, size[0] + 1)), int(rng.integers(size[1] * 3 // 4, size[1] + 1)))
            if kind == "seg":
                pixels, classes, instances = scene(rng, (h, w), int(rng.integers(2, 6)))
            else:
                pixels, classes, instances = scene(rng, (h, w), int(rng.integers(1, 3)), plain=True, radius=(6, 3))
            stem = f"{split}_{i:04d}"
            Image.fromarray(pixels).save(images / f"{stem}.jpg", quality=92)
            if kind == "seg":
                Image.fromarray(ignore_band(classes)).save(targets / f"{stem}.png")
            else:
                for k, (_, mask) in enumerate(instances):
                    Image.fromarray((mask * 255).astype(np.uint8)).save(targets / f"{stem}_{k}.png")
    if kind == "seg":
        (out / "classes.txt").write_text("\n".join(CLASSES) + "\n", encoding="utf-8")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("kind", choices=("seg", "sam"))
    p.add_argument("output", type=Path)
    p.add_argument("--train", type=int, default=48, help="training images (default 48)")
    p.add_argument("--val", type=int, default=12, help="validation images (default 12)")
    p.add_argument("--size", type=int, nargs=2, default=(192, 256), metavar=("H", "W"),
                   help="largest image size (default 192 256)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.output.exists() and any(args.output.iterdir()):
        print(f"error: {args.output} exists and is not empty", file=sys.stderr)
        return 2
    make(args.kind, args.output, args.train, args.val, tuple(args.size), args.seed)
    print(f"wrote {args.output}: {args.train} training and {args.val} validation images")
    return 0


if __name__ == "__main__":
    sys.exit(main())
