"""Pretrained weights from the Hub: download, convert, cache, offline use.

A local Hub (tests/fake_hub.py, plain http.server on 127.0.0.1) serves timm
repositories made here (random timm weights saved by timm in its Hub
layout); huggingface_hub's real download code talks to it through
``HF_ENDPOINT`` (CLI in a subprocess, since huggingface_hub reads the
variable at import) or the ``endpoint`` argument (library, in-process).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from fake_hub import FakeHub
from mlx_evit.classify import DEFAULT_MODEL
from mlx_evit import load
from mlx_evit.loading.hub import CACHE_ENV, HubError, cache_root
from mlx_evit.loading.pipeline import pretrained_dir
from reference_models import PHOTOS, peaked_timm_model, save_timm_folder, timm_probs

torch.set_num_threads(2)

CAT = [p for p in PHOTOS if p.name == "cat.png"]
CHUNK = 10 * 2**20  # huggingface_hub writes downloads in chunks of this size; a resume starts at a multiple


def _repo_files(folder: Path) -> dict[str, bytes]:
    return {name: (folder / name).read_bytes() for name in ("config.json", "model.safetensors")}


@pytest.fixture(scope="module")
def default_repo(tmp_path_factory) -> tuple[dict[str, bytes], np.ndarray]:
    """The default model's timm repository (random weights) and timm's probabilities for the cat photo."""
    model = peaked_timm_model(DEFAULT_MODEL, 11)
    folder = save_timm_folder(model, tmp_path_factory.mktemp("repo") / "b1")
    return _repo_files(folder), timm_probs(model, CAT)[0]


def _cli(args: list[str], home: Path, endpoint: str | None, offline: bool = False) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("HF_", "HUGGINGFACE_", "MLX_EVIT_", "TRANSFORMERS_")) and "proxy" not in k.lower()}
    env.update(HF_HOME=str(home), NO_PROXY="127.0.0.1,localhost", HF_HUB_DISABLE_TELEMETRY="1")
    if endpoint:
        env["HF_ENDPOINT"] = endpoint
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    command = [sys.executable, "-m", "mlx_evit.classify", *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)


def test_cli_downloads_once_then_runs_from_cache(default_repo, tmp_path):
    files, expected = default_repo
    repo_id = f"timm/{DEFAULT_MODEL}"
    hub = FakeHub().start()
    try:
        commit = hub.publish(repo_id, files)
        hub.cut_once(files["model.safetensors"])  # the first transfer breaks off: the download must resume
        home = tmp_path / "hf"
        args = [str(CAT[0]), "--format", "json"]

        first = _cli(args, home, hub.endpoint)
        assert first.returncode == 0, first.stderr
        (record,) = json.loads(first.stdout)
        assert record["model"] == DEFAULT_MODEL  # no --model: the default
        order = np.argsort(-expected)[:6]
        assert np.diff(-expected[order]).min() > 5e-4, "test setup: near-ties make the top-5 order arbitrary"
        order = order[:5]
        assert [p["index"] for p in record["top_k"]] == order.tolist()
        np.testing.assert_allclose([p["score"] for p in record["top_k"]], expected[order], atol=1e-4)
        assert "converting" in first.stderr

        sha = hashlib.sha256(files["model.safetensors"]).hexdigest()
        assert hub.routes("hub") == [
            ("HEAD", f"/{repo_id}/resolve/main/config.json"),  # which commit is main?
            ("HEAD", f"/{repo_id}/resolve/main/config.json"),  # hf_hub_download
            ("GET", f"/{repo_id}/resolve/main/config.json"),
            ("HEAD", f"/{repo_id}/resolve/{commit}/model.safetensors"),
        ]
        blob_gets = [(m, p, r) for s, m, p, r in hub.requests if s == "cdn"]
        assert [(m, p) for m, p, _ in blob_gets] == [("GET", f"/lfs/{sha}")] * 2
        resumed = blob_gets[1][2]
        assert resumed is not None and resumed.startswith("bytes=") and int(resumed[6:-1]) % CHUNK == 0 < int(
            resumed[6:-1]), resumed

        store = home / "mlx_evit" / f"models--timm--{DEFAULT_MODEL}"
        converted = store / "snapshots" / commit
        assert json.loads((converted / "config.json").read_text())["format"] == "mlx_evit"
        assert (store / "refs" / "main").read_text() == commit
        hub_snapshot = home / "hub" / f"models--timm--{DEFAULT_MODEL}" / "snapshots" / commit
        assert (hub_snapshot / "model.safetensors").read_bytes() == files["model.safetensors"]

        # second run, Hub up: the revision is checked (one HEAD), nothing is downloaded or converted
        del hub.requests[:]
        second = _cli(args, home, hub.endpoint)
        assert second.returncode == 0, second.stderr
        assert json.loads(second.stdout) == [record]
        assert hub.routes() == [("HEAD", f"/{repo_id}/resolve/main/config.json")]
        assert "converting" not in second.stderr
    finally:
        hub.stop()

    # Hub gone (connection refused): the cache answers
    third = _cli(args, home, hub.endpoint)
    assert third.returncode == 0, third.stderr
    assert json.loads(third.stdout) == [record]

    # offline with empty caches: a clear message, non-zero exit, no traceback
    empty = _cli(args, tmp_path / "empty", hub.endpoint, offline=True)
    assert empty.returncode == 2 and empty.stdout == ""
    (line,) = empty.stderr.strip().splitlines()
    assert "not cached" in line and "HF_HUB_OFFLINE" in line
    assert f"hf download {repo_id} model.safetensors config.json" in line and "--weights" in line


# ---------------------------------------------------------------- library, in-process


B0 = "efficientvit_b0.r224_in1k"


@pytest.fixture(scope="module")
def b0_versions(tmp_path_factory) -> list[dict[str, bytes]]:
    """Two uploads of the B0 repository with different weights."""
    root = tmp_path_factory.mktemp("b0")
    return [_repo_files(save_timm_folder(peaked_timm_model(B0, seed), root / str(seed))) for seed in (1, 2)]


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """A running local Hub; huggingface_hub's cache redirected under tmp_path."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    server = FakeHub().start()
    yield server
    server.stop()


def _weights(folder: Path) -> np.ndarray:
    from mlx.utils import tree_flatten

    model = load(folder, fuse=False)
    return np.concatenate([np.asarray(v).ravel() for _, v in tree_flatten(model.parameters())])


def test_new_revision_is_noticed_and_offline_finds_the_cache(hub, b0_versions, tmp_path):
    from huggingface_hub import constants

    cache = tmp_path / "mlx"
    old = hub.publish(f"timm/{B0}", b0_versions[0])
    first = pretrained_dir(B0, cache_dir=cache, endpoint=hub.endpoint)
    assert first == cache / f"models--timm--{B0}" / "snapshots" / old
    new = hub.publish(f"timm/{B0}", b0_versions[1])
    messages = []
    second = pretrained_dir("efficientvit_b0", cache_dir=cache, endpoint=hub.endpoint, log=messages.append)
    assert second.name == new != old and len(messages) == 1 and new[:12] in messages[0]
    assert not np.array_equal(_weights(first), _weights(second))
    assert (cache / f"models--timm--{B0}" / "refs" / "main").read_text() == new

    hub.stop()
    started = time.perf_counter()
    assert pretrained_dir(B0, cache_dir=cache, endpoint=hub.endpoint) == second  # unreachable: our cache
    assert pretrained_dir(B0, cache_dir=cache, endpoint=hub.endpoint, offline=True) == second
    # our cache empty, the Hub cache full: converted from there
    other = pretrained_dir(B0, cache_dir=tmp_path / "other", endpoint=hub.endpoint, offline=True)
    assert other == tmp_path / "other" / f"models--timm--{B0}" / "snapshots" / new
    np.testing.assert_array_equal(_weights(other), _weights(second))
    shutil.rmtree(constants.HF_HUB_CACHE)  # Hub cache cleaned: our own ref still finds the conversion
    assert pretrained_dir(B0, cache_dir=cache, endpoint=hub.endpoint, offline=True) == second
    with pytest.raises(HubError, match="not cached and offline mode"):
        pretrained_dir(B0, cache_dir=tmp_path / "empty", endpoint=hub.endpoint, offline=True)
    with pytest.raises(HubError, match=f"not cached and the Hub at {hub.endpoint} cannot be reached"):
        pretrained_dir(B0, cache_dir=tmp_path / "empty", endpoint=hub.endpoint)
    assert time.perf_counter() - started < 10, "an unreachable Hub must not be retried for long"


def test_hub_errors_are_named(hub, b0_versions, tmp_path):
    cache = tmp_path / "mlx"
    hub.publish(f"timm/{B0}", b0_versions[0])
    with pytest.raises(HubError, match=r"timm/efficientvit_m0.r224_in1k/config.json .*no such repository"):
        pretrained_dir("efficientvit_m0", cache_dir=cache, endpoint=hub.endpoint)
    with pytest.raises(HubError, match="revision v9.*no such revision"):
        pretrained_dir(B0, revision="v9", cache_dir=cache, endpoint=hub.endpoint)
    with pytest.raises(HubError, match="no pretrained weights on the Hub"):
        pretrained_dir("efficientvit_seed", cache_dir=cache, endpoint=hub.endpoint)
    with pytest.raises(ValueError, match="unknown model"):
        pretrained_dir("efficientvit_b7", cache_dir=cache, endpoint=hub.endpoint)

    # a repository whose weights do not fit: the conversion fails, nothing half-written stays
    hub.publish(f"timm/{B0}", {"config.json": b0_versions[0]["config.json"], "model.safetensors": b"\0" * 64})
    with pytest.raises(HubError, match="cannot convert"):
        pretrained_dir(B0, cache_dir=cache, endpoint=hub.endpoint)
    snapshots = cache / f"models--timm--{B0}" / "snapshots"
    assert not snapshots.exists() or not any(snapshots.iterdir())

    hub.publish(f"timm/{B0}", {"model.safetensors": b0_versions[0]["model.safetensors"]})
    with pytest.raises(HubError, match="config.json .*has no such file"):
        pretrained_dir(B0, cache_dir=cache, endpoint=hub.endpoint)


def test_cache_location(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.delenv(CACHE_ENV, raising=False)
    monkeypatch.setattr(constants, "HF_HOME", str(tmp_path / "home"))
    assert cache_root() == tmp_path / "home" / "mlx_evit"
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "elsewhere"))
    assert cache_root() == tmp_path / "elsewhere"


def test_load_takes_a_pretrained_name(hub, b0_versions, tmp_path, monkeypatch):
    """``mlx_evit.load(tag)`` loads the tag's cached Hub weights (a local path of that name would win)."""
    from huggingface_hub import constants

    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "mlx"))
    commit = hub.publish(f"timm/{B0}", b0_versions[0])
    expected = pretrained_dir(B0, endpoint=hub.endpoint)  # download + convert into $MLX_EVIT_CACHE
    hub.stop()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    model = load(B0)
    assert expected.name == commit and model.arch_name == "efficientvit_b0"
    np.testing.assert_array_equal(_weights(expected), _weights(B0))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="unknown pretrained tag"):
        load("efficientvit_b0.nonexistent_tag")
