"""The model families, one module each with its checkpoint key tables beside it (``seed``, ``mit``, ``msra``,
``seg_model``, ``sam_model``), and what they declare to the registry (``specs``, ``registry``, ``metadata``,
``keymap``; ``data/param_tables.json`` for identification).

Models are built from arguments here; reading files is :mod:`mlx_evit.loading`'s job.
"""
