"""One-line errors for storage that cannot be reached or used, naming the URL and the cause.

fsspec, s3fs, botocore and aiohttp raise dozens of exception types for a handful of problems: a
missing fsspec package (gcsfs, adlfs), missing credentials, a refused or unreachable endpoint, a
request timed out, a missing bucket, access denied, a storage option the filesystem refuses.
`storage_call(url)` turns each into a `StorageError` naming `url`, where a URL is first touched
(listing, reading, opening a store, loading a checkpoint or a registry version), so the CLI prints
one line (exit status 2) and a flow fails with it; `cellseg.cli.main` translates what escapes
elsewhere (`storage_error`).
"""

from __future__ import annotations

import importlib.util
import logging
import re
import socket
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit

from cellseg.redact import redact_text, redact_url

# What a filesystem's client raises for a storage option it does not take, or one that sets what
# another sets too; s3fs hands its options on to aiobotocore only at the first request.
_REFUSED_OPTION = re.compile(r"got (an unexpected|multiple values for) keyword argument '(\w+)'")
# S3 error codes that refuse the credentials themselves (an unknown key, a wrong secret, an expired
# or malformed session token), as opposed to AccessDenied: known credentials without the permission.
REFUSED_CREDENTIAL_CODES = frozenset({
    "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken", "TokenRefreshRequired",
    "InvalidClientTokenId", "UnrecognizedClientException", "AuthFailure"})
CREDENTIAL_SETTINGS = ("AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), or storage.s3.key and "
                       ".secret in the settings")


class StorageError(ValueError):
    """Storage that cannot be reached or used; the message names the URL and the cause.

    `transient` errors (a read timeout, a refused connection) may pass on their own, so a flow's
    task retries are worth it; the others (no credentials, credentials refused, access denied, a
    missing package) need someone to fix them. `unreachable` errors name an endpoint that no
    connection could be made to in any of the storage layer's attempts (refused, timed out
    connecting, no route, host name not found), or one that took connections but answered none
    of them (stalled): a dead endpoint, which more task retries would only wait on
    (`cellseg.flows._common.retry_unless_bad_input` retries a refused or stalled one once, for a blip).
    """

    def __init__(self, message: str, transient: bool = False, unreachable: bool = False):
        super().__init__(message)
        self.transient = transient
        self.unreachable = unreachable

    def __reduce__(self) -> tuple[Any, ...]:  # keeps the flags across processes (Dask, Prefect results)
        return (type(self), (str(self), self.transient, self.unreachable))


@contextmanager
def storage_call(url: str) -> Iterator[None]:
    """Raise the errors of the storage behind `url` as a StorageError naming it; others pass unchanged."""
    try:
        yield
    except StorageError:
        raise
    except Exception as error:
        translated = storage_error(url, error)
        if translated is None:
            raise
        raise translated from error


def storage_error(url: str | None, error: BaseException) -> StorageError | None:
    """`error`, raised while reaching `url` (None: a URL not known here), as a one-line
    StorageError; None when it is no storage problem."""
    if isinstance(error, StorageError):
        return error
    if isinstance(error, ImportError):
        return _missing_package(url) if url else None
    named = f"'{redact_url(url)}': " if url else ""
    import aiohttp
    from botocore import exceptions as boto
    from fsspec.exceptions import FSTimeoutError

    chain = _chain(error)
    if refused := credentials_refused(url, error):
        return refused
    for cause in chain:
        if isinstance(cause, boto.NoCredentialsError | boto.PartialCredentialsError | boto.CredentialRetrievalError):
            return StorageError(
                f"{named}no credentials ({cause}): set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE, "
                "or storage.s3.key and .secret in the settings (anon: true for a public bucket)")
    for cause in chain:
        if isinstance(cause, boto.ConnectTimeoutError | aiohttp.ConnectionTimeoutError):
            return _timed_out(url, cause, "connect")
        if isinstance(cause, boto.ReadTimeoutError | FSTimeoutError | TimeoutError):
            return _timed_out(url, cause, "read")
    for cause in chain:
        if isinstance(cause, boto.EndpointConnectionError | boto.ConnectionClosedError | aiohttp.ClientConnectorError
                      | ConnectionError):
            # No connection made at all (refused, no route, no such host), not one closed on the way.
            unreachable = isinstance(cause, boto.EndpointConnectionError | aiohttp.ClientConnectorError) or any(
                isinstance(inner, ConnectionRefusedError | socket.gaierror) for inner in chain)
            return StorageError(f"{named}cannot connect to {_endpoint(url, cause)} ({_reason(chain)})", transient=True,
                                unreachable=unreachable)
    for cause in chain:
        if isinstance(cause, boto.ClientError) and cause.response.get("Error", {}).get("Code") == "NoSuchBucket":
            bucket = f" '{url.split('://', 1)[1].split('/', 1)[0]}'" if url and "://" in url else ""
            return StorageError(f"{named}the bucket{bucket} does not exist (NoSuchBucket): check its name, or create "
                                "it; cellseg never creates one")
    for cause in chain:
        if isinstance(cause, boto.ParamValidationError):  # checked before any request: "Invalid bucket name ..."
            problem = str(cause).strip().splitlines()[-1]
            if problem.startswith("Invalid bucket name"):
                problem = f"{problem.split(': ', 1)[0]}: a bucket's name holds only letters, digits, '.', '-' and '_'"
            return StorageError(f"{named}{redact_text(problem)[:300]}")
    for cause in chain:
        if isinstance(cause, boto.EndpointResolutionError) or (
                isinstance(cause, ValueError) and str(cause).startswith("Invalid endpoint:")):
            return _bad_endpoint(url)
    if refused := _refused_option(url, chain):
        return refused
    if isinstance(error, PermissionError):
        return StorageError(f"{named}access denied ({error}){unexplained_denial(error)}")
    return None


def unexplained_denial(error: BaseException) -> str:
    """What to check when access was denied by a bare 403 (an answer to a HEAD request has no
    body to say why): either the credentials or their permissions; "" for a denial that says why."""
    from botocore.exceptions import ClientError

    if any(isinstance(cause, ClientError) and _error_code(cause) == "403" for cause in _chain(error)):
        return f"; the endpoint gave no reason: check {CREDENTIAL_SETTINGS}, and their permissions"
    return ""


def credentials_refused(url: str | None, error: BaseException) -> StorageError | None:
    """`error` as a StorageError saying that the endpoint refused the credentials it was sent (an
    unknown key, a wrong secret, an expired token), naming where credentials come from, never
    their values; None when `error` is no such refusal."""
    from botocore.exceptions import ClientError

    for cause in _chain(error):
        if isinstance(cause, ClientError) and (code := _error_code(cause)) in REFUSED_CREDENTIAL_CODES:
            return _credentials_refused(url, code, cause)
    return None


def _error_code(error: Any) -> str:
    return str(error.response.get("Error", {}).get("Code", ""))


def _credentials_refused(url: str | None, code: str, cause: Any) -> StorageError:
    named = f"'{redact_url(url)}': " if url else ""
    server = _configured_endpoint(url) or "the S3 endpoint"
    said = redact_text(str(cause.response.get("Error", {}).get("Message") or code)).strip().splitlines()[0]
    return StorageError(f"{named}{server} refused the credentials ({code}: {said}): check {CREDENTIAL_SETTINGS}, "
                        "and that they are this endpoint's")


def _configured_endpoint(url: str | None) -> str | None:
    """scheme://host:port of the endpoint fsspec's configuration gives the protocol of `url`; None when unset (AWS)."""
    given = _endpoint_setting(url)[1]
    return _origin(given) if isinstance(given, str) else None


def _endpoint_setting(url: str | None) -> tuple[str, Any]:
    """(the protocol of `url`, s3 without one; the endpoint URL fsspec's configuration gives it, or None)."""
    import fsspec.config

    protocol = _protocol(url) if url else "s3"
    options = fsspec.config.conf.get(protocol, {})
    return protocol, options.get("endpoint_url") or options.get("client_kwargs", {}).get("endpoint_url")


def _origin(address: str) -> str | None:
    """scheme://host:port of an http(s) URL (never a user name or password); None for any other."""
    parts = urlsplit(address)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return None
    try:
        port = f":{parts.port}" if parts.port else ""
    except ValueError:  # a port that is not a number
        port = ""
    return f"{parts.scheme}://{parts.hostname}{port}"


def _bad_endpoint(url: str | None) -> StorageError:
    """botocore refused the endpoint URL it was given (no scheme, or one other than http/https)."""
    protocol, given = _endpoint_setting(url)
    named = f"'{redact_url(url)}': " if url else ""
    if not given:  # given in code (`storage_options=`), not in the settings
        return StorageError(f"{named}the endpoint URL is not an http:// or https:// URL (in the storage options given)")
    return StorageError(f"{named}the endpoint URL '{redact_url(str(given))}' is not an http:// or https:// URL: fix "
                        f"storage.{protocol}.endpoint_url in the settings (or FSSPEC_{protocol.upper()}_ENDPOINT_URL)")


def _chain(error: BaseException) -> list[BaseException]:
    """`error` and what caused it, outermost first (at most 16 deep: causes can form loops)."""
    chain = [error]
    while len(chain) < 16 and (cause := chain[-1].__cause__ or chain[-1].__context__) is not None:
        chain.append(cause)
    return chain


def _refused_option(url: str | None, chain: list[BaseException]) -> StorageError | None:
    """The storage option that the filesystem of `url` refused, named with the settings that gave
    it (never its value: it may be a secret); None when the refused argument is no configured option."""
    import fsspec.config

    named = f"'{redact_url(url)}': " if url else ""
    for cause in chain:
        if not isinstance(cause, TypeError) or not (match := _REFUSED_OPTION.search(str(cause))):
            continue
        kind, argument = match.groups()
        own = _protocol(url) if url else None
        for protocol in sorted(fsspec.config.conf, key=lambda protocol: protocol != own):  # the URL's own first
            if (option := _option_path(fsspec.config.conf[protocol], argument)) is None:
                continue
            return StorageError(f"{named}{protocol}:// {_refused(kind, option)}; fix storage.{protocol} in the settings "
                                "(or fsspec's own configuration)")
        if url:  # an option given in code (`storage_options=`), not in the settings
            return StorageError(f"{named}{_protocol(url)}:// {_refused(kind, argument)} (in the storage options given)")
    return None


def _refused(kind: str, option: str) -> str:
    return (f"takes no storage option '{option}'" if kind == "an unexpected"
            else f"storage option '{option}' sets what another option sets too")


def _option_path(options: Any, name: str) -> str | None:
    """The dotted path of the key `name` in the nested options (client_kwargs.region_name); None if absent."""
    if not isinstance(options, Mapping):
        return None
    if name in options:
        return name
    for key, value in options.items():
        if (inner := _option_path(value, name)) is not None:
            return f"{key}.{inner}"
    return None


def _protocol(url: str) -> str:
    from fsspec.core import split_protocol

    return split_protocol(url)[0] or "file"


def _missing_package(url: str) -> StorageError | None:
    """'gs://...': gs:// needs gcsfs (pip install gcsfs), when the protocol's package is not installed."""
    from fsspec.registry import known_implementations

    protocol = _protocol(url)
    implementation = known_implementations.get(protocol, {}).get("class", "")
    package = implementation.split(".")[0]
    if not package or importlib.util.find_spec(package) is not None:
        return None
    return StorageError(f"'{redact_url(url)}': {protocol}:// needs {package}: pip install {package}")


def _timed_out(url: str | None, cause: BaseException, phase: str) -> StorageError:
    """A request to the endpoint behind `url` timed out connecting, or waiting for the answer."""
    from botocore.exceptions import BotoCoreError

    connect, read, attempts = _limits(_protocol(url) if url else "s3" if isinstance(cause, BotoCoreError) else "http")
    seconds = connect if phase == "connect" else read
    after = f" after {seconds:g} s" if seconds else ""
    what = f"connecting to {_endpoint(url, cause)}" if phase == "connect" else \
        f"waiting for {_endpoint(url, cause)} to answer"
    tried = f", tried {attempts} times" if attempts and attempts > 1 else ""
    named = f"'{redact_url(url)}': " if url else ""
    stalled = phase == "read" and _never_answered(cause)
    because = "; it took the connections but answered no request" if stalled else ""
    # An endpoint that took no connection in any attempt is down: the attempts already spent
    # attempts x connect seconds on it, and task retries would spend that again (no `transient`).
    # One that took connections and answered none is stalled: one task retry, as for a refused one.
    return StorageError(f"{named}timed out{after} {what} ({type(cause).__name__}{tried}{because}; "
                        f"storage_timeouts in the settings set the limits)", transient=phase != "connect",
                        unreachable=phase == "connect" or stalled)


# What this process has seen of each S3 endpoint, attempt by attempt (`cellseg.s3_retries` reports
# every attempt botocore makes): the hosts that answered a request (any HTTP status), and the read
# timeouts of each host requests went to.
_answering_hosts: set[str] = set()
_read_timeouts: dict[str, int] = {}
_waits_said: dict[str, float] = {}  # host: when a timed-out attempt to it was last said (monotonic)
WAIT_SAID_EVERY = 10.0  # seconds between two lines about one host's timed-out attempts
logger = logging.getLogger("cellseg.storage")


def note_s3_attempt(endpoint_url: str, answered: bool, error: BaseException | None) -> None:
    """Record one attempt of a request to the S3 endpoint `endpoint_url` (the client's): whether
    it got an answer, or the error it ended with."""
    from botocore.exceptions import ReadTimeoutError

    if answered:
        _answering_hosts.add(urlsplit(endpoint_url).netloc)
    elif isinstance(error, ReadTimeoutError):
        host = urlsplit(getattr(error, "kwargs", {}).get("endpoint_url") or endpoint_url).netloc
        _read_timeouts[host] = _read_timeouts.get(host, 0) + 1
        # Each timed-out attempt costs storage_timeouts.read_seconds (30 s): said, or a run waiting on
        # an endpoint that never answers looks hung for minutes before its error.
        if time.monotonic() - _waits_said.get(host, -WAIT_SAID_EVERY) >= WAIT_SAID_EVERY:
            _waits_said[host] = time.monotonic()
            logger.info("'%s' did not answer in time (timed-out tries so far: %d); trying again while the storage "
                        "settings' attempts allow", redact_url(endpoint_url), _read_timeouts[host])


def _never_answered(cause: BaseException) -> bool:
    """Whether the S3 host that `cause` (a read timeout) names timed out in this process and never
    answered a request: every attempt of every call to it timed out."""
    host = urlsplit(getattr(cause, "kwargs", {}).get("endpoint_url") or "").netloc
    if not host or not _read_timeouts.get(host):
        return False
    # A virtual-hosted bucket's requests go to bucket.host, the client's endpoint is host.
    return not any(host == answering or host.endswith(f".{answering}") for answering in _answering_hosts)


def botocore_attempts(retries: Mapping[str, Any]) -> int | None:
    """How many times botocore tries a request with this `retries` config: its
    "total_max_attempts" counts tries, its "max_attempts" retries; None when neither is set."""
    if retries.get("total_max_attempts"):
        return int(retries["total_max_attempts"])
    return int(retries["max_attempts"]) + 1 if "max_attempts" in retries else None


def _limits(protocol: str) -> tuple[float | None, float | None, int | None]:
    """(connect seconds, read seconds, attempts) that fsspec's configuration gives `protocol`."""
    import fsspec.config

    options = fsspec.config.conf.get(protocol, {})
    if protocol in ("s3", "s3a"):
        config = options.get("config_kwargs", {})
        return config.get("connect_timeout"), config.get("read_timeout"), botocore_attempts(config.get("retries", {}))
    timeout = options.get("client_kwargs", {}).get("timeout")
    return getattr(timeout, "sock_connect", None), getattr(timeout, "sock_read", None), None


def _endpoint(url: str | None, cause: BaseException) -> str:
    """scheme://host:port of the server that failed (never a user name or password)."""
    import aiohttp

    request = getattr(cause, "kwargs", {}).get("endpoint_url")  # botocore names the request URL
    if origin := _origin(request or url or ""):
        return origin
    if isinstance(cause, aiohttp.ClientConnectorError):
        return f"{cause.host}:{cause.port}"
    return f"the {_protocol(url)} endpoint" if url else "the storage endpoint"


def _reason(chain: list[BaseException]) -> str:
    """Why a connection failed, in words: the innermost operating-system error of `chain`."""
    for cause in reversed(chain):
        if isinstance(cause, ConnectionRefusedError):
            return "connection refused: nothing listens there"
        if isinstance(cause, socket.gaierror):
            return f"host name not found: {cause.strerror}"
        if isinstance(cause, OSError) and cause.strerror:
            return cause.strerror
    return str(chain[0])
