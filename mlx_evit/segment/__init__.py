"""``python -m mlx_evit.segment`` (the command: :mod:`mlx_evit.cli.segment_command`), and the segmenter's names.

The library lives in :mod:`mlx_evit.tasks.segmenter`; this package only
re-exports it (``from mlx_evit.segment import Segmenter``).
"""

from mlx_evit.tasks.segmenter import *  # noqa: F401,F403
from mlx_evit.tasks.segmenter import __all__  # noqa: F401
