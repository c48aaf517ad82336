"""``python -m mlx_evit.sam serve``: Segment Anything in the browser, served from this machine.

The app is :mod:`mlx_evit.webapp` (its server module documents the JSON API).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

from mlx_evit.cli.common import EXIT_OK, EXIT_USAGE, error_printer, guarded
from mlx_evit.cli.common import positive_int as _positive
from mlx_evit.ops.dtypes import DTYPE_NAMES as DTYPES

__all__ = ["main", "build_parser"]

PROG = "python -m mlx_evit.sam serve"

_EPILOG = """\
The page (http://HOST:PORT/): open an image (upload, drag and drop, or pick
from --images DIR); click for a foreground point, right click or Shift+click
for a background point, drag for a box; undo/clear; three candidate masks with
their predicted IoU; "segment everything"; save the mask as PNG and all masks
as COCO RLE JSON. Each image is encoded once; a prompt only runs the decoder.
Everything stays on this machine: the page loads nothing from elsewhere.

API (JSON; errors are 4xx {"error": MESSAGE}):
  GET  /api/health                          {"status": "ok", "model": NAME, ...}
  POST /api/images   body = image bytes     {"id", "width", "height", "encode_ms"}
  POST /api/predict  {"id", "points": [[x, y, label], ...], "box": [x0, y0, x1, y1] | null,
                      "multimask": bool}    {"masks": [{"png": BASE64, "score": IOU}, ...]}
  POST /api/everything {"id", "points_per_side", "pred_iou_thresh", ...}
                                            {"masks": [{"rle", "area", "bbox", ...}, ...]}

examples:
  python -m mlx_evit.sam serve                                  # efficientvit_sam_l0 (downloaded once)
  python -m mlx_evit.sam serve --weights sam_demo/model --images sam_demo/images --open
  python -m mlx_evit.sam serve --model efficientvit_sam_xl0 --port 9000
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Serve a local web page that segments images with "
                                "EfficientViT-SAM as you click.", epilog=_EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--model", default=None, metavar="NAME",
                   help="efficientvit_sam_l0/_l1/_l2 (512) or _xl0/_xl1 (1024); default efficientvit_sam_l0")
    g.add_argument("--weights", metavar="PATH", help="original .pt, any checkpoint the converter reads, or a "
                   "converted model folder")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="weights and activations (default float32)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; any other address lets "
                        "others on the network use the app)")
    p.add_argument("--port", type=int, default=8008, help="port (default 8008; 0: any free port)")
    p.add_argument("--open", action="store_true", help="open the page in the default browser")
    p.add_argument("--images", metavar="DIR", help="a folder whose images the page offers to open")
    p.add_argument("--max-upload-mb", type=_positive, default=32, help="largest image file accepted (default 32)")
    p.add_argument("--cache", type=_positive, default=4, metavar="N",
                   help="image embeddings kept, so that going back to an image does not encode it again (default 4)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress messages")
    p.add_argument("-v", "--verbose", action="store_true", help="log every request")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point; serves until Ctrl-C and returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    error = error_printer(PROG)
    return guarded(lambda: _run(args, error), error)


def _run(args: argparse.Namespace, error) -> int:
    from mlx_evit.cli.sam_command import DEFAULT_MODEL, _load_model
    from mlx_evit.webapp import Limits, SamService, is_loopback, make_server

    def log(message: str) -> None:
        if not args.quiet:
            print(f"{PROG}: {message}", file=sys.stderr, flush=True)

    if not 0 <= args.port <= 65535:
        error(f"--port {args.port}: expected 0-65535")
        return EXIT_USAGE
    if args.images is not None and not os.path.isdir(args.images):
        error(f"--images {args.images}: not a folder")
        return EXIT_USAGE
    if not is_loopback(args.host):
        print(f"{PROG}: warning: listening on {args.host}: anyone who can reach this machine on port {args.port} "
              "can use the app and upload images", file=sys.stderr, flush=True)
    try:  # bind before the model loads: a busy port fails at once
        server = make_server(None, args.host, args.port, log=log if args.verbose else None)
    except OSError as e:
        error(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}")
        return EXIT_USAGE
    try:
        from mlx_evit.cli.common import Console, UsageError

        try:
            net = _load_model(args, Console(PROG, quiet=args.quiet))
        except UsageError as e:
            error(str(e))
            return EXIT_USAGE
        limits = Limits(max_upload_bytes=args.max_upload_mb * 2**20, max_embeddings=args.cache)
        name = getattr(net, "arch_name", None) or args.model or DEFAULT_MODEL
        server.service = SamService(net, name, limits, images_dir=args.images)
        url = server.url
        print(f"serving {name} on {url} (Ctrl-C to stop)", flush=True)
        if args.open:
            import webbrowser

            webbrowser.open(url)
        try:
            server.serve_forever(poll_interval=0.25)
        except KeyboardInterrupt:
            log("stopped")
        return EXIT_OK
    finally:
        server.server_close()
