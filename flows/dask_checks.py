"""Checks that a Dask cluster can run a run's tasks, made before any task is sent, and the one line
for a run whose scheduler went away: a run on a cluster otherwise fails late and obscurely (every
image recorded as failed, a wait for workers that never come, an unpickling error)."""

from __future__ import annotations

import importlib.util
import os
from typing import Any, cast

from cellseg import __version__

DASK_CONNECT_SECONDS = 10
# A worker's storage check tries each URL up to 4 times, 30 s each with the default storage settings.
DASK_CHECK_SECONDS = 300


def check_dask_workers(address: str, paths: dict[str, str]) -> None:
    """Fail in one line, before any task is sent, when the Dask cluster at `address` cannot run
    the run's tasks: no scheduler answers, it has no workers, or a worker runs another cellseg
    version, lacks a package the run needs, cannot see one of the local `paths` (setting -> path),
    or cannot reach one of the URLs among them with its own storage settings."""
    from distributed import Client

    try:
        client = Client(address, timeout=DASK_CONNECT_SECONDS, set_as_default=False)
    except OSError as error:
        raise ValueError(f"no Dask scheduler answers at {address} (dask_address, --dask-address) within "
                         f"{DASK_CONNECT_SECONDS} s ({type(error).__name__}): start it (dask scheduler), or leave "
                         "dask_address out to run on this machine") from None
    with client:
        if not client.scheduler_info()["workers"]:
            raise ValueError(f"the Dask scheduler at {address} (dask_address) has no workers: start them "
                             f"(dask worker {address}); the run would wait for them for ever")
        protocols = sorted({url.split("://")[0] for url in paths.values() if "://" in url} - {"file"})
        local = {name: path for name, path in paths.items() if "://" not in path}
        views = _run_on_workers(client, address, worker_view, sorted(local.values()), protocols)
        _refuse(address, {worker: _worker_problems(view, local) for worker, view in views.items()})
        # Only once the workers run this cellseg: each reaches the run's URLs with its own settings,
        # which the shards use (credentials or an endpoint set where the run starts but not there).
        urls = {name: url for name, url in paths.items() if "://" in url and not url.startswith("file://")}
        if urls:
            _refuse(address, _run_on_workers(client, address, worker_storage_problems, urls))


def _run_on_workers(client: Any, address: str, function: Any, *args: Any) -> dict[str, Any]:
    """`function(*args)` on every worker: worker address -> its result. A worker that does not
    answer within DASK_CHECK_SECONDS fails the check: Dask's own wait has no end."""
    try:
        return cast("dict[str, Any]", client.run(function, *args, callback_timeout=DASK_CHECK_SECONDS))
    except TimeoutError:
        raise ValueError(f"a Dask worker at {address} did not answer cellseg's check within {DASK_CHECK_SECONDS} s: "
                         "it is stopped, overloaded or cannot reach the run's storage; restart it or take it out of "
                         "the cluster") from None
    except Exception as error:  # noqa: BLE001 - anything a worker cannot unpickle or run
        raise ValueError(f"the Dask workers at {address} cannot run cellseg's tasks ({type(error).__name__}: "
                         f"{error}): each needs this machine's cellseg, with its orchestration extra, and a restart "
                         "after an upgrade") from None


def _refuse(address: str, problems: dict[str, list[str]]) -> None:
    """Fail in one line naming each problem once, with the workers (addresses) that have it."""
    workers_by_problem: dict[str, list[str]] = {}
    for worker, found in sorted(problems.items()):
        for problem in found:
            workers_by_problem.setdefault(problem, []).append(worker)
    if not workers_by_problem:
        return
    advice = ""
    if any("cannot see" in problem for problem in workers_by_problem):
        advice = ": use URLs every machine reads (s3://...) or folders mounted at the same absolute path on every worker"
    elif any(problem.startswith(STORAGE_PROBLEM) for problem in workers_by_problem):
        advice = (": each Dask worker reads the images and writes the store with its own storage settings: give it "
                  "this machine's (CELLSEG_CONFIG, or AWS_* and FSSPEC_S3_ENDPOINT_URL or CELLSEG_STORAGE__S3__* in its "
                  "environment) and restart it")
    raise ValueError(f"Dask workers at {address} cannot run this run's tasks: " + "; ".join(
        f"{problem} ({', '.join(workers)})" for problem, workers in workers_by_problem.items()) + advice)


STORAGE_PROBLEM = "reaching"


def worker_storage_problems(urls: dict[str, str]) -> list[str]:
    """Run on a Dask worker: what stops it reaching the run's URLs (setting -> URL) with its own
    cellseg settings (CELLSEG_CONFIG, CELLSEG_*, AWS_*, fsspec's configuration), as the shards do:
    its settings refused, missing or refused credentials, denied access, an endpoint it cannot
    connect to. One problem at most (the first URL's): the others have the same cause. An object
    not there yet (a new store) is no problem, nor a read that timed out (the shards retry those)."""
    from cellseg.io import filesystem
    from cellseg.redact import redact_text
    from cellseg.settings import load_settings
    from cellseg.storage_errors import storage_error

    try:
        load_settings().apply_storage()
    except ValueError as error:
        return [f"its cellseg settings are refused ({redact_text(str(error))})"]
    for name, url in urls.items():
        try:
            fs, path = filesystem(url)
            fs.info(path)
        except FileNotFoundError:  # a new store, or a missing bucket, which the run names itself
            continue
        except Exception as error:  # noqa: BLE001 - what is no storage problem the run reports itself
            problem = storage_error(url, error)
            if problem is None or (problem.transient and not problem.unreachable):
                continue
            return [f"{STORAGE_PROBLEM} {name} {problem}"]
    return []


def worker_view(local_paths: list[str], protocols: list[str]) -> dict[str, Any]:
    """What a Dask worker has of a run's needs: its cellseg version, the packages it lacks (Prefect,
    a filesystem for each of `protocols`) and which of `local_paths` it cannot see."""
    import fsspec

    missing = [name for name in ("prefect",) if importlib.util.find_spec(name) is None]
    for protocol in protocols:
        try:
            fsspec.get_filesystem_class(protocol)
        except ImportError as error:
            missing.append(f"{error.name or protocol} (for {protocol}://)")
    return {"version": __version__, "missing": missing, "unseen": [path for path in local_paths if not os.path.exists(path)]}


def _worker_problems(view: dict[str, Any], local: dict[str, str]) -> list[str]:
    problems = [] if view["version"] == __version__ else [f"runs cellseg {view['version']}, this machine {__version__}"]
    problems += [f"lacks the package {name}" for name in view["missing"]]
    for name, path in local.items():
        if path in view["unseen"]:
            where = ", a relative path each worker reads in its own folder" if not os.path.isabs(path) else ""
            problems.append(f"cannot see {name} '{path}'{where}")
    return problems


def lost_scheduler_error(error: Exception, dask_address: str | None) -> ValueError | None:
    """The one line for shards that Dask cancelled because the scheduler went away mid-run; None
    for any other error."""
    if dask_address is None:
        return None
    from distributed.client import FutureCancelledError

    if not (isinstance(error, FutureCancelledError) and "scheduler-connection-lost" in str(error)):
        return None
    return ValueError(f"lost the Dask scheduler at {dask_address} (dask_address) mid-run: the images segmented so far "
                      "are kept in the store; start the scheduler again and rerun to segment the rest")
