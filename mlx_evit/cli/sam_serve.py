"""``python -m mlx_evit.sam serve``: Segment Anything in the browser, served from this machine.

The app is :mod:`mlx_evit.webapp` (its server module documents the JSON API).
"""

from __future__ import annotations

import argparse
import os
from typing import Optional, Sequence

from mlx_evit.cli.common import (
    EXIT_OK,
    Console,
    UsageError,
    add_dtype,
    add_model_options,
    add_progress,
    command_parser,
    exit_status_text,
    model_name,
    prog_name,
    run_command,
    weights_path,
)
from mlx_evit.cli.common import positive_int as _positive
from mlx_evit.cli.common import load_task_model
from mlx_evit.tasks.sam_predictor import DEFAULT_MODEL

__all__ = ["main", "build_parser"]

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

""" + exit_status_text((0, 2, 3, 130), notes={
    2: "also --images not a folder, a port that cannot be bound (both before the model loads)",
    130: "while the model loads (Ctrl-C while serving stops the server: 0)"}) + """
examples:
  python -m mlx_evit.sam serve                                  # efficientvit_sam_l0 (downloaded once)
  python -m mlx_evit.sam serve --weights sam_demo/model --images sam_demo/images --open
  python -m mlx_evit.sam serve --model efficientvit_sam_xl0 --port 9000
"""


def build_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    p = command_parser(prog or f"{prog_name('sam')} serve",
                       "Serve a local web page that segments images with EfficientViT-SAM as you click.", _EPILOG)
    add_model_options(p, "sam", model_default=DEFAULT_MODEL,
                      weights_help="original .pt, any checkpoint the converter reads, or a converted model folder "
                                   "(default: the model's released weights, downloaded once and cached)")
    add_dtype(p)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (127.0.0.1: this machine only; any other address lets others on "
                        "the network use the app)")
    p.add_argument("--port", type=int, default=8008, help="port, 0: any free port")
    p.add_argument("--open", action="store_true", help="open the page in the default browser")
    p.add_argument("--images", metavar="DIR", help="a folder whose images the page offers to open (default: none)")
    p.add_argument("--max-upload-mb", type=_positive, default=32, metavar="MB", help="largest image file accepted")
    p.add_argument("--cache", type=_positive, default=4, metavar="N",
                   help="image embeddings kept, so that going back to an image does not encode it again")
    add_progress(p, progress=False)
    p.add_argument("-v", "--verbose", action="store_true", help="log every request")
    return p


def main(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> int:
    """Command-line entry point; serves until Ctrl-C and returns the exit status."""
    return run_command(build_parser(prog), argv, _run)


def _run(args: argparse.Namespace, console: Console) -> int:
    from mlx_evit.webapp import Limits, SamService, is_loopback, make_server

    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port {args.port}: expected 0-65535")
    if args.images is not None and not os.path.isdir(args.images):
        raise UsageError(f"--images {args.images}: not a folder")
    if args.model:
        args.model = model_name(args.model, "sam")
    if args.weights:
        weights_path(args.weights)
    if not is_loopback(args.host):
        console.warn(f"listening on {args.host}: anyone who can reach this machine on port {args.port} "
                     "can use the app and upload images")
    try:  # bind before the model loads: a busy port fails at once
        server = make_server(None, args.host, args.port, log=console.log if args.verbose else None)
    except OSError as e:
        raise UsageError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") from None
    try:
        net = load_task_model(args, console, "SAM", DEFAULT_MODEL)
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
            console.log("stopped")
        return EXIT_OK
    finally:
        server.server_close()
