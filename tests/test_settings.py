"""Settings: flags > CELLSEG_* environment > TOML/YAML file > defaults, `cellseg config show` with
secrets masked, and the settings reaching what the commands and flows actually do."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cellseg.redact import MASK
from cellseg.settings import SettingsError, load_settings
from cellseg.store import ResultStore
from tests.conftest import cellseg

pytestmark = pytest.mark.integration


TOML = """
registry_url = "file-registry"
[training]
epochs = 7
patience = 3
learning_rate = 0.002
[predict]
threshold = 0.35
[storage.s3]
endpoint_url = "http://admin:hunter2@127.0.0.1:9"
key = "AKIAFILEKEY"
secret = "file-secret-value"
"""


@pytest.mark.parametrize("suffix", [".toml", ".yaml"])
def test_flags_over_environment_over_file_over_defaults(tmp_path, suffix):
    import tomllib
    import yaml

    path = tmp_path / f"cellseg{suffix}"
    path.write_text(TOML if suffix == ".toml" else yaml.safe_dump(tomllib.loads(TOML)))
    env = {"CELLSEG_TRAINING__PATIENCE": "5", "CELLSEG_PREDICT__THRESHOLD": "0.4"}
    shown = json.loads(cellseg("config", "show", "--json", "--config", str(path), env=env).stdout)
    assert shown["registry_url"] == "file-registry"           # file over default
    assert shown["training"]["epochs"] == 7                    # file
    assert shown["training"]["patience"] == 5                  # environment over file
    assert shown["predict"]["threshold"] == 0.4
    assert shown["training"]["batch_size"] == 1                # default where nobody says otherwise

    via_env = json.loads(cellseg("config", "show", "--json", env={**env, "CELLSEG_CONFIG": str(path)}).stdout)
    assert via_env == shown

    settings = load_settings(str(path), {"training": {"patience": 9}})  # flags (as the CLI passes them) win
    assert (settings.training.patience, settings.training.epochs, settings.training.learning_rate) == (9, 7, 0.002)


def test_config_show_masks_secrets(tmp_path):
    path = tmp_path / "cellseg.toml"
    path.write_text(TOML)
    # A misspelt secret (secrt) is masked too; fsspec would refuse it, but its value is a secret all the same.
    env = {"CELLSEG_STORAGE__GCS__TOKEN": "env-token-value", "CELLSEG_STORAGE__GCS__SECRT": "typo-secret-value",
           "CELLSEG_STORAGE__GCS__CLIENT_KWARGS__REGION_NAME": "eu-west-1"}
    for output in (cellseg("config", "show", "--config", str(path), env=env).stdout,
                   cellseg("--config", str(path), "config", "show", "--json", env=env).stdout):
        for secret in ("AKIAFILEKEY", "file-secret-value", "hunter2", "env-token-value", "typo-secret-value"):
            assert secret not in output
        assert "127.0.0.1:9" in output and MASK in output
    shown = json.loads(cellseg("config", "show", "--json", "--config", str(path), env=env).stdout)
    assert shown["storage"]["s3"] == {"endpoint_url": f"http://admin:{MASK}@127.0.0.1:9", "key": MASK, "secret": MASK}
    assert shown["storage"]["gcs"] == {"token": MASK, "secrt": MASK, "client_kwargs": {"region_name": "eu-west-1"}}
    yaml_text = cellseg("config", "show", "--config", str(path)).stdout
    assert yaml_text.startswith("# cellseg") and f"file {path}" in yaml_text and "epochs: 7" in yaml_text


def test_bad_settings_are_refused_naming_the_file_and_field(tmp_path):
    missing = cellseg("config", "show", "--config", str(tmp_path / "nope.toml"), check=False)
    assert missing.returncode == 2 and "nope.toml' does not exist" in missing.stderr
    (tmp_path / "x.ini").write_text("[a]")
    assert "must end in .toml, .yaml or .yml" in cellseg("config", "show", "--config", str(tmp_path / "x.ini"), check=False).stderr
    (tmp_path / "broken.toml").write_text("training = [")
    broken = cellseg("config", "show", "--config", str(tmp_path / "broken.toml"), check=False)
    assert broken.returncode == 2 and "broken.toml' is not valid TOML" in broken.stderr
    (tmp_path / "typo.yaml").write_text("training:\n  epochz: 3\n")
    typo = cellseg("config", "show", "--config", str(tmp_path / "typo.yaml"), check=False)
    assert typo.returncode == 2 and "typo.yaml" in typo.stderr and "training.epochz" in typo.stderr
    bad_env = cellseg("config", "show", env={"CELLSEG_TRAINING__EPOCHS": "many"}, check=False)
    assert bad_env.returncode == 2 and "training.epochs" in bad_env.stderr
    assert "Traceback" not in typo.stderr + bad_env.stderr + broken.stderr
    with pytest.raises(SettingsError, match="mapping"):
        (tmp_path / "list.yaml").write_text("- 1\n")
        load_settings(str(tmp_path / "list.yaml"))


@pytest.mark.parametrize(("name", "refusal"), [
    ("CELLSEG_REGISTRY_URLL", "CELLSEG_REGISTRY_URLL names no cellseg setting (did you mean CELLSEG_REGISTRY_URL?)"),
    ("CELLSEG_PREDICTT__THRESHOLD", "CELLSEG_PREDICTT__THRESHOLD names no cellseg setting (did you mean CELLSEG_PREDICT?)"),
    ("CELLSEG_FOO", "CELLSEG_FOO names no cellseg setting (settings: CELLSEG_REGISTRY_URL, "),
])
def test_an_environment_variable_naming_no_setting_is_refused(monkeypatch, name, refusal):
    """pydantic-settings passed over a misspelt top-level variable: the setting kept its default."""
    monkeypatch.setenv(name, "0.9")
    with pytest.raises(SettingsError, match=re.escape(refusal)):
        load_settings()
    monkeypatch.delenv(name)
    monkeypatch.setenv("CELLSEG_PREDICT__THRESHOLD", "0.9")
    monkeypatch.setenv("CELLSEG_DIRECT_S3_WRITES", "false")
    settings = load_settings()
    assert settings.predict.threshold == 0.9 and not settings.direct_s3_writes



def test_a_misspelt_nested_environment_variable_is_named_with_the_nearest_setting(monkeypatch):
    """The refusal named the field (training.patienc), not the variable a user has to find and fix."""
    monkeypatch.setenv("CELLSEG_TRAINING__PATIENC", "20")
    monkeypatch.setenv("CELLSEG_PREDICT__BLOCKS__QQQ", "1")
    with pytest.raises(SettingsError) as refused:
        load_settings()
    named = str(refused.value).split("; set by environment variable ")[1].split(", ")
    assert sorted(named) == ["CELLSEG_PREDICT__BLOCKS__QQQ",
                             "CELLSEG_TRAINING__PATIENC (did you mean CELLSEG_TRAINING__PATIENCE?)"]

@pytest.mark.parametrize(("text", "meant"), [
    ("[predict]\ntreshold = 0.4\n", "predict.treshold: Extra inputs are not permitted (did you mean predict.threshold?) (got 0.4)"),
    ("[traning]\nepochs = 3\n", "traning: Extra inputs are not permitted (did you mean training?)"),
    ("[predict.selection]\nchanel = 1\n", "(did you mean predict.selection.channel?)"),
    # Outside its section (above every table header, or under the wrong one).
    ("tile_size = 512\n", "tile_size: Extra inputs are not permitted (did you mean predict.tile_size?) (got 512)"),
    ("threshold = 0.4\n", "(did you mean training.threshold or predict.threshold?)"),
    ("[predict]\nblock_size = 4096\n", "(did you mean predict.blocks.block_size?)"),
], ids=["misspelt", "misspelt-section", "nested", "top-level", "top-level-twice", "section-too-high"])
def test_an_unknown_key_in_a_settings_file_is_named_with_the_one_it_meant(tmp_path, text, meant):
    path = tmp_path / "lab.toml"
    path.write_text(text)
    result = cellseg("config", "show", "--config", str(path), check=False)
    assert result.returncode == 2 and len(result.stderr.splitlines()) == 1
    assert result.stderr.startswith(f"cellseg config: error: invalid settings (from settings file '{path}'): ")
    assert meant in result.stderr


def test_a_field_of_several_types_is_one_problem_naming_the_field(tmp_path):
    """pydantic reports each type of a union apart, under names such as max_minutes.constrained-float."""
    path = tmp_path / "lab.toml"
    path.write_text("[training]\nmax_minutes = -3\n[predict.selection]\nz = 'min'\n")
    with pytest.raises(SettingsError) as refused:
        load_settings(str(path))
    assert str(refused.value) == (
        f"invalid settings (from settings file '{path}'): "
        "training.max_minutes: Input should be greater than 0 or Input should be 'auto' (got -3); "
        "predict.selection.z: Input should be a valid integer, unable to parse string as an integer "
        "or Input should be 'max' (got 'min')")


def test_a_refusal_names_only_the_sources_that_gave_the_value(tmp_path, monkeypatch):
    path = tmp_path / "lab.yaml"
    path.write_text("predict: {tile_size: 512}\n")
    monkeypatch.setenv("CELLSEG_TRAINING__EPOCHS", "many")
    with pytest.raises(SettingsError, match=r"^invalid settings \(from CELLSEG_\* environment variables\): training\.epochs"):
        load_settings(str(path))
    monkeypatch.delenv("CELLSEG_TRAINING__EPOCHS")
    with pytest.raises(SettingsError, match=rf"^invalid settings \(from flags and settings file '{re.escape(str(path))}'\): "
                                            r"predict: tile_overlap \(400\) must be at most three quarters"):
        load_settings(str(path), {"predict": {"tile_overlap": 400}})


def test_settings_files_saved_by_windows_editors(tmp_path):
    """Notepad and PowerShell write UTF-8 with a byte-order mark, and 'Unicode' as UTF-16."""
    with_mark = tmp_path / "bom.toml"
    with_mark.write_bytes("\ufeff[predict]\nthreshold = 0.4\n".encode())
    assert load_settings(str(with_mark)).predict.threshold == 0.4
    utf16 = tmp_path / "unicode.toml"
    utf16.write_text("[predict]\nthreshold = 0.4\n", encoding="utf-16")
    result = cellseg("config", "show", "--config", str(utf16), check=False)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [f"cellseg config: error: settings file '{utf16}' is UTF-16 text "
                                          "(as Windows saves 'Unicode'); save it as UTF-8"]


def test_a_settings_file_that_is_a_directory_is_called_one(tmp_path):
    (tmp_path / "conf.d.yaml").mkdir()
    with pytest.raises(SettingsError, match=r"conf\.d\.yaml' is a directory; name the file in it$"):
        load_settings(str(tmp_path / "conf.d.yaml"))


def test_an_empty_config_name_is_refused_and_suffixes_are_read_in_any_case(tmp_path):
    """`--config "$FILE"` with FILE unset ran on the defaults; Windows names files LAB.TOML."""
    empty = cellseg("config", "show", "--config", "", check=False)
    assert empty.returncode == 2
    assert empty.stderr.splitlines() == ["cellseg config: error: --config is given an empty name; name a settings file"]
    upper = tmp_path / "LAB.TOML"
    upper.write_text("[predict]\nthreshold = 0.4\n")
    assert load_settings(str(upper)).predict.threshold == 0.4


@pytest.mark.parametrize(("name", "value", "refusal"), [
    ("CELLSEG_STORAGE", '{"s3": {"secret": "half-quoted-secret"', "Expecting ',' delimiter at line 1, column 39"),
    ("CELLSEG_STORAGE", "s3.key=abc", "Expecting value at line 1, column 1"),
    ("CELLSEG_PREDICT__SELECTION", '{"z": 1', "Expecting ',' delimiter at line 1, column 8"),
])
def test_a_section_in_the_environment_that_is_not_json_is_named(monkeypatch, name, value, refusal):
    """pydantic-settings said `error parsing value for field "storage" from source "EnvSettingsSource"`."""
    monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError) as refused:
        load_settings()
    section = name.lower().removeprefix("cellseg_").replace("__", ".")
    assert str(refused.value) == (f"environment variable {name} ({section}) is not valid JSON ({refusal}): "
                                  "give the section as a JSON object")
    monkeypatch.delenv(name)
    monkeypatch.setenv("CELLSEG_STORAGE__S3__SECRET", "{starts-like-json")  # a single setting is text
    assert load_settings().storage == {"s3": {"secret": "{starts-like-json"}}


def test_null_in_the_environment_unsets_a_setting(tmp_path, monkeypatch):
    """TOML has no null, and 'null' in a variable was refused: no way to lift the time budget or
    give a setting of the file back to cellseg's choice."""
    path = tmp_path / "lab.toml"
    path.write_text("[predict]\nbatch_size = 4\n")
    monkeypatch.setenv("CELLSEG_TRAINING__MAX_MINUTES", "null")
    monkeypatch.setenv("CELLSEG_PREDICT__BATCH_SIZE", "null")
    settings = load_settings(str(path))
    assert settings.training.max_minutes is None and settings.training.time_budget(fine_tuning=True) is None
    assert settings.predict.batch_size is None


def test_no_time_budget_is_0_in_a_file_and_a_variable_as_on_the_command_line(tmp_path, monkeypatch):
    """`--max-minutes 0` meant no limit; `max_minutes = 0` in a file or CELLSEG_TRAINING__MAX_MINUTES=0 was refused."""
    path = tmp_path / "lab.toml"
    path.write_text("[training]\nmax_minutes = 0\n")
    assert load_settings(str(path)).training.max_minutes is None
    monkeypatch.setenv("CELLSEG_TRAINING__MAX_MINUTES", "0")
    assert load_settings().training.max_minutes is None
    monkeypatch.setenv("CELLSEG_TRAINING__MAX_MINUTES", "2.5")
    assert load_settings().training.max_minutes == 2.5


def test_a_settings_file_in_the_folder_that_is_not_named_is_warned_of(tmp_path, monkeypatch, caplog):
    """The README's example is headed `# cellseg.toml`; saved as such, it was ignored without a word."""
    (tmp_path / "cellseg.toml").write_text("[training]\nepochs = 80\n")
    monkeypatch.chdir(tmp_path)
    with caplog.at_level("WARNING", logger="cellseg.settings"):
        assert load_settings().training.epochs == 60
    assert [record.getMessage() for record in caplog.records] == [
        f"cellseg.toml in this folder is not read: name it with --config cellseg.toml or "
        f"CELLSEG_CONFIG={tmp_path / 'cellseg.toml'}"]
    caplog.clear()
    with caplog.at_level("WARNING", logger="cellseg.settings"):
        assert load_settings("cellseg.toml").training.epochs == 80
    assert not caplog.records


def test_boolean_storage_options_from_the_environment_are_booleans(monkeypatch):
    monkeypatch.setenv("CELLSEG_STORAGE__S3__ANON", "false")
    monkeypatch.setenv("CELLSEG_STORAGE__S3__USE_SSL", "True")
    assert load_settings().storage == {"s3": {"anon": False, "use_ssl": True}}


def test_train_takes_its_settings_from_file_environment_and_flags(tmp_path):
    cellseg("synth", "--out", str(tmp_path / "data"), "--count", "6", "--size", "64")
    (tmp_path / "cellseg.yaml").write_text(
        "model: {depth: 2, base_width: 4}\n"
        "training: {epochs: 3, patch_size: 64, patches_per_image: 1, val_fraction: 0.34, max_minutes: 2}\n"
    )
    common = ["train", "--images", str(tmp_path / "data/images"), "--masks", str(tmp_path / "data/masks"),
              "--config", str(tmp_path / "cellseg.yaml")]
    cellseg(*common, "--out", str(tmp_path / "env"), env={"CELLSEG_TRAINING__EPOCHS": "1"})
    cellseg(*common, "--out", str(tmp_path / "flag"), "--epochs", "2", env={"CELLSEG_TRAINING__EPOCHS": "1"})
    assert len(json.loads((tmp_path / "env/history.json").read_text())) == 1
    assert len(json.loads((tmp_path / "flag/history.json").read_text())) == 2
    import torch

    checkpoint = torch.load(tmp_path / "flag/best.pt", weights_only=True)
    assert checkpoint["model_config"]["base_width"] == 4 and checkpoint["model_config"]["depth"] == 2
    assert checkpoint["train_config"]["patch_size"] == 64


def test_predict_reads_s3_with_the_endpoint_and_credentials_from_a_settings_file(tmp_path, s3_bucket, tiny_checkpoint):
    import s3fs

    from benchmarks.servers import S3_TEST_CREDENTIALS
    from cellseg.synth import write_dataset

    bucket, options = s3_bucket
    write_dataset(str(tmp_path / "data"), count=3, size=96, seed=5)
    s3fs.S3FileSystem(**options).put(str(tmp_path / "data/images") + "/", f"{bucket[5:]}/incoming/", recursive=True)
    (tmp_path / "cellseg.toml").write_text(
        f'[storage.s3]\nendpoint_url = "{options["endpoint_url"]}"\n'
        f'key = "{S3_TEST_CREDENTIALS["AWS_ACCESS_KEY_ID"]}"\nsecret = "{S3_TEST_CREDENTIALS["AWS_SECRET_ACCESS_KEY"]}"\n'
        "[predict]\nmin_cell_area = 25\nstore_image = false\n"
    )
    # No AWS_* or FSSPEC_* variables: endpoint and credentials come from the settings file alone.
    env = {key: value for key, value in os.environ.items() if not key.startswith(("AWS_", "FSSPEC_"))}
    result = subprocess.run(
        [str(Path(sys.executable).parent / "cellseg"), "predict", "--model", str(tiny_checkpoint),
         "--images", f"{bucket}/incoming", "--out", f"{bucket}/out.zarr", "--threshold", "0.6"],
        capture_output=True, text=True, timeout=300, check=False,
        env={**env, "CELLSEG_CONFIG": str(tmp_path / "cellseg.toml"), "CELLSEG_PREDICT__THRESHOLD": "0.3"},
    )
    assert result.returncode == 0, result.stderr
    assert "segmented 3" in result.stdout
    assert S3_TEST_CREDENTIALS["AWS_SECRET_ACCESS_KEY"] not in result.stdout + result.stderr
    store = ResultStore.open(f"{bucket}/out.zarr", mode="r", storage_options=options)
    for image_id in store.done_ids():
        model = store.record(image_id)["model"]["predict"]
        assert model["threshold"] == 0.6 and model["min_cell_area"] == 25  # flag over env; file
        assert f"{image_id}/0" not in store.root
        sizes = np.bincount(store.read_cells(image_id).ravel())[1:]
        assert sizes.size == 0 or sizes.min() >= 25


def test_flows_take_storage_settings_from_the_worker_environment(tiny_checkpoint, s3_bucket, tmp_path, monkeypatch,
                                                                 prefect_harness):
    import fsspec.config
    import s3fs

    from cellseg.flows.segment import segment_images_flow
    from cellseg.jobs import SegmentJob
    from cellseg.registry import Registry
    from cellseg.synth import write_dataset

    bucket, options = s3_bucket
    write_dataset(str(tmp_path / "data"), count=2, size=96, seed=6)
    s3fs.S3FileSystem(**options).put(str(tmp_path / "data/images") + "/", f"{bucket[5:]}/in/", recursive=True)
    registry = Registry(str(tmp_path / "registry"))
    registry.register(str(tiny_checkpoint), promote=True)
    monkeypatch.setattr(fsspec.config, "conf", {})  # nothing from fsspec's own configuration
    monkeypatch.delenv("FSSPEC_S3_ENDPOINT_URL", raising=False)
    monkeypatch.setenv("CELLSEG_STORAGE__S3__ENDPOINT_URL", options["endpoint_url"])
    summary = segment_images_flow(SegmentJob(source_url=f"{bucket}/in", store_url=f"{bucket}/flow.zarr",
                                  registry_url=str(tmp_path / "registry")))
    assert summary["done"] == 2 and summary["failed"] == []
    limits = {"connect_timeout": 5.0, "read_timeout": 30.0, "retries": {"total_max_attempts": 4, "mode": "standard"}}
    assert fsspec.config.conf["s3"] == {"endpoint_url": options["endpoint_url"], "config_kwargs": limits}


@pytest.mark.parametrize("s3fs_first", [False, True])
def test_s3fs_retries_are_bounded_without_importing_it_at_every_start(s3fs_first):
    """s3fs's own 5 retries around botocore's would multiply an unreachable endpoint's wait; they are
    bounded to 1 when fsspec first imports s3fs for an s3:// or s3a:// URL, and not before: a
    command that never touches S3 does not pay for its import."""
    program = "\n".join([
        "import json, sys",
        "import s3fs" if s3fs_first else "",
        "import fsspec",
        "from cellseg.settings import CellsegSettings",
        "CellsegSettings().apply_storage()",
        "imported_by_settings = 's3fs' in sys.modules",
        "filesystems = [fsspec.core.url_to_fs(url, anon=True)[0] for url in ('s3a://bucket/x', 's3://bucket/y')]",
        "import s3fs",
        "print(json.dumps({'imported': imported_by_settings, 'retries': s3fs.S3FileSystem.retries,",
        "                  's3fs': [type(filesystem) is s3fs.S3FileSystem for filesystem in filesystems]}))",
    ])
    result = subprocess.run([sys.executable, "-c", program], check=False, capture_output=True, text=True, timeout=120,
                            env={key: value for key, value in os.environ.items() if not key.startswith("CELLSEG_")})
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.splitlines()[-1]) == {"imported": s3fs_first, "retries": 1, "s3fs": [True, True]}


@pytest.mark.parametrize("endpoint", ["htp://minio.lab:9000", "http//minio.lab:9000", "minio.lab:9000",
                                      "http://minio.lab:90x0", "https://"])
@pytest.mark.parametrize("field", ["CELLSEG_STORAGE__S3__ENDPOINT_URL", "CELLSEG_STORAGE__S3A__CLIENT_KWARGS__ENDPOINT_URL"])
def test_an_endpoint_url_that_is_no_web_url_is_refused_naming_the_setting(monkeypatch, field, endpoint):
    """botocore took a scheme typo (htp://) only at the first request, with a traceback (exit 1),
    and a flow retried it three times; a missing scheme failed naming no setting."""
    monkeypatch.setenv(field, endpoint)
    setting = field.removeprefix("CELLSEG_").lower().replace("__", ".")
    with pytest.raises(SettingsError, match=rf"{re.escape(setting)} must be an http:// or https:// URL with a host"
                                            rf".*\(got '{re.escape(endpoint)}'\)"):
        load_settings()


def test_an_endpoint_url_with_a_password_is_refused_without_it(monkeypatch):
    monkeypatch.setenv("CELLSEG_STORAGE__S3__ENDPOINT_URL", "htp://user:hunter2-secret@minio.lab:9000")
    with pytest.raises(SettingsError, match=r"storage\.s3\.endpoint_url must be") as raised:
        load_settings()
    assert "hunter2-secret" not in str(raised.value)


@pytest.mark.parametrize("endpoint", ["http://minio.lab:9000", "https://s3.example.org", "HTTP://10.0.0.5:8333/", ""])
def test_web_endpoint_urls_are_taken(monkeypatch, endpoint):
    monkeypatch.setenv("CELLSEG_STORAGE__S3__ENDPOINT_URL", endpoint)
    assert load_settings().storage["s3"]["endpoint_url"] == endpoint
