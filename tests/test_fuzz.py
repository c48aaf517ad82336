"""Hostile and broken inputs (issue 20): each listed defect, then a few hundred generated cases.

Every case runs in a worker process of :mod:`fuzz` (``tests/fuzz.py``) that
measures the case's peak memory and is killed on a timeout or beyond 3 GiB,
so a regression fails here instead of exhausting the machine. The whole
campaign (>= 1500 cases) is ``python -m tests.fuzz --cases 2000``.
"""

from __future__ import annotations

import builtins
import pickle

import pytest

import fuzz
from mlx_evit.errors import CheckpointError
from mlx_evit.loading.checkpoint import read_checkpoint

DEFECTS = [
    "pickle_bomb", "pickle_noops", "storage_bomb", "size_lie", "aliases", "stride0", "newline_key", "long_key",
    "corrupt_deflate", "corrupt_lzma", "zip_version", "plain_pickle",
    "image_1x100000", "image_100000x1", "image_3x60000", "image_fifo",
    "depth_million", "window_150", "embed_dim_1e9", "num_classes_1e12", "zeros", "zero_widths", "nested_980",
    "input_size_1e5",
]


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    return fuzz.make_seeds(tmp_path_factory.mktemp("fuzz_seeds"))


@pytest.fixture(scope="module")
def defects(tmp_path_factory, seeds):
    cases = fuzz.defect_cases(tmp_path_factory.mktemp("defects"), seeds)
    assert sorted(cases) == sorted(DEFECTS)
    results = fuzz.run_cases([case for case, _ in cases.values()], timeout=60)
    return {name: (result, expect) for (name, (_, expect)), result in zip(cases.items(), results)}


@pytest.mark.parametrize("name", DEFECTS)
def test_defect_is_a_clean_bounded_error(defects, name):
    """One line of the library's own type naming the input, within the memory bound and seconds."""
    result, expect = defects[name]
    assert result.outcome == "clean", f"{result.outcome}: {result.detail}"
    assert expect in result.detail, result.detail
    assert result.peak <= result.bound and result.seconds < (5 if name == "pickle_noops" else 20)


def test_plain_pickle_sniffing_reads_a_few_bytes(tmp_path, monkeypatch):
    path = tmp_path / "plain.pkl"
    path.write_bytes(pickle.dumps({"w": list(range(30))}, protocol=2)[:141])
    asked = []
    real_open = builtins.open

    class Spy:
        def __init__(self, f):
            self._f = f

        def read(self, n=-1):
            asked.append(n if n is not None and n >= 0 else float("inf"))
            return self._f.read(n)

        def __getattr__(self, name):
            return getattr(self._f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self._f.close()

    monkeypatch.setattr(builtins, "open", lambda *a, **k: Spy(real_open(*a, **k)))
    with pytest.raises(CheckpointError, match="plain pickle"):
        read_checkpoint(path)
    assert asked and max(asked) <= 2**16 + 1


def test_campaign(tmp_path, seeds):
    """A few hundred generated cases: nothing executed, no crash, timeout, memory over bound or raw error."""
    results = fuzz.campaign(300, seed=20, timeout=60, work=tmp_path, seeds=seeds)
    report = fuzz.summary(results)
    failures = [f"{r.outcome}: {r.case.family}/{r.case.kind} {r.case.note}: {r.detail}" for r in results
                if r.outcome not in ("accepted", "clean")]
    assert not failures, "\n".join(failures[:20])
    assert report["cases"] == 300 and set(report["families"]) == {"bytes", "zip", "pickle", "safetensors", "folder",
                                                                    "image"}
    assert report["accepted"] > 0 and report["clean"] > 200  # both paths exercised
