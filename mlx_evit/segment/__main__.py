"""``python -m mlx_evit.segment``: see :mod:`mlx_evit.cli.segment_command`."""

import sys

from mlx_evit.cli.segment_command import main

if __name__ == "__main__":
    sys.exit(main())
