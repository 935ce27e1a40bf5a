"""Checks that a Dask cluster can run a run's tasks, made before any task is sent, and the one line
for a run whose scheduler went away: a run on a cluster otherwise fails late and obscurely (every
image recorded as failed, a wait for workers that never come, an unpickling error)."""

from __future__ import annotations

import importlib.util
import os
from typing import Any

from cellseg import __version__

DASK_CONNECT_SECONDS = 10


def check_dask_workers(address: str, paths: dict[str, str]) -> None:
    """Fail in one line, before any task is sent, when the Dask cluster at `address` cannot run
    the run's tasks: no scheduler answers, it has no workers, or a worker runs another cellseg
    version, lacks a package the run needs, or cannot see one of the local `paths` (setting -> path)."""
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
        try:
            views = client.run(worker_view, sorted(local.values()), protocols)
        except Exception as error:  # noqa: BLE001 - anything a worker cannot unpickle or run
            raise ValueError(f"the Dask workers at {address} cannot run cellseg's tasks ({type(error).__name__}: "
                             f"{error}): each needs this machine's cellseg, with its orchestration extra, and a restart "
                             "after an upgrade") from None
    workers_by_problem: dict[str, list[str]] = {}
    for worker, view in sorted(views.items()):
        for problem in _worker_problems(view, local):
            workers_by_problem.setdefault(problem, []).append(worker)
    if workers_by_problem:
        advice = (": use URLs every machine reads (s3://...) or folders mounted at the same absolute path on every worker"
                  if any("cannot see" in problem for problem in workers_by_problem) else "")
        raise ValueError(f"Dask workers at {address} cannot run this run's tasks: " + "; ".join(
            f"{problem} ({', '.join(workers)})" for problem, workers in workers_by_problem.items()) + advice)


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
