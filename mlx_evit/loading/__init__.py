"""The one loading pipe (:mod:`mlx_evit.loading.pipeline`) and the readers and sources it runs through:
checkpoint files (``checkpoint`` and its readers), identification by key names and shapes (``identify``),
MLX model folders (``model_dir``, ``arch_schema``) and the Hugging Face Hub (``hub``).
"""
