"""``python -m mlx_evit export MODEL OUT_DIR``: ``.mlxfn`` files and ``export.json`` for C++ and Swift apps.

The library side is :func:`mlx_evit.tasks.app_export.export_model`.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

from mlx_evit.cli.common import EXIT_FAILED, EXIT_OK, EXIT_USAGE, error_printer, guarded, positive_int
from mlx_evit.errors import HubError, one_line
from mlx_evit.ops.dtypes import DTYPE_NAMES
from mlx_evit.outputs import OutputError

__all__ = ["main", "build_parser"]

PROG = "python -m mlx_evit export"

_EPILOG = """\
what is written (all inputs and outputs float32, one fixed shape per file):
  classification  model.mlxfn: preprocessed (B, H, W, 3) images -> logits (B, classes)
  segmentation    model.mlxfn: preprocessed (B, H, W, 3) images -> stride-8 logits (B, H/8, W/8, classes)
  SAM             image_encoder.mlxfn: padded, normalised (1, S, S, 3) -> embeddings (1, 64, 64, 256)
                  prompt_decoder_<N>.mlxfn per --points N (Meta's ONNX decoder convention):
                  image_embeddings, point_coords (1, N, 2), point_labels (1, N), mask_input
                  (1, 256, 256, 1), has_mask_input (1,) -> masks (1, 4, 256, 256), iou_predictions (1, 4)
  export.json     every function's inputs/outputs and the pre- and postprocessing steps, exactly

examples:
  python -m mlx_evit export efficientvit_sam_l0 sam_l0/ --points 2,3
  python -m mlx_evit export efficientvit_seg_b0_cityscapes seg_b0/ --image-size 512x1024
  python -m mlx_evit export my_model/ my_model_app/ --batch-size 8 --dtype float16

The files are checked before the folder appears: each is imported in a fresh process with only
mlx.core and must reproduce the library's outputs. exit status: 0 written; 1 the model cannot be
exported or the check failed (message says why); 2 wrong usage or output folder.
"""


def _image_size(text: str) -> tuple[int, int]:
    """argparse type: ``512`` or ``512x1024`` (height x width)."""
    parts = text.lower().split("x")
    try:
        sizes = [int(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected SIZE or HxW, e.g. 512 or 512x1024, got {text!r}") from None
    if len(sizes) not in (1, 2) or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"expected SIZE or HxW with positive numbers, got {text!r}")
    return (sizes[0], sizes[-1])


def _points(text: str) -> tuple[int, ...]:
    """argparse type: comma-separated prompt lengths, ``1,2,5``."""
    try:
        values = tuple(int(p) for p in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected point counts like 1,2,5, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"point counts must be positive, got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Export a model's inference functions to .mlxfn files, with export.json describing "
                    "their inputs, outputs and the pre- and postprocessing, for C++ and Swift apps.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model", metavar="MODEL", help="registered name or Hub tag (weights downloaded once), "
                                                        "MLX model folder or checkpoint")
    parser.add_argument("out_dir", metavar="OUT_DIR", help="folder to write (must not exist unless --force)")
    parser.add_argument("--image-size", type=_image_size, metavar="SIZE|HxW",
                        help="input size (default: the model's; SAM: the encoder size S)")
    parser.add_argument("--batch-size", type=positive_int, default=1, metavar="N",
                        help="images per call (classification, segmentation; default 1)")
    parser.add_argument("--dtype", choices=DTYPE_NAMES, default="float32",
                        help="what the model computes in (inputs and outputs stay float32; default float32)")
    parser.add_argument("--quantize", type=int, choices=(4, 8),
                        help="quantize the Linear weights to 4 or 8 bits (classification, segmentation)")
    parser.add_argument("--points", type=_points, default=None, metavar="N[,N...]",
                        help="SAM: prompt lengths, one decoder each (clicks + 1 padding point, or clicks + 2 "
                             "box corners; default 2)")
    parser.add_argument("--force", action="store_true", help="replace OUT_DIR if it is an earlier export")
    parser.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    error = error_printer(PROG)

    def log(message: str) -> None:
        if not args.quiet:
            print(f"{PROG}: {message}", file=sys.stderr, flush=True)

    def body() -> int:
        from mlx_evit.tasks.app_export import ExportError, export_model

        try:
            out = export_model(args.model, args.out_dir, image_size=args.image_size, batch_size=args.batch_size,
                               dtype=args.dtype, quantize=args.quantize, points=args.points,
                               force=args.force, log=log)
        except OutputError as e:
            error(one_line(e))
            return EXIT_USAGE
        except (ExportError, HubError, OSError) as e:
            error(one_line(e))
            return EXIT_FAILED
        if not args.quiet:
            import json

            spec = json.loads((out / "export.json").read_text(encoding="utf-8"))
            print(f"wrote {out} ({spec['model']}, {spec['family']}, {spec['dtype']})")
            for name, f in spec["functions"].items():
                size = os.path.getsize(out / f["file"]) / 2**20
                shapes = ", ".join(f"{i['name']} {tuple(i['shape'])}" for i in f["inputs"])
                outs = ", ".join(f"{o['name']} {tuple(o['shape'])}" for o in f["outputs"])
                err = spec["check"]["max_relative_error"][name]
                print(f"  {f['file']} ({size:.1f} MB): {shapes} -> {outs}; checked, relative error {err:.1e}")
        return EXIT_OK

    return guarded(body, error)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
