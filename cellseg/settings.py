"""The settings the command line runs with, from four places in this order of precedence:

1. command-line flags (`cellseg train --epochs 5`),
2. environment variables `CELLSEG_<FIELD>`, nested fields joined by `__`
   (`CELLSEG_TRAINING__EPOCHS=5`, `CELLSEG_PREDICT__THRESHOLD=0.4`,
   `CELLSEG_STORAGE__S3__ENDPOINT_URL=http://...`), or a whole section as JSON,
3. a TOML or YAML file named by `--config FILE` or `CELLSEG_CONFIG` (same nesting as the fields),
4. the defaults of the configuration models in `cellseg.config`.

`cellseg config show` prints the result with secrets masked. Storage options are handed to
fsspec's configuration (`apply_storage`), so every read and write of that protocol uses them.
"""

from __future__ import annotations

import contextvars
import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError, field_validator
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

from cellseg.config import ModelConfig, PredictConfig, TrainConfig, Url
from cellseg.paths import DEFAULT_REGISTRY_URL

CONFIG_ENV = "CELLSEG_CONFIG"
MASK = "********"
_SECRET_NAME = re.compile(r"secret|password|passwd|token|key|credential|session", re.IGNORECASE)
_URL_PASSWORD = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)(?P<user>[^:/@\s]+):[^@/\s]+@", re.IGNORECASE)
_file_values: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar("cellseg_file_values", default=None)


class SettingsError(ValueError):
    """A settings file that cannot be used; the message names it."""


class CellsegSettings(BaseSettings):
    """Everything a `cellseg` command takes from flags, environment and config file."""

    model_config = SettingsConfigDict(env_prefix="CELLSEG_", env_nested_delimiter="__", extra="forbid", frozen=True)

    registry_url: Url = Field(DEFAULT_REGISTRY_URL, description="model registry URL (directory or bucket prefix)")
    storage: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="fsspec options per protocol, e.g. {'s3': {'endpoint_url': ..., 'key': ..., 'secret': ...}}",
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
        that protocol created afterwards (listing, reading, zarr stores) starts from."""
        import fsspec.config

        for protocol, options in self.storage.items():
            fsspec.config.conf[protocol] = {**fsspec.config.conf.get(protocol, {}), **options}

    def masked(self) -> dict[str, Any]:
        """The settings as plain data with every secret replaced by a mask: values under names
        like key/secret/token/password, and passwords inside URLs."""
        return _mask(self.model_dump(mode="json"))


def config_file_path(config_file: str | None = None) -> Path | None:
    """The settings file named by `config_file` or $CELLSEG_CONFIG, checked; None when neither is set."""
    name = config_file or os.environ.get(CONFIG_ENV) or None
    if name is None:
        return None
    path = Path(name).expanduser()
    if path.suffix not in (".toml", ".yaml", ".yml"):
        raise SettingsError(f"settings file '{path}' must end in .toml, .yaml or .yml")
    if not path.is_file():
        raise SettingsError(f"settings file '{path}' does not exist")
    return path


def read_settings_file(path: Path) -> dict[str, Any]:
    """The nested settings of a TOML or YAML file."""
    text = path.read_text()
    try:
        data = tomllib.loads(text) if path.suffix == ".toml" else yaml.safe_load(text)
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as error:
        raise SettingsError(f"settings file '{path}' is not valid {path.suffix[1:].upper()}: {error}") from error
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SettingsError(f"settings file '{path}' must hold a mapping of settings, not {type(data).__name__}")
    return data


def load_settings(config_file: str | None = None, overrides: Mapping[str, Any] | None = None) -> CellsegSettings:
    """Settings from `overrides` (the flags, as nested dicts) over the environment over the file."""
    path = config_file_path(config_file)
    token = _file_values.set(read_settings_file(path) if path else {})
    try:
        return CellsegSettings(**dict(overrides or {}))
    except ValidationError as error:
        where = "flags, CELLSEG_* environment variables" + (f" and settings file '{path}'" if path else "")
        raise SettingsError(f"invalid settings (from {where}):\n{error}") from error
    finally:
        _file_values.reset(token)


def _mask(value: Any, name: str = "") -> Any:
    if isinstance(value, dict):
        return {key: _mask(item, str(key)) for key, item in value.items()}
    if isinstance(value, list):
        return [_mask(item, name) for item in value]
    if value is not None and _SECRET_NAME.search(name) and not isinstance(value, bool):
        return MASK
    if isinstance(value, str):
        return _URL_PASSWORD.sub(lambda match: f"{match['scheme']}{match['user']}:{MASK}@", value)
    return value
