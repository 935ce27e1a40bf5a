"""The command line parser's shared pieces: the exit statuses its help states, the argparse types
of its flags, the prefixes that tell settings fields from job fields (and `given`, which reads
them back), a command's own --config and -q (`add_command`), and the parser that names a
misspelt option's nearest match (`CommandParser`)."""

from __future__ import annotations

import argparse
import difflib
import re
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

CONFIG_HELP = "TOML or YAML settings file (default: $CELLSEG_CONFIG); flags > CELLSEG_* environment > file"
QUIET_HELP = "only warnings and errors on stderr"
SETTING, JOB = "setting:", "job:"  # argparse dest prefixes of the two kinds of field
PARTLY_FAILED = 3  # the exit status of a batch in which some images failed
DRY_RUN_HELP = ("list what the run would do (images to segment, retried, block by block, skipped, rejected) "
                "and check the model, source and store, without loading the model or writing anything")
EXIT_STATUS_HELP = (
    "exit status: 0 done (every image done or skipped, or nothing to do); 1 verify found damaged images (not "
    "repaired); 2 bad usage, settings or input, or storage that cannot be used (no credentials, unreachable, timed "
    f"out, denied), with one line saying which; {PARTLY_FAILED} some images failed: each is listed and recorded, the "
    "rest are done, and the next run tries the failed ones again (export: damaged images were left out of the "
    "table); 130 interrupted (Ctrl-C), 143 stopped by SIGTERM (kill, timeout, a batch scheduler's time limit): what "
    "was written is kept"
)


def cell_diameter(text: str) -> float | str | None:
    """--cell-diameter of training: pixels, 'auto' or 'none'."""
    if text.lower() in ("auto", "none"):
        return None if text.lower() == "none" else "auto"
    return float(text)


def z_plane(text: str) -> int | str:
    """--z: a plane index or 'max' (projection)."""
    return text if text == "max" else int(text)


def time_point(text: str) -> int | str:
    """--t: a time point index or 'all'."""
    return text if text == "all" else int(text)


def minutes(text: str) -> float | str | None:
    """--max-minutes: 0 means no limit, 'auto' the default budget."""
    return text if text == "auto" else float(text) or None


def row_limit(text: str) -> int | None:
    """--limit of `results`: how many rows to show; 0 shows every row."""
    rows = int(text)
    if rows < 0:
        raise argparse.ArgumentTypeError(f"{rows} rows: give 0 (every row) or more")
    return rows or None


def at_least(least: int, what: str) -> Any:
    """An argparse type: an integer of at least `least` (`what` names it in the error)."""
    def parse(text: str) -> int:
        value = int(text)
        if value < least:
            raise argparse.ArgumentTypeError(f"{value} {what}: give {least} or more")
        return value
    return parse


def given(args: argparse.Namespace, prefix: str) -> dict[str, Any]:
    """The fields the flags of `prefix` set, as nested dicts ({'training': {'epochs': 5}})."""
    nested: dict[str, Any] = {}
    for name, value in vars(args).items():
        if name.startswith(prefix):
            *parents, leaf = name.removeprefix(prefix).split(".")
            node = nested
            for parent in parents:
                node = node.setdefault(parent, {})
            node[leaf] = value
    return nested


def add_command(group: argparse._SubParsersAction, name: str, run: str | None = None,
                **kwargs: Any) -> argparse.ArgumentParser:
    """A (sub)command that also takes --config and -q after its name; `run` names its function in
    `cellseg.cli.COMMANDS`."""
    parser = group.add_parser(name, **kwargs)
    parser.add_argument("--config", default=argparse.SUPPRESS, metavar="FILE", help=CONFIG_HELP)
    parser.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help=QUIET_HELP)
    if run is not None:
        parser.set_defaults(run=run)
    return parser


class CommandParser(argparse.ArgumentParser):
    """A parser whose commands refuse what they do not know themselves: with the command's own
    usage line, and the option nearest a misspelt one (`--treshold`: did you mean --threshold?),
    where argparse would have the top parser name them under `cellseg`'s usage."""

    def parse_known_args(self, args: Sequence[str] | None = None, namespace: Any = None) -> Any:  # type: ignore[override]
        self._arguments = list(sys.argv[1:] if args is None else args)
        namespace, extras = super().parse_known_args(args, namespace)
        if extras and self._subparsers is None:  # a command's own parser, not one that holds commands
            self.error(f"unrecognized arguments: {' '.join(extras)}{self._nearest(extras)}")
        return namespace, extras

    def error(self, message: str) -> NoReturn:
        """argparse's error, which names a misspelt command's nearest (`predcit`: did you mean
        predict?) and a misspelt option that the missing required one hides (`--imgs`)."""
        # Python 3.11 quotes the choices ('predict', 'train'); 3.12.8 and 3.13.1 on do not.
        if choice := re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message):
            choices = [name.strip().strip("'") for name in choice[2].split(",")]
            if close := difflib.get_close_matches(choice[1], choices, n=1):
                message = f"{message} (did you mean {close[0]}?)"
        elif message.startswith("the following arguments are required") and (unknown := self._unknown_options()):
            message = f"unrecognized arguments: {' '.join(unknown)}{self._nearest(unknown)}; {message}"
        super().error(message)

    def _unknown_options(self) -> list[str]:
        """The --options given that are none of this parser's, nor an abbreviation of one."""
        options = [option for action in self._actions for option in action.option_strings if option.startswith("--")]
        return [argument for argument in getattr(self, "_arguments", []) if argument.startswith("--") and argument != "--"
                and not any(option.startswith(argument.split("=", 1)[0]) for option in options)]

    def _nearest(self, extras: list[str]) -> str:
        options = [option for action in self._actions for option in action.option_strings if option.startswith("--")]
        for extra in extras:
            if extra.startswith("--") and (close := difflib.get_close_matches(extra.split("=", 1)[0], options, n=1)):
                return f" (did you mean {close[0]}?)"
        return ""


def add_pairs(parser: argparse.ArgumentParser, resumable: bool = False) -> None:
    """--images and --masks: the image/mask pairs of training and tuning; a `resumable` command
    takes them from the run it resumes when they are not given."""
    resumed = " (with --resume: the run's own unless given)" if resumable else ""
    parser.add_argument("--images", required=not resumable, help=f"directory URL of images{resumed}")
    parser.add_argument("--masks", required=not resumable,
                        help="directory URL of masks, each named as its image or with _mask, _masks, _label, "
                             "_labels or _cp_masks before the extension (may be the --images folder): binary masks, "
                             "or instance label images (one integer per cell), which teach the model to keep "
                             f"touching cells apart{resumed}")
