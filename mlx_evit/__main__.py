"""``python -m mlx_evit``: see :mod:`mlx_evit.cli.commands`."""

import sys

from mlx_evit.cli.commands import main

if __name__ == "__main__":
    sys.exit(main())
