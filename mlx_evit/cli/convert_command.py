"""``mlx-evit-convert`` / ``python -m mlx_evit.convert``: a checkpoint to an MLX model directory.

The library side is :func:`mlx_evit.convert` (:mod:`mlx_evit.api`).
"""

from __future__ import annotations

import argparse
import sys
import warnings
from typing import Optional, Sequence

from mlx_evit.api import convert
from mlx_evit.ops.dtypes import DTYPE_NAMES
from mlx_evit.errors import CheckpointError, CheckpointMismatchError, ConversionError, describe_error, one_line

__all__ = ["main", "build_parser"]

_PROG = "mlx-evit-convert"

_EPILOG = """\
examples:
  mlx-evit-convert efficientvit_b1.r224_in1k/ out/          # timm Hub folder
  mlx-evit-convert efficientvit_b0_r224.pt b0/ --dtype float16
  mlx-evit-convert efficientvit_m4.pth m4/ --model efficientvit_m4 --force

then, in Python:  model = mlx_evit.load("out")

exit status: 0 converted; 1 the input cannot be converted (message says why);
2 wrong command-line usage.
"""


def _human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{int(size)} B"
        size /= 1000
    return f"{n} B"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=_PROG,
        description=(
            "Convert an EfficientViT checkpoint (MIT B0-B3/L1-L3, Microsoft M0-M5; timm or\n"
            "original layout) to an MLX model directory (model.safetensors + config.json),\n"
            "without torch. The model is detected from the keys and shapes. Pickled\n"
            "checkpoints are read with a restricted unpickler: nothing in the file is run."
        ),
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("src", metavar="SRC",
                        help="a .pt/.pth/.bin PyTorch checkpoint, a .safetensors file, or a timm Hub folder "
                             "(model.safetensors or pytorch_model.bin, with config.json)")
    parser.add_argument("out_dir", metavar="OUT_DIR", help="directory to create (must not exist unless --force)")
    parser.add_argument("--model", metavar="NAME",
                        help="registry name to check the checkpoint against, e.g. efficientvit_b1.r288_in1k "
                             "(default: detected from the keys and shapes)")
    parser.add_argument("--dtype", choices=DTYPE_NAMES, default="float32",
                        help="parameter dtype of the converted model (default: float32; BatchNorm "
                             "statistics and attention stay float32)")
    parser.add_argument("--force", action="store_true", help="replace OUT_DIR if it exists")
    parser.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point; returns the exit status (0 ok, 1 conversion error, 2 usage)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (2), already printed by argparse
        return int(e.code or 0)

    def log(message: str) -> None:
        if not args.quiet:
            print(f"{_PROG}: {message}", file=sys.stderr, flush=True)

    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = convert(args.src, args.out_dir, model=args.model, dtype=args.dtype, force=args.force,
                             log=log)
    except KeyboardInterrupt:
        print(f"{_PROG}: interrupted; nothing was written", file=sys.stderr)
        return 130
    except (ConversionError, CheckpointError, CheckpointMismatchError, OSError, ValueError) as e:
        print(f"{_PROG}: error: {describe_error(e)}", file=sys.stderr)
        return 1
    except Exception as e:  # never a traceback; say it is ours
        print(f"{_PROG}: error: unexpected {type(e).__name__} while converting {args.src}: "
              f"{describe_error(e)} (please report this)", file=sys.stderr)
        return 1
    seen = set()
    for message in (*result.warnings, *(str(w.message) for w in caught)):
        if message not in seen:
            seen.add(message)
            print(f"{_PROG}: warning: {one_line(message, 1200)}", file=sys.stderr)
    if not args.quiet:
        classes = "features only" if not result.num_classes else f"{result.num_classes} classes"
        print(
            f"converted {args.src} -> {result.out_dir}\n"
            f"  model:      {result.model} ({result.layout} layout, {result.source_format}, {classes})\n"
            f"  parameters: {result.num_params:,}\n"
            f"  dtype:      {result.dtype}\n"
            f"  size:       {_human_bytes(result.size_bytes)} on disk\n"
            f"  sha256:     {result.sha256} (source)"
        )
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
