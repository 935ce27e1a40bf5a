"""Writing a result's objects to an S3-compatible server with obstore (Rust's `object_store`)
instead of through s3fs and botocore, whose Python machinery costs about 1 ms of CPU per request
on the cores the model needs (docs/performance.md, "Storage").

A writer is made for a zarr store on s3fs only where it can reproduce what s3fs would do: the
same endpoint and addressing style (read from a URL botocore signs; not AWS's own endpoint,
whose buckets s3fs may find in other regions), the same static credentials (given, from the
environment or a profile; credentials that expire stay with botocore, which refreshes them), the
same timeouts and attempts, and no option that changes a write (server-side encryption, ACLs,
requester pays, versions, other botocore settings; a certificate bundle named by AWS_CA_BUNDLE is
trusted too). Its first write proves it: if that fails, the store is written through s3fs from
then on and the reason is logged once. After that, a failed write raises OSError naming the
object. `enable(False)` (settings: `direct_s3_writes = false`) turns it off in the process.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from cellseg.redact import redact_text, redact_url
from cellseg.storage_errors import botocore_attempts

if TYPE_CHECKING:
    from obstore.store import ClientConfig, RetryConfig, S3Credential

logger = logging.getLogger(__name__)

_enabled = threading.Event()
_enabled.set()
# Each writer is kept with its filesystem (s3fs keeps one per set of options), one per bucket prefix
# and process (obstore's runtime threads do not survive a fork).
_writers: weakref.WeakKeyDictionary[Any, dict[tuple[str, int], DirectS3Writer | None]] = weakref.WeakKeyDictionary()
_writers_lock = threading.Lock()
# Options s3fs takes that change nothing about a plain PUT, or that the writer takes over.
_NEUTRAL_OPTIONS = {"key", "secret", "token", "endpoint_url", "anon", "max_concurrency", "use_listings_cache",
                    "listings_expiry_time", "max_paths", "skip_instance_cache", "asynchronous", "loop",
                    "default_block_size", "default_fill_cache", "default_cache_type", "cache_regions", "profile",
                    "use_ssl", "client_kwargs", "config_kwargs", "fixed_upload_size"}
_NEUTRAL_CLIENT_KWARGS = {"region_name", "endpoint_url"}
# botocore settings that change nothing about what a PUT writes (or that the writer takes over).
_NEUTRAL_CONFIG_KWARGS = {"connect_timeout", "read_timeout", "retries", "s3", "max_pool_connections", "tcp_keepalive",
                          "request_checksum_calculation", "response_checksum_validation", "user_agent_extra"}
MAX_CERTIFICATE_BYTES = 16 * 1024 * 1024
_UNNAMEABLE = re.compile(r"[\x00-\x1f\x7f]")
# A whole PUT's bound: the read timeout bounds each wait, this the request (a 4 MB chunk on a
# slow link takes tens of seconds, so it is well above obstore's default of 30 s).
_REQUEST_SECONDS = 600


def enable(on: bool) -> None:
    """Write S3 objects directly where possible (the default), or always through s3fs."""
    if on:
        _enabled.set()
    else:
        _enabled.clear()


def enabled() -> bool:
    return _enabled.is_set()


@dataclass
class DirectS3Writer:
    """PUTs objects under `prefix` of one bucket; `write` says whether it did."""

    store: Any  # obstore.store.S3Store
    bucket: str
    prefix: str
    filesystem: Any  # the s3fs instance, whose listing cache the writes invalidate
    proven: bool = False
    failed: str | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    async def write(self, objects: Sequence[tuple[str, bytes]]) -> bool:
        """PUT every (key, bytes) concurrently, keys relative to the prefix. False when the caller
        must write them another way: this writer has given up, or a key is one obstore cannot
        name (nothing is then known to be written). OSError, naming an object, once its writes
        have worked before."""
        if self.failed is not None or not _enabled.is_set():
            return False
        if not all(_nameable(key) for key, _ in objects):
            return False  # s3fs writes these (an image named with a control character, say)
        import obstore

        tasks = [asyncio.ensure_future(obstore.put_async(self.store, key, data)) for key, data in objects]
        try:
            await asyncio.gather(*tasks)
        except BaseException as error:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            failed_key = next((key for (key, _), task in zip(objects, tasks, strict=True)
                               if task.done() and not task.cancelled() and task.exception() is not None), objects[0][0])
            if not isinstance(error, Exception):
                raise
            message = redact_text(str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__)
            with self._lock:
                if not self.proven:
                    if self.failed is None:  # writes under way together all fail: say it once
                        self.failed = message
                        logger.warning("writing s3://%s/%s directly failed (%s): it is written through s3fs instead",
                                       self.bucket, self.prefix, message)
                    return False
            raise _os_error(error, f"s3://{self.bucket}/{self._full(failed_key)}", message) from error
        finally:
            for key, _ in objects:
                self.filesystem.invalidate_cache(f"{self.bucket}/{self._full(key)}")
        self.proven = True
        return True

    def _full(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key


def _nameable(key: str) -> bool:
    """Whether obstore takes `key` as it is: it refuses ASCII control characters and empty, '.'
    and '..' segments (object_store's `Path::parse`), where s3fs would write them."""
    return not _UNNAMEABLE.search(key) and all(part not in ("", ".", "..") for part in key.split("/"))


def _os_error(error: BaseException, url: str, message: str) -> OSError:
    """obstore's error as the OSError s3fs would raise, so that it is handled alike: a refused or
    timed-out request (cellseg.storage_errors: transient), access denied (the store cannot be
    written), a missing bucket."""
    import obstore.exceptions as failures

    kind: type[OSError] = OSError
    if isinstance(error, failures.NotFoundError):
        kind = FileNotFoundError
    elif isinstance(error, (failures.PermissionDeniedError, failures.UnauthenticatedError)):
        kind = PermissionError
    elif "kind: Timeout" in str(error):  # obstore's debug text is the only place that says which
        kind = TimeoutError
    elif "kind: Connect" in str(error):
        kind = ConnectionError
    return kind(f"cannot write '{redact_url(url)}': {message}")


def writers_of(path: str) -> list[DirectS3Writer | None]:
    """What was decided for the store at `path` ("bucket/prefix"), in every filesystem that wrote
    it: a writer (proven, or given up: `failed`), or None where s3fs writes it."""
    with _writers_lock:
        return [writer for by_key in _writers.values() for (written, _), writer in by_key.items() if written == path]


async def direct_writer(store: Any) -> DirectS3Writer | None:
    """The direct writer of a zarr store on s3fs (`zarr.storage.FsspecStore`), made once per
    filesystem and bucket prefix; None where one would not write as s3fs does, or when off."""
    if not _enabled.is_set():
        return None
    filesystem = getattr(store, "fs", None)
    path = getattr(store, "path", None)
    if filesystem is None or not isinstance(path, str) or type(filesystem).__name__ != "S3FileSystem":
        return None
    key = (path, os.getpid())
    with _writers_lock:
        cached = _writers.get(filesystem, {})
        if key in cached:
            return cached[key]
    writer = await _make_writer(filesystem, path)
    with _writers_lock:
        _writers.setdefault(filesystem, {})[key] = writer
    return writer


async def _make_writer(filesystem: Any, path: str) -> DirectS3Writer | None:
    reason = _unsupported(filesystem)
    bucket, _, prefix = path.strip("/").partition("/")
    if reason is None and not bucket:
        reason = "no bucket"
    if reason is not None:
        logger.debug("s3://%s is written through s3fs: %s", path, reason)
        return None
    try:
        client = await filesystem.set_session()
        endpoint, virtual_hosted = await _bucket_endpoint(client, bucket)
        host = urlsplit(endpoint).hostname or ""
        if host == "amazonaws.com" or host.endswith(".amazonaws.com"):
            # AWS's own endpoint: s3fs finds a bucket's region itself; keep its requests there.
            logger.debug("s3://%s is written through s3fs: an AWS endpoint", path)
            return None
        credentials = await _static_credentials(filesystem)
        if credentials is None:
            logger.debug("s3://%s is written through s3fs: its credentials are refreshed by botocore", path)
            return None
        from obstore.store import S3Store

        store = S3Store(
            bucket, prefix=prefix or None, endpoint=endpoint, region=client.meta.region_name or "us-east-1",
            virtual_hosted_style_request=virtual_hosted, skip_signature=False,
            credential_provider=_Credentials(*credentials),
            client_options=_client_options(filesystem, endpoint), retry_config=_retry_config(filesystem),
        )
    except Exception as error:  # noqa: BLE001 - any failure here only means s3fs writes, as before
        logger.debug("s3://%s is written through s3fs: %s", path, redact_text(str(error)))
        return None
    return DirectS3Writer(store, bucket, prefix, filesystem)


async def _bucket_endpoint(client: Any, bucket: str) -> tuple[str, bool]:
    """Where botocore sends this bucket's requests: (endpoint, whether the bucket is in the host
    name), read from a URL it signs (offline) with its own endpoint and addressing rules."""
    url = urlsplit(await client.generate_presigned_url("put_object", Params={"Bucket": bucket, "Key": "k"}, ExpiresIn=60))
    base = f"{url.scheme}://{url.netloc}"
    if url.netloc.startswith(f"{bucket}."):
        return base + url.path[: -len("/k")], True
    if not url.path.endswith(f"/{bucket}/k"):
        raise ValueError(f"botocore's URL for bucket '{bucket}' has an unexpected form")
    return base + url.path[: -len(f"/{bucket}/k")], False


def _unsupported(filesystem: Any) -> str | None:
    """Why s3fs's options for this filesystem would make its writes differ from a plain PUT."""
    options = dict(getattr(filesystem, "storage_options", {}) or {})
    extra = sorted(set(options) - _NEUTRAL_OPTIONS)
    if extra:
        return f"options {extra}"
    if options.get("anon") or getattr(filesystem, "anon", False):
        return "anonymous access"
    if getattr(filesystem, "s3_additional_kwargs", None) or getattr(filesystem, "requester_pays", False) \
            or getattr(filesystem, "version_aware", False):
        return "options that change each write"
    client_kwargs = dict(getattr(filesystem, "client_kwargs", {}) or {})
    if set(client_kwargs) - _NEUTRAL_CLIENT_KWARGS:
        return f"client options {sorted(set(client_kwargs) - _NEUTRAL_CLIENT_KWARGS)}"
    config_kwargs = dict(getattr(filesystem, "config_kwargs", {}) or {})
    if set(config_kwargs) - _NEUTRAL_CONFIG_KWARGS:
        return f"botocore options {sorted(set(config_kwargs) - _NEUTRAL_CONFIG_KWARGS)}"
    # Of botocore's S3 options only the addressing style, which the endpoint follows (_bucket_endpoint).
    if set(dict(config_kwargs.get("s3") or {})) - {"addressing_style"}:
        return f"botocore's s3 options {sorted(config_kwargs['s3'])}"
    return None


async def _static_credentials(filesystem: Any) -> tuple[str, str, str | None] | None:
    """The key, secret and token botocore signs with, when they never change; else None."""
    if filesystem.key and filesystem.secret:
        return filesystem.key, filesystem.secret, filesystem.token
    credentials = await filesystem.session.get_credentials()
    if credentials is None or hasattr(credentials, "refresh_needed"):
        return None
    frozen = await credentials.get_frozen_credentials()
    if not frozen.access_key or not frozen.secret_key:
        return None
    return frozen.access_key, frozen.secret_key, frozen.token


class _Credentials:
    """obstore's credential provider for static credentials (passing them this way keeps
    obstore from mixing in AWS_* variables of the environment)."""

    def __init__(self, key: str, secret: str, token: str | None) -> None:
        self._credential: S3Credential = {"access_key_id": key, "secret_access_key": secret, "token": token,
                                          "expires_at": None}

    def __call__(self) -> S3Credential:
        return self._credential

    def __repr__(self) -> str:
        return "_Credentials(***)"


def _client_options(filesystem: Any, endpoint: str) -> ClientConfig:
    config = dict(getattr(filesystem, "config_kwargs", {}) or {})
    options: ClientConfig = {"timeout": timedelta(seconds=_REQUEST_SECONDS)}
    if "connect_timeout" in config:
        options["connect_timeout"] = timedelta(seconds=float(config["connect_timeout"]))
    if "read_timeout" in config:
        options["read_timeout"] = timedelta(seconds=float(config["read_timeout"]))
    if urlsplit(endpoint).scheme == "http":
        options["allow_http"] = True
    elif bundle := os.environ.get("AWS_CA_BUNDLE"):
        # botocore trusts this bundle's certificates; obstore adds them to the system's roots.
        with open(bundle, "rb") as file:
            certificates = file.read(MAX_CERTIFICATE_BYTES + 1)
        if len(certificates) > MAX_CERTIFICATE_BYTES:
            raise ValueError(f"AWS_CA_BUNDLE '{bundle}' is over {MAX_CERTIFICATE_BYTES} bytes")
        options["root_certificate"] = certificates
    return options


def _retry_config(filesystem: Any) -> RetryConfig:
    retries = dict(getattr(filesystem, "config_kwargs", {}) or {}).get("retries", {}) or {}
    attempts = botocore_attempts(retries) or 4  # botocore's own default: 3 retries
    return {"max_retries": max(0, attempts - 1), "retry_timeout": timedelta(seconds=_REQUEST_SECONDS),
            "backoff": {"init_backoff": timedelta(milliseconds=100), "max_backoff": timedelta(seconds=20), "base": 2}}
