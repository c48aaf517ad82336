"""The command lines, one module per command (``mlx_evit.cli.<command>_command.main``), argument parsing and
printing only, on the shared convention of :mod:`mlx_evit.cli.common`; :mod:`mlx_evit.cli.commands` is
``python -m mlx_evit``."""
