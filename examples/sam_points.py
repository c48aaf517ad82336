"""Segment an object from points and a box with EfficientViT-SAM; save the masks over the photo.

    python examples/sam_points.py examples/images/cat.jpg --point 200,150 --box 40,30,420,290
    python examples/sam_points.py photo.jpg --point 320,240 --point 50,50,0 --model efficientvit_sam_xl0
    python examples/sam_points.py photo.jpg --point 320,240 --weights efficientvit_sam_l0.pt --out sam.png
"""

import argparse

import numpy as np
from PIL import Image

import mlx_evit  # import before mlx.core (it sets up BLAS)
from mlx_evit.loading.hub import HubError
from mlx_evit.tasks.transforms import load_image
from mlx_evit.sam import SamPredictor

parser = argparse.ArgumentParser(description="Masks from point (X,Y[,LABEL]) and box (X0,Y0,X1,Y1) prompts.")
parser.add_argument("image")
parser.add_argument("--point", action="append", default=[], help="X,Y or X,Y,0 for background; repeatable")
parser.add_argument("--box", help="X0,Y0,X1,Y1")
parser.add_argument("--model", default="efficientvit_sam_l0", help="released weights from the Hub")
parser.add_argument("--weights", help="an original .pt or a converted folder, instead of the Hub weights")
parser.add_argument("--out", default="sam_overlay.png")
args = parser.parse_args()

try:
    points = [[float(v) for v in p.split(",")] for p in args.point]
    box = np.array([float(v) for v in args.box.split(",")]) if args.box else None
    coords = np.array([p[:2] for p in points]) if points else None
    labels = np.array([int(p[2]) if len(p) > 2 else 1 for p in points]) if points else None
    if coords is None and box is None:
        raise ValueError("give at least one --point or a --box")
    image = np.asarray(load_image(args.image))  # (H, W, 3) uint8 RGB
    model = mlx_evit.load(args.weights or args.model)  # a registered name fetches and caches the Hub file
except (OSError, ValueError, IndexError, HubError) as e:  # bad prompt, file or weights: one line, no traceback
    raise SystemExit(f"error: {e}")

predictor = SamPredictor(model)
predictor.set_image(image)  # the image encoder runs once; every predict() below reuses its embedding
masks, scores, _ = predictor.predict(coords, labels, box, multimask_output=box is None and len(points) == 1)
best = masks[np.argmax(scores)]  # (H, W) bool
print(f"{len(masks)} mask(s), predicted IoU {[round(float(s), 3) for s in scores]}; best covers {best.mean():.1%}")

overlay = image.astype(np.float32)
overlay[best] = 0.5 * overlay[best] + 0.5 * np.array([30, 144, 255])
for (x, y), label in zip(coords if coords is not None else [], labels if labels is not None else []):
    colour = (0, 255, 0) if label else (255, 0, 0)  # green foreground, red background points
    overlay[max(int(y) - 3, 0) : int(y) + 4, max(int(x) - 3, 0) : int(x) + 4] = colour
Image.fromarray(overlay.astype(np.uint8)).save(args.out)
print(f"saved {args.out}")
