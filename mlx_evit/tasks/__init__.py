"""Task objects over models: classification (``classifier``, ``evaluation``), segmentation (``segmenter``),
Segment Anything (``sam_predictor``, ``mask_generator``), fine-tuning (``seg_training``, ``sam_training``),
and exports for apps (``app_export``); each task object has ``from_pretrained`` through the one loader
(:func:`mlx_evit.load`). No task module reads checkpoints, model folders or the Hub itself.
"""
