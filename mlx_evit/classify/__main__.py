"""``python -m mlx_evit.classify``: see :mod:`mlx_evit.cli.classify_command`."""

import sys

from mlx_evit.cli.classify_command import main

if __name__ == "__main__":
    sys.exit(main())
