"""The web app's JSON API, as a script uses it: answers equal SamPredictor's, bad input is a clear 4xx, load is safe.

One server (``python -m mlx_evit.sam serve`` in a subprocess) serves the
module; the expected masks come from :class:`~mlx_evit.sam.SamPredictor`
and :class:`~mlx_evit.sam.SamAutomaticMaskGenerator` on the same weights in
this process.
"""

from __future__ import annotations

import io
import os
import statistics
import subprocess
import sys
import threading
import time
import http.client

import numpy as np
import pytest
from PIL import Image

import mlx_evit
from mlx_evit.sam import SamAutomaticMaskGenerator, SamPredictor
from mlx_evit.tasks.transforms import load_image
from mlx_evit.webapp import SamService, is_loopback

from sam_web import ENV, PHOTOS, Server, call, make_model_dir, png_mask, upload

CAT, COFFEE = PHOTOS / "cat.png", PHOTOS / "coffee.png"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("webapp_model") / "l0_128")


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    """A served folder: a photo, a text file, a symlink to a photo outside; a secret photo beside it."""
    root = tmp_path_factory.mktemp("webapp_library")
    inside = root / "served"
    inside.mkdir()
    (inside / "cat.png").write_bytes(CAT.read_bytes())
    (inside / "notes.txt").write_text("not an image")
    (root / "secret.png").write_bytes(COFFEE.read_bytes())
    (inside / "escape.png").symlink_to(root / "secret.png")
    return inside


@pytest.fixture(scope="module")
def server(model_dir, library):
    s = Server("--weights", str(model_dir), "--images", str(library), "--max-upload-mb", "1")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def predictor(model_dir):
    return SamPredictor(mlx_evit.load(model_dir))


def expected(predictor, image, points=None, box=None, multimask=True):
    """SamPredictor's masks and scores for a request's prompts, best first."""
    predictor.set_image(image)
    coords = labels = None
    if points:
        coords = np.array([p[:2] for p in points], np.float64)
        labels = np.array([p[2] for p in points])
    masks, scores, _ = predictor.predict(coords, labels, None if box is None else np.array(box, np.float64),
                                         multimask_output=multimask)
    order = np.argsort(-scores, kind="stable")
    return masks[order], scores[order]


def assert_same_masks(answer, masks, scores):
    assert len(answer["masks"]) == len(masks)
    for got, mask, score in zip(answer["masks"], masks, scores):
        np.testing.assert_array_equal(png_mask(got["png"]), mask)
        assert got["score"] == pytest.approx(float(score), abs=1e-5)


# ---------------------------------------------------------------------------
# The page and the health check
# ---------------------------------------------------------------------------


def test_health_and_an_offline_page(server):
    status, health = call(server.port, "GET", "/api/health")
    assert status == 200 and health["status"] == "ok" and health["model"] == "efficientvit_sam_l0"
    assert health["image_size"] == 128 and health["library"] is True
    for path in ("/", "/app.js", "/style.css"):
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        conn.request("GET", path)
        r = conn.getresponse()
        text = r.read().decode()
        assert r.status == 200 and len(text) > 500, path
        assert "http://" not in text and "https://" not in text and 'src="//' not in text, path  # nothing external
        if path == "/":
            assert "default-src 'self'" in r.getheader("Content-Security-Policy")
            assert 'src="app.js"' in text and 'href="style.css"' in text
        conn.close()


# ---------------------------------------------------------------------------
# Answers equal the library's
# ---------------------------------------------------------------------------


PROMPTS = [
    dict(points=[[200, 150, 1]], multimask=True),
    dict(points=[[120.5, 80.25, 1], [300, 200, 0]], multimask=False),
    dict(points=[], box=[50, 40, 380, 290], multimask=True),
    dict(points=[[220, 160, 1]], box=[100, 60, 420, 299], multimask=False),
    dict(points=[[0, 0, 1], [451, 300, 1]], multimask=True),  # the image's corners are inside
]


@pytest.mark.parametrize("prompt", PROMPTS, ids=["point", "fg+bg", "box", "point+box", "corners"])
def test_predict_equals_sam_predictor(server, predictor, prompt):
    info = upload(server.port, CAT)
    image = np.asarray(load_image(CAT))
    assert (info["height"], info["width"]) == image.shape[:2]
    status, answer = call(server.port, "POST", "/api/predict", {"id": info["id"], "box": None, **prompt})
    assert status == 200, answer
    masks, scores = expected(predictor, image, prompt["points"], prompt.get("box"), prompt["multimask"])
    assert len(masks) == (3 if prompt["multimask"] else 1)
    assert all(0 < m.mean() < 1 for m in masks) or prompt.get("box"), [m.mean() for m in masks]
    assert_same_masks(answer, masks, scores)
    assert [m["score"] for m in answer["masks"]] == sorted((m["score"] for m in answer["masks"]), reverse=True)


def test_images_are_encoded_once_and_served_as_the_model_sees_them(server):
    first = upload(server.port, COFFEE)
    again = upload(server.port, COFFEE)
    assert again["id"] == first["id"] and again["encode_ms"] == 0  # the embedding is cached
    other = upload(server.port, CAT)
    assert other["id"] != first["id"]
    status, png = call(server.port, "GET", f"/api/images/{first['id']}")
    assert status == 200
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(png))), np.asarray(load_image(COFFEE)))
    # The same pixels in another format are the same image.
    buf = io.BytesIO()
    load_image(COFFEE).save(buf, format="BMP")
    status, info = call(server.port, "POST", "/api/images", buf.getvalue(), "image/bmp")
    assert status == 200 and info["id"] == first["id"]
    status, answer = call(server.port, "POST", "/api/predict", {"id": first["id"], "points": [[100, 100, 1]]})
    assert status == 200 and answer["encode_ms"] == 0 and answer["decode_ms"] > 0


def test_library_lists_and_opens_only_the_served_folder(server, library):
    status, listing = call(server.port, "GET", "/api/library")
    assert status == 200 and listing == {"images": ["cat.png"]}  # no text file, no symlink out of the folder
    status, info = call(server.port, "POST", "/api/library", {"name": "cat.png"})
    assert status == 200 and info["name"] == "cat.png" and info["id"] == upload(server.port, CAT)["id"]
    for name in ("escape.png", "../secret.png", str(library.parent / "secret.png"), "notes.txt", "", 7):
        status, answer = call(server.port, "POST", "/api/library", {"name": name})
        assert status == 404 and "not an image of the served folder" in answer["error"], (name, answer)


def test_everything_equals_the_mask_generator(server, predictor):
    info = upload(server.port, CAT)
    options = dict(points_per_side=3, pred_iou_thresh=0.0, stability_score_thresh=0.0, box_nms_thresh=1.0)
    status, answer = call(server.port, "POST", "/api/everything", dict(id=info["id"], **options))
    assert status == 200, answer
    ref = SamAutomaticMaskGenerator(predictor, output_mode="uncompressed_rle", **options)
    records = sorted(ref.generate(np.asarray(load_image(CAT))), key=lambda r: -r["area"])
    assert len(answer["masks"]) == len(records) > 1
    for got, want in zip(answer["masks"], records):
        assert got["rle"] == want["segmentation"] and got["rle"]["size"] == [300, 451]
        assert got["area"] == want["area"] and got["bbox"] == want["bbox"]
        assert got["predicted_iou"] == pytest.approx(want["predicted_iou"], abs=1e-5)
        assert got["stability_score"] == pytest.approx(want["stability_score"], abs=1e-5)
    status, progress = call(server.port, "GET", f"/api/progress?id={info['id']}")
    assert status == 200 and progress == {"done": 1, "total": 1, "running": False}  # 9 points, one batch


# ---------------------------------------------------------------------------
# Bad input: 4xx and a one-line message
# ---------------------------------------------------------------------------


def _bad_cases(image_id: str) -> list[tuple[str, str, object, str, int, str]]:
    """(name, path, body, content type, status, text in the message)."""
    png = CAT.read_bytes()
    big = np.random.default_rng(0).integers(0, 256, (700, 700, 3), np.uint8)  # ~1.4 MB as PNG
    buf = io.BytesIO()
    Image.fromarray(big).save(buf, format="PNG", compress_level=0)
    j = "application/json"
    return [
        ("oversized upload", "/api/images", buf.getvalue(), "image/png", 413, "over the limit"),
        ("not an image", "/api/images", b"this is not an image\n" * 10, "image/gif", 415, "not an image"),
        ("truncated image", "/api/images", png[: len(png) // 2], "image/png", 400, "cannot decode"),
        ("empty upload", "/api/images", b"", "image/png", 400, "empty upload"),
        ("upload as text", "/api/images", png, "text/plain", 415, "Content-Type image/"),
        ("malformed JSON", "/api/predict", b'{"id": "x", "points": [[1, 2, 1]', j, 400, "malformed JSON"),
        ("JSON not an object", "/api/predict", [1, 2], j, 400, "expected a JSON object"),
        ("predict as a form", "/api/predict", b"id=x", "application/x-www-form-urlencoded", 415, "application/json"),
        ("unknown field", "/api/predict", {"id": image_id, "points": [[1, 1, 1]], "mask": 1}, j, 400, "unknown field"),
        ("missing id", "/api/predict", {"points": [[1, 1, 1]]}, j, 400, "missing field(s) id"),
        ("unknown id", "/api/predict", {"id": "feed" * 8, "points": [[1, 1, 1]]}, j, 404, "upload the image again"),
        ("point right of the image", "/api/predict", {"id": image_id, "points": [[452, 10, 1]]}, j, 400,
         "outside the 451x300 image"),
        ("point above the image", "/api/predict", {"id": image_id, "points": [[10, -0.5, 1]]}, j, 400, "outside"),
        ("NaN coordinate", "/api/predict", ('{"id": "%s", "points": [[NaN, 1, 1]]}' % image_id).encode(), j, 400,
         "finite number"),
        ("text coordinate", "/api/predict", {"id": image_id, "points": [["1", 1, 1]]}, j, 400, "finite number"),
        ("point of two numbers", "/api/predict", {"id": image_id, "points": [[1, 1]]}, j, 400, "[x, y, label]"),
        ("label 2", "/api/predict", {"id": image_id, "points": [[1, 1, 2]]}, j, 400, "label must be 1"),
        ("too many points", "/api/predict", {"id": image_id, "points": [[1, 1, 1]] * 65}, j, 400, "at most 64"),
        ("inverted box", "/api/predict", {"id": image_id, "box": [100, 10, 50, 60]}, j, 400, "x0 <= x1"),
        ("box outside", "/api/predict", {"id": image_id, "box": [0, 0, 500, 60]}, j, 400, "<= 451"),
        ("box of three", "/api/predict", {"id": image_id, "box": [0, 0, 5]}, j, 400, "[x0, y0, x1, y1]"),
        ("no prompt", "/api/predict", {"id": image_id, "points": [], "box": None}, j, 400, "no prompt"),
        ("multimask not bool", "/api/predict", {"id": image_id, "points": [[1, 1, 1]], "multimask": "yes"}, j, 400,
         "true or false"),
        ("everything option", "/api/everything", {"id": image_id, "points_per_side": 0}, j, 400, "in [1, 64]"),
        ("everything crops", "/api/everything", {"id": image_id, "crop_n_layers": 1.5}, j, 400, "integer"),
        ("everything unknown", "/api/everything", {"id": image_id, "min_mask_region_area": 5}, j, 400, "unknown"),
    ]


def test_bad_input_is_a_4xx_with_a_one_line_message(server):
    image_id = upload(server.port, CAT)["id"]
    for name, path, body, kind, status, needle in _bad_cases(image_id):
        got, answer = call(server.port, "POST", path, body, kind)
        assert got == status, (name, got, answer)
        assert set(answer) == {"error"} and needle in answer["error"] and "\n" not in answer["error"], (name, answer)
    # Unknown paths, wrong methods, files outside the page, other hosts.
    for method, path, status in [("GET", "/api/predict", 405), ("POST", "/api/health", 405), ("GET", "/api/nope", 404),
                                 ("GET", "/../mlx_evit/webapp/server.py", 404), ("GET", "/static/app.js", 404),
                                 ("GET", "/%2e%2e/%2e%2e/etc/passwd", 404), ("GET", "/api/images/../../server.py", 404),
                                 ("GET", "/api/images/unknown", 404)]:
        got, answer = call(server.port, method, path, b"" if method == "POST" else None)
        assert got == status and "error" in answer, (method, path, got, answer)
    got, answer = call(server.port, "GET", "/api/health", headers={"Host": "attacker.example:80"})
    assert got == 403 and "localhost" in answer["error"]
    # A body larger than the limit announced but not sent: refused before reading.
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.putrequest("POST", "/api/images")
    conn.putheader("Content-Type", "image/png")
    conn.putheader("Content-Length", str(10 * 2**30))
    conn.endheaders()
    r = conn.getresponse()
    assert r.status == 413 and b"over the limit" in r.read()
    conn.close()
    # The server is still fine.
    assert call(server.port, "GET", "/api/health")[0] == 200


# ---------------------------------------------------------------------------
# Load: concurrent clients get their own answers
# ---------------------------------------------------------------------------


@pytest.mark.slow  # 200 decoder runs: about a minute on 2 cores
def test_concurrent_clients_get_their_own_answers(server, predictor):
    """200 predict requests from 8 clients over 2 images and 16 prompts: no error, each answer its prompt's."""
    images = {path.name: (upload(server.port, path)["id"], np.asarray(load_image(path))) for path in (CAT, COFFEE)}
    rng = np.random.default_rng(3)
    jobs = []
    for name, (image_id, image) in images.items():
        h, w = image.shape[:2]
        for k in range(8):
            points = [[float(rng.uniform(0, w)), float(rng.uniform(0, h)), 1]]
            if k % 2:
                points.append([float(rng.uniform(0, w)), float(rng.uniform(0, h)), 0])
            request = {"id": image_id, "points": points, "box": None, "multimask": bool(k % 3 == 0)}
            jobs.append((request, expected(predictor, image, points, None, request["multimask"])))
    n_requests, n_clients = 200, 8
    latencies, failures = [], []
    lock = threading.Lock()

    def client(c: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=300)
        for i in range(c, n_requests, n_clients):
            request, (masks, scores) = jobs[(i * 7) % len(jobs)]
            start = time.perf_counter()
            try:
                status, answer = call(server.port, "POST", "/api/predict", request, conn=conn)
                seconds = time.perf_counter() - start
                assert status == 200, answer
                assert_same_masks(answer, masks, scores)
            except Exception as e:  # noqa: BLE001 (collected and reported below)
                with lock:
                    failures.append(f"request {i}: {type(e).__name__}: {e}"[:300])
                continue
            with lock:
                latencies.append(seconds)
        conn.close()

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(n_clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    assert not failures, failures[:5]
    assert len(latencies) == n_requests
    ms = sorted(1000 * s for s in latencies)
    print(f"\nload: {n_requests} predict requests from {n_clients} clients in {wall:.1f} s "
          f"({n_requests / wall:.1f} requests/s); latency ms: median {statistics.median(ms):.0f}, "
          f"p95 {ms[int(0.95 * len(ms)) - 1]:.0f}, max {ms[-1]:.0f}")


def test_one_request_runs_the_model_at_a_time(model_dir):
    """Concurrent requests on two images: the predictor is never entered twice, its image never switched mid-way."""
    service = SamService(mlx_evit.load(model_dir), "efficientvit_sam_l0", compile=False)
    images = [service.add_image(p.read_bytes())["id"] for p in (CAT, COFFEE)]
    sizes = {images[0]: (300, 451), images[1]: (400, 600)}
    real, inside, most, errors = service.predictor.predict, [0], [0], []

    def watched(*args, **kwargs):
        inside[0] += 1
        most[0] = max(most[0], inside[0])
        size = service.predictor.original_size
        time.sleep(0.05)  # room for another thread to come in
        assert service.predictor.original_size == size, "the image changed under a running prediction"
        try:
            return real(*args, **kwargs)
        finally:
            inside[0] -= 1

    service.predictor.predict = watched

    def client(i: int) -> None:
        try:
            answer = service.predict({"id": images[i % 2], "points": [[10, 10, 1]], "multimask": False})
            assert png_mask(answer["masks"][0]["png"]).shape == sizes[images[i % 2]]
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append(f"{type(e).__name__}: {e}")

    threads = [threading.Thread(target=client, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and most[0] == 1, (errors, most)


# ---------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------


def _serve(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mlx_evit.sam", "serve", *args], capture_output=True, text=True,
                          env=ENV, timeout=300)


def test_command_errors_are_one_line(server, tmp_path):
    cases = [
        (["--images", str(tmp_path / "missing")], "--images"),
        (["--port", str(server.port)], "cannot listen on 127.0.0.1"),  # busy: fails before the model loads
        (["--port", "70000"], "0-65535"),
        (["--model", "efficientvit_sam_l0", "--weights", "x"], "--weights x: no such file or folder"),
        (["--model", "efficientvit_seg_b0_cityscapes"], "a segmentation model"),
        (["-q", "--progress"], "unrecognized arguments: --progress"),
    ]
    for args, needle in cases:
        r = _serve(*args)
        assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
    # Another host only when asked, with a warning (192.0.2.1 is a documentation address: nothing listens).
    r = _serve("--host", "192.0.2.1", "--port", "8008")
    assert "warning: listening on 192.0.2.1" in r.stderr and "cannot listen" in r.stderr and r.returncode == 2
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("[::1]") and is_loopback("127.3.2.1")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.2") and not is_loopback("example.com")
    r = _serve("--help")
    assert r.returncode == 0 and "/api/predict" in r.stdout


def test_the_offline_demo_serves(tmp_path):
    """The README's demo: examples/make_sam_demo.py, then the app on its weights and photos."""
    demo = tmp_path / "sam_demo"
    r = subprocess.run([sys.executable, "examples/make_sam_demo.py", str(demo), "--image-size", "128"],
                       capture_output=True, text=True, env=ENV, timeout=300, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert r.returncode == 0, r.stderr
    again = subprocess.run([sys.executable, "examples/make_sam_demo.py", str(demo)], capture_output=True, text=True,
                           env=ENV, timeout=300, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert again.returncode == 0 and "there already" in again.stdout, again.stderr  # the README command reruns
    s = Server("--weights", str(demo / "model"), "--images", str(demo / "images"))
    try:
        assert call(s.port, "GET", "/api/health")[1]["image_size"] == 128
        status, listing = call(s.port, "GET", "/api/library")
        assert status == 200 and listing["images"] == ["cat.jpg"]
        status, info = call(s.port, "POST", "/api/library", {"name": "cat.jpg"})
        assert status == 200 and (info["width"], info["height"]) == load_image(demo / "images" / "cat.jpg").size
        status, answer = call(s.port, "POST", "/api/predict", {"id": info["id"], "points": [[200, 150, 1]]})
        assert status == 200 and len(answer["masks"]) == 3
    finally:
        s.stop()
