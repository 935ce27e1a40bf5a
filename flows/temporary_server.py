"""The temporary Prefect server of a flow command run without PREFECT_API_URL, kept out of Ctrl-C's way.

Prefect starts that server as a child process in the command's process group, so the terminal's
Ctrl-C stopped it together with the command. The flow engine, told of the interrupt, then spent
minutes retrying to report the crash to the stopped server and ended with an API error (exit
status 2, not the 130 of an interrupted command). Started in a session of its own, the server
outlives the Ctrl-C: the run ends as Crashed within seconds, and Prefect stops the server when the
command exits. A hang-up (the terminal closed) ends the command as an exit, so that the server is
stopped then too, as the process group's hang-up stopped it before.
"""

from __future__ import annotations

import signal
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

HANGUP_STATUS = 128 + signal.SIGHUP


class _OwnSession:
    """The subprocess module as Prefect's server module sees it, with Popen starting a new session."""

    def __getattr__(self, name: str) -> Any:
        return getattr(subprocess, name)

    @staticmethod
    def Popen(*args: Any, **kwargs: Any) -> subprocess.Popen[Any]:
        return subprocess.Popen(*args, **{**kwargs, "start_new_session": True})


def keep_temporary_server_from_ctrl_c() -> None:
    """Make the temporary server Prefect starts for this process (none with PREFECT_API_URL set) run
    in its own session, and a hang-up end this process through its exit handlers, which stop it."""
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value():
        return
    from prefect.server.api import server

    if None in server.SubprocessASGIServer._instances:  # already made (started, perhaps) in this process
        return

    class ServerInOwnSession(server.SubprocessASGIServer):
        def _run_uvicorn_command(self) -> subprocess.Popen[Any]:
            module_subprocess, server.subprocess = server.subprocess, _OwnSession()  # type: ignore[assignment]
            try:
                return super()._run_uvicorn_command()
            finally:
                server.subprocess = module_subprocess

    ServerInOwnSession()  # the instance Prefect's own `SubprocessASGIServer()` returns from now on
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGHUP) is signal.SIG_DFL:
        signal.signal(signal.SIGHUP, _exit_on_hangup)


@contextmanager
def shared_temporary_server() -> Iterator[None]:
    """Start this process's temporary server now (none with PREFECT_API_URL set) and, within the
    block, name it in the settings that the processes of a flow's task runner (tune-unet's trials)
    are started with, so that they report to it. Each of them would otherwise start a server of its
    own, seconds each, and the parent's server would never see their task runs."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if PREFECT_API_URL.value():
        yield
        return
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()  # the one Prefect's client would start for this process (stopped at exit)
    server.start()
    with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
        yield


def _exit_on_hangup(signum: int, frame: Any) -> None:
    raise SystemExit(HANGUP_STATUS)
