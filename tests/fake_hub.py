"""A small local stand-in for the Hugging Face Hub, for tests (plain http.server).

It serves what ``huggingface_hub.hf_hub_download`` asks for, the way the
Hub answers it:

* ``HEAD``/``GET /{repo_id}/resolve/{revision}/{filename}`` on the Hub port.
  Regular files answer 200 with ``X-Repo-Commit`` and ``ETag`` (the git blob
  sha1). LFS files (``*.safetensors``) answer 302 to a blob URL on a
  second port (a CDN, so the client does not follow it on HEAD), carrying
  ``X-Repo-Commit``, ``X-Linked-Etag`` (sha256) and ``X-Linked-Size``.
  Unknown repository / revision / file: 404 with ``X-Error-Code``
  ``RepoNotFound`` / ``RevisionNotFound`` / ``EntryNotFound``.
* ``HEAD``/``GET /lfs/{sha256}`` on the CDN port, with ``Range`` support
  (206) so that interrupted downloads can resume. :meth:`FakeHub.cut_once`
  makes the next GET of a blob stop half-way (the connection closes early).

Every request is recorded in :attr:`FakeHub.requests` as
``(server, method, path, range)``.
"""

from __future__ import annotations

import hashlib
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

LFS_SUFFIXES = (".safetensors", ".bin", ".pth")


class FakeHub:
    def __init__(self) -> None:
        self.repos: dict[str, tuple[str, dict[str, bytes]]] = {}
        self.blobs: dict[str, bytes] = {}
        self.requests: list[tuple[str, str, str, str | None]] = []
        self._cut: set[str] = set()
        self._lock = threading.Lock()
        self._hub = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self, "hub"))
        self._cdn = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self, "cdn"))
        self._threads: list[threading.Thread] = []

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._hub.server_address[1]}"

    @property
    def cdn(self) -> str:
        return f"http://127.0.0.1:{self._cdn.server_address[1]}"

    def publish(self, repo_id: str, files: dict[str, bytes]) -> str:
        """Make ``files`` the new ``main`` of ``repo_id``; returns the new commit id."""
        digest = hashlib.sha1(repo_id.encode())
        for name in sorted(files):
            digest.update(name.encode() + b"\0" + hashlib.sha256(files[name]).digest())
        with self._lock:
            digest.update(str(len(self.requests)).encode())
            commit = digest.hexdigest()
            self.repos[repo_id] = (commit, dict(files))
            for name, data in files.items():
                if name.endswith(LFS_SUFFIXES):
                    self.blobs[hashlib.sha256(data).hexdigest()] = data
        return commit

    def cut_once(self, data: bytes) -> None:
        """The next GET of this blob sends half of it, then closes the connection."""
        self._cut.add(hashlib.sha256(data).hexdigest())

    def start(self) -> "FakeHub":
        for server in (self._hub, self._cdn):
            thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        """Shut both servers down; their ports refuse connections afterwards."""
        for server in (self._hub, self._cdn):
            server.shutdown()
            server.server_close()
        for thread in self._threads:
            thread.join()

    def routes(self, server: str | None = None) -> list[tuple[str, str]]:
        return [(m, p) for s, m, p, _ in self.requests if server in (None, s)]


def _git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _handler(hub: FakeHub, role: str) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:  # keep the test output clean
            pass

        def do_HEAD(self) -> None:
            self._serve(body=False)

        def do_GET(self) -> None:
            self._serve(body=True)

        def _serve(self, body: bool) -> None:
            path = urllib.parse.urlsplit(self.path).path
            with hub._lock:
                hub.requests.append((role, self.command, path, self.headers.get("Range")))
            if role == "hub":
                self._resolve(path, body)
            else:
                self._blob(path, body)

        def _reply(self, status: int, headers: dict[str, str], data: bytes = b"", body: bool = False) -> None:
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", headers.get("Content-Length", str(len(data))))
            self.end_headers()
            if body and data:
                self.wfile.write(data)

        def _error(self, code: str, extra: dict[str, str] | None = None) -> None:
            self._reply(404, {"X-Error-Code": code, **(extra or {})}, code.encode(), body=self.command == "GET")

        def _resolve(self, path: str, body: bool) -> None:
            parts = [urllib.parse.unquote(p) for p in path.strip("/").split("/")]
            if len(parts) < 5 or parts[2] != "resolve":
                self._reply(404, {}, b"not found", body)
                return
            repo_id, revision, filename = "/".join(parts[:2]), parts[3], "/".join(parts[4:])
            if repo_id not in hub.repos:
                self._error("RepoNotFound")
                return
            commit, files = hub.repos[repo_id]
            if revision not in ("main", commit):
                self._error("RevisionNotFound")
                return
            if filename not in files:
                self._error("EntryNotFound", {"X-Repo-Commit": commit})
                return
            data = files[filename]
            if filename.endswith(LFS_SUFFIXES):
                sha = hashlib.sha256(data).hexdigest()
                self._reply(302, {
                    "Location": f"{hub.cdn}/lfs/{sha}",
                    "X-Repo-Commit": commit,
                    "ETag": f'"{_git_blob_sha1(sha.encode())}"',
                    "X-Linked-Etag": f'"{sha}"',
                    "X-Linked-Size": str(len(data)),
                })
                return
            self._reply(200, {
                "X-Repo-Commit": commit,
                "ETag": f'"{_git_blob_sha1(data)}"',
                "Content-Type": "application/json" if filename.endswith(".json") else "application/octet-stream",
            }, data, body)

        def _blob(self, path: str, body: bool) -> None:
            sha = path.rsplit("/", 1)[-1]
            data = hub.blobs.get(sha)
            if not path.startswith("/lfs/") or data is None:
                self._reply(404, {}, b"no such blob", body)
                return
            start, status, headers = 0, 200, {"Accept-Ranges": "bytes", "ETag": f'"{sha}"'}
            ranged = self.headers.get("Range")
            if ranged and ranged.startswith("bytes=") and ranged.endswith("-"):
                start = int(ranged[len("bytes="):-1])
                status = 206
                headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
            part = data[start:]
            if body and sha in hub._cut:
                hub._cut.discard(sha)
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(part)))
                self.end_headers()
                self.wfile.write(part[: len(part) // 2])
                self.wfile.flush()
                self.close_connection = True
                return
            self._reply(status, headers, part, body)

    return Handler
