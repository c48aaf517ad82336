"""``python -m mlx_evit.classify`` (the command: :mod:`mlx_evit.cli.classify_command`), and the classifier's names.

The library lives in :mod:`mlx_evit.tasks.classifier`; this package only
re-exports it under the import path the README documents
(``from mlx_evit.classify import Classifier``).
"""

from mlx_evit.tasks.classifier import *  # noqa: F401,F403
from mlx_evit.tasks.classifier import __all__  # noqa: F401
