"""``python -m mlx_evit.sam`` (the command: :mod:`mlx_evit.cli.sam_command`), and EfficientViT-SAM's names.

The model is :mod:`mlx_evit.models.sam_model`; the task objects are
:mod:`mlx_evit.tasks.sam_predictor` and :mod:`mlx_evit.tasks.mask_generator`.
"""

from mlx_evit.errors import ImageNotSetError, SamError
from mlx_evit.models.sam_model import MODELS, EfficientViTSam, MaskDecoder, PromptEncoder, SamImageEncoder
from mlx_evit.tasks.mask_generator import SamAutomaticMaskGenerator
from mlx_evit.tasks.sam_predictor import DEFAULT_MODEL, SamPredictor

__all__ = ["MODELS", "DEFAULT_MODEL", "EfficientViTSam", "SamImageEncoder", "PromptEncoder", "MaskDecoder",
           "SamPredictor", "SamAutomaticMaskGenerator", "SamError", "ImageNotSetError"]
