"""(being written)"""
MODELS = ()
EfficientViT = None
output_size = None
