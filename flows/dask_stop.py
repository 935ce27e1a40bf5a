"""A run's shards on a Dask cluster stopped with the run. Shards in the run's own process see a
`threading.Event` (`cellseg.jobs_shards.stopped_when_left_by_an_error`); those on the cluster's
workers, in other processes and on other machines, read a `distributed.Event` named for the run,
which the run sets on the scheduler when it is interrupted, cancelled or stopped. A shard then ends
after writing the images it has predicted, instead of segmenting the rest of its shard after its
run has gone.

The event of an interrupted run stays set on the scheduler (a shard that starts late must still
see it), one small entry per interrupted run for the scheduler's lifetime."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager

from cellseg.flows.dask_checks import DASK_CONNECT_SECONDS
from cellseg.redact import redact_text, redact_url

logger = logging.getLogger("cellseg.flows")

STOP_POLL_SECONDS = 1.0  # how often a shard asks the scheduler: each ask is a round trip


def cluster_stop_name(key: str) -> str:
    """The name of the run `key`'s stop event on its Dask scheduler."""
    return f"cellseg-stop-{key}"


class ClusterStop:
    """The stop flag of a shard on a Dask worker: whether the run `key`'s event is set on the
    scheduler, asked at most once every `poll_seconds`, and once set, set for good. Where no
    scheduler can be asked (not on a worker, or the scheduler gone), nothing says stop."""

    def __init__(self, key: str, poll_seconds: float = STOP_POLL_SECONDS):
        self.name = cluster_stop_name(key)
        self.poll_seconds = poll_seconds
        self._set = False
        self._next_ask = 0.0

    def is_set(self) -> bool:
        now = time.monotonic()
        if self._set or now < self._next_ask:
            return self._set
        self._next_ask = now + self.poll_seconds
        try:
            from distributed import Event

            self._set = bool(Event(self.name).is_set())
        except Exception as error:  # noqa: BLE001 - a flag that cannot be read stops nothing
            logger.debug("cannot read the run's stop event %s (%s)", self.name, type(error).__name__)
        return self._set


@contextmanager
def shards_on_cluster_stopped_when_left_by_an_error(dask_address: str | None, key: str) -> Iterator[None]:
    """Within the block, run `key`'s shards on the Dask cluster at `dask_address` (none: nothing to
    do) read `ClusterStop(key)`; left by an exception (Ctrl-C, a cancellation, SIGTERM), the block
    sets the run's event on the scheduler, so they end after writing what they have predicted."""
    try:
        yield
    except BaseException:
        if dask_address:
            set_cluster_stop(dask_address, key)
        raise


def set_cluster_stop(dask_address: str, key: str) -> None:
    """Set run `key`'s stop event on the scheduler at `dask_address`; said, not raised, when it
    cannot be: the run is ending anyway, and its shards there then finish their images."""
    from distributed import Client, Event

    try:
        with Client(dask_address, timeout=DASK_CONNECT_SECONDS, set_as_default=False) as client:
            Event(cluster_stop_name(key), client=client).set()
    except Exception as error:  # noqa: BLE001 - see the docstring
        logger.warning("could not tell this run's shards on the Dask cluster at %s to stop (%s: %s): each "
                       "finishes its shard", redact_url(dask_address), type(error).__name__, redact_text(str(error)))
