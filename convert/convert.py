#!/usr/bin/env python
"""Convert an EfficientViT PyTorch/safetensors checkpoint to an MLX model directory.

Same as the installed ``mlx-evit-convert`` command; the logic lives in
:mod:`mlx_evit.cli.convert`. Run ``python convert/convert.py --help``.
"""

import sys

from mlx_evit.cli.convert import main

if __name__ == "__main__":
    sys.exit(main())
