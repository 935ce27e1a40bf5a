"""s3fs's S3FileSystem with its own retries bounded, imported by fsspec for the first s3:// URL of
a process (`settings.CellsegSettings.apply_storage` registers this module for it), so that a
command that never touches S3 does not pay s3fs's import (about 0.27 s) at its start.

s3fs repeats timed-out and throttled requests 5 times around botocore's own attempts: one layer of
retries (botocore's) keeps an unreachable endpoint's failure bounded. Every attempt's outcome is
reported to `cellseg.storage_errors.note_s3_attempt`, which tells a stalled endpoint (one that
took connections and answered nothing) from a slow answer.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import s3fs

from cellseg.storage_errors import note_s3_attempt

s3fs.S3FileSystem.retries = 1
S3FileSystem = s3fs.S3FileSystem  # the class itself, so that its instances and type checks are s3fs's own
_set_session = s3fs.S3FileSystem.set_session


async def _set_session_reporting_attempts(self: Any, refresh: bool = False, kwargs: Any = None) -> Any:
    client = await _set_session(self, refresh=refresh, kwargs=kwargs or {})
    client.meta.events.register("response-received.s3", partial(_report, client.meta.endpoint_url),
                                unique_id="cellseg-report-attempts")
    return client


def _report(endpoint_url: str, response_dict: Any = None, exception: BaseException | None = None, **_: Any) -> None:
    note_s3_attempt(endpoint_url, response_dict is not None, exception)


s3fs.S3FileSystem.set_session = _set_session_reporting_attempts
