"""(being written)"""
MODELS = ()
