"""mlx_evit: EfficientViT models for Apple MLX.

Three model families share one registry:

* the configurable seed model, ``EfficientViT.build(...)`` (cascaded group
  linear attention, :mod:`mlx_evit.seed`);
* MIT EfficientViT B0-B3 / L1-L3 (:mod:`mlx_evit.mit`);
* Microsoft EfficientViT M0-M5 (:mod:`mlx_evit.msra`).

All models take NHWC float32 images and return logits (or features).
"""

from . import _blas  # noqa: F401  (must run before mlx.core is imported)
from . import convert as _convert_package  # noqa: F401  (first: the name ``convert`` is the function below)
from .api import convert, create_model, load, save_model
from .layers import fuse_modules
from .registry import get_pretrained_cfg, list_models
from .resize import resize  # noqa: F401  (NHWC resize equal to torch interpolate; mlx_evit.resize)
from .seed import EfficientViT, output_size

from .version import __version__

__all__ = [
    "EfficientViT",
    "output_size",
    "create_model",
    "list_models",
    "get_pretrained_cfg",
    "fuse_modules",
    "load",
    "convert",
    "save_model",
    "__version__",
]
