"""What ``export.json`` says an app must do around the exported functions, family by family.

Each builder returns plain JSON data: the preprocessing, prompt and
postprocessing steps as a list of ``{"step": ..., fields..., "text": ...}``
objects. The fields are exact (numbers, rounding, interpolation, index
arithmetic); ``text`` says the same in a sentence, so an app can be written
from the file alone (C++, Swift) without reading this package.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

__all__ = ["classification_steps", "segmentation_steps", "sam_steps", "TORCH_LINEAR_INDEX", "PILLOW_BILINEAR"]

TORCH_LINEAR_INDEX = (
    "torch F.interpolate(mode='bilinear', align_corners=False), one axis at a time: for output index d of n_out "
    "from n_in, scale = float32(n_in) / float32(n_out), s = float32(scale * (d + 0.5) - 0.5), s = max(s, 0), "
    "i0 = floor(s), i1 = min(i0 + 1, n_in - 1), w1 = s - i0, w0 = 1 - w1, out[d] = w0 * in[i0] + w1 * in[i1]"
)
TORCH_CUBIC_INDEX = (
    "torch F.interpolate(mode='bicubic', align_corners=False), one axis at a time: scale = float32(n_in) / "
    "float32(n_out), s = float32(scale * (d + 0.5) - 0.5) (not clamped), i0 = floor(s), t = s - i0; taps "
    "i0-1..i0+2 clamped to [0, n_in - 1] with Keys weights (A = -0.75): far(t + 1), near(t), near(1 - t), "
    "far(2 - t), near(x) = ((A + 2) x - (A + 3)) x^2 + 1, far(x) = ((A x - 5A) x + 8A) x - 4A"
)
PILLOW_BILINEAR = (
    "Pillow Image.resize(size, Image.BILINEAR) on 8-bit RGB: separable, horizontal pass first (only over the "
    "rows the vertical pass reads), then vertical, each pass: scale = n_in / n_out (double), support = "
    "max(scale, 1), for output index d: center = (d + 0.5) * scale, xmin = max(int(center - support + 0.5), 0), "
    "xmax = min(int(center + support + 0.5), n_in), weights k(x) = max(0, 1 - |(x - center + 0.5) / "
    "max(scale, 1)|) for x in [xmin, xmax), normalised to sum 1, then fixed point: "
    "K = int(k * 2^22 + 0.5) (int(k * 2^22 - 0.5) if k < 0); out = clip((2^21 + sum(in[x] * K)) >> 22, 0, 255) "
    "(integer arithmetic, the intermediate image is uint8). An image already of the target size is not resized."
)


def _normalize_step(mean: Sequence[float], std: Sequence[float], formula: str) -> dict[str, Any]:
    return {"step": "normalize", "mean": [float(m) for m in mean], "std": [float(s) for s in std],
            "formula": formula, "dtype": "float32",
            "text": f"per channel (R, G, B), in float32: {formula}"}


def classification_steps(cfg: dict[str, Any], size: tuple[int, int], transform: Any) -> dict[str, Any]:
    """timm's evaluation transform as :class:`mlx_evit.tasks.transforms.EvalTransform` runs it."""
    h, w = size
    sh, sw = transform.scale_size
    mode = transform.crop_mode
    if mode == "center" and sh == sw:
        rule = (f"short side to {sh}, long side int({sh} * long / short) (truncated); the image's orientation "
                "kept (width <= height: width is the short side)")
    elif mode == "squash":
        rule = f"both sides to exactly {sh}x{sw} (H x W), aspect ratio not kept"
    else:
        fit = "max" if mode == "border" else "min"
        rule = (f"ratio = {fit}(height / {sh}, width / {sw}); width' = max(1, round_half_even(width / ratio)), "
                "height' = max(1, round_half_even(height / ratio))")
    return {
        "preprocessing": [
            {"step": "decode", "text": "decode the image, apply its EXIF orientation, convert to 8-bit RGB "
                                       "(alpha dropped, not composited)"},
            {"step": "resize", "crop_mode": mode, "scale_size": [sh, sw], "crop_pct": transform.crop_pct,
             "interpolation": f"pillow_{transform.interpolation}", "rule": rule,
             "text": f"resize with Pillow's {transform.interpolation.upper()} filter (uint8): {rule}; skipped "
                     "when the size is already right"},
            {"step": "center_crop", "size": [h, w],
             "fill": [round(255 * m) for m in transform.mean] if mode == "border" else [0, 0, 0],
             "text": f"torchvision CenterCrop to {h}x{w}: if smaller, first pad (top/left get floor(pad / 2)) with "
                     f"the fill colour; then offset top = round_half_even((H' - {h}) / 2), left likewise"},
            _normalize_step(transform.mean, transform.std, "(x / 255 - mean) / std"),
            {"step": "layout", "layout": "NHWC", "text": "stack images as (batch, H, W, 3), float32, C order"},
        ],
        "postprocessing": [
            {"step": "softmax", "text": "logits (batch, classes); probabilities = softmax over the last axis; "
                                        "the class index is the argmax"},
        ],
    }


def segmentation_steps(cfg: Optional[dict[str, Any]], size: tuple[int, int], mean, std) -> dict[str, Any]:
    """The original EfficientViT-Seg evaluation as :class:`mlx_evit.tasks.segmenter.Segmenter` runs it."""
    h, w = size
    mode = (cfg or {}).get("crop_mode")
    if mode == "short_side":
        native = ("The original evaluation sizes each image: short side 512, long side ceil(long / short * 512 / "
                  f"32) * 32; this export takes exactly {h}x{w}, the size for images of that aspect ratio")
    else:
        _, nh, nw = (cfg or {}).get("input_size", (3, h, w))
        native = f"The original evaluation resizes every image to {nh}x{nw} whatever its aspect ratio"
    formula = "(x - m) * r with m = float32(mean) * 255 and r = 1 / (float32(std) * 255), all float32"
    return {
        "preprocessing": [
            {"step": "decode", "text": "decode the image, apply its EXIF orientation, convert to 8-bit RGB"},
            {"step": "resize", "size": [h, w], "interpolation": "opencv_cubic", "skip_if_equal": True,
             "text": f"resize to exactly {h}x{w} (H x W) with OpenCV cv2.resize(..., INTER_CUBIC) on uint8 "
                     f"(Keys cubic, A = -0.75, result rounded and saturated to 0..255); skipped when the image is "
                     f"already {h}x{w}. {native}"},
            _normalize_step(mean, std, formula),
            {"step": "layout", "layout": "NHWC", "text": "(batch, H, W, 3), float32, C order"},
        ],
        "postprocessing": [
            {"step": "resize_logits", "interpolation": "torch_bicubic", "index_rule": TORCH_CUBIC_INDEX,
             "text": "logits (batch, H / 8, W / 8, classes) at stride 8; resize them to the original image size "
                     "(h, w) with torch's bicubic rule (align_corners False), then take the argmax over classes "
                     "per pixel (first maximum wins)"},
            {"step": "colorize", "text": "class index -> palette[index] (RGB) for display"},
        ],
    }


def sam_steps(size: int, frame: int, mean, std, low_res: int, threshold: float) -> dict[str, Any]:
    """EfficientViT-SAM as :class:`mlx_evit.tasks.sam_predictor.SamPredictor` runs it."""
    frame_rule = (f"nh = int(h * ({frame} / max(h, w)) + 0.5), nw = int(w * ({frame} / max(h, w)) + 0.5) "
                  "(double arithmetic, truncated)")
    return {
        "preprocessing": [
            {"step": "decode", "text": "decode the image to 8-bit RGB (h x w)"},
            {"step": "resize", "rule": "long_side", "size": size, "interpolation": "pillow_bilinear",
             "rounding": f"int(x * ({size} / max(h, w)) + 0.5)", "algorithm": PILLOW_BILINEAR,
             "text": f"resize so the long side is {size}: rh = int(h * s + 0.5), rw = int(w * s + 0.5) with s = "
                     f"{size} / max(h, w) in double; skipped when max(h, w) == {size}. {PILLOW_BILINEAR}"},
            _normalize_step(mean, std, "(x / 255 - mean) / std"),
            {"step": "pad", "size": [size, size], "value": 0.0, "where": "bottom_right",
             "text": f"place the (rh, rw, 3) result at the top left of a {size}x{size}x3 float32 array of zeros"},
            {"step": "layout", "layout": "NHWC", "text": f"(1, {size}, {size}, 3), float32, C order"},
        ],
        "prompts": {
            "frame": frame,
            "frame_size": frame_rule,
            "coordinate_transform": f"x' = x * (nw / w), y' = y * (nh / h) in double, then float32; {frame_rule}",
            "labels": {"1": "foreground click", "0": "background click", "2": "box top-left corner",
                       "3": "box bottom-right corner", "-1": "padding point"},
            "order": "clicks first, then either the box's two corners (labels 2, 3) or, without a box, one "
                     "padding point (0, 0) with label -1",
            "mask_input": f"(1, {low_res}, {low_res}, 1) float32 low-resolution logits of an earlier call (finite); "
                          "zeros when has_mask_input is 0",
            "has_mask_input": "(1,) float32: 1 to use mask_input, 0 to ignore it",
            "text": f"prompt coordinates are pixels of the image resized so its long side is {frame} (for every "
                    "encoder size); transform (x, y) pixel coordinates of the original image with "
                    "coordinate_transform. A decoder takes exactly N points: pick the decoder whose N is "
                    "clicks + 2 (with a box) or clicks + 1 (without one).",
        },
        "postprocessing": [
            {"step": "select", "text": "masks (1, 4, 256, 256) and iou_predictions (1, 4): index 0 is the "
                                       "single-mask output (use it for several clicks or a box with clicks); "
                                       "1-3 the multimask outputs (for one click: take the highest IoU)"},
            {"step": "upscale", "size": [frame, frame], "interpolation": "torch_bilinear",
             "index_rule": TORCH_LINEAR_INDEX,
             "text": f"resize the {low_res}x{low_res} logits bilinearly to {frame}x{frame}"},
            {"step": "crop", "text": "keep rows 0..nh-1 and columns 0..nw-1 (frame_size)"},
            {"step": "resize", "interpolation": "torch_bilinear", "index_rule": TORCH_LINEAR_INDEX,
             "text": "resize the (nh, nw) logits bilinearly to the original (h, w). The three steps are linear "
                     "per axis: mlx_evit composes each axis into one (h, 256) / (w, 256) matrix in double and "
                     "applies logits' = Mh @ low @ Mw^T in float32"},
            {"step": "threshold", "value": threshold,
             "text": f"mask = logits > {threshold}"},
        ],
    }
