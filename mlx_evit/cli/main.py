"""``python -m mlx_evit``: one command line with subcommands (list, info, and one per task command).

A task command is one entry in :data:`COMMANDS`: its name, the module whose
``main(argv) -> int`` runs it (``mlx_evit.cli.<name>``) and a one-line
summary. ``python -m mlx_evit classify ...`` is ``python -m
mlx_evit.classify ...``; the module is imported only when its command runs.
"""

from __future__ import annotations

import argparse
import math
import importlib
import sys
from typing import Optional, Sequence

from mlx_evit.errors import one_line
from mlx_evit.models.registry import get_entry, list_models, split_name
from mlx_evit.version import __version__
from mlx_evit.models.keymap import param_shapes

__all__ = ["COMMANDS", "main", "build_parser"]

PROG = "python -m mlx_evit"

COMMANDS: dict[str, tuple[str, str]] = {
    "classify": ("mlx_evit.cli.classify", "classify images (python -m mlx_evit.classify)"),
    "convert": ("mlx_evit.cli.convert", "convert a checkpoint to an MLX model directory (mlx-evit-convert)"),
    "evaluate": ("mlx_evit.cli.evaluate", "accuracy on a folder of class subfolders (python -m mlx_evit.evaluate)"),
    "segment": ("mlx_evit.cli.segment", "semantic segmentation of images (python -m mlx_evit.segment)"),
    "sam": ("mlx_evit.cli.sam", "segment an image from points/boxes, or everything (python -m mlx_evit.sam)"),
    "export": ("mlx_evit.cli.export", ".mlxfn files + export.json for C++ and Swift apps (SAM, seg, classification)"),
}
"""Subcommand -> (module with ``main(argv)``, summary). Adding a command is one line here."""


def build_parser() -> argparse.ArgumentParser:
    commands = "\n".join(f"  {name:<10}{summary}" for name, (_, summary) in COMMANDS.items())
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="EfficientViT models for Apple MLX.",
        epilog=f"task commands (each takes --help):\n{commands}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"mlx_evit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("list", help="registered models, or their pretrained tags")
    p.add_argument("pattern", nargs="?", default="*", metavar="PATTERN", help="shell pattern, e.g. 'efficientvit_b*'")
    p.add_argument("--pretrained", action="store_true", help="list the tagged names (name.tag) instead")
    p = sub.add_parser("info", help="one model: family, parameters, input size, preprocessing, tags")
    p.add_argument("name", metavar="NAME", help="architecture or tagged name")
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
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in COMMANDS:
        module = importlib.import_module(COMMANDS[argv[0]][0])
        return int(module.main(argv[1:]) or 0)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version (0) or a usage error (2), printed by argparse
        return int(e.code or 0)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        if args.command == "list":
            names = list_models(args.pattern, pretrained=args.pretrained)
            if not names:
                print(f"{PROG} list: no model matches {args.pattern!r}", file=sys.stderr)
                return 1
            print("\n".join(names))
        else:
            print(_info(args.name))
    except ValueError as e:
        print(f"{PROG} {args.command}: error: {one_line(e)}", file=sys.stderr)
        return 1
    return 0
