"""``python -m mlx_evit``: one command line with subcommands (list, info, and one per task command).

A task command is one entry in :data:`COMMANDS`: its name, the module whose
``main(argv) -> int`` runs it (``mlx_evit.cli.<name>``) and a one-line
summary. ``python -m mlx_evit classify ...`` is ``python -m
mlx_evit.classify ...``; the module is imported only when its command runs.
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import sys
from typing import Optional, Sequence

from mlx_evit.cli.common import (
    EXIT_INPUT,
    EXIT_OK,
    EXIT_STATUSES,
    EXIT_USAGE,
    Console,
    HelpFormatter,
    UsageError,
    command_parser,
    exit_status_text,
    model_name,
)
from mlx_evit.models.registry import get_entry, list_models, split_name
from mlx_evit.version import __version__
from mlx_evit.models.keymap import param_shapes

__all__ = ["COMMANDS", "main", "build_parser"]

PROG = "python -m mlx_evit"
"""The program name in messages when run as ``python -m mlx_evit`` (``mlx-evit`` as the console script)."""

COMMANDS: dict[str, tuple[str, str]] = {
    "classify": ("mlx_evit.cli.classify_command", "classify images (also python -m mlx_evit.classify)"),
    "convert": ("mlx_evit.cli.convert_command", "convert a checkpoint to an MLX model directory (also mlx-evit-convert)"),
    "evaluate": ("mlx_evit.cli.evaluate_command", "accuracy on a folder of class subfolders (also python -m mlx_evit.evaluate)"),
    "segment": ("mlx_evit.cli.segment_command", "semantic segmentation of images (also python -m mlx_evit.segment)"),
    "sam": ("mlx_evit.cli.sam_command", "segment an image from points/boxes, or everything (also python -m mlx_evit.sam)"),
    "export": ("mlx_evit.cli.export_command", ".mlxfn files + export.json for C++ and Swift apps (SAM, seg, classification)"),
}
"""Subcommand -> (module with ``main(argv, prog=None)``, summary). Adding a command is one line here."""


def _prog() -> str:
    return "mlx-evit" if os.path.basename(sys.argv[0] if sys.argv else "") == "mlx-evit" else PROG


def build_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    parser = command_parser(prog or _prog(), "EfficientViT models for Apple MLX.",
                            "Each command takes --help.\n\n" + exit_status_text((0, 1, 2)).replace(
                                EXIT_STATUSES[1], "list: no model matches the pattern"))
    parser.add_argument("--version", action="version", version=f"mlx_evit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands",
                                parser_class=argparse.ArgumentParser)
    p = sub.add_parser("list", help="registered models, or their pretrained tags", formatter_class=HelpFormatter)
    p.add_argument("pattern", nargs="?", default="*", metavar="PATTERN",
                   help="shell pattern, e.g. 'efficientvit_b*' (default: every model)")
    p.add_argument("--pretrained", action="store_true", help="list the tagged names (name.tag) instead")
    p = sub.add_parser("info", help="one model: family, parameters, input size, preprocessing, tags",
                       formatter_class=HelpFormatter)
    p.add_argument("name", metavar="NAME", help="architecture or tagged name ('timm/' prefix accepted)")
    for name, (_, summary) in COMMANDS.items():
        sub.add_parser(name, help=summary, add_help=False)
    return parser


def _info(name: str) -> str:
    entry = get_entry(name)
    cfg = entry.cfg(split_name(name)[1])
    model = entry.builder(**entry.defaults)
    params = sum(math.prod(s) for k, s in param_shapes(model).items()
                 if not k.endswith(("running_mean", "running_var")))
    lines = [
        f"name:          {entry.name}" + (f".{cfg.tag}" if cfg is not None else ""),
        f"family:        {entry.family}",
        f"parameters:    {params:,}",
        f"classes:       {getattr(model, 'num_classes', None) or 'none (features)'}",
        f"layouts:       {', '.join(k.name for k in getattr(entry.builder, 'checkpoint_layouts', ())) or 'none'}",
    ]
    if cfg is not None:
        c, h, w = cfg.input_size
        lines += [
            f"input size:    {h}x{w} ({c} channels, NHWC)",
            f"preprocessing: resize {cfg.interpolation}, crop_pct {cfg.crop_pct}, crop {cfg.crop_mode}, "
            f"mean {tuple(round(v, 6) for v in cfg.mean)}, std {tuple(round(v, 6) for v in cfg.std)}",
            f"weights:       {cfg.hf_hub_id or 'none published'}",
        ]
    tags = ", ".join(f"{entry.name}.{t.tag}" for t in entry.tags)
    lines.append(f"tags:          {tags or 'none'}")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``python -m mlx_evit``; returns the exit status (2: usage error)."""
    argv = [os.fspath(a) for a in (sys.argv[1:] if argv is None else argv)]
    prog = _prog()
    if argv and argv[0] in COMMANDS:
        module = importlib.import_module(COMMANDS[argv[0]][0])
        return int(module.main(argv[1:], prog=f"{prog} {argv[0]}") or 0)
    parser = build_parser(prog)
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version (0) or a usage error (2), printed by argparse
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    console = Console(f"{prog} {args.command}")
    if args.command == "list":
        pattern = args.pattern.removeprefix("timm/")
        names = list_models(pattern, pretrained=args.pretrained)
        if not names:
            console.error(f"no model matches {args.pattern!r}")
            return EXIT_INPUT
        print("\n".join(names))
        return EXIT_OK
    try:
        print(_info(model_name(args.name, "any", option="")))
    except UsageError as e:
        console.error(e)
        return EXIT_USAGE
    return EXIT_OK
