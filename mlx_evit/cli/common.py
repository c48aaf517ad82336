"""One command-line convention for every command, and the argument layer that enforces it.

The convention (the README's "Command line" section; ``tests/test_cli_convention.py``
walks every command's parser to check it):

======================  =================================================================
``-m, --model NAME``    a registered name, with or without its tag, ``timm/`` prefix
                        accepted; only names of the command's own family (a segment
                        model for ``segment``); suggestions come from that family
``-w, --weights PATH``  an MLX model folder or a checkpoint file (default: the model's
                        published weights, fetched once and cached)
``-o, --output PATH``   where the results go: ONE target per command, a file for a
                        command that writes one (``classify``; ``-`` is stdout), a folder
                        for one that writes several (``segment``, ``sam``, ``evaluate``,
                        ``convert``; a name ending in ``.json``/``.csv``/... is refused
                        there). Nothing existing is replaced without ``--force``.
``-f, --format FMT``    the format of the results, from ``text, json, jsonl, csv``
``--force``             replace existing outputs
``--skip-errors``       report an unreadable input and go on with the others
``--progress``          a progress bar even when stderr is not a terminal
``-q, --quiet``         nothing on stderr but errors (excludes ``--progress``)
``--dtype DTYPE``       float32 (default), float16, bfloat16
``-b, --batch-size N``  ``-r, --recursive``  ``-k, --top-k K``: where they apply
======================  =================================================================

Every option that does not apply to the chosen mode is refused (exit 2);
negative numbers are accepted as values of coordinate options
(``--point -5,10``); every ``--help`` shows each option's default; options
cannot be abbreviated.

Exit statuses (:data:`EXIT_STATUSES`, the same for the same class of error):
0 done; 1 an input to process could not be read or used (an image, a label,
the checkpoint ``convert`` converts), or nothing could be processed; 2 the
command line cannot run (bad or inapplicable option, unknown model name,
model/weights/labels that cannot be loaded, output refused); 3 an unexpected
error (a bug; ``MLX_EVIT_DEBUG=1`` shows the traceback); 4 another rank of a
distributed run failed; 130 interrupted.

How a command uses it (new commands such as ``segment train`` or ``sam
serve`` follow the same lines)::

    def build_parser(prog=None):
        parser = command_parser(prog or prog_name("classify"), "Classify images ...", epilog=EPILOG)
        parser.add_argument("inputs", nargs="+", metavar="INPUT", help="image file, folder or glob pattern")
        add_model_options(parser, "classify", model_default=DEFAULT_MODEL)
        add_output(parser, "file", "write the results to FILE")
        add_format(parser, ("text", "json"), default="text")
        add_force(parser); add_skip_errors(parser); add_progress(parser); add_dtype(parser)
        return parser

    def main(argv=None, prog=None):
        return run_command(build_parser(prog), argv, _run)   # _run(args, console) -> exit status

Inside ``_run``: ``given(args, "points_per_side")`` says whether an option
was typed; :func:`refuse` rejects options that do not apply; raise
:class:`UsageError` (exit 2) or :class:`InputError` (exit 1) with a
one-line message, or use ``console.error``/``console.log``/``console.warn``.
:func:`model_name` checks ``--model`` against the command's family.

The module is over 500 lines on purpose: the convention, the parser that
enforces it and the checks commands run are one place a new command imports.
"""

from __future__ import annotations

import argparse
import copy
import difflib
import os
import re
import sys
import warnings
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Sequence, Union

from mlx_evit.errors import one_line

__all__ = [
    "EXIT_OK", "EXIT_FAILED", "EXIT_INPUT", "EXIT_USAGE", "EXIT_INTERNAL", "EXIT_RANK_FAILED", "EXIT_INTERRUPTED",
    "EXIT_STATUSES", "DEBUG_ENV", "FORMATS", "DTYPES", "FAMILIES",
    "UsageError", "InputError", "Console", "HelpFormatter", "CommandParser",
    "positive_int", "unit_fraction", "error_printer", "guarded",
    "prog_name", "command_parser", "exit_status_text", "add_model_options", "add_output", "add_format",
    "add_force", "add_skip_errors", "add_progress", "add_dtype", "add_batch_size", "add_recursive",
    "given", "option_name", "load_problem", "load_task_model", "plural", "weights_path", "output_folder", "CreatedFiles", "refuse", "model_name", "folder_output_name", "run_command",
]

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERNAL, EXIT_RANK_FAILED, EXIT_INTERRUPTED = 0, 1, 2, 3, 4, 130
EXIT_INPUT = EXIT_FAILED
EXIT_STATUSES: dict[int, str] = {
    EXIT_OK: "done",
    EXIT_INPUT: "an input could not be read or used (the run stops there unless --skip-errors), or none could",
    EXIT_USAGE: "bad or inapplicable option, unknown model, model/weights that cannot be loaded, output refused",
    EXIT_INTERNAL: "unexpected error (a bug: rerun with MLX_EVIT_DEBUG=1 for the traceback)",
    EXIT_RANK_FAILED: "another rank of a distributed run failed, hung or was lost",
    EXIT_INTERRUPTED: "interrupted",
}
"""Exit status -> its meaning, the same in every command."""
DEBUG_ENV = "MLX_EVIT_DEBUG"
"""Set to 1: unexpected errors raise with their traceback."""
FORMATS = ("text", "json", "jsonl", "csv")
"""Every ``--format`` offers a subset of these."""
from mlx_evit.ops.dtypes import DTYPE_NAMES as DTYPES  # noqa: E402 (one list of dtype names)
FAMILIES: dict[str, tuple[str, ...]] = {
    "classify": ("seed", "mit", "msra"),
    "segment": ("seg",),
    "sam": ("sam",),
    "any": ("seed", "mit", "msra", "seg", "sam"),
}
"""Command kind -> the registry families its ``--model`` accepts."""
_KIND = {"seed": "classification", "mit": "classification", "msra": "classification", "seg": "segmentation",
         "sam": "SAM"}
_FILE_SUFFIXES = (".json", ".jsonl", ".csv", ".txt", ".png", ".jpg", ".jpeg", ".npz", ".safetensors")


class UsageError(Exception):
    """The command line cannot run (exit 2); the message is one line naming the option."""


class InputError(Exception):
    """An input to process could not be read or used (exit 1); the message names the file."""


# ---------------------------------------------------------------- argument types


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def unit_fraction(text: str) -> float:
    """argparse type: a number in [0, 1] (opacities, thresholds)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {value}")
    return value


# ---------------------------------------------------------------- the parser


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions and epilogs as written; every option's help ends with its default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (not action.option_strings or "default" in text or default is None or default is False
                or default == argparse.SUPPRESS or (isinstance(default, list) and not default)
                or isinstance(action, (argparse._HelpAction, argparse._VersionAction))):
            return text
        return f"{text} (default: %(default)s)"


_NEGATIVE_VALUE = re.compile(r"^-\d*\.?\d+(?:[eE][-+]?\d+)?(?:,[-+]?\d*\.?\d+(?:[eE][-+]?\d+)?)*$")


class CommandParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` that follows the convention.

    Errors are one line (``PROG: error: MESSAGE``, exit 2); options cannot be
    abbreviated; a value that starts with a minus sign and reads as numbers
    (``-5,10``) is taken as the value of the option before it; the parsed
    namespace records which options were typed (:func:`given`).
    """

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # noqa: D401 (argparse's hook)
        sys.stderr.write(f"{self.prog}: error: {one_line(message)} (see --help)\n")
        sys.stderr.flush()
        raise SystemExit(EXIT_USAGE)

    def _value_options(self) -> set[str]:
        return {s for a in self._actions if a.option_strings and a.nargs != 0 for s in a.option_strings}

    def _join_negative_values(self, argv: list[str]) -> list[str]:
        options, out, i = self._value_options(), [], 0
        while i < len(argv):
            token = argv[i]
            if token == "--":
                out.extend(argv[i:])
                break
            if token in options and i + 1 < len(argv) and _NEGATIVE_VALUE.match(argv[i + 1]):
                out.append(f"{token}={argv[i + 1]}" if token.startswith("--") else token + argv[i + 1])
                i += 2
                continue
            out.append(token)
            i += 1
        return out

    def parse_known_args(self, args=None, namespace=None):
        argv = [os.fspath(a) for a in (sys.argv[1:] if args is None else args)]
        argv = self._join_negative_values(argv)
        ns, extra = super().parse_known_args(argv, namespace)
        ns._given = self._typed(argv)
        return ns, extra

    def _typed(self, argv: list[str]) -> frozenset:
        """The dests of the options present in ``argv`` (a parse with every default suppressed)."""
        shadow = copy.copy(self)
        shadow.__class__ = argparse.ArgumentParser  # no recursion into this method
        shadow._actions = [copy.copy(a) for a in self._actions]
        shadow._option_string_actions = {}
        for action in shadow._actions:
            if action.option_strings:
                action.default = argparse.SUPPRESS
                action.required = False
            for s in action.option_strings:
                shadow._option_string_actions[s] = action
        shadow._defaults = {}
        shadow._mutually_exclusive_groups = []
        shadow.error = lambda message: (_ for _ in ()).throw(argparse.ArgumentError(None, message))
        try:
            ns, _ = argparse.ArgumentParser.parse_known_args(shadow, argv)
        except (argparse.ArgumentError, SystemExit):
            return frozenset()
        options = {a.dest for a in self._actions if a.option_strings}
        return frozenset(k for k in vars(ns) if k in options)


def prog_name(command: str, default: Optional[str] = None) -> str:
    """How the user ran ``command``: ``mlx-evit-classify``, ``mlx-evit classify`` or ``python -m mlx_evit.classify``."""
    base = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    if base == f"mlx-evit-{command}":
        return base
    if base == "mlx-evit":
        return f"mlx-evit {command}"
    if base == "__main__.py" and os.path.basename(os.path.dirname(sys.argv[0])) == "mlx_evit":
        return f"python -m mlx_evit {command}"
    return default or f"python -m mlx_evit.{command}"


def exit_status_text(statuses: Iterable[int] = (EXIT_OK, EXIT_INPUT, EXIT_USAGE, EXIT_INTERNAL, EXIT_INTERRUPTED),
                     notes: Optional[dict[int, str]] = None) -> str:
    """The ``exit status:`` block of an epilog (the shared meanings; ``notes`` adds a command's detail)."""
    lines = ["exit status:"]
    for code in statuses:
        text = EXIT_STATUSES[code] + (f"; {notes[code]}" if notes and code in notes else "")
        lines.append(f"  {code:<5}{text}")
    return "\n".join(lines) + "\n"


def command_parser(prog: str, description: str, epilog: str = "") -> CommandParser:
    """A parser for one command (its ``--help`` shows every default; one-line errors, exit 2)."""
    return CommandParser(prog=prog, description=description, epilog=epilog)


# ---------------------------------------------------------------- the shared options


def add_model_options(parser: argparse.ArgumentParser, kind: str, *, model_default: Optional[str] = None,
                      model_help: Optional[str] = None, weights_help: Optional[str] = None) -> None:
    """``-m/--model NAME`` and ``-w/--weights PATH``."""
    families = ", ".join(sorted({_KIND[f] for f in FAMILIES[kind]}))
    default = f"default: {model_default} without --weights; " if model_default else "default: "
    parser.add_argument(
        "-m", "--model", metavar="NAME",
        help=model_help or (f"registered {families} model, with or without its tag ('timm/' prefix accepted) "
                            f"({default}with --weights: what the weights say, checked against NAME)"))
    parser.add_argument(
        "-w", "--weights", metavar="PATH",
        help=weights_help or ("MLX model folder or checkpoint file (default: the model's published weights, "
                              "downloaded once and cached converted)"))


def add_output(parser: argparse.ArgumentParser, kind: str, help: str, *, required: bool = False,
               aliases: Sequence[str] = ()) -> None:
    """``-o/--output FILE`` (``kind="file"``) or ``-o/--output DIR`` (``kind="folder"``); ``aliases``: old spellings."""
    metavar = "FILE" if kind == "file" else "DIR"
    parser.add_argument("-o", "--output", *aliases, metavar=metavar, required=required,
                        help=help + ("" if required or "default" in help else " (default: none)"))


def add_format(parser: argparse.ArgumentParser, choices: Sequence[str], default: Optional[str], help: str,
               **kwargs) -> None:
    """``-f/--format FMT`` with ``choices`` from :data:`FORMATS` (``kwargs``: more of ``add_argument``'s)."""
    assert set(choices) <= set(FORMATS), choices
    parser.add_argument("-f", "--format", choices=tuple(choices), default=default, help=help, **kwargs)


def add_force(parser: argparse.ArgumentParser, help: str = "replace existing outputs") -> None:
    parser.add_argument("--force", action="store_true", help=help)


def add_skip_errors(parser: argparse.ArgumentParser,
                    help: str = "report an unreadable input and go on with the others") -> None:
    parser.add_argument("--skip-errors", action="store_true", help=help)


def add_progress(parser: argparse.ArgumentParser, progress: bool = True) -> None:
    """``--progress`` (a bar even when stderr is not a terminal) and ``-q/--quiet``, mutually exclusive."""
    group = parser.add_mutually_exclusive_group()
    if progress:
        group.add_argument("--progress", action="store_true",
                           help="show the progress bar even when stderr is not a terminal")
    group.add_argument("-q", "--quiet", action="store_true", help="print nothing on stderr but errors")


def add_dtype(parser: argparse.ArgumentParser, help: str = "dtype of the model's weights and activations") -> None:
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help=help)


def add_batch_size(parser: argparse.ArgumentParser, default: int = 16, help: str = "images per batch") -> None:
    parser.add_argument("-b", "--batch-size", type=positive_int, default=default, metavar="N", help=help)


def add_recursive(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-r", "--recursive", action="store_true",
                        help="descend into subfolders of folder inputs; '**' in patterns")


# ---------------------------------------------------------------- checks inside a command


def given(args: argparse.Namespace, dest: str) -> bool:
    """Whether the option of ``dest`` was typed on the command line (even with its default value)."""
    return dest in getattr(args, "_given", ())


def option_name(parser: argparse.ArgumentParser, dest: str) -> str:
    """The long spelling of the option of ``dest`` (``--points-per-side``)."""
    for action in parser._actions:
        if action.dest == dest and action.option_strings:
            return max(action.option_strings, key=len)
    return dest


def refuse(parser: argparse.ArgumentParser, args: argparse.Namespace, dests: Iterable[str], why: str) -> None:
    """:class:`UsageError` if any option of ``dests`` was typed: ``--x: why``."""
    typed = [option_name(parser, d) for d in dests if given(args, d)]
    if typed:
        raise UsageError(f"{', '.join(typed)}: {why}")


def _family_names(families: Sequence[str]) -> list[str]:
    from mlx_evit.models.registry import get_entry, list_models

    archs = [n for n in list_models() if get_entry(n).family in families]
    return archs + [n for n in list_models(pretrained=True) if get_entry(n).family in families]


def model_name(name: str, kind: str, option: str = "--model") -> str:
    """The registry name ``name`` stands for (``timm/`` dropped), checked to be of ``kind``'s family.

    :class:`UsageError` for an unknown name (with close names of the same
    family) or a model of another family (nothing is downloaded).
    """
    from mlx_evit.models.registry import get_entry

    families = FAMILIES[kind]
    bare = name[len("timm/"):] if name.startswith("timm/") else name
    names = _family_names(families)
    try:
        entry = get_entry(bare)
    except ValueError:
        close = difflib.get_close_matches(bare, names, n=5, cutoff=0.5)
        hint = f"; did you mean: {', '.join(close)}?" if close else ""
        where = f"{option}: " if option else ""
        raise UsageError(f"{where}unknown model {name!r}{hint} (python -m mlx_evit list)") from None
    if entry.family not in families:
        archs = [n for n in names if "." not in n]
        raise UsageError(f"{option} {name}: a {_KIND[entry.family]} model; this command takes "
                         f"{_KIND[families[0]]} models: {', '.join(archs)}")
    tag = bare.partition(".")[2]
    if tag and tag not in {t.tag for t in entry.tags}:
        raise UsageError(f"{option} {name}: {entry.name} has no tag {tag!r} (tags: "
                         f"{', '.join(t.tag for t in entry.tags) or 'none'})")
    return bare


def weights_path(path: str, option: str = "--weights") -> str:
    """``path`` if it exists; :class:`UsageError` naming it (and a model name it may be meant as) if not."""
    if os.path.exists(path):
        return path
    message = f"{option} {path}: no such file or folder"
    if os.sep not in path and "." not in os.path.splitext(path)[1][1:2]:
        close = difflib.get_close_matches(path.removeprefix("timm/"), _family_names(FAMILIES["any"]), n=3,
                                          cutoff=0.6)
        if close:
            message += f" (a model name goes to --model; did you mean --model {close[0]}?)"
    raise UsageError(message)


def folder_output_name(path: str, what: str, option: str = "--output") -> str:
    """``path`` for a folder output; :class:`UsageError` for a new name that reads as a file (``report.json``)."""
    if not os.path.isdir(path) and os.path.splitext(path.rstrip("/"))[1].lower() in _FILE_SUFFIXES:
        raise UsageError(f"{option} {path}: this command writes a folder ({what}); give a folder name")
    return path


# ---------------------------------------------------------------- running


@dataclass
class Console:
    """What a command prints on stderr: errors always; status lines and progress unless ``--quiet``."""

    prog: str
    quiet: bool = False
    force_progress: bool = False
    stream: object = None

    def __post_init__(self):
        self.stream = self.stream or sys.stderr

    def _write(self, text: str) -> None:
        self.stream.write(text + "\n")
        self.stream.flush()

    def error(self, message: object) -> None:
        self._write(f"{self.prog}: error: {one_line(message)}")

    def warn(self, message: object) -> None:
        if not self.quiet:
            self._write(f"{self.prog}: warning: {one_line(message)}")

    def log(self, message: object) -> None:
        if not self.quiet:
            self._write(f"{self.prog}: {message}")

    def show_progress(self) -> bool:
        """A progress bar: on a terminal, or with ``--progress``; never with ``--quiet``."""
        return not self.quiet and (self.force_progress or self.stream.isatty())


def error_printer(prog: str) -> Callable[[str], None]:
    """``error(message)``: ``PROG: error: message`` on stderr, one line, flushed."""
    return Console(prog).error


def guarded(body: Callable[[], int], error: Callable[[str], None]) -> int:
    """``body()``'s exit status; Ctrl-C, a closed stdout and unexpected errors become one line and a status."""
    try:
        return body()
    except KeyboardInterrupt:
        error("interrupted")
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (e.g. `| head`): stop quietly, without a second error at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK
    except Exception as e:
        if os.environ.get(DEBUG_ENV):
            raise
        error(f"unexpected {type(e).__name__}: {one_line(e)} (rerun with {DEBUG_ENV}=1 for the traceback)")
        return EXIT_INTERNAL


def run_command(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]],
                body: Callable[[argparse.Namespace, Console], int]) -> int:
    """Parse ``argv`` and run ``body(args, console)``: the exit status, never a traceback.

    :class:`UsageError` -> 2, :class:`InputError` -> 1, Ctrl-C -> 130,
    anything else -> 3 (see :func:`guarded`); warnings raised during the run
    are one ``PROG: warning: ...`` line each (none with ``--quiet``).
    """
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (2), printed already
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    console = Console(parser.prog, quiet=bool(getattr(args, "quiet", False)),
                      force_progress=bool(getattr(args, "progress", False)))

    def run() -> int:
        with warnings.catch_warnings():
            warnings.showwarning = lambda message, *_a, **_k: console.warn(message)
            try:
                return int(body(args, console) or 0)
            except UsageError as e:
                console.error(e)
                return EXIT_USAGE
            except InputError as e:
                console.error(e)
                return EXIT_INPUT

    return guarded(run, console.error)


def load_problem(error: BaseException) -> str:
    """The message of a failed model load, with the command-line way out of a Hub failure."""
    from mlx_evit.errors import HubError

    return f"{error} (or give --weights PATH)" if isinstance(error, HubError) else str(error)


def load_task_model(args: argparse.Namespace, console: "Console", kind: str, default: Optional[str] = None):
    """The model that ``-m/--model`` and ``-w/--weights`` name, for a task of ``kind`` (``"SAM"``, ...).

    Through the task objects' one loader (:func:`mlx_evit.tasks.pretrained.load_for_task`); a name of
    another kind, an unknown name, unloadable weights or a Hub failure is a :class:`UsageError`.
    """
    from mlx_evit.errors import HubError
    from mlx_evit.tasks.pretrained import load_for_task

    try:
        net, _ = load_for_task(getattr(args, "model", None), kind=kind, error=UsageError, default=default,
                               weights=getattr(args, "weights", None), dtype=getattr(args, "dtype", None),
                               log=console.log)
    except (HubError, ValueError) as e:
        raise UsageError(load_problem(e)) from None
    return net


def plural(count: int, word: str, many: Optional[str] = None) -> str:
    """``"1 image"``, ``"2 images"``."""
    return f"{count} {word if count == 1 else (many or word + 's')}"


def output_folder(path: str, inputs: Iterable[str], force: bool, *, what: str,
                  marker: Union[str, Callable[[str], bool], None] = None,
                  describe: str = "an output folder of this command", option: str = "--output", check: bool = True):
    """The checked :class:`mlx_evit.outputs.OutputDir` of a folder output, or :class:`UsageError`.

    ``what`` names the files written (for a name that reads as a file); with
    ``marker`` (a file name, or a predicate on the folder), a non-empty
    folder without it is refused without suggesting ``--force`` (which could
    not help). ``check=False``: only these two checks (the caller checks the rest).
    """
    from mlx_evit.outputs import OutputError, check_output_dir

    folder_output_name(path, what, option)
    if marker and os.path.isdir(path) and any(os.scandir(path)):
        marked = marker(path) if callable(marker) else os.path.isfile(os.path.join(path, marker))
        if not marked:
            raise UsageError(f"{option} {path}: is a non-empty folder that is not {describe}; "
                             "not writing into it (choose another folder)")
    if not check:
        return None
    try:
        return check_output_dir(path, inputs=list(inputs), force=force, marker=marker, describe=describe,
                                option=option)
    except OutputError as e:
        raise UsageError(e) from None


class CreatedFiles:
    """Writes into a checked output folder and remembers the files it created.

    :meth:`undo` removes them (and the folder, if the run created it): a run
    that stops leaves the folder as it found it, so the rerun needs no
    ``--force``. Files replaced under ``--force`` keep their new content.
    """

    def __init__(self, out):
        self.out, self.created = out, []

    def write_file(self, name: str, data) -> str:
        path = os.path.join(self.out.path, name)
        new = not os.path.lexists(path)
        written = self.out.write_file(name, data)
        if new:
            self.created.append(os.fspath(written))
        return os.fspath(written)

    def undo(self) -> None:
        for path in reversed(self.created):
            try:
                os.unlink(path)
            except OSError:
                pass
        self.created = []
        if not self.out.existed:
            try:
                os.rmdir(self.out.path)
            except OSError:
                pass
