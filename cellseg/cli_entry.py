"""The `cellseg` command: Ctrl-C while the CLI's modules load (a second or two, before `cli.main`
can take it) ends it as it does later, in one line with status 130, not in a traceback."""

from __future__ import annotations

import sys


def main() -> int:
    try:
        from cellseg.cli import main as run
    except KeyboardInterrupt:
        from cellseg.cli_signals import ignore_further_interrupts

        ignore_further_interrupts()
        print("cellseg: interrupted while starting", file=sys.stderr)
        return 130
    return run()
