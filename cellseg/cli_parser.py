"""The command line's parser: `cellseg` and its commands, in the order its help lists them. The
flags that set settings or job fields are tables (`cli_parser_flags`); each group of commands'
arguments is beside it (`cli_parser_results`, `cli_parser_models`, `cli_parser_flows`); the pieces
they share are in `cli_parser_base`."""

from __future__ import annotations

import argparse

from cellseg import __version__
from cellseg.cli_parser_base import CONFIG_HELP, EXIT_STATUS_HELP, QUIET_HELP, CommandParser, add_command
from cellseg.cli_parser_flows import add_flow, add_serve, add_tune
from cellseg.cli_parser_models import add_models, add_synth, add_train
from cellseg.cli_parser_results import add_evaluate, add_export, add_predict, add_results, add_verify


def build_parser() -> argparse.ArgumentParser:
    """The parser of `cellseg`: each command's `run` names its function in `cellseg.cli.COMMANDS`."""
    parser = CommandParser(
        prog="cellseg", description="Segment grayscale microscopy images into cells and background with a U-Net.",
        epilog=EXIT_STATUS_HELP,
    )
    parser.add_argument("--version", action="version", version=f"cellseg {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help=QUIET_HELP)
    parser.add_argument("--config", metavar="FILE", help=CONFIG_HELP)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_synth(commands)
    add_train(commands)
    add_predict(commands)
    add_evaluate(commands)
    add_results(commands)
    add_export(commands)
    add_verify(commands)
    add_tune(commands)
    add_models(commands)
    add_flow(commands)
    _add_config(commands)
    add_serve(commands)
    return parser


def _add_config(commands: argparse._SubParsersAction) -> None:
    """`cellseg config show`: the effective settings."""
    config = add_command(commands, "config",
                         help="show the effective settings (flags > CELLSEG_* environment > --config file)")
    config_actions = config.add_subparsers(dest="action", required=True, metavar="ACTION")
    show = add_command(config_actions, "show", "config",
                       help="print the settings every command starts from, secrets masked")
    show.add_argument("--json", action="store_true", help="JSON instead of YAML")
