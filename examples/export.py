"""Export a model for a C++ or Swift app: ``.mlxfn`` files and ``export.json`` (a thin example over the library).

    python examples/export.py --output b0_app                                  # timm weights from the Hub
    python examples/export.py --weights my_model --output my_model_app --batch-size 8

Everything happens in :func:`mlx_evit.tasks.app_export.export_model`, also run by
``python -m mlx_evit export MODEL OUT_DIR`` (which adds SAM's ``--points``): the folder gets
``model.mlxfn`` (preprocessed ``(batch, H, W, 3)`` float32 NHWC images in, logits out) and
``export.json`` (input and output shapes, the preprocessing steps, the class names). The files are
checked before the folder appears: imported again in a fresh process, they must reproduce the model.
"""

from __future__ import annotations

import argparse
import json

import mlx_evit  # noqa: F401  (before mlx.core: sets up BLAS)
from mlx_evit.tasks.app_export import export_model


def main() -> None:
    parser = argparse.ArgumentParser(description="Export a model to .mlxfn + export.json and check it.")
    parser.add_argument("--model", default="efficientvit_b0.r224_in1k", help="a pretrained tag")
    parser.add_argument("--weights", help="MLX model directory or checkpoint, instead of the Hub weights")
    parser.add_argument("--output", "-o", required=True, help="folder to write")
    parser.add_argument("--batch-size", type=int, default=1, help="images per call (default 1)")
    parser.add_argument("--image-size", type=int, help="input resolution (default: the model's)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    parser.add_argument("--quantize", type=int, choices=(4, 8), help="quantize the Linear weights to 4 or 8 bits")
    parser.add_argument("--force", action="store_true", help="replace an earlier export")
    args = parser.parse_args()
    try:
        out = export_model(args.weights or args.model, args.output, image_size=args.image_size,
                           batch_size=args.batch_size, dtype=args.dtype, quantize=args.quantize, force=args.force)
    except (OSError, ValueError) as e:  # ExportError and OutputError are ValueErrors with one-line messages
        raise SystemExit(f"error: {e}")
    spec = json.loads((out / "export.json").read_text())
    model = spec["functions"]["model"]
    print(f"wrote {out / model['file']}: {spec['model']}, input {tuple(model['inputs'][0]['shape'])} float32 NHWC "
          f"-> logits {tuple(model['outputs'][0]['shape'])}; re-imported in a fresh process, relative error "
          f"{spec['check']['max_relative_error']['model']:.1e}")


if __name__ == "__main__":
    main()
