"""EfficientViT-SAM: promptable segmentation (L0-L2 at 512, XL0/XL1 at 1024) in MLX.

``SamPredictor(mlx_evit.load(...))`` encodes an image once and decodes any
number of point/box/mask prompts; ``SamAutomaticMaskGenerator`` segments
everything from a point grid. The models live in :mod:`mlx_evit.sam.model`.
"""

from .model import MODELS, EfficientViTSam, MaskDecoder, PromptEncoder, SamImageEncoder
from .amg import SamAutomaticMaskGenerator
from .predictor import SamPredictor

__all__ = ["MODELS", "EfficientViTSam", "SamImageEncoder", "PromptEncoder", "MaskDecoder", "SamPredictor",
           "SamAutomaticMaskGenerator"]
