"""``python -m mlx_evit``: list, info, --version and the task commands behind one table."""

from __future__ import annotations

import subprocess
import sys

import pytest

import mlx_evit
from mlx_evit.cli import commands as cli_main
from mlx_evit.cli.commands import COMMANDS, main


def test_version_and_help(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"mlx_evit {mlx_evit.__version__}"
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ("list", "info", *COMMANDS))
    assert main([]) == 2  # no command: the help, and a usage status


def test_list_with_patterns_and_tags(capsys):
    assert main(["list", "efficientvit_m*"]) == 0
    assert capsys.readouterr().out.split() == [f"efficientvit_m{i}" for i in range(6)]
    assert main(["list", "--pretrained", "efficientvit_b1*"]) == 0
    tags = capsys.readouterr().out.split()
    assert tags == mlx_evit.list_models("efficientvit_b1*", pretrained=True) and len(tags) == 3
    assert main(["list", "nothing_like_this*"]) == 1
    assert "no model matches" in capsys.readouterr().err


def test_info_names_size_and_preprocessing(capsys):
    assert main(["info", "efficientvit_b2.r256_in1k"]) == 0
    out = capsys.readouterr().out
    model = mlx_evit.create_model("efficientvit_b2")
    from mlx.utils import tree_flatten

    params = sum(v.size for k, v in tree_flatten(model.parameters()) if not k.endswith(("running_mean", "running_var")))
    assert f"parameters:    {params:,}" in out and "input size:    256x256" in out
    assert "crop_pct 1.0" in out and "timm/efficientvit_b2.r256_in1k" in out
    assert main(["info", "efficientvit_b7"]) == 2  # a usage error, as in every command (issue 25)
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "unknown model 'efficientvit_b7'" in line and "did you mean" in line


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_task_commands_run_their_module(command, capsys):
    """``python -m mlx_evit CMD --help`` is the command's own help (its module's ``main``)."""
    with pytest.raises(SystemExit) as exit_:  # argparse's --help exits inside main() for some commands
        raise SystemExit(main([command, "--help"]))
    assert exit_.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_module_entry_point_in_a_fresh_process():
    run = subprocess.run([sys.executable, "-m", "mlx_evit", "list", "efficientvit_seed"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.split() == ["efficientvit_seed"], run.stderr
    assert cli_main.PROG == "python -m mlx_evit"
