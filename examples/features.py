"""Multi-scale feature maps of a model for one image, saved as a PNG.

    python examples/features.py examples/images/cat.jpg --output features.png   # timm weights from the Hub
    python examples/features.py photo.jpg --weights my_model --image-size 512 --output features.png

``model.forward_features(x)`` returns one NHWC map per stage, finest first
(MIT B/L series: strides 4, 8, 16, 32; Microsoft M series: 16, 32, 64; seed
model: ``patch_size * 2**i``): the input of a segmentation or detection
head. Each map is drawn as RGB = its first three principal components over
the image's pixels (similar colours, similar features), enlarged to the
input size without smoothing so that its resolution stays visible, next to
the input crop.
"""

from __future__ import annotations

import argparse

import numpy as np
from PIL import Image, ImageDraw

import mlx_evit  # import before mlx.core (it sets up BLAS)
from mlx_evit.api import pretrained_weights
from mlx_evit.errors import HubError
from mlx_evit.tasks.transforms import eval_transform, load_image

import mlx.core as mx

GAP, CAPTION = 8, 18  # pixels between panels, and below them for the captions


def pca_rgb(features: np.ndarray) -> np.ndarray:
    """``(h, w, C)`` features -> ``(h, w, 3)`` uint8: the top three principal components as R, G, B.

    The mean feature is mid-grey, and all three components share one scale
    (the first component's 99th percentile of magnitude reaches 0 or 255;
    values beyond are clipped), so colour distances follow feature
    distances and a weak component stays faint instead of being stretched
    into noise. Missing components (fewer than 3 channels or pixels) stay
    grey.
    """
    h, w, c = features.shape
    x = features.reshape(h * w, c).astype(np.float64)
    x -= x.mean(axis=0)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    k = min(3, vt.shape[0])
    components = np.zeros((h * w, 3))
    components[:, :k] = x @ vt[:k].T
    scale = max(np.percentile(np.abs(components[:, 0]), 99), 1e-12)
    rgb = np.clip(0.5 + 0.5 * components / scale, 0.0, 1.0)
    return np.round(rgb * 255).astype(np.uint8).reshape(h, w, 3)


def feature_panels(model, image: Image.Image, cfg: dict) -> tuple[np.ndarray, list[np.ndarray]]:
    """The input crop ``(H, W, 3)`` uint8 and each stage's features ``(h_i, w_i, C_i)`` float32."""
    transform = eval_transform(cfg)
    pixels = transform(image)  # (H, W, 3) float32, normalized
    features = model.forward_features(mx.array(pixels)[None])
    return transform.crop_uint8(image), [np.array(f[0].astype(mx.float32)) for f in features]


def render(crop: np.ndarray, features: list[np.ndarray]) -> Image.Image:
    """The input crop and one PCA panel per stage, side by side, captioned with their shapes."""
    height, width = crop.shape[:2]
    canvas = Image.new("RGB", ((len(features) + 1) * (width + GAP) - GAP, height + CAPTION), "white")
    draw = ImageDraw.Draw(canvas)
    canvas.paste(Image.fromarray(crop), (0, 0))
    draw.text((2, height + 3), "input", fill="black")
    for i, f in enumerate(features, 1):
        panel = Image.fromarray(pca_rgb(f)).resize((width, height), Image.Resampling.NEAREST)
        canvas.paste(panel, (i * (width + GAP), 0))
        h, w, c = f.shape
        draw.text((i * (width + GAP) + 2, height + 3), f"stage {i - 1}: {h}x{w}x{c}", fill="black")
    return canvas


def main() -> None:
    parser = argparse.ArgumentParser(description="Draw a model's per-stage feature maps for an image.")
    parser.add_argument("image")
    parser.add_argument("--model", default="efficientvit_b0.r224_in1k", help="a pretrained tag")
    parser.add_argument("--weights", help="MLX model directory or checkpoint, instead of the Hub weights")
    parser.add_argument("--image-size", type=int, help="input resolution (default: the model's)")
    parser.add_argument("--output", "-o", default="features.png", help="PNG to write (default features.png)")
    args = parser.parse_args()
    try:
        model = mlx_evit.load(args.weights or pretrained_weights(args.model))
        cfg = dict(model.pretrained_cfg or {})
        if args.image_size:
            cfg["input_size"] = (3, args.image_size, args.image_size)
        crop, features = feature_panels(model, load_image(args.image), cfg)
    except (OSError, ValueError, HubError) as e:
        raise SystemExit(f"error: {e}")
    for i, f in enumerate(features):
        print(f"stage {i}: {f.shape[0]}x{f.shape[1]} positions x {f.shape[2]} channels")
    render(crop, features).save(args.output)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
