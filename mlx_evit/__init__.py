"""mlx_evit: EfficientViT models for Apple MLX.

Three model families share one registry:

* the configurable seed model, ``EfficientViT.build(...)`` (cascaded group
  linear attention, :mod:`mlx_evit.models.seed`);
* MIT EfficientViT B0-B3 / L1-L3 (:mod:`mlx_evit.models.mit`);
* Microsoft EfficientViT M0-M5 (:mod:`mlx_evit.models.msra`).

All models take NHWC float32 images and return logits (or features).
"""

from mlx_evit.ops.blas import blas_info, setup as _setup_blas

_setup_blas()  # the one setup step: MLX's CPU GEMMs on a fast OpenBLAS (README, Performance); cheap elsewhere
from mlx_evit.api import convert, create_model, load, save_model
from mlx_evit.ops.layers import fuse_modules
from mlx_evit.models.registry import get_pretrained_cfg, list_models
from mlx_evit.ops.resampling import resize  # noqa: F401  (NHWC resize equal to torch interpolate; mlx_evit.resize)
from mlx_evit.models.seed import EfficientViT, output_size

from mlx_evit.version import __version__

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
    "blas_info",
    "__version__",
]
