"""``python -m mlx_evit.evaluate``: see :mod:`mlx_evit.cli.evaluate_command`."""

import sys

from mlx_evit.cli.evaluate_command import main

if __name__ == "__main__":
    sys.exit(main())
