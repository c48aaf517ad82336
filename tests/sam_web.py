"""Helpers of the web app's tests: a small SAM model folder, the server started as a user starts it, HTTP calls.

The model is EfficientViT-SAM L0 with the synthetic weights of
:mod:`synthetic` and a 128 encoder input (fast on a CPU); the server is
``python -m mlx_evit.sam serve --port 0`` in a subprocess, its URL read from
the line it prints.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import http.client
from pathlib import Path
from typing import Any, Optional
from urllib.parse import urlsplit

import numpy as np
from PIL import Image

import synthetic

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = ROOT / "tests" / "data" / "images"
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT)] + sys.path))


def make_model_dir(path: Path) -> Path:
    """An L0 with synthetic weights and a 128 encoder input, saved as an MLX model folder."""
    import mlx_evit
    from mlx_evit.models.keymap import load_state_dict
    from mlx_evit.models.registry import build_model

    net = build_model("efficientvit_sam_l0", image_size=128)
    load_state_dict(net, synthetic.state_dict(synthetic.keys_file("efficientvit-sam-l0")))
    mlx_evit.save_model(net, path)
    return path


class Server:
    """``python -m mlx_evit.sam serve`` in a subprocess on a free 127.0.0.1 port."""

    def __init__(self, *args: str, timeout: float = 300):
        self.err = tempfile.TemporaryFile("w+")  # a file, not a pipe: a chatty server cannot block on it
        self.proc = subprocess.Popen([sys.executable, "-m", "mlx_evit.sam", "serve", "--port", "0", *args],
                                     stdout=subprocess.PIPE, stderr=self.err, text=True, env=ENV, cwd=ROOT)
        line = self.proc.stdout.readline()  # "serving NAME on URL (Ctrl-C to stop)"
        match = re.search(r"on (http://127\.0\.0\.1:\d+/)", line)
        if not match:
            self.proc.kill()
            self.proc.wait()
            raise RuntimeError(f"the server did not start: {line!r} {self.stderr()}")
        self.url = match.group(1)
        self.port = urlsplit(self.url).port

    def stop(self) -> str:
        """Stop the server (Ctrl-C) and return what it wrote on stderr."""
        if self.proc.poll() is None:
            self.proc.send_signal(2)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.stderr()

    def stderr(self) -> str:
        self.err.seek(0)
        return self.err.read()


def call(port: int, method: str, path: str, body: Any = None, content_type: Optional[str] = None,
         headers: Optional[dict] = None, conn: Optional[http.client.HTTPConnection] = None) -> tuple[int, Any]:
    """One request -> (status, parsed JSON or raw bytes). ``body``: bytes as is, anything else as JSON."""
    own = conn is None
    conn = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    hdrs = dict(headers or {})
    if body is not None and not isinstance(body, bytes):
        body = json.dumps(body).encode()
        content_type = content_type or "application/json"
    if content_type:
        hdrs["Content-Type"] = content_type
    try:
        conn.request(method, path, body=body, headers=hdrs)
        response = conn.getresponse()
        data = response.read()
        kind = response.getheader("Content-Type", "")
        return response.status, json.loads(data) if kind.startswith("application/json") else data
    finally:
        if own:
            conn.close()


def upload(port: int, path: Path) -> dict:
    status, info = call(port, "POST", "/api/images", path.read_bytes(), "image/png")
    assert status == 200, info
    return info


def png_mask(b64: str) -> np.ndarray:
    """A mask PNG of the API (base64, 0/255) -> bool array; it must hold only 0 and 255."""
    arr = np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))
    assert arr.ndim == 2 and set(np.unique(arr).tolist()) <= {0, 255}, (arr.shape, np.unique(arr))
    return arr == 255


def wait_for(predicate, timeout: float = 120, what: str = "condition"):
    """Poll ``predicate()`` until it returns something true; fail with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.05)
