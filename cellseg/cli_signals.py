"""SIGTERM as a clean stop, like Ctrl-C.

`kill`, `timeout`, `docker stop`, systemd and a batch scheduler's time limit (SLURM, LSF, PBS)
end a command with SIGTERM. Python's default for it ends the process where it stands: no
`finally`, no exit handlers, so a flow command's temporary Prefect server (a process in a session
of its own) was left running for good and nothing said what was kept. Raised as an interrupt
instead, SIGTERM takes the path Ctrl-C takes: the shards stop once what they have predicted is
written, the clean-ups run, one line says what is kept, and the exit handlers stop the server.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

TERMINATED = 128 + signal.SIGTERM  # 143, the shell's status for a command ended by SIGTERM


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C raises KeyboardInterrupt so that every clean-up of an interrupt runs for it."""


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM during the clean-up ends the process at once
    raise Terminated()


def _third_press_ends_at_once(signum: int, frame: FrameType | None) -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def wait_out_a_second_interrupt() -> None:
    """For a process about to exit once its stop has been reported: a second Ctrl-C waits for the
    exit handlers instead of breaking into one, and a third ends the process at once. Pressed again
    while they ran (Prefect stopping a flow command's temporary server, the executors' threads
    joined), Ctrl-C ended a handler part way, before the server's kill where it lingered, and put
    "Exception ignored in ... KeyboardInterrupt:" after the line saying what was kept. Only where
    Ctrl-C still raises KeyboardInterrupt: called again, it leaves a second press's effect as it is."""
    if (threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGINT) is signal.default_int_handler):
        signal.signal(signal.SIGINT, _third_press_ends_at_once)


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises `Terminated` in the main thread. Left alone where the
    process ignores SIGTERM or already handles it, and outside the main thread; the default is
    back after the block.

    Within a Prefect flow run, Prefect's own handler takes SIGTERM (the run ends as Crashed) and
    then sends it again to the handler it replaced, this one."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return
    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
