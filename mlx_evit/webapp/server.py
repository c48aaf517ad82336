"""The web app's HTTP side: the page's three static files and the JSON API of :class:`~mlx_evit.webapp.service.SamService`.

Standard library only (``http.server.ThreadingHTTPServer``): the app serves
one person on their own machine, so a thread per connection is plenty, and
no web framework joins the runtime dependencies.

API (JSON in and out; errors are 4xx ``{"error": MESSAGE}``):

- ``GET /api/health`` -> ``{"status": "ok", "model": NAME, "image_size": R, "library": bool}``
- ``POST /api/images``, body = an image file's bytes -> ``{"id", "width", "height", "encode_ms"}``
- ``GET /api/images/ID`` -> the image as the model sees it (PNG)
- ``POST /api/predict`` ``{"id", "points": [[x, y, label], ...], "box": [x0, y0, x1, y1] | null,
  "multimask": bool}`` -> ``{"masks": [{"png": BASE64 PNG, "score": IOU}, ...], "decode_ms", "encode_ms"}``
- ``POST /api/everything`` ``{"id", options...}`` -> ``{"masks": [{"rle", "area", "bbox", "predicted_iou",
  "stability_score", "point_coords", "crop_box"}, ...], "ms"}``; ``GET /api/progress?id=ID`` while it runs
- ``GET /api/library`` -> ``{"images": [NAME, ...]}`` and ``POST /api/library`` ``{"name"}`` (``--images DIR``)

Only the three packaged page files and the files ``/api/library`` lists are
ever read. A server bound to a loopback address answers only requests whose
``Host`` is a loopback name (no DNS rebinding), JSON endpoints require
``Content-Type: application/json`` and uploads ``image/*`` (so a web page
elsewhere cannot post to it with a plain form), and the page's
Content-Security-Policy allows nothing but this server.
"""

from __future__ import annotations

import ipaddress
import json
import socket
import sys
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any, Callable, Optional
from urllib.parse import parse_qs, urlsplit

from mlx_evit.errors import one_line
from mlx_evit.webapp.service import ApiError, SamService

__all__ = ["SamHTTPServer", "make_server", "is_loopback", "STATIC_FILES"]

STATIC_FILES = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/index.html": ("index.html", "text/html; charset=utf-8"),
    "/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/style.css": ("style.css", "text/css; charset=utf-8"),
}
"""URL path -> (file in the package's ``static`` folder, content type): all the server ever serves from disk."""

CSP = ("default-src 'self'; img-src 'self' data: blob:; script-src 'self'; style-src 'self'; "
       "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
_LOOPBACK_NAMES = ("localhost", "localhost.")


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an address, IPv6 possibly in brackets) is this machine only."""
    host = host.strip("[]").lower()
    if host in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _read_static() -> dict[str, bytes]:
    folder = resources.files(__package__) / "static"  # this package's static/ folder
    return {name: (folder / name).read_bytes() for name, _ in set(STATIC_FILES.values())}


class SamHTTPServer(ThreadingHTTPServer):
    """A threading HTTP server carrying the :class:`SamService` and the page's files.

    ``service`` may be attached after the socket is bound (the command binds
    first, so a busy port fails before the model loads).
    """

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], service: Optional[SamService] = None,
                 log: Optional[Callable[[str], None]] = None):
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)
        self.service = service
        self.log = log
        self.static = _read_static()
        self.local_only = is_loopback(address[0])

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


def make_server(service: Optional[SamService], host: str = "127.0.0.1", port: int = 8008,
                log: Optional[Callable[[str], None]] = None) -> SamHTTPServer:
    """A bound (not yet serving) server; ``port=0`` picks a free port (``server.url`` tells which)."""
    return SamHTTPServer((host, port), service, log)


class _Handler(BaseHTTPRequestHandler):
    server: SamHTTPServer
    protocol_version = "HTTP/1.1"
    server_version = "mlx-evit-sam"
    sys_version = ""

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base class's name)
        if self.server.log is not None:
            self.server.log(f"{self.address_string()} {format % args}")

    # -- dispatch ----------------------------------------------------------------------------

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")

    def _handle(self, method: str) -> None:
        self._body_read = False
        try:
            if self.server.local_only and not self._host_is_local():
                raise ApiError(403, "this server answers only requests to localhost")
            url = urlsplit(self.path)
            if method == "GET" and url.path in STATIC_FILES:
                name, kind = STATIC_FILES[url.path]
                return self._send(200, self.server.static[name], kind, {"Content-Security-Policy": CSP})
            if not url.path.startswith("/api/"):
                raise ApiError(404, f"no such page: {url.path[:80]}")
            service = self.server.service
            if service is None:
                raise ApiError(503, "the model is still loading")
            route = (method, url.path)
            if route == ("GET", "/api/health"):
                return self._send_json(200, service.health())
            if route == ("GET", "/api/library"):
                return self._send_json(200, {"images": service.library()})
            if route == ("GET", "/api/progress"):
                image_id = parse_qs(url.query).get("id", [""])[0]
                return self._send_json(200, service.progress(image_id))
            if method == "GET" and url.path.startswith("/api/images/"):
                png = service.image_png(url.path[len("/api/images/"):])
                return self._send(200, png, "image/png")
            if route == ("POST", "/api/images"):
                kind = self.headers.get("Content-Type", "")
                if not (kind.startswith("image/") or kind.startswith("application/octet-stream")):
                    raise ApiError(415, f"upload the image file's bytes with Content-Type image/..., got {kind!r:.60}")
                return self._send_json(200, service.add_image(self._body(service.limits.max_upload_bytes)))
            posts = {"/api/predict": service.predict, "/api/everything": service.everything,
                     "/api/library": service.open_library_image}
            if method == "POST" and url.path in posts:
                return self._send_json(200, posts[url.path](self._json_body(service.limits.max_json_bytes)))
            known = {"/api/health", "/api/library", "/api/progress", "/api/images", "/api/predict", "/api/everything"}
            if url.path in known or url.path.startswith("/api/images/"):
                raise ApiError(405, f"{method} is not allowed on {url.path}")
            raise ApiError(404, f"no such API endpoint: {url.path[:80]}")
        except ApiError as e:
            if method == "POST" and not self._body_read:
                self.close_connection = True  # the unread body must not be parsed as the next request
            self._send_json(e.status, {"error": e.message})
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as e:  # a bug: answer 500 and say so on the server's console
            traceback.print_exc(file=sys.stderr)
            self._send_json(500, {"error": f"internal error: {type(e).__name__}: {one_line(e)}"})

    def _host_is_local(self) -> bool:
        host = self.headers.get("Host", "")
        name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        return is_loopback(name)

    # -- bodies ------------------------------------------------------------------------------

    def _body(self, limit: int) -> bytes:
        if self.headers.get("Transfer-Encoding"):
            self.close_connection = True
            raise ApiError(411, "chunked uploads are not supported: send Content-Length")
        length = self.headers.get("Content-Length")
        if length is None:
            self.close_connection = True
            raise ApiError(411, "Content-Length is required")
        try:
            n = int(length)
        except ValueError:
            self.close_connection = True
            raise ApiError(400, f"bad Content-Length {length!r:.30}") from None
        if n < 0 or n > limit:
            left = n if 0 < n <= 4 * limit else 0  # drained, so the client reads the answer, not a reset
            while left > 0:
                chunk = self.rfile.read(min(1 << 20, left))
                if not chunk:
                    break
                left -= len(chunk)
            self._body_read = n > 0 and left == 0
            raise ApiError(413, f"request body of {n} bytes is over the limit of {limit} bytes")
        data = self.rfile.read(n)
        self._body_read = True
        if len(data) != n:
            self.close_connection = True
            raise ApiError(400, f"request body ended after {len(data)} of {n} bytes")
        return data

    def _json_body(self, limit: int) -> Any:
        kind = self.headers.get("Content-Type", "")
        data = self._body(limit)
        if not kind.startswith("application/json"):
            raise ApiError(415, f"send JSON with Content-Type application/json, got {kind!r:.60}")
        try:
            return json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ApiError(400, f"malformed JSON: {one_line(e)}") from None

    # -- answers -----------------------------------------------------------------------------

    def _send_json(self, status: int, payload: Any) -> None:
        self._send(status, json.dumps(payload, separators=(",", ":")).encode(), "application/json")

    def _send(self, status: int, body: bytes, kind: str, headers: Optional[dict[str, str]] = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)
