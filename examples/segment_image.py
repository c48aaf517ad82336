"""Segment one image with the Python API: load a seg model, predict, save the colours and an overlay.

    python examples/segment_image.py street.png                                   # released Cityscapes B1
    python examples/segment_image.py room.jpg --model efficientvit_seg_l1_ade20k --output room_seg.png
    python examples/segment_image.py street.png --weights efficientvit_seg_b0_cityscapes.pt   # a local file
"""

import argparse

import numpy as np
from PIL import Image

import mlx_evit  # noqa: F401  (import before mlx.core: it sets up BLAS)
from mlx_evit.loading.hub import HubError
from mlx_evit.tasks.segmenter import Segmenter

parser = argparse.ArgumentParser(description="Label every pixel of an image (Cityscapes or ADE20K classes).")
parser.add_argument("image")
parser.add_argument("--model", default="efficientvit_seg_b1_cityscapes", help="a registered seg model")
parser.add_argument("--weights", help="original .pt, other checkpoint or converted MLX folder (default: the Hub)")
parser.add_argument("--output", default="segmentation.png", help="colour label map; the overlay goes beside it")
parser.add_argument("--alpha", type=float, default=0.5, help="overlay opacity of the colours")
args = parser.parse_args()

try:  # the dataset's preprocessing (Cityscapes 1024x2048, ADE20K short side 512), BatchNorms folded, compiled
    segmenter = Segmenter.load(None if args.weights and args.model == parser.get_default("model") else args.model,
                               weights=args.weights)
    image = np.asarray(Image.open(args.image).convert("RGB"))
except (OSError, ValueError, HubError) as e:  # no such file, bad weights, Hub unreachable: say so, no traceback
    raise SystemExit(f"error: {e}")
result = segmenter(image)  # .labels (H, W) at the image size, .logits (h/8, w/8, classes)

Image.fromarray(result.colorize()).save(args.output)
overlay = args.output.rsplit(".", 1)[0] + "_overlay.png"
Image.fromarray(result.overlay(image, args.alpha)).save(overlay)
fractions = result.class_fractions()
for i in np.argsort(-fractions)[:5]:
    if fractions[i] > 0:
        print(f"{fractions[i]:7.2%}  {segmenter.classes[i]}")
print(f"wrote {args.output} and {overlay}")
