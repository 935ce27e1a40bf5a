"""The settings the command line runs with, from four places in this order of precedence:

1. command-line flags (`cellseg train --epochs 5`),
2. environment variables `CELLSEG_<FIELD>`, nested fields joined by `__`
   (`CELLSEG_TRAINING__EPOCHS=5`, `CELLSEG_PREDICT__THRESHOLD=0.4`,
   `CELLSEG_STORAGE__S3__ENDPOINT_URL=http://...`), or a whole section as JSON; `null` unsets,
3. a TOML or YAML file named by `--config FILE` or `CELLSEG_CONFIG` (same nesting as the fields;
   a `cellseg.toml` in the current folder is not read unless named, and a warning says so),
4. the defaults of the configuration models in `cellseg.config`.

`cellseg config show` prints the result with secrets masked. Storage options are handed to
fsspec's configuration (`apply_storage`), so every read and write of that protocol uses them,
beneath the limits of `storage_timeouts`: each storage request gives up after `connect_seconds`
connecting or `read_seconds` waiting for data, and is tried at most `attempts` times.

A settings file is bounded before and while it is parsed (size, nesting, values counted with
YAML aliases expanded), and so are CELLSEG_* values given as JSON: a hostile file is refused
in well under a second, naming it.
"""

from __future__ import annotations

import codecs
import contextvars
import copy
import difflib
import json
import logging
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast, get_origin
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    InitSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10
    import tomli as tomllib

from cellseg import s3_direct
from cellseg.config import ModelConfig, PredictConfig, TrainConfig, Url
from cellseg.paths import DEFAULT_REGISTRY_URL, LOCAL_ROOT
from cellseg.redact import redact, redact_text, redact_url

CONFIG_ENV = "CELLSEG_CONFIG"
MAX_FILE_BYTES = 64 * 1024  # settings files are a few hundred bytes; pure-Python YAML parses 64 KiB in about a second
MAX_ENV_CHARS = 64 * 1024
MAX_DEPTH = 32
MAX_VALUES = 10_000  # values in a file or a JSON environment variable, each YAML alias counted where it is used
_ALIASES = {"s3": "s3a", "http": "https"}
S3_PROTOCOLS = ("s3", "s3a")  # what fsspec opens with s3fs
_applied_limits: dict[str, dict[str, Any]] = {}
logger = logging.getLogger(__name__)
_file_values: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar("cellseg_file_values", default=None)


class SettingsError(ValueError):
    """A settings file that cannot be used; the message names it."""


class StorageTimeouts(BaseModel):
    """How long one storage request (s3, http) may wait, and how often it is tried, so that an
    endpoint that never answers fails in bounded time: about attempts x (connect or read
    seconds), plus botocore's backoff between attempts (at most 20 s each)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # A dead endpoint fails after about attempts x connect_seconds: 4 x 5 s, under half a minute.
    connect_seconds: float = Field(5.0, gt=0, le=600, description="give up connecting after this long")
    read_seconds: float = Field(30.0, gt=0, le=3600, description="give up when no data arrives for this long")
    attempts: int = Field(4, ge=1, le=10, description="tries of each s3 request (throttling, 5xx, timeouts); "
                                                       "http requests are tried once")

    def fsspec_options(self) -> dict[str, dict[str, Any]]:
        """These limits as fsspec options per protocol: botocore's config for s3, aiohttp's for http."""
        from aiohttp import ClientTimeout

        # botocore's "max_attempts" counts retries only (and it rewrites that key in place); "total_max_attempts" counts tries.
        retries = {"total_max_attempts": self.attempts, "mode": "standard"}
        http = {"client_kwargs": {"timeout": ClientTimeout(total=None, sock_connect=self.connect_seconds,
                                                           sock_read=self.read_seconds)}}
        return {"s3": {"config_kwargs": {"connect_timeout": self.connect_seconds, "read_timeout": self.read_seconds,
                                         "retries": retries}},
                "http": http}


class CellsegSettings(BaseSettings):
    """Everything a `cellseg` command takes from flags, environment and config file."""

    model_config = SettingsConfigDict(env_prefix="CELLSEG_", env_nested_delimiter="__", env_parse_none_str="null",
                                      extra="forbid", frozen=True)

    registry_url: Url = Field(DEFAULT_REGISTRY_URL, description="model registry URL (directory or bucket prefix)")
    local_root: str = Field(
        LOCAL_ROOT, min_length=1,
        description="this machine's folder for the dataset cache and training/tuning runs (cache/, training/, "
                    "tuning/ under it); relative to where a command or flow run starts",
    )
    storage: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="fsspec options per protocol, e.g. {'s3': {'endpoint_url': ..., 'key': ..., 'secret': ...}}",
    )
    storage_timeouts: StorageTimeouts = StorageTimeouts()
    direct_s3_writes: bool = Field(
        True, description="write results to S3-compatible servers (not AWS's own endpoint) with obstore, a fraction of "
                          "s3fs's CPU per request, where it writes as s3fs would (cellseg.s3_direct); false: through s3fs",
    )
    model: ModelConfig = ModelConfig()
    training: TrainConfig = TrainConfig()
    predict: PredictConfig = PredictConfig()

    @field_validator("storage", mode="after")
    @classmethod
    def _booleans_from_text(cls, storage: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        # Environment variables are text: CELLSEG_STORAGE__S3__ANON=false must not read as a truthy "false".
        def convert(value: Any) -> Any:
            if isinstance(value, dict):
                return {key: convert(item) for key, item in value.items()}
            if isinstance(value, str) and value.lower() in ("true", "false"):
                return value.lower() == "true"
            return value

        return convert(storage)

    @field_validator("storage", mode="after")
    @classmethod
    def _endpoints_are_web_urls(cls, storage: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        # botocore refuses any other endpoint only at the first request, as a traceback (htp://) or
        # a line naming no setting (a missing scheme): name the setting before any work starts.
        for protocol in S3_PROTOCOLS:
            options = storage.get(protocol) or {}
            client_kwargs = options.get("client_kwargs")
            for name, value in (("endpoint_url", options.get("endpoint_url")),
                                ("client_kwargs.endpoint_url",
                                 client_kwargs.get("endpoint_url") if isinstance(client_kwargs, dict) else None)):
                if value not in (None, "") and not _web_url(value):
                    shown = redact_url(value) if isinstance(value, str) else type(value).__name__
                    raise ValueError(f"storage.{protocol}.{name} must be an http:// or https:// URL with a host, "
                                     f"such as http://minio.lab:9000 (got {shown[:80]!r})")
        return storage

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, env_settings, InitSettingsSource(settings_cls, init_kwargs=_file_values.get() or {})

    def apply_storage(self) -> None:
        """Merge the storage options into fsspec's configuration, which every filesystem of
        that protocol created afterwards (listing, reading, zarr stores) starts from: the limits
        of `storage_timeouts` first, then fsspec's own configuration and `storage`, which win.
        Also turns the direct S3 writes on or off (`direct_s3_writes`)."""
        import fsspec
        import fsspec.config

        if "s3fs" in sys.modules:  # imported already: fsspec may hold its class, so bound it now
            import cellseg.s3_retries  # noqa: F401
        else:  # bounded when fsspec first imports it for an s3:// URL, not at every command's start
            for protocol in S3_PROTOCOLS:
                fsspec.register_implementation(protocol, "cellseg.s3_retries.S3FileSystem", clobber=True)
        limits = self.storage_timeouts.fsspec_options()
        # fsspec merges the options of the protocols one class serves shallowly, the alias last:
        # an alias with options of its own (s3a, https) needs the limits too.
        limits |= {alias: limits[base] for base, alias in _ALIASES.items()
                   if alias in fsspec.config.conf or alias in self.storage}
        for protocol in limits.keys() | self.storage.keys():
            # Limits applied before (by other settings in this process) are replaced, not kept as if given.
            current = _without(fsspec.config.conf.get(protocol, {}), _applied_limits.get(protocol, {}))
            options = merged(merged(limits.get(protocol, {}), current), self.storage.get(protocol, {}))
            fsspec.config.conf[protocol] = copy.deepcopy(options)  # clients may edit their options in place
        _applied_limits.clear()
        _applied_limits.update(limits)
        s3_direct.enable(self.direct_s3_writes)

    def masked(self) -> dict[str, Any]:
        """The settings as plain data with every secret replaced by a mask (`cellseg.redact.redact`):
        values under names like key/secret/token/password/auth, and credentials inside strings."""
        return cast("dict[str, Any]", redact(self.model_dump(mode="json")))


def _web_url(value: Any) -> bool:
    """Whether `value` is an http:// or https:// URL with a host name (and a numeric port, if any)."""
    if not isinstance(value, str):
        return False
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises for a port that is not a number
    except ValueError:
        return False
    return parts.scheme.lower() in ("http", "https") and bool(parts.hostname)


def config_file_path(config_file: str | None = None) -> Path | None:
    """The settings file named by `config_file` or $CELLSEG_CONFIG, checked; None when neither is set."""
    if config_file == "":  # `--config "$FILE"` with FILE unset must not run on the defaults
        raise SettingsError("--config is given an empty name; name a settings file")
    name = config_file or os.environ.get(CONFIG_ENV) or None
    if name is None:
        return None
    path = Path(name).expanduser()
    if path.suffix.lower() not in (".toml", ".yaml", ".yml"):
        raise SettingsError(f"settings file '{path}' must end in .toml, .yaml or .yml")
    if path.is_dir():
        raise SettingsError(f"settings file '{path}' is a directory; name the file in it")
    if not path.exists():
        raise SettingsError(f"settings file '{path}' does not exist")
    if not path.is_file():
        raise SettingsError(f"settings file '{path}' is not a regular file")
    return path


UNNAMED_SETTINGS_FILES = ("cellseg.toml", "cellseg.yaml", "cellseg.yml")
# The unnamed settings files warned of in this process: settings are loaded several times in one
# flow run (the flow, then each task), and the warning is news only once per file.
_warned_unnamed: set[Path] = set()


def _warn_of_unnamed_settings_files() -> None:
    """Warn (once per file in a process) that a settings file in the current folder is not read:
    only --config and CELLSEG_CONFIG name one, and a file left beside the data looked as if it
    took effect."""
    for name in UNNAMED_SETTINGS_FILES:
        if Path(name).is_file():
            path = Path(name).resolve()
            if path not in _warned_unnamed:
                _warned_unnamed.add(path)
                logger.warning("%s in this folder is not read: name it with --config %s or %s=%s",
                               name, name, CONFIG_ENV, path)
            return


def read_settings_file(path: Path) -> dict[str, Any]:
    """The nested settings of a TOML or YAML file of at most MAX_FILE_BYTES, MAX_DEPTH levels
    and MAX_VALUES values; SettingsError naming the file for anything else."""
    where = f"settings file '{path}'"
    kind = "TOML" if path.suffix.lower() == ".toml" else "YAML"
    with path.open("rb") as file:
        raw = file.read(MAX_FILE_BYTES + 1)
    if len(raw) > MAX_FILE_BYTES:
        raise SettingsError(f"{where} is over {MAX_FILE_BYTES // 1024} KiB, the limit for settings")
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        raise SettingsError(f"{where} is UTF-16 text (as Windows saves 'Unicode'); save it as UTF-8")
    try:
        text = raw.decode("utf-8-sig")  # a byte-order mark, as Windows editors write, is no setting
        data = tomllib.loads(text) if kind == "TOML" else yaml.load(text, Loader=_BoundedSafeLoader)
    except UnicodeDecodeError as error:
        raise SettingsError(f"{where} is not UTF-8 text (byte {error.start})") from error
    except yaml.MarkedYAMLError as error:
        raise SettingsError(f"{where} is not valid YAML: {_yaml_problem(error)}") from error
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as error:
        raise SettingsError(f"{where} is not valid {kind}: {' '.join(str(error).split())}") from error
    except RecursionError as error:
        raise SettingsError(f"{where} is nested deeper than {MAX_DEPTH} levels") from error
    except ValueError as error:  # Python refuses integers of over 4300 digits
        raise SettingsError(f"{where} holds a value out of range: {str(error).split(';')[0]}") from error
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SettingsError(f"{where} must hold a mapping of settings, not {type(data).__name__}")
    _check_shape(data, where)
    return data


class _BoundedSafeLoader(yaml.SafeLoader):
    """yaml.SafeLoader bounded for settings: nesting depth, and mappings grown by merge keys
    (`<<: *x` copies entries, where a plain alias shares them and is counted by `_check_shape`;
    older PyYAML releases copied repeated merges too, which grows a mapping exponentially)."""

    depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.depth >= MAX_DEPTH:
            raise yaml.composer.ComposerError(None, None, f"nested deeper than {MAX_DEPTH} levels",
                                              self.peek_event().start_mark)
        self.depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def flatten_mapping(self, node: Any) -> None:
        super().flatten_mapping(node)
        if len(node.value) > MAX_VALUES:
            raise yaml.constructor.ConstructorError(None, None, f"merge keys make a mapping of over {MAX_VALUES} "
                                                    "entries", node.start_mark)


def _yaml_problem(error: yaml.MarkedYAMLError) -> str:
    """A YAML error on one line, without the snippet of the file PyYAML adds (it may hold a secret)."""
    mark = error.problem_mark or error.context_mark
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    return " ".join(part for part in (error.context, error.problem) if part) + where


def _check_shape(data: Any, where: str) -> None:
    """Refuse settings nested deeper than MAX_DEPTH, with more than MAX_VALUES values (a YAML
    alias counted each time it is used: the alias bomb) or holding anything but text, numbers,
    booleans, lists and mappings with text keys. Never shows a value: it may be a secret."""
    count = 0
    stack: list[tuple[Any, str, int]] = [(data, "", 0)]
    while stack:
        value, name, depth = stack.pop()
        count += 1
        if count > MAX_VALUES:
            raise SettingsError(f"{where} holds over {MAX_VALUES} values (YAML aliases counted each time they are used)")
        if depth > MAX_DEPTH:
            raise SettingsError(f"{where} is nested deeper than {MAX_DEPTH} levels (at {_shortened(name)})")
        if isinstance(value, dict):
            for key, item in value.items():
                if not isinstance(key, str):
                    raise SettingsError(f"{where}: key {_shortened(str(key))!r} under "
                                        f"{_shortened(name) or 'the top level'} is not text (quote it)")
                stack.append((item, f"{name}.{key}" if name else key, depth + 1))
        elif isinstance(value, list):
            stack.extend((item, f"{name}[{index}]", depth + 1) for index, item in enumerate(value))
        elif value is not None and not isinstance(value, str | int | float | bool):
            raise SettingsError(f"{where}: {_shortened(name)} is a {type(value).__name__}; settings hold text, "
                                "numbers, booleans, lists and mappings (quote it)")


def _shortened(name: str, limit: int = 80) -> str:
    """A dotted setting name for a message, its middle cut when long (keys may be anything)."""
    return name if len(name) <= limit else f"{name[: limit // 2]}…{name[-limit // 2:]}"


def _check_environment() -> None:
    """Bound the CELLSEG_* environment variables before pydantic-settings parses them, the same
    way as a settings file (a whole section may be given as JSON)."""
    for name, value in os.environ.items():
        if not name.upper().startswith("CELLSEG_"):
            continue
        where = f"environment variable {name}"
        _check_setting_name(name)
        if len(value) > MAX_ENV_CHARS:
            raise SettingsError(f"{where} is over {MAX_ENV_CHARS // 1024} KiB, the limit for settings")
        if value.lstrip()[:1] in ("{", "[") or _takes_json(name):
            try:
                parsed = json.loads(value)
            except json.JSONDecodeError as error:
                if not _takes_json(name):
                    continue  # text that starts like JSON, such as a secret
                # pydantic-settings says `error parsing value for field "storage" from source "EnvSettingsSource"`.
                section = ".".join(name.lower().removeprefix("cellseg_").split("__"))
                raise SettingsError(f"{where} ({section}) is not valid JSON ({error.msg} at line {error.lineno}, "
                                    f"column {error.colno}): give the section as a JSON object") from None
            except RecursionError as error:
                raise SettingsError(f"{where} is nested deeper than {MAX_DEPTH} levels") from error
            except ValueError as error:  # Python refuses integers of over 4300 digits
                raise SettingsError(f"{where} holds a value out of range: {str(error).split(';')[0]}") from error
            _check_shape(parsed, where)


def _takes_json(variable: str) -> bool:
    """Whether the CELLSEG_* `variable` names a section (predict, predict__selection, storage,
    storage__s3), whose value is JSON, rather than a single setting."""
    names = variable.lower().removeprefix("cellseg_").split("__")
    return _section(names) is not None or (names[0] == "storage" and len(names) <= 2)


# CELLSEG_* variables that are not settings: the settings file's name, and switches read directly.
OTHER_VARIABLES = {CONFIG_ENV}


def _check_setting_name(name: str) -> None:
    """Refuse a CELLSEG_* variable that names no setting (pydantic-settings passes over a top-level
    one without a word, so a typo left a setting at its default)."""
    field = name.upper().removeprefix("CELLSEG_").split("__", 1)[0].lower()
    if field in CellsegSettings.model_fields or name.upper() in OTHER_VARIABLES:
        return
    fields = list(CellsegSettings.model_fields)
    close = difflib.get_close_matches(field, fields, n=1, cutoff=0.75)
    known = [f"CELLSEG_{known.upper()}" for known in fields] + sorted(OTHER_VARIABLES)
    hint = f" (did you mean CELLSEG_{close[0].upper()}?)" if close else f" (settings: {', '.join(known)})"
    raise SettingsError(f"environment variable {name} names no cellseg setting{hint}")


def merged(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """`base` with `over` on top, nested mappings merged key by key."""
    result = dict(base)
    for key, value in over.items():
        below = result.get(key)
        result[key] = merged(below, value) if isinstance(below, Mapping) and isinstance(value, Mapping) else value
    return result


def _without(options: Mapping[str, Any], applied: Mapping[str, Any]) -> dict[str, Any]:
    """`options` less the entries that still hold the value `applied` gave them."""
    kept: dict[str, Any] = {}
    for key, value in options.items():
        given = applied.get(key)
        if isinstance(value, Mapping) and isinstance(given, Mapping):
            if rest := _without(value, given):
                kept[key] = rest
        elif key not in applied or value != given:
            kept[key] = value
    return kept


def load_settings(config_file: str | None = None, overrides: Mapping[str, Any] | None = None) -> CellsegSettings:
    """Settings from `overrides` (the flags, as nested dicts) over the environment over the file."""
    path = config_file_path(config_file)
    if path is None:
        _warn_of_unnamed_settings_files()
    _check_environment()
    file_values = read_settings_file(path) if path else {}
    token = _file_values.set(file_values)
    try:
        return CellsegSettings(**dict(overrides or {}))
    except ValidationError as error:
        where = _sources_of(error, overrides or {}, file_values, path)
        raise SettingsError(f"invalid settings (from {where}): {describe_invalid(error)}"
                            f"{_unknown_variables(error)}") from error
    finally:
        _file_values.reset(token)


def _sources_of(error: ValidationError, flags: Mapping[str, Any], file_values: Mapping[str, Any],
                path: Path | None) -> str:
    """Which of the flags, the CELLSEG_* variables and the file gave the values `error` refuses,
    in that order; all three where it cannot tell."""
    variables = [name.upper() for name in os.environ if name.upper().startswith("CELLSEG_")]
    flagged = environment = filed = False
    for item in error.errors(include_url=False):
        names = _field_names(item["loc"], CellsegSettings)
        variable = "CELLSEG_" + "__".join(names).upper()
        flagged |= _holds(flags, names)
        # A variable for the field, for a field below it, or for a section above it (JSON).
        environment |= any(name == variable or name.startswith(variable + "__") or variable.startswith(name + "__")
                           for name in variables)
        filed |= _holds(file_values, names)
    named = [source for source, gave in (("flags", flagged), ("CELLSEG_* environment variables", environment),
                                         (f"settings file '{path}'", filed)) if gave]
    if not named:
        named = ["flags", "CELLSEG_* environment variables"] + ([f"settings file '{path}'"] if path else [])
    return ", ".join(named[:-1]) + " and " + named[-1] if len(named) > 1 else named[0]


def _holds(values: Mapping[str, Any], names: list[str]) -> bool:
    """Whether the nested mappings `values` give the field `names` leads to (an empty section gives nothing)."""
    for name in names:
        if not isinstance(values, Mapping) or name not in values:
            return False
        values = values[name]
    return values != {}



def _unknown_variables(error: ValidationError) -> str:
    """The CELLSEG_* variables that gave fields `error` refuses as unknown, each with the nearest
    field of its section: a typo in a nested name (CELLSEG_TRAINING__PATIENC) is then named as set."""
    named = []
    variables = {name.upper() for name in os.environ}
    for item in error.errors(include_url=False):
        names = [str(part) for part in item["loc"]]
        variable = "CELLSEG_" + "__".join(names).upper()
        if item["type"] != "extra_forbidden" or variable not in variables:
            continue
        section = _section(names[:-1])
        close = difflib.get_close_matches(names[-1], list(section.model_fields), n=1, cutoff=0.75) if section else []
        named.append(variable + (f" (did you mean CELLSEG_{'__'.join([*names[:-1], close[0]]).upper()}?)"
                                 if close else ""))
    return f"; set by environment variable {', '.join(named)}" if named else ""


def _section(names: list[str], model: type[BaseModel] = CellsegSettings) -> type[BaseModel] | None:
    """The model of the section `names` leads to from `model` (`model` itself for []), None
    where it is no model."""
    for name in names:
        field = model.model_fields.get(name)
        annotation = field.annotation if field is not None else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        model = annotation
    return model

def describe_invalid(error: ValidationError) -> str:
    """A pydantic error on one line: each field, what is wrong and the value given, credentials
    masked; values under `storage` are never shown (a malformed section may hold its secrets).
    An unknown field is named with the nearest known one of its section (`predict.treshold`:
    did you mean predict.threshold?); a field of several types says once what each one wants."""
    model = _cellseg_model(error.title)
    problems: dict[tuple[str, ...], list[str]] = {}
    shown_values: dict[tuple[str, ...], str] = {}
    for item in error.errors(include_url=False):
        names = _field_names(item["loc"], model) if model else [str(part) for part in item["loc"]]
        problem = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden" and model is not None:
            problem += _nearest_field(names, model)
        problems.setdefault(tuple(names), []).append(problem)
        value = item.get("input")
        if names[:1] != ["storage"] and (value is None or isinstance(value, str | int | float)):
            shown = repr(redact(value, names[-1] if names else ""))
            shown_values[tuple(names)] = f" (got {shown[:80] + '…' if len(shown) > 80 else shown})"
    return redact_text("; ".join(f"{'.'.join(names) or error.title}: {' or '.join(dict.fromkeys(messages))}"
                                 f"{shown_values.get(names, '')}" for names, messages in problems.items()))


def _field_names(loc: tuple[int | str, ...], model: type[BaseModel]) -> list[str]:
    """The field names and list positions of an error's location in `model`, without the tags
    pydantic adds for each type a field may have (`z.constrained-int`, `z.literal['max']`)."""
    names: list[str] = []
    section: type[BaseModel] | None = model
    in_mapping = False  # below a field holding a mapping (storage), every key is a name
    for part in loc:
        if in_mapping or isinstance(part, int):
            names.append(str(part))
            continue
        if section is None:
            continue
        names.append(part)
        field = section.model_fields.get(part)
        annotation = field.annotation if field is not None else None
        in_mapping = get_origin(annotation) is dict
        section = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    return names


def _nearest_field(names: list[str], model: type[BaseModel]) -> str:
    """' (did you mean <section>.<field>?)' for the unknown field `names` leads to, when one of
    its section's fields is close to it; '' otherwise."""
    section = _section(names[:-1], model)
    if section is None:
        return ""
    # A field of a sub-section given a level too high (`threshold` outside [predict]), else a misspelling.
    meant = [".".join([*names[:-1], name, names[-1]]) for name in section.model_fields
             if (below := _section([name], section)) is not None and names[-1] in below.model_fields]
    meant = meant or [".".join([*names[:-1], close])
                      for close in difflib.get_close_matches(names[-1], list(section.model_fields), n=1, cutoff=0.75)]
    return f" (did you mean {' or '.join(meant)}?)" if meant else ""


def _cellseg_model(title: str) -> type[BaseModel] | None:
    """The cellseg model class named `title` (a ValidationError's title), among those imported."""
    pending: list[type[BaseModel]] = [BaseModel]
    while pending:
        model = pending.pop()
        if model.__name__ == title and model.__module__.startswith("cellseg."):
            return model
        pending.extend(model.__subclasses__())
    return None
