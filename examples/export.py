"""Export a model's inference function to a ``.mlxfn`` file that C++ and Swift apps run with MLX.

    python examples/export.py --output b0.mlxfn                                   # timm weights from the Hub
    python examples/export.py --weights my_model --output my_model.mlxfn --batch-size 8

The file holds the forward pass of the model as ``mlx_evit.tasks.inference.prepare``
sets it up (eval mode, BatchNorms folded, optionally float16/bfloat16 or
4/8-bit weights) together with the weights, for one input shape
``(batch, H, W, 3)``: float32 NHWC images, resized, cropped and normalized
as the model's preprocessing says, in; float32 logits out. The
preprocessing, the class names and the input shape are stored with it as
JSON metadata. The shape is fixed: these models cannot be exported
``shapeless`` (their padding and reshapes depend on the image size), so
export one file per batch size and resolution.

The export is checked: the file is imported again with
``mx.import_function`` and must give exactly the model's logits on a
random batch.
"""

from __future__ import annotations

import argparse
import json
import os

import mlx_evit  # import before mlx.core (it sets up BLAS)
from mlx_evit.api import pretrained_weights
from mlx_evit.errors import HubError
from mlx_evit.tasks.inference import prepare
from mlx_evit.tasks.labels import imagenet_labels
from mlx_evit.ops.dtypes import DTYPE_NAMES
from mlx_evit.tasks.transforms import eval_transform
from mlx_evit.models.specs import PREPROCESSING_KEYS

import mlx.core as mx


def inference_function(model, dtype: str, quantize: int | None):
    """``forward(x)``: float32 ``(B, H, W, 3)`` -> float32 logits, with the prepared model."""
    predictor = prepare(model, dtype=dtype, quantize=quantize, streams=1, compile=True)
    net, net_dtype = predictor.model, predictor.dtype

    def forward(x: mx.array) -> mx.array:
        return net(x.astype(net_dtype)).astype(mx.float32)

    return forward


def class_names(model) -> list[str] | None:
    """The model's own labels; ImageNet's for a 1000-class model without them."""
    if model.labels:
        return list(model.labels)
    return [label.name for label in imagenet_labels()] if model.num_classes == 1000 else None


def main() -> None:
    parser = argparse.ArgumentParser(description="Export a model to an .mlxfn file and check it.")
    parser.add_argument("--model", default="efficientvit_b0.r224_in1k", help="a pretrained tag")
    parser.add_argument("--weights", help="MLX model directory or checkpoint, instead of the Hub weights")
    parser.add_argument("--output", "-o", required=True, help=".mlxfn file to write")
    parser.add_argument("--batch-size", type=int, default=1, help="images per call (default 1)")
    parser.add_argument("--image-size", type=int, help="input resolution (default: the model's)")
    parser.add_argument("--dtype", default="float32", choices=DTYPE_NAMES)
    parser.add_argument("--quantize", type=int, choices=(4, 8), help="quantize the Linear weights to 4 or 8 bits")
    args = parser.parse_args()
    if args.batch_size < 1 or (args.image_size is not None and args.image_size < 1):
        parser.error("--batch-size and --image-size must be positive")
    try:
        model = mlx_evit.load(args.weights or pretrained_weights(args.model))
        cfg = dict(model.pretrained_cfg or {})
        if args.image_size:
            cfg["input_size"] = (3, args.image_size, args.image_size)
        height, width = eval_transform(cfg).size
    except (OSError, ValueError, HubError) as e:
        raise SystemExit(f"error: {e}")

    forward = inference_function(model, args.dtype, args.quantize)
    shape = (args.batch_size, height, width, 3)
    metadata = {
        "model": model.arch_name,
        "input": {"shape": list(shape), "layout": "NHWC", "dtype": "float32"},
        "preprocessing": {k: cfg[k] for k in PREPROCESSING_KEYS
                          if k in cfg},
        "labels": class_names(model),
    }
    try:  # tracing runs the model once: a size it cannot take fails here, with the model's message
        mx.export_function(args.output, forward, mx.zeros(shape), metadata=json.dumps(metadata))
    except ValueError as e:
        raise SystemExit(f"error: cannot export at {height}x{width}: {e}")

    # Check: the imported function must reproduce the model's logits bit for bit.
    imported, stored = mx.import_function(args.output, return_metadata=True)
    x = mx.random.normal(shape, key=mx.random.key(0))
    expected, (got,) = forward(x), imported(x)
    if json.loads(stored) != json.loads(json.dumps(metadata)) or not mx.array_equal(got, expected).item():
        raise SystemExit(f"error: {args.output} does not reproduce the model "
                         f"(max |diff| {mx.abs(got - expected).max().item():.3g})")
    size_mb = os.path.getsize(args.output) / 2**20
    print(f"wrote {args.output} ({size_mb:.1f} MB): {model.arch_name}, input {shape} float32 NHWC -> logits "
          f"{tuple(got.shape)}; re-imported, logits identical")


if __name__ == "__main__":
    main()
