"""``mlx_evit.convert``: the converter's public names in one place, and ``python -m mlx_evit.convert``.

The work is done below: :mod:`mlx_evit.checkpoint` (reading),
:mod:`mlx_evit.detect` (which model), :mod:`mlx_evit.conversion`
(checkpoint -> model), :mod:`mlx_evit.model_dir` (the MLX model directory
format), :mod:`mlx_evit.api` (:func:`convert`, :func:`load`, ...) and
:mod:`mlx_evit.cli.convert` (the command line). This package only
re-exports them under the names the README documents.
"""

from ..api import ConversionResult, convert, load, load_into
from ..cli.convert import main
from ..detect import detect_model
from ..dtypes import DTYPES, cast_model, model_dtype, parse_dtype
from ..errors import ConversionError
from ..model_dir import CONFIG_NAME, FORMAT, FORMAT_VERSION, WEIGHTS_NAME, is_model_dir, save_model

__all__ = [
    "ConversionError",
    "ConversionResult",
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "FORMAT",
    "FORMAT_VERSION",
    "DTYPES",
    "parse_dtype",
    "cast_model",
    "model_dtype",
    "convert",
    "load",
    "load_into",
    "save_model",
    "detect_model",
    "is_model_dir",
    "main",
]
