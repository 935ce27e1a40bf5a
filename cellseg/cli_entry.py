"""The `cellseg` command: Ctrl-C while the CLI's modules load (a second or two, before `cli.main`
can take it) ends it as it does later, in one line with status 130, not in a traceback."""

from __future__ import annotations

import sys

from cellseg.cli_signals import TERMINATED, wait_out_a_second_interrupt


def main() -> int:
    try:
        from cellseg.cli import main as run
        from cellseg.cli_output import INTERRUPTED
    except KeyboardInterrupt:
        wait_out_a_second_interrupt()
        print("cellseg: interrupted while starting", file=sys.stderr)
        return 130
    status = run(exiting=True)
    if status in (INTERRUPTED, TERMINATED):  # as `main` did, for commands that report their own stop (`tune`)
        wait_out_a_second_interrupt()
    return status
