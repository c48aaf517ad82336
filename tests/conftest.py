"""Shared pytest setup: markers, and mlx_evit imported before any test imports mlx.core.

Markers (registered in pyproject.toml): ``parity`` (agreement with code
nobody here wrote, or with its fixtures; must pass under
``MLX_EVIT_KERNELS=native`` and ``=cpu``) and ``slow`` (the longest cases;
``pytest -m "not slow"`` is the quick loop). ``slow`` is given here from
:data:`SLOW`, the cases measured over 20 s in a full run (``--durations``),
so the list stays in one place.
"""

import mlx_evit  # noqa: F401  (first: it loads the fast BLAS before mlx.core is imported)
import pytest

SLOW = (
    "test_mit.py::test_logits_match_timm[l3]",
    "test_mit.py::test_logits_match_timm[l2]",
    "test_mit.py::test_logits_match_timm[l1]",
    "test_mit.py::test_logits_match_timm[b3]",
    "test_mit.py::test_logits_match_timm[b2]",
    "test_mit.py::test_logits_match_timm[b1]",
    "test_mit.py::test_original_large_layout_uses_original_constants",
    "test_mit.py::test_odd_input_size_features_and_logits[l1]",
    "test_inference.py::test_lower_precision_deviation_and_size",
    "test_inference.py::test_msra_bias_tables_follow_dtype_and_weights",
    "test_inference.py::test_prepared_model_matches_eager_unfused[efficientvit_l1]",
    "test_inference.py::test_prepared_model_matches_eager_unfused[efficientvit_m0]",
    "test_seed.py::test_learns_digits",
    "test_examples.py::test_readme_demo_",
    "test_examples.py::test_readme_commands_with_the_default_hub_weights",
    "test_hub.py::test_cli_downloads_once_then_runs_from_cache",
    "test_convert.py::test_half_precision_within_measured_tolerance",
)
"""Node ids (relative to tests/, prefixes match) of the slowest cases."""


def pytest_collection_modifyitems(config, items):
    for item in items:
        nodeid = item.nodeid.removeprefix("tests/")
        if nodeid.startswith(SLOW):
            item.add_marker(pytest.mark.slow)
