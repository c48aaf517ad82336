"""A small offline stand-in for Cityscapes, to try ``python -m mlx_evit.segment`` without the Hub.

    python examples/make_seg_demo.py seg_demo

writes ``seg_demo/images/<city>/<name>_leftImg8bit.png`` (street-like scenes: sky, buildings,
vegetation, road, sidewalk, cars), their ground truth ``seg_demo/labels/<city>/<name>_gtFine_labelIds.png``
(Cityscapes label ids, as in gtFine) and ``seg_demo/model``: an EfficientViT-Seg B0 (Cityscapes
classes) with *random* weights, saved as an MLX model directory whose preprocessing resizes to
256x512 instead of 1024x2048, so that it runs in seconds. Its predictions are meaningless; the
demo shows the commands and the files they write. For real label maps use a released model
(``--model efficientvit_seg_b1_cityscapes``, downloaded once from the Hugging Face Hub).
"""

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image

import mlx_evit

# Cityscapes label ids (gtFine) and a colour per region.
SKY, BUILDING, VEGETATION, ROAD, SIDEWALK, CAR, UNLABELED = 23, 11, 21, 7, 8, 26, 0
COLOURS = {SKY: (110, 150, 210), BUILDING: (120, 110, 100), VEGETATION: (60, 120, 40), ROAD: (90, 80, 95),
           SIDEWALK: (170, 150, 160), CAR: (30, 40, 140), UNLABELED: (0, 0, 0)}


def scene(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """(RGB uint8 image, label ids uint8) of one street-like scene."""
    label = np.full((h, w), SKY, np.uint8)
    horizon = int(h * rng.uniform(0.45, 0.6))
    x = 0
    while x < w:  # buildings and trees along the horizon
        width = int(rng.integers(w // 10, w // 4))
        top = int(rng.integers(h // 10, horizon - h // 10))
        label[top:horizon, x : x + width] = BUILDING if rng.random() < 0.7 else VEGETATION
        x += width
    label[horizon:] = ROAD
    label[horizon : horizon + h // 12] = SIDEWALK
    for _ in range(int(rng.integers(1, 4))):  # cars on the road
        cw, ch = int(rng.integers(w // 10, w // 5)), int(rng.integers(h // 10, h // 6))
        cx, cy = int(rng.integers(0, w - cw)), int(rng.integers(horizon + h // 12, h - ch))
        label[cy : cy + ch, cx : cx + cw] = CAR
    label[-2:] = UNLABELED  # the ego-vehicle border, ignored in evaluation
    image = np.zeros((h, w, 3), np.float64)
    for value, colour in COLOURS.items():
        image[label == value] = colour
    image += rng.normal(0, 12, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8), label


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--images", type=int, default=4)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    for i in range(args.images):
        city = ("aachen", "bremen")[i % 2]
        name = f"{city}_{i:06d}_000019"
        image, label = scene(rng, 192, 384)
        for kind, suffix, data in (("images", "leftImg8bit", image), ("labels", "gtFine_labelIds", label)):
            path = args.folder / kind / city / f"{name}_{suffix}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(data).save(path)
    model_dir = args.folder / "model"
    model = mlx_evit.create_model("efficientvit_seg_b0_cityscapes")  # random weights
    mlx_evit.save_model(model, model_dir, force=True)
    config_path = model_dir / "config.json"
    config = json.loads(config_path.read_text())
    config["pretrained_cfg"]["input_size"] = [3, 256, 512]  # a small "custom" preprocessing
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    print(f"wrote {args.images} images and labels under {args.folder}, and a random-weight model in {model_dir}")


if __name__ == "__main__":
    main()
