"""``python -m mlx_evit.sam``: see :mod:`mlx_evit.cli.sam_command`."""

import sys

from mlx_evit.cli.sam_command import main

if __name__ == "__main__":
    sys.exit(main())
