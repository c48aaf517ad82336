"""``python -m mlx_evit.evaluate`` (the command: :mod:`mlx_evit.cli.evaluate_command`), and the evaluation names.

The library lives in :mod:`mlx_evit.tasks.evaluation`; this package only
re-exports it (``from mlx_evit.evaluate import evaluate, find_dataset``).
"""

from mlx_evit.tasks.evaluation import *  # noqa: F401,F403
from mlx_evit.tasks.evaluation import __all__  # noqa: F401
