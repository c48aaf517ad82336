"""One command-line convention (issue 25): every command's parser is walked and checked against it.

The parsers are built from ``mlx_evit.cli.<command>.build_parser`` for every
command of :data:`mlx_evit.cli.commands.COMMANDS` and every sub-command of
:data:`SUBCOMMANDS` (``segment train``, ``sam train``, ``sam serve``, run through
their parent command's ``main``); the checks run without a model (every refusal
happens before anything is loaded or downloaded).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from mlx_evit.cli import common
from mlx_evit.cli.commands import COMMANDS
from mlx_evit.cli.commands import main as top_main

# dest -> the option strings it must have wherever it appears (extra: documented old spellings).
CANONICAL = {
    "model": {"-m", "--model"},
    "weights": {"-w", "--weights"},
    "output": {"-o", "--output"},
    "format": {"-f", "--format"},
    "force": {"--force"},
    "skip_errors": {"--skip-errors"},
    "progress": {"--progress"},
    "quiet": {"-q", "--quiet"},
    "dtype": {"--dtype"},
    "batch_size": {"-b", "--batch-size"},
    "recursive": {"-r", "--recursive"},
    "top_k": {"-k", "--top-k"},
}
ALIASES = {"output": {"--output-dir"}}
# Every command that runs a model takes these.
EVERYWHERE = ("model", "weights", "output", "dtype", "quiet", "force")
# Sub-commands: "PARENT SUB" -> the module with build_parser(prog) and main(argv, prog).
SUBCOMMANDS = {
    "segment train": "mlx_evit.cli.segment_train",
    "sam train": "mlx_evit.cli.sam_train",
    "sam serve": "mlx_evit.cli.sam_serve",
}
# Shared options that do not apply to a command, and why.
NOT_APPLICABLE = {
    "segment train": {"dtype"},  # training runs in float32 (no mixed precision in the trainers)
    "sam train": {"dtype"},
    "sam serve": {"output", "force"},  # the page saves masks in the browser; nothing is written here
}
# Exit statuses a command cannot return (every other one of 0, 1, 2, 3, 130 is documented).
NO_STATUS = {"sam serve": {1}}  # nothing it reads is an "input": an unreadable upload is a 4xx answer
ALL = [*COMMANDS, *SUBCOMMANDS]


def _module(name: str):
    return importlib.import_module(COMMANDS[name][0] if name in COMMANDS else SUBCOMMANDS[name])


def parsers():
    for name in ALL:
        yield name, _module(name).build_parser()


def run(name: str, argv, capsys) -> tuple[int, str, str]:
    """``name``'s exit status, stdout and stderr; a sub-command through its parent's ``main``."""
    parent, _, sub = name.partition(" ")
    module = importlib.import_module(COMMANDS[parent][0])
    code = module.main(([sub] if sub else []) + [str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_line_error(err: str, prog_part: str = "") -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert ": error: " in lines[0] and prog_part in lines[0], err
    return lines[0]


# ---------------------------------------------------------------- the parsers


@pytest.mark.parametrize("name,parser", list(parsers()), ids=ALL)
def test_shared_options_have_one_spelling(name, parser):
    by_dest = {a.dest: a for a in parser._actions if a.option_strings}
    for dest in EVERYWHERE:
        if dest in NOT_APPLICABLE.get(name, ()):
            assert dest not in by_dest, f"{name} takes {dest} (listed as not applicable)"
            continue
        assert dest in by_dest, f"{name} lacks {'/'.join(sorted(CANONICAL[dest]))}"
    for dest, action in by_dest.items():
        if dest in CANONICAL:
            assert CANONICAL[dest] <= set(action.option_strings) <= CANONICAL[dest] | ALIASES.get(dest, set()), (
                name, dest, action.option_strings)
    # no shared spelling means something else in any command
    for action in by_dest.values():
        for dest, spellings in CANONICAL.items():
            if set(action.option_strings) & spellings:
                assert action.dest == dest, (name, action.option_strings)
    if "format" in by_dest:
        assert set(by_dest["format"].choices) <= set(common.FORMATS)
    if "dtype" in by_dest:
        assert set(by_dest["dtype"].choices) == set(common.DTYPES) and by_dest["dtype"].default == "float32"


@pytest.mark.parametrize("name,parser", list(parsers()), ids=ALL)
def test_every_help_shows_the_defaults(name, parser):
    formatter = parser._get_formatter()
    for action in parser._actions:
        if not action.option_strings or action.help == argparse.SUPPRESS or action.nargs == 0:
            continue  # positionals, hidden aliases, flags
        text = formatter._expand_help(action) if action.help else ""
        assert action.required or "default" in text, (name, action.option_strings, text)
    help_text = parser.format_help()
    assert "exit status:" in help_text and "  2    " in help_text
    assert ("  1    " in help_text) == (1 not in NO_STATUS.get(name, ()))


@pytest.mark.parametrize("name,parser", list(parsers()), ids=ALL)
def test_progress_and_quiet_exclude_each_other_and_no_abbreviations(name, parser, capsys):
    dests = {a.dest for a in parser._actions}
    if "progress" in dests:
        group = next(g for g in parser._mutually_exclusive_groups
                     if {a.dest for a in g._group_actions} == {"progress", "quiet"})
        assert group
    with pytest.raises(SystemExit) as e:
        parser.parse_args(["x", "--forc"])
    assert e.value.code == 2
    one_line_error(capsys.readouterr().err)


@pytest.mark.parametrize("name", ALL)
def test_usage_errors_exit_2_in_one_line(name, capsys):
    code, _, err = run(name, ["x", "-o", "y", "--no-such-option"], capsys)
    assert code == 2
    one_line_error(err, "--no-such-option")


@pytest.mark.parametrize("name", ["classify", "segment", "sam", "evaluate", "convert", *SUBCOMMANDS])
def test_unknown_model_is_exit_2_with_suggestions_from_the_family(name, tmp_path, capsys):
    Image.new("RGB", (40, 30)).save(tmp_path / "a.png")
    (tmp_path / "data" / "cls").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "data" / "cls" / "a.png")
    argv = {
        "classify": [tmp_path / "a.png", "-m", "efficientvit_b9z"],
        "segment": [tmp_path / "a.png", "-o", tmp_path / "o", "-m", "efficientvit_seg_zz"],
        "sam": [tmp_path / "a.png", "--point", "1,1", "-o", tmp_path / "o", "-m", "efficientvit_sam_zz"],
        "evaluate": [tmp_path / "data", "-m", "efficientvit_b9z"],
        "convert": [tmp_path / "a.png", tmp_path / "o", "-m", "efficientvit_b9z"],
        "segment train": [tmp_path / "data", "-o", tmp_path / "o", "-m", "efficientvit_seg_zz"],
        "sam train": [tmp_path / "data", "-o", tmp_path / "o", "-m", "efficientvit_sam_zz"],
        "sam serve": ["-m", "efficientvit_sam_zz", "--port", "0"],
    }[name]
    code, _, err = run(name, argv, capsys)
    line = one_line_error(err)
    assert code == 2 and "unknown model" in line and "did you mean" in line
    suggested = line.split("did you mean:")[1].split("?")[0].split(",")
    prefix = {"segment": "efficientvit_seg_", "sam": "efficientvit_sam_"}.get(name.split()[0], "efficientvit_")
    assert all(s.strip().startswith(prefix) for s in suggested), line
    if name in ("classify", "evaluate"):
        assert not any("_seg_" in s or "_sam_" in s for s in suggested), line
    assert not (tmp_path / "o").exists()


def test_a_model_of_another_family_is_refused_without_a_download(tmp_path, capsys, monkeypatch):
    import mlx_evit.api
    import mlx_evit.loading.hub

    def no_hub(*a, **k):
        raise AssertionError("tried the Hub")

    monkeypatch.setattr(mlx_evit.loading.pipeline, "pretrained_dir", no_hub)
    monkeypatch.setattr(mlx_evit.api, "pretrained_weights", no_hub)
    Image.new("RGB", (40, 30)).save(tmp_path / "a.png")
    code, _, err = run("segment", [tmp_path / "a.png", "-o", tmp_path / "o", "-m", "efficientvit_b0"], capsys)
    line = one_line_error(err)
    assert code == 2 and "classification model" in line and "efficientvit_seg_b1_ade20k" in line
    code, _, err = run("sam", [tmp_path / "a.png", "--point", "1,1", "-o", tmp_path / "o2", "-m",
                               "efficientvit_seg_b0_cityscapes"], capsys)
    assert code == 2 and "segmentation model" in one_line_error(err) and "efficientvit_sam_l0" in err
    code, _, err = run("classify", [tmp_path / "a.png", "-m", "efficientvit_sam_l0"], capsys)
    assert code == 2 and "SAM model" in one_line_error(err)


@pytest.mark.parametrize("name", list(SUBCOMMANDS))
def test_sub_commands_are_named_as_they_were_run(name, capsys, monkeypatch):
    """The parent passes its program name on: errors and usage name the whole command line."""
    parent, _, sub = name.partition(" ")
    module = importlib.import_module(COMMANDS[parent][0])
    assert module.main([sub, "--no-such-option"], prog=f"mlx-evit {parent}") == 2
    assert one_line_error(capsys.readouterr().err).startswith(f"mlx-evit {name}: error: ")
    assert top_main([parent, sub, "--help"]) == 0
    assert capsys.readouterr().out.startswith(f"usage: python -m mlx_evit {name} ")
    monkeypatch.setattr(sys, "argv", [f"/venv/bin/mlx-evit-{parent}"])
    assert module.main([sub, "--help"]) == 0
    assert capsys.readouterr().out.startswith(f"usage: mlx-evit-{parent} {sub} ")


@pytest.mark.parametrize("name", ["segment train", "sam train"])
@pytest.mark.parametrize("argv,needle", [
    (["DATA", "-m", "M"], "-o/--output DIR is required"),
    (["DATA", "-o", "OUT"], "name the model to fine-tune: --model NAME or --weights PATH"),
    (["DATA", "-o", "OUT.json", "-m", "M"], "--output OUT.json: this command writes a folder"),
    (["DATA", "-o", "OUT", "-w", "nothing"], "--weights nothing: no such file or folder"),
    (["DATA", "-o", "OUT", "-m", "efficientvit_b0"], "a classification model"),
    (["DATA", "-o", "OUT", "-m", "M", "--progress", "-q"], "not allowed with argument --progress"),
    (["DATA", "-o", "OUT", "-m", "M", "--report", "json"], "--report"),  # -f/--format now
    (["DATA", "-o", "OUT", "-m", "M", "--batch", "2"], "--batch"),  # no abbreviations
])
def test_train_refuses_before_anything_loads(name, argv, needle, tmp_path, capsys):
    model = {"segment train": "efficientvit_seg_b0_cityscapes", "sam train": "efficientvit_sam_l0"}[name]
    subs = {"DATA": tmp_path / "data", "OUT": tmp_path / "out", "OUT.json": tmp_path / "out.json", "M": model,
            "nothing": tmp_path / "nothing"}
    code, out, err = run(name, [subs.get(a, a) for a in argv], capsys)
    line = one_line_error(err, name)
    assert code == 2 and needle.replace("nothing", str(tmp_path / "nothing")).replace(
        "OUT.json", str(tmp_path / "out.json")) in line, line
    assert out == "" and not (tmp_path / "out").exists() and not (tmp_path / "out.json").exists()


def test_train_options_reach_the_trainer(tmp_path, capsys, monkeypatch):
    """-b, -f json, -q/--progress and the other options arrive in the trainer's config."""
    import mlx_evit.tasks.sam_training
    import mlx_evit.tasks.seg_training

    seen = {}

    def fake(config, ranks):
        seen["config"] = config
        return {"start_step": 0, "step": 2, "steps": 2, "images_per_second": 1.0, "output": str(config.output)}

    monkeypatch.setattr(mlx_evit.tasks.seg_training, "train_segmentation", fake)
    monkeypatch.setattr(mlx_evit.tasks.sam_training, "train_sam", fake)
    code, out, err = run("segment train", [tmp_path, "-o", tmp_path / "o", "-m", "efficientvit_seg_b0_cityscapes",
                                           "-b", "3", "-f", "json", "-q", "--image-size", "64x96"], capsys)
    config = seen["config"]
    assert code == 0 and err == "" and json.loads(out)["step"] == 2
    assert (config.batch_size, config.image_size, config.progress) == (3, (64, 96), False)
    code, out, err = run("sam train", [tmp_path, "--output", tmp_path / "o", "--model", "timm/efficientvit_sam_l0",
                                       "--batch-size", "2", "--progress", "--prompts", "box"], capsys)
    config = seen["config"]
    assert code == 0 and out.startswith("trained steps 1-2 of 2 on 1 rank")
    assert (config.batch_size, config.model, config.prompts) == (2, "efficientvit_sam_l0", ("box",))
    assert config.progress and config.progress_bar  # --progress: the bar even off a terminal
    run("sam train", [tmp_path, "-o", tmp_path / "o", "-m", "efficientvit_sam_l0"], capsys)
    assert seen["config"].progress and not seen["config"].progress_bar  # captured stderr is no terminal


def test_timm_names_are_accepted_everywhere(capsys):
    assert common.model_name("timm/efficientvit_b0.r224_in1k", "classify") == "efficientvit_b0.r224_in1k"
    assert top_main(["info", "timm/efficientvit_b0.r224_in1k"]) == 0
    assert "efficientvit_b0.r224_in1k" in capsys.readouterr().out
    assert top_main(["list", "--pretrained", "timm/efficientvit_b0*"]) == 0
    assert capsys.readouterr().out.split() == ["efficientvit_b0.r224_in1k"]
    # the same mistake, the same status: an unknown name is a usage error in info too
    assert top_main(["info", "efficientvit_q7"]) == 2
    assert "unknown model" in one_line_error(capsys.readouterr().err)
    with pytest.raises(common.UsageError, match="no tag"):
        common.model_name("efficientvit_b0.r999_in1k", "classify")


def test_a_model_name_given_as_weights_is_explained(tmp_path, capsys):
    Image.new("RGB", (40, 30)).save(tmp_path / "a.png")
    code, _, err = run("classify", [tmp_path / "a.png", "-w", "efficientvit_b0"], capsys)
    line = one_line_error(err)
    assert code == 2 and "no such file" in line and "--model efficientvit_b0" in line


# ---------------------------------------------------------------- modes


@pytest.mark.parametrize("argv,needle", [
    (["IMG", "-o", "OUT", "--labels-dir", "L"], "--labels-dir: applies only with --eval"),
    (["IMG", "-o", "OUT", "--report", "json"], "--report: applies only with --eval"),
    (["--eval", "D", "--labels-dir", "D", "--alpha", "0.3"], "--alpha: does not apply to --eval"),
    (["--eval", "D", "--labels-dir", "D", "--no-overlay"], "--no-overlay: does not apply to --eval"),
    (["--eval", "D", "--labels-dir", "D", "--format", "csv"], "--format csv"),
    (["IMG", "D", "--eval", "D", "--labels-dir", "D"], "give no other inputs"),
])
def test_segment_refuses_options_of_the_other_mode(argv, needle, tmp_path, capsys):
    Image.new("RGB", (40, 30)).save(tmp_path / "a.png")
    subs = {"IMG": tmp_path / "a.png", "OUT": tmp_path / "o", "D": tmp_path, "L": tmp_path}
    code, _, err = run("segment", [subs.get(a, a) for a in argv], capsys)
    assert code == 2 and needle in one_line_error(err)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("argv,needle", [
    (["--point", "5,5", "--points-per-side", "8"], "--points-per-side: applies only with --everything"),
    (["--point", "5,5", "--points-per-batch", "64"], "--points-per-batch: applies only with --everything"),
    (["--box", "1,1,9,9", "--crop-layers", "1"], "--crop-layers"),
    (["--everything", "--multimask"], "--multimask"),
    (["--everything", "--point", "1,1"], "takes no --point"),
    (["--point", "-5,10"], "--point -5,10 is outside the 40x30 image"),
    (["--box", "-10,-10,20,20"], "--box -10,-10,20,20 is not inside the 40x30 image"),
    (["--box", "10,10,50,20"], "is not inside the 40x30 image"),
    (["--box", "10,10,10,20"], "non-zero area"),
    (["--box", "10,10,20,10"], "non-zero area"),
])
def test_sam_prompts_and_modes(argv, needle, tmp_path, capsys):
    Image.new("RGB", (40, 30)).save(tmp_path / "a.png")
    code, _, err = run("sam", [tmp_path / "a.png", *argv, "-o", tmp_path / "o"], capsys)
    assert code == 2 and needle in one_line_error(err)
    assert not (tmp_path / "o").exists()


def test_negative_numbers_are_values_of_coordinate_options():
    parser = importlib.import_module("mlx_evit.cli.sam_command").build_parser()
    args = parser.parse_args(["img.png", "--point", "-5,10", "--point", "-1.5,-2,0", "--box", "-10,-10,200,200",
                              "-o", "out"])
    assert args.point == [(-5.0, 10.0, 1), (-1.5, -2.0, 0)]
    assert args.box == [(-10.0, -10.0, 200.0, 200.0)]
    assert args.output == "out" and common.given(args, "point") and not common.given(args, "everything")
    args = parser.parse_args(["img.png", "--box=-1,-1,5,5", "--output-dir", "old"])  # the old spelling
    assert args.box == [(-1.0, -1.0, 5.0, 5.0)] and args.output == "old"


def test_given_records_options_typed_even_with_their_default():
    parser = importlib.import_module("mlx_evit.cli.sam_command").build_parser()
    args = parser.parse_args(["img.png", "--points-per-batch", "64", "-o", "x", "-q"])
    assert common.given(args, "points_per_batch") and common.given(args, "quiet")
    assert not common.given(args, "points_per_side") and args.points_per_side == 32


def test_sam_everything_options_show_their_defaults():
    text = importlib.import_module("mlx_evit.cli.sam_command").build_parser().format_help()
    text = text.split("--everything options")[1]
    for option, default in (("--points-per-side", 32), ("--points-per-batch", 16), ("--pred-iou-thresh", 0.88),
                            ("--stability-thresh", 0.95), ("--crop-layers", 0)):
        block = text.split(option, 1)[1].split("\n  -", 1)[0]
        assert f"(default: {default})" in " ".join(block.split()), option


# ---------------------------------------------------------------- outputs


@pytest.mark.parametrize("name", ["evaluate", "segment"])
def test_a_folder_output_named_like_a_file_is_refused(name, tmp_path, capsys):
    (tmp_path / "data" / "cls").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "data" / "cls" / "a.png")
    argv = ([tmp_path / "data", "-o", tmp_path / "report.json", "-w", tmp_path / "nothing"] if name == "evaluate"
            else [tmp_path / "data" / "cls" / "a.png", "-o", tmp_path / "report.json"])
    code, _, err = run(name, argv, capsys)
    assert code == 2 and "writes a folder" in one_line_error(err)
    assert not (tmp_path / "report.json").exists()


def test_force_is_suggested_only_where_it_helps(tmp_path, capsys):
    (tmp_path / "data" / "cls").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "data" / "cls" / "a.png")
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("...")
    code, _, err = run("evaluate", [tmp_path / "data", "-o", precious], capsys)
    assert code == 2 and "--force" not in one_line_error(err) and "not an evaluation output folder" in err
    code, _, err = run("convert", [tmp_path / "data" / "cls" / "a.png", precious], capsys)
    assert code == 2 and "--force" not in one_line_error(err) and "not an MLX model directory" in err
    (tmp_path / "report").mkdir()
    (tmp_path / "report" / "summary.json").write_text("{}")
    code, _, err = run("evaluate", [tmp_path / "data", "-o", tmp_path / "report", "-w", tmp_path / "x"], capsys)
    assert code == 2 and "pass --force" in one_line_error(err)  # here it helps


def test_classify_replaces_an_output_file_only_with_force(tmp_path, capsys):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    out = tmp_path / "results.csv"
    out.write_text("old\n")
    code, _, err = run("classify", [tmp_path / "a.png", "-o", out, "-w", tmp_path / "nothing"], capsys)
    assert code == 2 and "--force" in one_line_error(err) and out.read_text() == "old\n"


def test_convert_takes_the_shared_options(tmp_path, capsys):
    code, _, err = run("convert", ["-w", tmp_path / "missing.pt", "-o", tmp_path / "out"], capsys)
    assert code == 1 and "missing.pt" in one_line_error(err)  # the input, not the usage
    code, _, err = run("convert", [tmp_path / "missing.pt"], capsys)
    assert code == 2 and "OUT_DIR" in one_line_error(err)


# ---------------------------------------------------------------- help texts and cosmetics


def test_prog_name_is_how_the_command_was_run(monkeypatch):
    cli = importlib.import_module("mlx_evit.cli.classify_command")
    monkeypatch.setattr(sys, "argv", ["/venv/bin/mlx-evit-classify"])
    assert cli.build_parser().prog == "mlx-evit-classify"
    monkeypatch.setattr(sys, "argv", ["/venv/bin/mlx-evit"])
    assert cli.build_parser().prog == "mlx-evit classify"
    monkeypatch.setattr(sys, "argv", ["/src/mlx_evit/classify/__main__.py"])
    assert cli.build_parser().prog == "python -m mlx_evit.classify"
    monkeypatch.setattr(sys, "argv", ["/src/mlx_evit/__main__.py"])
    assert cli.build_parser().prog == "python -m mlx_evit classify"


def test_top_level_help_lists_each_command_once(capsys):
    assert top_main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in [*COMMANDS, "list", "info"]:
        assert sum(line.strip().startswith(name + " ") for line in out.splitlines()) == 1, name


def test_convert_help_names_every_family():
    text = importlib.import_module("mlx_evit.cli.convert_command").build_parser().format_help()
    assert "EfficientViT-Seg" in text and "EfficientViT-SAM" in text


def test_warnings_during_a_run_are_one_line(capsys):
    parser = common.command_parser("prog", "d")
    add = common.add_progress
    add(parser)

    def body(args, console):
        warnings.warn("first line\nsecond line", RuntimeWarning)
        return 0

    assert common.run_command(parser, [], body) == 0
    assert capsys.readouterr().err == "prog: warning: first line second line\n"
    assert common.run_command(parser, ["-q"], body) == 0
    assert capsys.readouterr().err == ""


def test_plurals_and_report_paths(capsys):
    from mlx_evit.cli.evaluate_command import _print_summary

    assert common.plural(1, "image") == "1 image" and common.plural(2, "class", "classes") == "2 classes"
    result = SimpleNamespace(
        top_indices=np.zeros((1, 5)), errors={}, ranks=1, count=1, dataset=SimpleNamespace(folders=["cat"], root="d"),
        model="m", top1=1.0, top5=1.0, mean_per_class_accuracy=1.0, throughput=1.0, seconds=1.0,
        per_class=lambda: [{"class": "cat", "images": 1, "top1": 1.0, "top5": 1.0}])
    _print_summary(result, sys.stdout, "report/")
    out = capsys.readouterr().out
    assert "evaluated 1 image of 1 class on 1 rank" in out and "report//" not in out
    assert "report/summary.json" in out and "1 images" not in out


def test_evaluate_progress_counts_skipped_images():
    import io

    from mlx_evit.cli.evaluate_command import _Progress

    stream = io.StringIO()
    progress = _Progress(32, "1 rank", stream, enabled=True, bar=False)
    progress.skipped = 2
    progress(32, 32)
    assert "32/32 images" in stream.getvalue() and "2 unreadable skipped" in stream.getvalue()
    assert "evaluated 32/32" not in stream.getvalue()


def test_sam_progress_is_wired_when_the_generator_offers_it():
    from mlx_evit.cli.sam_command import _Progress, _accepts_progress

    class WithProgress:
        def generate(self, image, progress=None):
            return []

    class Without:
        def generate(self, image):
            return []

    assert _accepts_progress(WithProgress().generate) and not _accepts_progress(Without().generate)
    import io

    stream = io.StringIO()
    bar = _Progress(stream, True)
    bar(3, 4)
    bar(0.5)
    bar.close()
    assert "75.0%" in stream.getvalue() and "50.0%" in stream.getvalue() and stream.getvalue().endswith("\n")


def test_segment_stopped_run_leaves_no_half_outputs(tmp_path, capsys):
    """A run that stops on an unreadable image removes what it created; the rerun needs no --force."""
    segment = importlib.import_module("mlx_evit.cli.segment_command")
    out_dir = tmp_path / "out"
    from mlx_evit.outputs import check_output_dir

    out = check_output_dir(out_dir)
    written = common.CreatedFiles(out)
    written.write_file("a.png", b"x")
    written.write_file("b.png", b"y")
    written.undo()
    assert not out_dir.exists()
    out_dir.mkdir()
    (out_dir / "keep.txt").write_text("k")
    out = check_output_dir(out_dir, force=True)
    written = common.CreatedFiles(out)
    written.write_file("keep.txt", "new")  # replaced under --force: not created by the run
    written.write_file("c.png", b"z")
    written.undo()
    assert sorted(p.name for p in out_dir.iterdir()) == ["keep.txt"]
    assert segment.build_parser().parse_args(["x", "--output-dir", "o"]).output == "o"


def test_exit_statuses_are_documented_once():
    assert common.EXIT_STATUSES[2].startswith("bad or inapplicable option")
    for name, parser in parsers():
        text = parser.format_help()
        for code in sorted({0, 1, 2, 3, 130} - NO_STATUS.get(name, set())):
            assert f"  {code:<5}{common.EXIT_STATUSES[code][:20]}" in text, (name, code)
    assert json.dumps(common.EXIT_STATUSES)


@pytest.mark.parametrize("where", ["generate", "constructor", "none"])
def test_sam_everything_shows_progress_through_the_generator(where, tmp_path, capsys, monkeypatch):
    """The bar is fed by the mask generator's ``progress`` callback, in generate() or the constructor."""
    import mlx_evit.sam
    from mlx_evit.cli import sam_command as sam_cli

    calls = []

    class Generator:
        def __init__(self, predictor, progress=None, **options):
            calls.append(("options", options))
            self.progress = progress

        def generate(self, image, progress=None):
            report = progress or self.progress
            for i in range(1, 5):
                report(i, 4)
            return []

    class Plain:
        def __init__(self, predictor, **options):
            pass

        def generate(self, image):
            return []

    if where == "constructor":
        Generator.generate = lambda self, image: [self.progress(i, 4) for i in range(1, 5)] and []
    if where == "generate":
        Generator.__init__ = lambda self, predictor, **options: calls.append(("options", options))
    monkeypatch.setattr(mlx_evit.tasks.mask_generator, "SamAutomaticMaskGenerator", Plain if where == "none" else Generator)
    monkeypatch.setattr(mlx_evit.tasks.sam_predictor, "SamPredictor", lambda net: object())
    monkeypatch.setattr(sam_cli, "_load_model", lambda args, console: SimpleNamespace(arch_name="efficientvit_sam_l0"))
    Image.new("RGB", (40, 30)).save(tmp_path / "a.png")
    code = sam_cli.main([str(tmp_path / "a.png"), "--everything", "--points-per-batch", "8", "-o",
                         str(tmp_path / "o"), "--progress"])
    err = capsys.readouterr().err
    assert code == 0, err
    if where == "none":
        assert "100.0%" not in err
    else:
        assert "100.0%" in err and calls[0][1]["points_per_batch"] == 8
    assert json.loads((tmp_path / "o" / "a.json").read_text())["masks"] == []
