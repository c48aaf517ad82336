"""mlx_evit: EfficientViT models for Apple MLX.

Three model families share one registry:

* the configurable seed model, ``EfficientViT.build(...)`` (cascaded group
  linear attention, :mod:`mlx_evit.seed`);
* MIT EfficientViT B0-B3 / L1-L3 (:mod:`mlx_evit.mit`);
* Microsoft EfficientViT M0-M5 (:mod:`mlx_evit.msra`).

All models take NHWC float32 images and return logits (or features).
"""

from . import _blas  # noqa: F401  (must run before mlx.core is imported)
from .convert import convert, load, save_model
from .layers import fuse_modules
from .registry import create_model, get_pretrained_cfg, list_models
from .resize import resize  # noqa: F401  (NHWC resize equal to torch interpolate; mlx_evit.resize)
from .seed import EfficientViT, output_size

__version__ = "0.1.0"

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
