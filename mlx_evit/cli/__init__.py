"""The command lines, one module per command (``mlx_evit.cli.<command>.main``); see :mod:`mlx_evit.cli.commands`."""
