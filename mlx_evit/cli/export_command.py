"""``python -m mlx_evit export MODEL OUT_DIR``: ``.mlxfn`` files and ``export.json`` for C++ and Swift apps.

The library side is :func:`mlx_evit.tasks.app_export.export_model`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional, Sequence

from mlx_evit.cli.common import (EXIT_OK, Console, InputError, UsageError, add_batch_size, add_dtype, add_force,
                                 add_model_options, add_output, add_progress, command_parser, exit_status_text,
                                 folder_output_name, model_name, prog_name, run_command)
from mlx_evit.errors import HubError
from mlx_evit.outputs import OutputError

__all__ = ["main", "build_parser"]

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
mlx.core and must reproduce the library's outputs.

""" + exit_status_text()


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


def build_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    parser = command_parser(
        prog or prog_name("export"),
        "Export a model's inference functions to .mlxfn files, with export.json describing their inputs, "
        "outputs and the pre- and postprocessing, for C++ and Swift apps.",
        _EPILOG,
    )
    parser.usage = f"{parser.prog} [options] MODEL OUT_DIR  (or -m NAME | -w PATH, -o OUT_DIR)"
    parser.add_argument("paths", nargs="*", metavar="MODEL OUT_DIR",
                        help="MODEL: registered name or Hub tag (weights downloaded once), MLX model folder or "
                             "checkpoint; OUT_DIR: the folder to write (must not exist unless --force)")
    add_model_options(parser, "any", model_help="registered name or Hub tag to export (default: the first "
                                                "positional)",
                      weights_help="MLX model folder or checkpoint to export (default: the first positional)")
    add_output(parser, "folder", "OUT_DIR given as an option (default: the last positional)")
    parser.add_argument("--image-size", type=_image_size, metavar="SIZE|HxW",
                        help="input size (default: the model's; SAM: the encoder size S)")
    add_batch_size(parser, default=1, help="images per call (classification, segmentation)")
    add_dtype(parser, "what the model computes in (inputs and outputs stay float32)")
    parser.add_argument("--quantize", type=int, choices=(4, 8),
                        help="quantize the Linear weights to 4 or 8 bits (classification, segmentation; "
                             "default: none)")
    parser.add_argument("--points", type=_points, default=None, metavar="N[,N...]",
                        help="SAM: prompt lengths, one decoder each (clicks + 1 padding point, or clicks + 2 "
                             "box corners; default 2)")
    add_force(parser, "replace OUT_DIR if it is an earlier export")
    add_progress(parser, progress=False)
    return parser


def _paths(args: argparse.Namespace) -> tuple[str, str]:
    paths = list(args.paths)
    if args.model is not None and args.weights is not None:
        raise UsageError("give the model once: -m/--model NAME or -w/--weights PATH")
    src = args.weights if args.weights is not None else args.model
    if src is None:
        src = paths.pop(0) if paths else None
    out = args.output if args.output is not None else (paths.pop() if paths else None)
    if paths:
        raise UsageError(f"unexpected argument(s): {' '.join(paths)} (give MODEL and OUT_DIR once)")
    if src is None or out is None:
        raise UsageError("give MODEL and OUT_DIR (positionals, or -m NAME / -w PATH and -o/--output OUT_DIR)")
    if args.weights is None and not os.path.exists(src):
        src = model_name(src, "any")
    return src, out


def main(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> int:
    """Command-line entry point; returns the exit status (see ``--help``)."""
    return run_command(build_parser(prog), argv, _run)


def _run(args: argparse.Namespace, console: Console) -> int:
    from mlx_evit.tasks.app_export import ExportError, export_model

    src, out_dir = _paths(args)
    folder_output_name(out_dir, "the .mlxfn files and export.json")
    try:
        out = export_model(src, out_dir, image_size=args.image_size, batch_size=args.batch_size,
                           dtype=args.dtype, quantize=args.quantize, points=args.points,
                           force=args.force, log=console.log)
    except OutputError as e:
        raise UsageError(e) from None
    except (ExportError, HubError, OSError) as e:
        raise InputError(e) from None
    if not args.quiet:
        spec = json.loads((out / "export.json").read_text(encoding="utf-8"))
        print(f"wrote {out} ({spec['model']}, {spec['family']}, {spec['dtype']})")
        for name, f in spec["functions"].items():
            size = os.path.getsize(out / f["file"]) / 2**20
            shapes = ", ".join(f"{i['name']} {tuple(i['shape'])}" for i in f["inputs"])
            outs = ", ".join(f"{o['name']} {tuple(o['shape'])}" for o in f["outputs"])
            err = spec["check"]["max_relative_error"][name]
            print(f"  {f['file']} ({size:.1f} MB): {shapes} -> {outs}; checked, relative error {err:.1e}")
    return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
