"""Credentials out of everything cellseg shows, logs or stores: URLs, option mappings, free text.

- `redact_url`: a URL with its password (and a bare http(s) user name, the usual place of an
  access token) and its secret query or fragment parameters (`X-Amz-Signature`, `sig`, `token`...)
  masked; the user name and everything else kept, so the URL still says which file it is.
- `redact`: nested options (settings, fsspec storage options, stored attributes): the value under
  any secret-looking name (key, secret, token, password, passphrase, auth, Authorization, Cookie,
  X-Api-Key, ...) masked whole, and every string passed through `redact_text`.
- `redact_text`: free-form text (error messages, log lines): URLs as above, `name=value` and
  `"name": value` pairs with a secret-looking name, and HTTP authorization headers.

The real values stay in memory for I/O; only what leaves the process is redacted. All three are
idempotent: redacting twice gives what redacting once gave.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from typing import Any

MASK = "********"

# A name is secret when it contains one of these (case-insensitive) or is one of the short names.
_SECRET_PARTS = ("secret", "passw", "passphrase", "token", "key", "credential", "session", "signature", "auth",
                 "cookie", "private")
_SECRET_NAMES = frozenset({"sig", "pw", "pwd", "pass", "sas"})
_KEPT_VALUES = frozenset({"null", "none", "true", "false", ""})
# Schemes whose bare user name is a login name, no secret (sftp://alice@host); in any other URL
# (https://TOKEN@host, a mistyped htp://TOKEN@host, s3://KEY@bucket) a bare user name is masked.
_LOGIN_SCHEMES = frozenset({"sftp", "ssh", "scp", "ftp", "ftps", "smb", "hdfs", "webhdfs"})

_PARTS = "|".join(_SECRET_PARTS)
_SHORT = "|".join(sorted(_SECRET_NAMES))
# A secret-looking name as a whole token: it contains one of the parts, or is one of the short names.
# (A look-ahead, then the token: linear time, where a pattern around the part would backtrack.)
_NAME = rf"(?=(?i:[\w.-]*?(?:{_PARTS})|(?:{_SHORT})(?![\w.-])))[\w.-]+"
_QUOTED = r"'[^'\n]*'|\"[^\"\n]*\""

# A URL ends at a space, quote, bracket or ';' (which separates the fields of connection strings).
_URL = r"(?P<url>(?<![\w+.-])[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>;]*)"
# "name": value and 'name': value, as in JSON and Python reprs of mappings.
_QUOTED_PAIR = (rf"(?P<qhead>(?P<q>['\"]){_NAME}(?P=q)\s*:\s*)"
                rf"(?P<qvalue>{_QUOTED}|\[[^\]\n]*\]|\([^)\n]*\)|\{{[^{{}}\n]*\}}|[^\s,}}\]]+)")
# Authorization: Basic ..., Cookie: ..., X-Api-Key: ... (HTTP headers as printed by clients).
_HEADER = (r"(?P<hhead>(?<![\w-])(?i:(?:proxy-)?authori[sz]ation|(?:set-)?cookie"
           r"|x-(?=[\w-]*?(?:key|token|auth|secret|signature))[\w-]+)[ \t]*:[ \t]*)"
           rf"(?P<hvalue>{_QUOTED}|[^\r\n'\",}}]+)")
# name=value (query strings, connection strings, keyword reprs).
_ASSIGNMENT = rf"(?P<ehead>(?<![\w.-]){_NAME}=)(?P<evalue>{_QUOTED}|[^&;\s'\",)}}\]]+)"
# name: value as in YAML, lower-case names only (`KeyError: x` stays as it is), but a settings error
# about a field so named (`predict.api_key: Extra inputs are not permitted (got '********')`).
_PYDANTIC_PROBLEM = r"(?!Extra inputs are not permitted|Field required|Input should )"
_YAML_PAIR = (rf"(?P<yhead>(?<![\w.-])(?=[a-z0-9_.-]*?(?:{_PARTS})|(?:{_SHORT})[ \t]*:)[a-z0-9_.-]+[ \t]*:[ \t]+)"
              rf"{_PYDANTIC_PROBLEM}(?P<yvalue>{_QUOTED}|[^\s'\",}}\]][^\r\n,}}\]]*)")

# C0 and C1 control characters but newline and tab: a file name holding ESC sequences would
# otherwise drive the terminal it is printed on.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")

_TEXT = re.compile("|".join((_URL, _QUOTED_PAIR, _HEADER, _ASSIGNMENT, _YAML_PAIR)))
_PARAMETER = re.compile(_ASSIGNMENT)
# The look-behind starts a scheme only at a word boundary: linear time on long runs of letters.
_AUTHORITY = re.compile(r"(?<![A-Za-z0-9+.-])(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)://(?P<authority>[^/?#\s'\"<>]*)")


def is_secret_name(name: str) -> bool:
    """Whether a value called `name` (an option, header, query parameter) holds a credential,
    or would if it were spelt right: `secrt`, `pasword` and `tokn` are masked too."""
    lowered = name.lower()
    return (lowered in _SECRET_NAMES or any(part in lowered for part in _SECRET_PARTS)
            or _misspelt_secret(lowered))


# Whole names a misspelling is compared with: the parts, and the spellings they are cut from.
_SECRET_WORDS = (*_SECRET_PARTS, "password", "secret_key", "access_key", "credentials", "session_token")
MISSPELLING_SIMILARITY = 0.8  # difflib's ratio: one letter left out of, added to or changed in a 5-letter word


def _misspelt_secret(lowered: str) -> bool:
    if len(lowered) < 4:  # a short name is too close to too many words
        return False
    return any(difflib.SequenceMatcher(None, lowered, word).ratio() >= MISSPELLING_SIMILARITY for word in _SECRET_WORDS)


def redact_url(url: str) -> str:
    """`url` with its password, a bare user name (not a login scheme's: sftp://alice@host) and
    secret query/fragment parameters masked: `https://bob:pw@host/x?sig=abc` ->
    `https://bob:********@host/x?sig=********`."""
    if "://" not in url:
        return url
    scheme, _, rest = url.partition("://")
    if scheme.lower() in _BUCKET_SCHEMES and (found := _BUCKET_CREDENTIALS.match(rest)):
        url = f"{scheme}://{found['user']}:{MASK}@{rest[found.end():]}"  # a secret with '/', '?' or '#' in it
    url = _AUTHORITY.sub(_masked_authority, url)
    start = url.find("://")
    query = min((index for index in (url.find("?", start), url.find("#", start)) if index >= 0), default=-1)
    if query < 0:
        return url
    return url[:query] + _PARAMETER.sub(_masked_pair, url[query:])


# Protocols whose URL's first part is the bucket (or container): credentials written before an '@'
# there are read as part of its name, sent to the endpoint and echoed back in its errors.
_BUCKET_SCHEMES = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "oss", "r2"})
# USER:SECRET@ at the start: a user (an access key id) holds no '/', ':' or '@'; a secret may hold
# '/', '+', '?' or '#' (AWS secret keys are base64). Neither a bucket's name nor Azure's
# `container@account.dfs.core.windows.net` has a ':' before its '@'.
_BUCKET_CREDENTIALS = re.compile(r"(?P<user>[^/:@?#]*):(?P<secret>[^@]*)@")


def credentials_in_bucket_url(url: str) -> str | None:
    """Why `url` cannot be used when it is an object-store URL with credentials in it
    (`s3://KEY:SECRET@bucket/x`), with the secret masked; None otherwise."""
    scheme, _, rest = url.partition("://")
    if scheme.lower() not in _BUCKET_SCHEMES or not _BUCKET_CREDENTIALS.match(rest):
        return None
    return (f"'{redact_url(url)}' has credentials in it, which {scheme}:// URLs do not take (they would be read as "
            "part of the bucket's name): give them in the environment (for s3://, AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY) or in the storage settings (storage.<protocol>), and the URL without them")


def redact_text(text: str) -> str:
    """Free-form `text` with credentials masked: URLs (`redact_url`), `name=value`, `"name": value`
    and `name: value` with a secret-looking name, and HTTP Authorization/Cookie/API-key headers."""
    return _TEXT.sub(_masked_match, text)


def redact(value: Any, name: str = "") -> Any:
    """`value` (nested mappings, lists, strings) with every credential masked: the whole value under
    a secret-looking `name` or key, and credentials inside strings (`redact_text`)."""
    if value is None or isinstance(value, bool):
        return value
    if name and is_secret_name(name):
        return MASK
    if isinstance(value, Mapping):
        return {key: redact(item, str(key)) for key, item in value.items()}
    if isinstance(value, list | tuple):
        items = [redact(item) for item in value]
        return items if isinstance(value, list) else tuple(items)
    if isinstance(value, str):
        return redact_text(value)
    return value


def _masked_authority(match: re.Match[str]) -> str:
    userinfo, at, host = match["authority"].rpartition("@")
    if not at:
        return match[0]
    user, colon, _ = userinfo.partition(":")
    if colon:
        userinfo = f"{user}:{MASK}"
    elif match["scheme"].lower() not in _LOGIN_SCHEMES and userinfo:
        userinfo = MASK
    return f"{match['scheme']}://{userinfo}@{host}"


def _masked_pair(match: re.Match[str]) -> str:
    return match["ehead"] + MASK


def _masked_match(match: re.Match[str]) -> str:
    if match["url"] is not None:
        return redact_url(match["url"])
    if match["qhead"] is not None:
        if match["qvalue"].strip("'\"").lower() in _KEPT_VALUES:
            return match[0]
        return f"{match['qhead']}{match['q']}{MASK}{match['q']}"
    if match["hhead"] is not None:
        return match["hhead"] + MASK
    if match["ehead"] is not None:
        return match["ehead"] + MASK
    return match[0] if match["yvalue"].strip("'\"").lower() in _KEPT_VALUES else match["yhead"] + MASK


def terminal_safe(text: str) -> str:
    """`text` with control characters (ESC, CR, BEL, ... but newline and tab) shown as escapes
    (`\\x1b`), for text that may hold file names and goes to a terminal."""
    return _CONTROL.sub(lambda match: match[0].encode("unicode_escape").decode("ascii"), text)


def newlines_escaped(text: str) -> str:
    """`text` (a file name, an image id, a message quoting one) on one line: CR and LF as `\\r`,
    `\\n`. A name holding a newline split a one-line message in two, its second half a line of its own."""
    return text.replace("\r", "\\r").replace("\n", "\\n")


def shown(text: str) -> str:
    """Free text as it may be shown on a terminal: credentials masked, control characters escaped."""
    return terminal_safe(redact_text(text))
