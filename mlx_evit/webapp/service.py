"""What the web app does, without HTTP: images kept by id, embeddings cached, prompts checked and decoded.

:class:`SamService` holds one :class:`CachedPredictor` behind a lock (MLX
models are not shared between threads here: one request uses the model at a
time), a bounded store of uploaded images and the progress of "segment
everything". Every method takes plain Python values (parsed JSON) and
raises :class:`ApiError` (an HTTP status and a one-line message) for bad
input; :mod:`mlx_evit.webapp.server` turns that into ``{"error": MESSAGE}``.
"""

from __future__ import annotations

import base64
import hashlib
import io
import math
import os
import struct
import threading
import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from mlx_evit.errors import one_line
from mlx_evit.tasks.mask_generator import SamAutomaticMaskGenerator, generate_crop_boxes
from mlx_evit.tasks.transforms import to_rgb
from mlx_evit.tasks.sam_predictor import SamPredictor, as_rgb_uint8

__all__ = ["ApiError", "Limits", "CachedPredictor", "SamService", "decode_image", "mask_png",
           "IMAGE_FORMATS", "IMAGE_SUFFIXES"]

IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF")
"""Pillow decoders an upload may use (no others are tried)."""
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
"""File names listed from ``--images DIR``."""
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error)
# "Segment everything" options a request may set: name -> (type, low, high).
EVERYTHING_OPTIONS: dict[str, tuple[type, float, float]] = {
    "points_per_side": (int, 1, 64),
    "points_per_batch": (int, 1, 256),
    "pred_iou_thresh": (float, 0.0, 1.0),
    "stability_score_thresh": (float, 0.0, 1.0),
    "box_nms_thresh": (float, 0.0, 1.0),
    "crop_n_layers": (int, 0, 2),
}


class ApiError(Exception):
    """A request the app refuses: an HTTP status (4xx) and a one-line message."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class Limits:
    """Bounds on what a request may cost (bytes, pixels, prompts, images kept)."""

    max_upload_bytes: int = 32 * 2**20
    max_json_bytes: int = 2**20
    max_pixels: int = 25_000_000
    max_points: int = 64
    max_images: int = 8
    max_embeddings: int = 4
    max_library_files: int = 1000


def decode_image(data: bytes, max_pixels: int) -> np.ndarray:
    """Image file bytes -> ``(H, W, 3)`` uint8 RGB, upright, as :func:`~mlx_evit.tasks.transforms.load_image` reads files."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit decides
            with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as img:
                if img.width * img.height > max_pixels:
                    raise ApiError(413, f"image of {img.width}x{img.height} pixels is over the limit of "
                                        f"{max_pixels} pixels")
                img.load()
                rgb = to_rgb(ImageOps.exif_transpose(img))
    except UnidentifiedImageError:
        raise ApiError(415, "not an image file in a supported format (PNG, JPEG, WebP, BMP, GIF, TIFF)") from None
    except Image.DecompressionBombError as e:
        raise ApiError(413, f"image too large to decode safely ({one_line(e)})") from None
    except _DECODE_ERRORS as e:
        raise ApiError(400, f"cannot decode the image ({one_line(e)})") from None
    arr = np.array(rgb, dtype=np.uint8)
    arr.flags.writeable = False
    return arr


def mask_png(mask: np.ndarray) -> str:
    """Bool ``(H, W)`` -> base64 of an 8-bit grayscale PNG, 0 outside and 255 inside."""
    buf = io.BytesIO()
    Image.fromarray(mask.astype(np.uint8) * 255, mode="L").save(buf, format="PNG", compress_level=1)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def pixel_digest(rgb: np.ndarray) -> str:
    """A content id of an RGB array: its shape and pixels hashed (32 hex digits)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(repr(rgb.shape).encode())
    h.update(np.ascontiguousarray(rgb).data)
    return h.hexdigest()


class CachedPredictor(SamPredictor):
    """A :class:`~mlx_evit.tasks.sam_predictor.SamPredictor` that keeps the last ``capacity`` embeddings.

    ``set_image`` of an image seen recently (same pixels) restores its
    embedding instead of running the encoder; ``last_encode_s`` is the
    encoder time of the last ``set_image`` (0 on a cache hit).
    """

    def __init__(self, model, capacity: int = 4, **kwargs: Any):
        super().__init__(model, **kwargs)
        self.capacity = max(1, int(capacity))
        self._embeddings: OrderedDict[str, tuple] = OrderedDict()
        self.last_encode_s = 0.0
        self.encodes = 0

    def set_image(self, image, image_format: str = "RGB", key: Optional[str] = None) -> None:
        """As :meth:`SamPredictor.set_image`; ``key``: the image's :func:`pixel_digest` if already known."""
        rgb = as_rgb_uint8(image, image_format)
        key = key or pixel_digest(rgb)
        hit = self._embeddings.get(key)
        if hit is not None:
            self._embeddings.move_to_end(key)
            self.features, self.original_size, self.input_size = hit
            self.is_image_set = True
            self.last_encode_s = 0.0
            return
        start = time.perf_counter()
        super().set_image(rgb)
        self.last_encode_s = time.perf_counter() - start
        self.encodes += 1
        self._embeddings[key] = (self.features, self.original_size, self.input_size)
        while len(self._embeddings) > self.capacity:
            self._embeddings.popitem(last=False)


class _CountingGenerator(SamAutomaticMaskGenerator):
    """The automatic mask generator, reporting (batches done, batches in all) after each decoder batch."""

    def __init__(self, predictor: SamPredictor, report: Callable[[int, int], None], **options: Any):
        super().__init__(predictor, **options)
        self._report = report
        self._done = self._total = 0

    def generate(self, image, image_format: str = "RGB") -> list[dict[str, Any]]:
        h, w = np.asarray(image).shape[:2]
        _, layers = generate_crop_boxes((h, w), self.crop_n_layers, self.crop_overlap_ratio)
        self._done = 0
        self._total = sum(math.ceil(len(self.point_grids[layer]) / self.points_per_batch) for layer in layers)
        self._report(0, self._total)
        return super().generate(image, image_format)

    def _process_batch(self, *args: Any) -> None:
        super()._process_batch(*args)
        self._done += 1
        self._report(self._done, self._total)


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ApiError(400, f"{what} must be a finite number, got {value!r:.40}")
    return float(value)


def _fields(body: Any, allowed: set[str], required: set[str]) -> dict:
    if not isinstance(body, dict):
        raise ApiError(400, f"expected a JSON object, got {type(body).__name__}")
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise ApiError(400, f"unknown field(s) {', '.join(unknown)}; expected {', '.join(sorted(allowed))}")
    missing = sorted(required - set(body))
    if missing:
        raise ApiError(400, f"missing field(s) {', '.join(missing)}")
    return body


class SamService:
    """The model, the images and the embeddings behind the web app; thread-safe.

    ``model``: an EfficientViT-SAM model; ``name``: shown by ``/api/health``;
    ``images_dir``: the folder ``/api/library`` lists and opens (nothing
    outside it is read); ``compile``: ``mx.compile`` the encoder and decoder.
    """

    def __init__(self, model, name: str, limits: Limits = Limits(), images_dir: Optional[os.PathLike] = None,
                 compile: bool = True):
        self.name = name
        self.limits = limits
        self.predictor = CachedPredictor(model, capacity=limits.max_embeddings, compile=compile)
        self.images_dir = Path(os.path.realpath(images_dir)) if images_dir is not None else None
        self._model_lock = threading.Lock()  # one request runs the model at a time
        self._lock = threading.Lock()  # images and progress
        self._images: OrderedDict[str, np.ndarray] = OrderedDict()
        self._progress: dict[str, dict[str, Any]] = {}

    # -- images ------------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        return {"status": "ok", "model": self.name, "image_size": int(self.predictor.model.image_size),
                "library": self.images_dir is not None}

    def add_image(self, data: bytes) -> dict[str, Any]:
        """Decode, keep and encode an image file's bytes -> ``{"id", "width", "height", "encode_ms"}``."""
        if not data:
            raise ApiError(400, "empty upload: the request body must be the image file's bytes")
        rgb = decode_image(data, self.limits.max_pixels)
        image_id = pixel_digest(rgb)
        with self._lock:
            self._images[image_id] = rgb
            self._images.move_to_end(image_id)
            while len(self._images) > self.limits.max_images:
                self._images.popitem(last=False)
        with self._model_lock:
            self.predictor.set_image(rgb, key=image_id)
            encode_s = self.predictor.last_encode_s
        h, w = rgb.shape[:2]
        return {"id": image_id, "width": w, "height": h, "encode_ms": round(encode_s * 1000, 1)}

    def image(self, image_id: Any) -> np.ndarray:
        """The RGB pixels of an image kept under ``image_id``; 404 when unknown or dropped."""
        if not isinstance(image_id, str):
            raise ApiError(400, f"id must be a string, got {type(image_id).__name__}")
        with self._lock:
            rgb = self._images.get(image_id)
            if rgb is not None:
                self._images.move_to_end(image_id)
        if rgb is None:
            raise ApiError(404, f"unknown image id {image_id[:40]!r} (the server keeps the last "
                                f"{self.limits.max_images} images): upload the image again")
        return rgb

    def image_png(self, image_id: str) -> bytes:
        """The image as the model sees it (upright RGB), as PNG bytes for the page."""
        buf = io.BytesIO()
        Image.fromarray(self.image(image_id)).save(buf, format="PNG", compress_level=1)
        return buf.getvalue()

    def library(self) -> list[str]:
        """Image file names directly in ``images_dir`` (sorted; symlinks out of it are not listed)."""
        if self.images_dir is None:
            raise ApiError(404, "no image folder: start the server with --images DIR")
        names = []
        with os.scandir(self.images_dir) as entries:
            for entry in entries:
                if Path(entry.name).suffix.lower() not in IMAGE_SUFFIXES or not entry.is_file():
                    continue
                real = Path(os.path.realpath(entry.path))
                if real.parent != self.images_dir and self.images_dir not in real.parents:
                    continue
                names.append(entry.name)
        return sorted(names)[: self.limits.max_library_files]

    def open_library_image(self, body: Any) -> dict[str, Any]:
        """``{"name": NAME}``, a file listed by :meth:`library` -> as :meth:`add_image`."""
        name = _fields(body, {"name"}, {"name"})["name"]
        if not isinstance(name, str) or name not in self.library():
            raise ApiError(404, f"{str(name)[:80]!r} is not an image of the served folder")
        path = self.images_dir / name
        if path.stat().st_size > self.limits.max_upload_bytes:
            raise ApiError(413, f"{name} is over the upload limit of {self.limits.max_upload_bytes} bytes")
        return dict(self.add_image(path.read_bytes()), name=name)

    # -- prompts -----------------------------------------------------------------------------

    def parse_prompt(self, body: Any) -> tuple[str, np.ndarray, Optional[np.ndarray], Optional[np.ndarray],
                                                Optional[np.ndarray], bool]:
        """A predict request -> (id, rgb, points (N, 2), labels (N,), box (4,), multimask); 4xx if malformed."""
        body = _fields(body, {"id", "points", "box", "multimask"}, {"id"})
        rgb = self.image(body["id"])
        h, w = rgb.shape[:2]
        points = body.get("points") or []
        if not isinstance(points, list):
            raise ApiError(400, "points must be a list of [x, y, label]")
        if len(points) > self.limits.max_points:
            raise ApiError(400, f"{len(points)} points: at most {self.limits.max_points} per request")
        coords, labels = [], []
        for i, p in enumerate(points):
            if not isinstance(p, list) or len(p) != 3:
                raise ApiError(400, f"points[{i}] must be [x, y, label], got {p!r:.60}")
            x, y = _number(p[0], f"points[{i}] x"), _number(p[1], f"points[{i}] y")
            if not (0 <= x <= w and 0 <= y <= h):
                raise ApiError(400, f"points[{i}] ({x:g}, {y:g}) is outside the {w}x{h} image")
            if isinstance(p[2], bool) or p[2] not in (0, 1):
                raise ApiError(400, f"points[{i}] label must be 1 (foreground) or 0 (background), got {p[2]!r:.20}")
            coords.append((x, y))
            labels.append(int(p[2]))
        box = body.get("box")
        if box is not None:
            if not isinstance(box, list) or len(box) != 4:
                raise ApiError(400, f"box must be [x0, y0, x1, y1] or null, got {box!r:.60}")
            x0, y0, x1, y1 = (_number(v, "box coordinate") for v in box)
            if not (0 <= x0 <= x1 <= w and 0 <= y0 <= y1 <= h):
                raise ApiError(400, f"box [{x0:g}, {y0:g}, {x1:g}, {y1:g}] must satisfy 0 <= x0 <= x1 <= {w} "
                                    f"and 0 <= y0 <= y1 <= {h}")
            box = np.array([x0, y0, x1, y1], np.float64)
        if not coords and box is None:
            raise ApiError(400, "no prompt: give at least one point or a box")
        multimask = body.get("multimask", True)
        if not isinstance(multimask, bool):
            raise ApiError(400, f"multimask must be true or false, got {multimask!r:.20}")
        pts = np.array(coords, np.float64).reshape(-1, 2) if coords else None
        labs = np.array(labels, np.int64) if coords else None
        return body["id"], rgb, pts, labs, box, multimask

    def predict(self, body: Any) -> dict[str, Any]:
        """``{"id", "points", "box", "multimask"}`` -> ``{"masks": [{"png", "score"}, ...] best first, timings}``."""
        image_id, rgb, points, labels, box, multimask = self.parse_prompt(body)
        with self._model_lock:
            self.predictor.set_image(rgb, key=image_id)
            encode_s = self.predictor.last_encode_s
            start = time.perf_counter()
            masks, scores, _ = self.predictor.predict(points, labels, box, multimask_output=multimask)
            decode_s = time.perf_counter() - start
        order = np.argsort(-scores, kind="stable")
        return {"masks": [{"png": mask_png(masks[k]), "score": float(scores[k])} for k in order],
                "decode_ms": round(decode_s * 1000, 1), "encode_ms": round(encode_s * 1000, 1)}

    # -- segment everything ------------------------------------------------------------------

    def everything(self, body: Any) -> dict[str, Any]:
        """``{"id", options...}`` -> the automatic mask generator's records with uncompressed RLE masks."""
        body = _fields(body, {"id", *EVERYTHING_OPTIONS}, {"id"})
        rgb = self.image(body["id"])
        options: dict[str, Any] = {}
        for key, (kind, low, high) in EVERYTHING_OPTIONS.items():
            if key not in body:
                continue
            value = _number(body[key], key)
            if kind is int and value != int(value):
                raise ApiError(400, f"{key} must be an integer, got {body[key]!r:.20}")
            if not low <= value <= high:
                raise ApiError(400, f"{key} must be in [{low:g}, {high:g}], got {value:g}")
            options[key] = kind(value)
        image_id = body["id"]

        def report(done: int, total: int) -> None:
            with self._lock:
                self._progress[image_id] = {"done": done, "total": total, "running": True}

        start = time.perf_counter()
        with self._model_lock:
            generator = _CountingGenerator(self.predictor, report, output_mode="uncompressed_rle", **options)
            try:
                records = generator.generate(rgb)
            finally:
                with self._lock:
                    self._progress[image_id] = dict(self._progress.get(image_id, {"done": 0, "total": 0}),
                                                    running=False)
        records.sort(key=lambda r: -r["area"])
        masks = [{"rle": r["segmentation"], **{k: r[k] for k in ("area", "bbox", "predicted_iou", "stability_score",
                                                                    "point_coords", "crop_box")}}
                 for r in records]
        return {"masks": masks, "ms": round((time.perf_counter() - start) * 1000, 1)}

    def progress(self, image_id: str) -> dict[str, Any]:
        """``{"done", "total", "running"}`` of the last "segment everything" on ``image_id``."""
        with self._lock:
            return dict(self._progress.get(image_id, {"done": 0, "total": 0, "running": False}))
