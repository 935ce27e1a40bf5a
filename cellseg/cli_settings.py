"""A command's settings, from its flags over the environment over --config, and `cellseg config`
which shows them."""

from __future__ import annotations

import argparse
from typing import Any

from cellseg import __version__
from cellseg.cli_parser_base import SETTING, given
from cellseg.json_values import dumps
from cellseg.settings import CellsegSettings, config_file_path, load_settings


def command_settings(args: argparse.Namespace, overrides: dict[str, Any] | None = None) -> CellsegSettings:
    """The command's settings: its flags (and `overrides`) over the environment over --config;
    storage options are handed to fsspec before anything is read."""
    nested = given(args, SETTING)
    for section, values in (overrides or {}).items():
        nested[section] = {**values, **nested.get(section, {})} if isinstance(values, dict) else values
    settings = load_settings(getattr(args, "config", None), nested)
    settings.apply_storage()
    return settings


def run_config(args: argparse.Namespace) -> int:
    import yaml

    data = command_settings(args).masked()
    if args.json:
        print(dumps(data, indent=1))
        return 0
    path = config_file_path(getattr(args, "config", None))
    print(f"# cellseg {__version__} settings: flags > CELLSEG_* environment > "
          f"{f'file {path}' if path else 'no settings file'} > defaults; secrets masked")
    print(yaml.safe_dump(data, sort_keys=False), end="")
    return 0
