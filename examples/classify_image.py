"""Classify one image with the Python API: load a model, preprocess, predict, print the top 5.

    python examples/classify_image.py examples/images/cat.jpg             # timm weights from the Hub
    python examples/classify_image.py photo.jpg --model efficientvit_m0.r224_in1k
    python examples/classify_image.py photo.jpg --weights my_model        # MLX directory or checkpoint
"""

import argparse

import mlx_evit  # import before mlx.core (it sets up BLAS)
from mlx_evit.errors import HubError
from mlx_evit.tasks.labels import imagenet_labels
from mlx_evit.tasks.transforms import preprocess

import mlx.core as mx

parser = argparse.ArgumentParser(description="Top-5 classes of an image.")
parser.add_argument("image")
parser.add_argument("--model", default="efficientvit_b0.r224_in1k", help="a pretrained tag")
parser.add_argument("--weights", help="MLX model directory or checkpoint, instead of the Hub weights")
args = parser.parse_args()

try:  # eval mode, BatchNorms folded; .pretrained_cfg is the model's preprocessing, .labels its class names
    model = mlx_evit.load(args.weights or args.model)  # a tag fetches and caches its Hub weights
    pixels = preprocess(args.image, model.pretrained_cfg or {})  # (H, W, 3) float32, as timm (defaults if no cfg)
except (OSError, ValueError, HubError) as e:  # no such file, bad weights, Hub unreachable: say so, no traceback
    raise SystemExit(f"error: {e}")
probs = mx.softmax(model(mx.array(pixels)[None]), axis=-1)[0]  # a batch of one NHWC image -> probabilities

if model.labels:  # class names saved with the model (e.g. by examples/finetune.py)
    names = model.labels
elif model.num_classes == 1000:
    names = [label.name for label in imagenet_labels()]
else:
    names = [f"class {i}" for i in range(model.num_classes)]
for i in mx.argsort(-probs)[:5].tolist():
    print(f"{probs[i].item():7.2%}  {names[i]}")
