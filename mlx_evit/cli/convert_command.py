"""``mlx-evit-convert`` / ``python -m mlx_evit convert``: a checkpoint to an MLX model directory.

``SRC OUT_DIR`` as positionals, or ``-w/--weights SRC`` and ``-o/--output
OUT_DIR`` (the shared option names, :mod:`mlx_evit.cli.common`). The library
side is :func:`mlx_evit.convert` (:mod:`mlx_evit.api`).
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from mlx_evit.errors import CheckpointError, CheckpointMismatchError, ConversionError, describe_error, one_line
from mlx_evit.cli.common import (
    EXIT_INPUT,
    EXIT_INTERRUPTED,
    EXIT_OK,
    Console,
    UsageError,
    add_dtype,
    add_force,
    add_model_options,
    add_output,
    add_progress,
    command_parser,
    exit_status_text,
    model_name,
    output_folder,
    prog_name,
    run_command,
)

__all__ = ["main", "build_parser"]

_EPILOG = """\
examples:
  mlx-evit-convert efficientvit_b1.r224_in1k/ out/          # timm Hub folder
  mlx-evit-convert efficientvit_b0_r224.pt b0/ --dtype float16
  mlx-evit-convert efficientvit_m4.pth m4/ --model efficientvit_m4 --force
  mlx-evit-convert efficientvit_seg_b1_ade20k.pt seg-b1/    # EfficientViT-Seg
  mlx-evit-convert -w efficientvit_sam_l0.pt -o sam-l0/     # EfficientViT-SAM

then, in Python:  model = mlx_evit.load("out")

""" + exit_status_text(notes={1: "here: SRC cannot be read or converted (the message says why)"})


def _human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{int(size)} B"
        size /= 1000
    return f"{n} B"


def build_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    parser = command_parser(
        prog or prog_name("convert", "mlx-evit-convert"),
        "Convert an EfficientViT checkpoint (classification: MIT B0-B3/L1-L3, Microsoft M0-M5, timm or\n"
        "original layout; EfficientViT-Seg; EfficientViT-SAM) to an MLX model directory\n"
        "(model.safetensors + config.json), without torch. The model is detected from the keys and\n"
        "shapes. Pickled checkpoints are read with a restricted unpickler: nothing in the file is run.",
        _EPILOG,
    )
    parser.usage = f"{parser.prog} [options] SRC OUT_DIR  (or -w SRC -o OUT_DIR)"
    parser.add_argument("paths", nargs="*", metavar="SRC OUT_DIR",
                        help="SRC: a .pt/.pth/.bin PyTorch checkpoint, a .safetensors file, a timm Hub folder "
                             "(model.safetensors or pytorch_model.bin, with config.json) or an MLX model folder; "
                             "OUT_DIR: the directory to create (must not exist unless --force)")
    add_model_options(
        parser, "any",
        model_help="registry name to check the checkpoint against, e.g. efficientvit_b1.r288_in1k "
                   "(default: detected from the keys and shapes)",
        weights_help="SRC given as an option (default: the first positional)")
    add_output(parser, "folder", "OUT_DIR given as an option (default: the last positional)")
    add_dtype(parser, "parameter dtype of the converted model (BatchNorm statistics and attention stay float32)")
    add_force(parser, "replace OUT_DIR if it is an MLX model directory")
    add_progress(parser, progress=False)
    return parser


def _paths(args: argparse.Namespace) -> tuple[str, str]:
    paths = list(args.paths)
    src = args.weights if args.weights is not None else (paths.pop(0) if paths else None)
    out = args.output if args.output is not None else (paths.pop() if paths else None)
    if paths:
        raise UsageError(f"unexpected argument(s): {' '.join(paths)} (give SRC and OUT_DIR once)")
    if src is None or out is None:
        raise UsageError("give SRC and OUT_DIR (positionals, or -w/--weights SRC and -o/--output OUT_DIR)")
    return src, out


def main(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> int:
    """Command-line entry point; returns the exit status (0 ok, 1 conversion error, 2 usage)."""
    return run_command(build_parser(prog), argv, _run)


def _run(args: argparse.Namespace, console: Console) -> int:
    from mlx_evit.api import convert
    from mlx_evit.loading.model_dir import check_target, mlx_config_path

    src, out_dir = _paths(args)
    model = model_name(args.model, "any") if args.model else None
    output_folder(out_dir, [src], args.force, what="model.safetensors and config.json", check=False,
                  marker=lambda p: mlx_config_path(p) is not None, describe="an MLX model directory")
    try:
        check_target(out_dir, args.force, inputs=[src])
    except ConversionError as e:
        raise UsageError(e) from None
    try:
        result = convert(src, out_dir, model=model, dtype=args.dtype, force=args.force, log=console.log)
    except KeyboardInterrupt:
        console.error("interrupted; nothing was written")
        return EXIT_INTERRUPTED
    except (ConversionError, CheckpointError, CheckpointMismatchError, OSError, ValueError) as e:
        console.error(describe_error(e))
        return EXIT_INPUT
    seen = set()
    for message in result.warnings:  # what the load reported (returned as data, not as Python warnings)
        if message not in seen:
            seen.add(message)
            sys.stderr.write(f"{console.prog}: warning: {one_line(message, 1200)}\n")
    if not args.quiet:
        classes = "features only" if not result.num_classes else f"{result.num_classes} classes"
        print(
            f"converted {src} -> {result.out_dir}\n"
            f"  model:      {result.model} ({result.layout} layout, {result.source_format}, {classes})\n"
            f"  parameters: {result.num_params:,}\n"
            f"  dtype:      {result.dtype}\n"
            f"  size:       {_human_bytes(result.size_bytes)} on disk\n"
            f"  sha256:     {result.sha256} (source)"
        )
    return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
