"""``python -m mlx_evit.segment``: see :mod:`mlx_evit.cli.segment`."""

import sys

from mlx_evit.cli.segment import main

if __name__ == "__main__":
    sys.exit(main())
