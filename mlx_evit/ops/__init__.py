"""The numerical foundations every family builds on: layers, the CPU formulations and the choice between
them (``MLX_EVIT_KERNELS``), resampling rules (torch's and OpenCV's), dtypes, and the Linux BLAS setup.

Nothing here knows a model family, a checkpoint or a task.
"""
