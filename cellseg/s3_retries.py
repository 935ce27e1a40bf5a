"""s3fs's S3FileSystem with its own retries bounded, imported by fsspec for the first s3:// URL of
a process (`settings.CellsegSettings.apply_storage` registers this module for it), so that a
command that never touches S3 does not pay s3fs's import (about 0.27 s) at its start.

s3fs repeats timed-out and throttled requests 5 times around botocore's own attempts: one layer of
retries (botocore's) keeps an unreachable endpoint's failure bounded.
"""

from __future__ import annotations

import s3fs

s3fs.S3FileSystem.retries = 1
S3FileSystem = s3fs.S3FileSystem  # the class itself, so that its instances and type checks are s3fs's own
