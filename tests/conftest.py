"""Shared pytest setup: the markers.

Markers (registered in pyproject.toml): ``parity`` (agreement with code
nobody here wrote, or with its fixtures; must pass under
``MLX_EVIT_KERNELS=native`` and ``=cpu``) and ``slow`` (the longest cases;
``pytest -m "not slow"`` is the quick loop). ``slow`` is given here from
:data:`SLOW`, the slowest cases of a full run (``--durations``), so the
list stays in one place.

On a GPU where MLX runs float32 in TF32 (its CUDA default), the parity
tests compare with the TF32 tolerance of :mod:`tests.precision`; on the CPU
and with ``MLX_ENABLE_TF32=0`` nothing changes.
"""

import numpy as np
import pytest

from mlx_evit.ops.backend import float32_is_tf32

SLOW = (
    # measured in the full run of 21:35 UTC (2 shared cores): 9-28 s each, with their fixtures
    "test_examples.py::test_readme_demo_",
    "test_classify.py::test_top5_matches_timm_pipeline",
    "test_sam_predictor.py::test_live_against_upstream",
    "test_sam_cli.py::test_cli_prompts_end_to_end",
    "test_mit.py::test_logits_match_timm[b3]",
    "test_mit.py::test_logits_match_timm[l3]",
    "test_mit.py::test_logits_match_timm[b2]",
    "test_mit.py::test_logits_match_timm[l2]",
    "test_mit.py::test_logits_match_timm[l1]",
    "test_convert.py::test_round_trip_every_layout",
    "test_convert.py::test_l3_from_timm_safetensors",
    "test_hub.py::test_new_revision_is_noticed_and_offline_finds_the_cache",
    "test_hub.py::test_cli_downloads_once_then_runs_from_cache",
    "test_distributed.py::test_finetune_on_two_ranks_reaches_the_weights_of_one_process",
    "test_seed.py::test_learns_digits",
    # fine-tuning from random weights on the loaded 2-core machine (about 1-2 min each there)
    "test_seg_training.py::test_training_raises_validation_miou",
    "test_sam_training.py::test_decoder_training_",
    "test_readme_training.py::test_the_readme_training_block",
)
"""Node ids (relative to tests/, prefixes match) of the slowest cases."""


def pytest_collection_modifyitems(config, items):
    for item in items:
        nodeid = item.nodeid.removeprefix("tests/")
        if nodeid.startswith(SLOW):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def _tf32_tolerance(request, monkeypatch):
    """Under TF32 (GPU, MLX_ENABLE_TF32 not 0), widen a parity test's assert_allclose to tests.precision.TF32_REL."""
    if request.node.get_closest_marker("parity") is not None and float32_is_tf32():
        from precision import tf32_assert_allclose

        monkeypatch.setattr(np.testing, "assert_allclose", tf32_assert_allclose(np.testing.assert_allclose))
    yield
