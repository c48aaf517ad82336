"""Shared pytest setup: markers, and mlx_evit imported before any test imports mlx.core.

Markers: ``parity`` (agreement with code nobody here wrote, or with its
fixtures; must pass under ``MLX_EVIT_KERNELS=native`` and ``=cpu``) and
``slow`` (the longest cases; ``pytest -m "not slow"`` is the quick loop).
"""

import mlx_evit  # noqa: F401  (first: it loads the fast BLAS before mlx.core is imported)


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "parity: agreement with a reference implementation or its fixtures (run in both kernel modes)"
    )
    config.addinivalue_line("markers", "slow: one of the slowest cases; deselect with -m 'not slow'")
