"""The `cellseg` command: parse flags into settings and jobs, call the library's recipe, print.

synth, train, predict, evaluate, results, export, models and config run without Prefect; flow,
tune and serve run the Prefect flows and deployments (the `orchestration` extra). Object-storage
endpoints and credentials come from the settings (`storage`), the environment or fsspec's
config files, never from flags.

The commands' functions are grouped by what they serve: `cli_predict`, `cli_results` (evaluate,
results, export, verify), `cli_models` (synth, train, models), `cli_flows` (flow, tune, serve) and
`cli_settings` (each command's settings, and config); `cli_output` prints for them. Here `main`
parses, dispatches (`COMMANDS`) and says in one line what went wrong.
"""

from __future__ import annotations

import argparse
import ast
import io
import logging
import os
import select
import sys
import threading
from collections.abc import Callable, Sequence
from contextlib import nullcontext, redirect_stderr
from typing import Any

from pydantic import ValidationError

from cellseg.cli_flows import run_flow_segment, run_flow_train, run_serve, run_tune
from cellseg.cli_models import run_models, run_synth, run_train
from cellseg.cli_output import INTERRUPTED
from cellseg.cli_parser import build_parser
from cellseg.cli_predict import run_predict
from cellseg.cli_results import run_evaluate, run_export, run_results, run_verify
from cellseg.cli_settings import run_config
from cellseg.cli_signals import TERMINATED, Terminated, sigterm_as_interrupt, wait_out_a_second_interrupt
from cellseg.redact import newlines_escaped, redact_url, shown, terminal_safe
from cellseg.settings import describe_invalid

Run = Callable[[argparse.Namespace], int]


def _prefect_api_error(error: BaseException) -> str | None:
    """One line for a Prefect API that a flow command cannot use: PREFECT_API_URL unreachable or
    answering with an error, or the temporary server Prefect starts without it too slow to start;
    None for other errors (and when Prefect was never imported)."""
    if "prefect" not in sys.modules:
        return None
    import httpx
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS

    if isinstance(error, RuntimeError) and str(error).startswith("Timed out while attempting to connect to ephemeral"):
        return (f"the temporary Prefect server (PREFECT_API_URL is not set) did not start within "
                f"{PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value()} s: on a busy machine raise "
                "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, or run `prefect server start` and set PREFECT_API_URL")
    cause: BaseException | None = error
    for _ in range(16):  # causes can form loops
        if cause is None:
            break
        if isinstance(cause, httpx.TransportError | httpx.HTTPStatusError):
            api = f" at {redact_url(PREFECT_API_URL.value())}" if PREFECT_API_URL.value() else ""
            what = (f"answered {cause.response.status_code}" if isinstance(cause, httpx.HTTPStatusError)
                    else f"cannot be reached ({type(cause).__name__}: {cause})")
            return (f"the Prefect API{api} {what}: start it (`prefect server start`), fix PREFECT_API_URL, or unset "
                    "it to run on a temporary server")
        cause = cause.__cause__ or cause.__context__
    return None


def _stdout_reader_gone() -> bool:
    """Whether stdout is a pipe whose reader has closed it (`cellseg results STORE | head -1`), as
    opposed to a broken connection elsewhere, which is an error."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (AttributeError, OSError, ValueError):  # no poll() (Windows), or stdout is no file
        return False


COMMANDS: dict[str, Run] = {
    "synth": run_synth, "train": run_train, "predict": run_predict, "evaluate": run_evaluate,
    "results": run_results, "export": run_export, "models": run_models, "config": run_config,
    "flow_train": run_flow_train, "flow_segment": run_flow_segment, "tune": run_tune, "serve": run_serve,
    "verify": run_verify,
}


class PrefectRunLines(logging.Filter):
    """Prefect's lines about flow and task runs, as a command's output: a run that completed says
    nothing (the command's own summary follows), a failed task names itself and its error, a
    failed flow names itself, and the error a flow raises, which `main` says last, is not said
    before it too (it was said three times)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name not in ("prefect.flow_runs", "prefect.task_runs"):
            return True
        message = record.getMessage()
        if message == "Finished in state Completed()":
            return False
        if message.startswith(("Encountered exception during execution", "Task run failed with ")) \
                and " - Retry " not in message and record.exc_info and _explained(record.exc_info[1]):
            return False
        if message.startswith("Finished in state Failed("):
            if record.name == "prefect.flow_runs":
                line = f"flow run '{getattr(record, 'flow_run_name', '?')}' failed"
            else:
                line = f"task run '{getattr(record, 'task_run_name', '?')}' failed: {_state_message(message)}"
            record.msg, record.args = newlines_escaped(line), ()
        return True


def _state_message(line: str) -> str:
    """The message of a state Prefect logs as "Finished in state Failed('...')", without Prefect's
    "Task run encountered an exception" before the error's type."""
    quoted = line[len("Finished in state Failed("):].removesuffix(")")
    try:
        message = str(ast.literal_eval(quoted))
    except (ValueError, SyntaxError):  # not one quoted string (PREFECT_DEBUG_MODE's repr of the state)
        message = quoted
    return message.removeprefix("Task run encountered an exception ") or "(no message)"


class RedactingFormatter(logging.Formatter):
    """Log lines with credentials masked (`redact_text`) and control characters escaped,
    whichever library logged them."""

    def format(self, record: logging.LogRecord) -> str:
        if record.exc_info and _explained(record.exc_info[1]):
            # Prefect logs a failed task's or flow's traceback; `main` says this error in one line.
            record = logging.makeLogRecord({**record.__dict__, "exc_info": None, "exc_text": None})
        if isinstance(record.args, tuple) and record.args:  # a file name or an error quoting one: kept on its line
            args = tuple(newlines_escaped(str(arg)) if isinstance(arg, str | BaseException) else arg
                         for arg in record.args)
            record = logging.makeLogRecord({**record.__dict__, "args": args})
        return shown(super().format(record))


def _explained(error: BaseException | None) -> bool:
    """Whether `main` reports `error` in one line, which its traceback would only bury."""
    from cellseg.storage_errors import storage_error

    if isinstance(error, ValueError | FileNotFoundError | ModuleNotFoundError):
        return True
    return error is not None and storage_error(None, error) is not None


class TerminalSafeOutput:
    """stdout with control characters escaped: file names are printed, and a name holding an
    escape sequence must not drive the terminal."""

    def __init__(self, stream: Any):
        self._stream = stream

    def write(self, text: str) -> int:
        return self._stream.write(terminal_safe(text))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def training_kept(out_dir: str) -> str:
    from cellseg.jobs_training import kept_line  # loads torch, as the training it follows did

    return kept_line(out_dir)


INTERRUPTED_HINTS: dict[str, str | Callable[[argparse.Namespace], str]] = {
    "predict": "the images written so far are kept: run the same command again to segment the rest",
    "flow segment-images": "the images written so far are kept: run the same command again to segment the rest",
    "train": lambda args: training_kept(args.out),
    "flow train-unet": "once its training had begun, the flow's line above says what its run kept and how to go on "
                       "from it",
    "export": "no file was left partly written (a table is written whole or not at all, label images each whole); "
              "with --labels, run it again with --overwrite to write them all",
}


SHARD_THREAD_PREFIX = "cellseg-shard-"  # as `jobs_shards.segment_shards` names its threads (not imported: torch)


def _exit_now_while_shards_run(status: int) -> None:
    """Exit with `status` at once where shard threads still run: a second Ctrl-C ends the wait for
    them (`jobs_shards.STOP_GRACE`), and the interpreter's exit with a thread inside torch aborted
    the process ("terminate called without an active exception", status 134). Nothing is lost:
    every write to a store is whole or absent, and the next run redoes an image not finished."""
    if any(thread.is_alive() and thread.name.startswith(SHARD_THREAD_PREFIX) for thread in threading.enumerate()):
        logging.shutdown()
        sys.stderr.flush()
        sys.stdout.flush()
        os._exit(status)


def main(argv: Sequence[str] | None = None, exiting: bool = False) -> int:
    """Run the command `argv` (the process's arguments when None) and return its exit status.
    `exiting`: the process ends with this status (the `cellseg` command), so that a Ctrl-C after an
    interrupt has been reported may wait out the exit (`cli_signals.wait_out_a_second_interrupt`)."""
    usage_errors = io.StringIO()
    try:
        with redirect_stderr(usage_errors):  # argparse echoes the arguments it refuses, URLs included
            args = build_parser().parse_args(argv)
    finally:
        sys.stderr.write(shown(usage_errors.getvalue()))
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(RedactingFormatter("%(message)s"))
    handler.addFilter(PrefectRunLines())
    logging.basicConfig(level=logging.WARNING, handlers=[handler])
    logging.getLogger("cellseg").setLevel(logging.WARNING if args.quiet else logging.INFO)
    from cellseg.storage_errors import storage_error

    command = " ".join(filter(None, (args.command, getattr(args, "flow", None))))  # `flow segment-images`, ...
    stdout, sys.stdout = sys.stdout, TerminalSafeOutput(sys.stdout)
    # `serve` is left to Prefect's runner, which stops its runs on SIGTERM in its own way.
    stop_signals = sigterm_as_interrupt() if args.command != "serve" else nullcontext()
    try:
        with stop_signals:
            status = COMMANDS[args.run](args)
        sys.stdout.flush()  # a reader that has gone (`| head -1`) shows up here, not at interpreter exit
        return status
    except KeyboardInterrupt as error:
        if exiting:
            wait_out_a_second_interrupt()
        hint = INTERRUPTED_HINTS.get(command)
        hint = hint(args) if callable(hint) else hint
        how = "stopped by SIGTERM" if isinstance(error, Terminated) else "interrupted"
        print(f"cellseg {command}: {how}" + (f"; {hint}" if hint else ""), file=sys.stderr)
        _exit_now_while_shards_run(TERMINATED if isinstance(error, Terminated) else INTERRUPTED)
        return TERMINATED if isinstance(error, Terminated) else INTERRUPTED
    except BrokenPipeError as error:
        if _stdout_reader_gone():
            # Python's advice: point stdout at devnull, so that the flush at exit cannot fail again.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 0
        print(f"cellseg {command}: error: {shown(str(error))}", file=sys.stderr)
    except ValidationError as error:
        print(f"cellseg {command}: invalid settings: {terminal_safe(describe_invalid(error))}", file=sys.stderr)
    # ValueError holds the library's own errors (CheckpointError, DatasetError, ImageReadError,
    # RegistryError, SettingsError, StoreError): named here, their modules would load torch for
    # commands that never touch a model.
    except (FileNotFoundError, ValueError, ModuleNotFoundError) as error:
        print(f"cellseg {command}: error: {shown(str(error))}", file=sys.stderr)
    except Exception as error:
        # The Prefect API's own, then storage errors raised where no URL is named (StorageError
        # where one is: a ValueError, above); the Prefect client's errors chain connection errors too.
        if (line := _prefect_api_error(error) or storage_error(None, error)) is None:
            raise
        print(f"cellseg {command}: error: {shown(str(line))}", file=sys.stderr)
    finally:
        sys.stdout = stdout
    return 2


if __name__ == "__main__":
    sys.exit(main(exiting=True))
