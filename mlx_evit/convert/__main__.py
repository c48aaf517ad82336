"""``python -m mlx_evit.convert``: see :mod:`mlx_evit.cli.convert`."""

import sys

from ..cli.convert import main

if __name__ == "__main__":
    sys.exit(main())
