"""``python -m mlx_evit``: see :mod:`mlx_evit.cli.main`."""

import sys

from mlx_evit.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
