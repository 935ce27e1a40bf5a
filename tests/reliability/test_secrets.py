"""Secrets are never printed, logged or stored (issue 19, class 3).

Credentials reach cellseg in settings (a YAML file, CELLSEG_* variables) and inside URLs: here
an HTTP server on the loopback that demands Basic authentication, with the user name and
password in every `--images`, `--masks`, `--model` and `--init-from` URL, so that reading works
only because the real URL is used in memory. Every output stream of the real CLI, every file of
the results store, of the exported table and of the training run is then searched for the
password: it is never there, while the redacted URL still names the file.
"""

from __future__ import annotations

import base64
import functools
import http.server
import json
import shutil
import threading
from pathlib import Path

import pytest
import torch

from cellseg.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from cellseg.config import ModelConfig, TrainConfig
from cellseg.model import UNet
from cellseg.redact import MASK
from cellseg.synth import write_dataset
from tests.conftest import cellseg

pytestmark = pytest.mark.integration

PASSWORD = "Hunter2-Secret-Pw"
USER = "alice"
# What a client sends for USER:PASSWORD; it must not leak either (headers in logs, say).
BASIC = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()


class _AuthHandler(http.server.SimpleHTTPRequestHandler):
    """Serves its directory (with directory listings) to Basic-authenticated requests only."""

    def _authorised(self) -> bool:
        if self.headers.get("Authorization") == f"Basic {BASIC}":
            return True
        self.send_response(401)
        self.send_header("WWW-Authenticate", 'Basic realm="cellseg-test"')
        self.send_header("Content-Length", "0")
        self.end_headers()
        return False

    def do_GET(self) -> None:
        if self._authorised():
            super().do_GET()

    def do_HEAD(self) -> None:
        if self._authorised():
            super().do_HEAD()

    def log_message(self, *args: object) -> None:
        """No request log on the test's output."""


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """(URL with USER:PASSWORD, the same URL redacted) of a loopback HTTP server holding
    predict/ (three images and one broken file), train/images and train/masks, and model.pt (a
    small untrained U-Net: what it finds does not matter here, only where URLs end up)."""
    root = tmp_path_factory.mktemp("site")
    write_dataset(str(root / "train"), count=3, size=64, seed=3)
    shutil.copytree(root / "train" / "images", root / "predict")
    (root / "predict" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    torch.manual_seed(0)
    config = ModelConfig(depth=2, base_width=4)
    save_checkpoint(Checkpoint(config, UNet(config).state_dict(), TrainConfig(), {}, 0), str(root / "model.pt"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_AuthHandler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    host = f"127.0.0.1:{server.server_address[1]}"
    try:
        yield f"http://{USER}:{PASSWORD}@{host}", f"http://{USER}:{MASK}@{host}"
    finally:
        server.shutdown()
        server.server_close()


def _leaks(*texts: str) -> list[str]:
    return [secret for secret in (PASSWORD, BASIC) if any(secret in text for text in texts)]


def _files_leaking(root: Path) -> list[str]:
    """Every file under `root` whose bytes hold the password (zarr metadata, tables, checkpoints:
    torch's zip is stored uncompressed, so the pickled strings are searchable)."""
    return [str(path) for path in sorted(root.rglob("*")) if path.is_file()
            and any(secret.encode() in path.read_bytes() for secret in (PASSWORD, BASIC))]


def test_config_show_masks_every_kind_of_secret(tmp_path):
    path = tmp_path / "cellseg.yaml"
    path.write_text(
        'registry_url: "https://:REGISTRY-PW@registry.example.org/models"\n'
        "storage:\n"
        "  http:\n"
        '    headers: {Authorization: "Bearer HEADER-TOKEN", Accept: image/png}\n'
        '    client_kwargs: {auth: [alice, CLIENT-AUTH-PW]}\n'
        "  abfs:\n"
        '    connection_string: "DefaultEndpointsProtocol=https;AccountName=acct;AccountKey=ACCOUNT-KEY==;'
        'EndpointSuffix=core.windows.net"\n'
        "  sftp: {username: alice, passphrase: SFTP-PASSPHRASE, port: 22}\n"
    )
    env = {"CELLSEG_STORAGE__S3": '{"endpoint_url": "http://bob:ENV-URL-PW@127.0.0.1:9", "secret": "ENV-SECRET"}',
           "CELLSEG_STORAGE__GCS__TOKEN": "ENV-GCS-TOKEN"}
    secrets = ("REGISTRY-PW", "HEADER-TOKEN", "CLIENT-AUTH-PW", "ACCOUNT-KEY", "SFTP-PASSPHRASE", "ENV-URL-PW",
               "ENV-SECRET", "ENV-GCS-TOKEN")
    as_json = cellseg("config", "show", "--json", "--config", str(path), env=env)
    assert as_json.returncode == 0 and "Traceback" not in as_json.stderr
    assert [secret for secret in secrets if secret in as_json.stdout + as_json.stderr] == []
    storage = json.loads(as_json.stdout)["storage"]
    # Masked where the secret was, the rest as given: each setting still says what it is.
    assert json.loads(as_json.stdout)["registry_url"] == f"https://:{MASK}@registry.example.org/models"
    assert storage["http"]["headers"] == {"Authorization": MASK, "Accept": "image/png"}
    assert storage["http"]["client_kwargs"] == {"auth": MASK}
    assert storage["abfs"]["connection_string"] == (f"DefaultEndpointsProtocol=https;AccountName=acct;AccountKey={MASK};"
                                                    "EndpointSuffix=core.windows.net")
    assert storage["sftp"] == {"username": "alice", "passphrase": MASK, "port": 22}
    assert storage["s3"] == {"endpoint_url": f"http://bob:{MASK}@127.0.0.1:9", "secret": MASK}
    assert storage["gcs"] == {"token": MASK}


@pytest.mark.parametrize(("env", "arguments", "culprit"), [
    ({"CELLSEG_STORAGE__S3": '{"key": "AKIA", "secret": "JSON-SECRET"'}, ["config", "show"], "storage.s3"),
    ({"CELLSEG_STORAGE__S3": '["JSON-SECRET"]'}, ["config", "show"], "storage.s3"),
    ({"CELLSEG_REGISTRY_URL": "htp://:JSON-SECRET@registry.example.org"}, ["config", "show"], "registry_url"),
    ({}, ["predict", "--images", "htp://bob:JSON-SECRET@host/images", "--out", "OUT"], "source_url"),
    ({}, ["predict", "--images", "IMAGES", "--out", "OUT", "https://bob:JSON-SECRET@host/stray"], "unrecognized"),
])
def test_refused_settings_never_echo_their_secret(env, arguments, culprit, tmp_path):
    arguments = [str(tmp_path / argument) if argument in ("IMAGES", "OUT") else argument for argument in arguments]
    result = cellseg(*arguments, env=env, check=False)
    assert result.returncode == 2
    assert culprit in result.stderr and "Traceback" not in result.stderr
    assert "JSON-SECRET" not in result.stdout + result.stderr
    assert not (tmp_path / "OUT").exists()


def test_credentials_in_image_and_model_urls_are_never_stored_or_shown(site, tmp_path):
    url, shown_url = site
    store = tmp_path / "results.zarr"
    predicted = cellseg("predict", "--images", f"{url}/predict/", "--model", f"{url}/model.pt", "--out", str(store),
                        "--device", "cpu", check=False)
    # The good images are done and the broken one is recorded failed (exit 3 once partly failed
    # batches report it, 0 before).
    assert predicted.returncode in (0, 3), predicted.stderr
    assert "Traceback" not in predicted.stderr
    listed = cellseg("results", str(store), "--json")
    rows = json.loads(listed.stdout)
    table = tmp_path / "statistics.csv"
    exported = cellseg("export", str(store), "--table", "images", "--out", str(table))

    assert _leaks(predicted.stdout, predicted.stderr, listed.stdout, listed.stderr, exported.stdout,
                  exported.stderr) == []
    assert _files_leaking(store) == [] and _files_leaking(tmp_path) == []
    # The redacted URL still names each file: in the store, the results and the export.
    assert sorted(row["source_url"] for row in rows["statistics"]) == [
        f"{shown_url}/predict/synth_{index:04d}.png" for index in range(3)]
    [failure] = rows["failures"]
    assert failure["source_url"] == f"{shown_url}/predict/broken.png" and "broken.png" in failure["error"]
    assert f"{shown_url}/predict/broken.png" in predicted.stdout + predicted.stderr
    attributes = json.loads((store / "synth_0000" / "zarr.json").read_text())["attributes"]["cellseg"]
    assert attributes["status"] == "done" and attributes["model"]["checkpoint"] == f"{shown_url}/model.pt"
    assert f"{shown_url}/predict/synth_0001.png" in table.read_text()


def test_credentials_in_training_urls_stay_out_of_the_run(site, tmp_path):
    url, shown_url = site
    run = tmp_path / "run"
    trained = cellseg("train", "--images", f"{url}/train/images/", "--masks", f"{url}/train/masks/",
                      "--init-from", f"{url}/model.pt", "--out", str(run), "--epochs", "1", "--patch-size", "64",
                      "--val-fraction", "0.34", "--device", "cpu", check=False)
    assert trained.returncode == 0, trained.stderr
    assert _leaks(trained.stdout, trained.stderr) == [] and _files_leaking(run) == []
    manifest = json.loads((run / "manifest.json").read_text())
    assert {entry["image_url"] for entry in manifest["entries"]} == {
        f"{shown_url}/train/images/synth_{index:04d}.png" for index in range(3)}
    assert load_checkpoint(str(run / "best.pt")).train_config.init_from == f"{shown_url}/model.pt"
