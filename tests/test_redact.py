"""Credentials masked in URLs, option mappings and free text (cellseg.redact): every kind from
issue 19, what must stay readable, and bounded time on hostile text."""

from __future__ import annotations

import json
import time

import pytest

from cellseg.redact import MASK, credentials_in_bucket_url, is_secret_name, redact, redact_text, redact_url
from cellseg.settings import CellsegSettings


@pytest.mark.parametrize(("url", "expected"), [
    ("https://:PW@host/registry", f"https://:{MASK}@host/registry"),
    ("http://admin:hunter2@127.0.0.1:9", f"http://admin:{MASK}@127.0.0.1:9"),
    ("s3://AKIA:SECRET@bucket/images/a.png", f"s3://AKIA:{MASK}@bucket/images/a.png"),
    ("https://bob:p@ss@host/x.png", f"https://bob:{MASK}@host/x.png"),  # an unescaped '@' in the password
    ("https://ghp_TOKEN@github.com/x.pt", f"https://{MASK}@github.com/x.pt"),  # a bare http user is a token
    ("sftp://alice@host/data", "sftp://alice@host/data"),  # a login name alone is no secret
    ("htp://sup3rs3cret@minio.lab:9000", f"htp://{MASK}@minio.lab:9000"),  # a mistyped scheme hides no token
    ("s3://AKIAKEY@bucket/x", f"s3://{MASK}@bucket/x"),
    ("simplecache::s3://k:SECRET@bucket/x", f"simplecache::s3://k:{MASK}@bucket/x"),
    ("https://acct.blob.core.windows.net/c/a.png?sv=2022-11-02&sp=r&sig=AB%2Bc",
     f"https://acct.blob.core.windows.net/c/a.png?sv=2022-11-02&sp=r&sig={MASK}"),
    ("https://b.s3.amazonaws.com/a.png?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIA%2F1&"
     "X-Amz-Signature=beef&X-Amz-Security-Token=tok",
     f"https://b.s3.amazonaws.com/a.png?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential={MASK}&"
     f"X-Amz-Signature={MASK}&X-Amz-Security-Token={MASK}"),
    ("https://host/cb#access_token=TOK&state=1", f"https://host/cb#access_token={MASK}&state=1"),
])
def test_redact_url_masks_credentials_and_keeps_the_rest(url, expected):
    assert redact_url(url) == expected
    assert redact_url(expected) == expected  # idempotent


@pytest.mark.parametrize("url", ["/data/images/a.png", "s3://bucket/key=2021/token=x/a.png", "file:///tmp/x y.png",
                                 "memory://store.zarr", "C:\\data\\a.png", "runs/registry", ""])
def test_urls_without_credentials_are_unchanged(url):
    assert redact_url(url) == url  # hive-style path segments are names, not parameters
    assert redact_text(url) == url


@pytest.mark.parametrize(("text", "secret", "kept"), [
    ("DefaultEndpointsProtocol=https;AccountName=acct;AccountKey=abc+/d==;EndpointSuffix=core.windows.net",
     "abc+/d==", "AccountName=acct;AccountKey=********;EndpointSuffix"),
    ("BlobEndpoint=https://a.blob.core.windows.net;SharedAccessSignature=sv=2022&sig=SASSIG",
     "SASSIG", "BlobEndpoint=https://a.blob.core.windows.net;"),
    ("Authorization: Bearer eyJhbGciOi.x.y", "eyJhbGciOi", "Authorization: ********"),
    ("proxy-authorization: Basic dXNlcjpwYXNz", "dXNlcjpwYXNz", "proxy-authorization: "),
    ("X-Api-Key: K3Y", "K3Y", "X-Api-Key: "),
    ("Cookie: session=abc", "abc", "Cookie: "),
    ("request headers {'Authorization': 'Basic dXNlcjpw', 'Accept': 'image/png'}", "dXNlcjpw", "'Accept': 'image/png'"),
    ('{"key": "AKIA", "secret": "TOPSECRET", "region": "eu"}', "TOPSECRET", '"region": "eu"'),
    ('{"endpoint_url": "http://u:URLPW@h:9", "auth": ["alice", "AUTHPW"]}', "URLPW", '"endpoint_url": "http://u:'),
    ('{"auth": ["alice", "AUTHPW"], "x": 1}', "AUTHPW", '"x": 1'),
    ("input_value='{\"key\": \"AKIA\", \"secret\": \"JSONPW\"'", "JSONPW", "input_value="),
    ("S3FileSystem(key='AKIA', secret='KWPW', endpoint_url='http://h')", "KWPW", "endpoint_url='http://h'"),
    ("aws_secret_access_key=ENVPW and password=PW2", "ENVPW", "and"),
    ("  secret: YAMLPW\n  endpoint_url: http://u:YAMLURLPW@h\n  region: eu", "YAMLPW", "region: eu"),
    ("passphrase: 'my long pass phrase'", "long pass", "passphrase: ********"),
    ("failed to read 'https://u:READPW@h:80/a.png': not a readable image", "READPW", "not a readable image"),
])
def test_redact_text_masks_credentials_in_free_text(text, secret, kept):
    shown = redact_text(text)
    assert secret not in shown and MASK in shown and kept in shown
    assert redact_text(shown) == shown


@pytest.mark.parametrize("text", ["KeyError: 'zarr.json'", "image 'a.png' has no mask", "epoch 3/10 train_loss 0.1",
                                  "design: x, bypass: y", "token: null", "tile_size=1024 threshold=0.5"])
def test_ordinary_text_is_left_alone(text):
    assert redact_text(text) == text


def test_redact_masks_options_by_name_at_any_depth_and_credentials_inside_strings():
    options = {
        "registry_url": "https://:REGPW@registry.example.org/models",
        "storage": {
            "s3": {"key": "AKIA", "secret": "S3PW", "endpoint_url": "http://u:EPPW@127.0.0.1:9", "anon": False},
            "gcs": {"token": "GCSTOKEN", "project": "p"},
            "http": {"headers": {"Authorization": "Bearer HDR", "Proxy-Authorization": "Basic PX", "Cookie": "c=1",
                                 "X-Api-Key": "APIKEY", "Accept": "image/png"},
                     "client_kwargs": {"auth": ["alice", "AUTHPW"], "trust_env": True}},
            "abfs": {"connection_string": "AccountName=acct;AccountKey=ABFSKEY==;EndpointSuffix=core.windows.net",
                     "sas_token": "SAS", "account_name": "acct"},
            "sftp": {"username": "alice", "password": "SFTPPW", "passphrase": "PHRASE", "pkey": "-----BEGIN KEY",
                     "port": 22},
            "webdav": {"AUTH": ("user", "TUPLEPW"), "Client_Secret": "CS", "session_token": None},
        },
    }
    shown = redact(options)
    text = json.dumps(shown)
    for secret in ("REGPW", "S3PW", "EPPW", "GCSTOKEN", "HDR", "PX", "c=1", "APIKEY", "AUTHPW", "ABFSKEY", "SAS\"",
                   "SFTPPW", "PHRASE", "BEGIN", "TUPLEPW", "\"CS\"", "AKIA"):
        assert secret not in text, secret
    storage = shown["storage"]
    assert storage["s3"]["endpoint_url"] == f"http://u:{MASK}@127.0.0.1:9" and storage["s3"]["anon"] is False
    assert storage["http"]["headers"]["Accept"] == "image/png" and storage["http"]["client_kwargs"]["trust_env"] is True
    assert storage["abfs"]["connection_string"] == f"AccountName=acct;AccountKey={MASK};EndpointSuffix=core.windows.net"
    assert storage["sftp"]["username"] == "alice" and storage["sftp"]["port"] == 22
    assert storage["webdav"]["session_token"] is None  # nothing set, nothing to hide
    assert shown["registry_url"] == f"https://:{MASK}@registry.example.org/models"
    assert redact(shown) == shown


def test_no_setting_of_cellseg_itself_looks_secret():
    defaults = CellsegSettings().model_dump(mode="json")
    assert redact(defaults) == defaults


@pytest.mark.parametrize("name", ["key", "AccountKey", "X-Amz-Signature", "sig", "client_secret", "Authorization",
                                  "passphrase", "pkey", "SAS", "session_token", "Proxy-Authorization", "cookie",
                                  # misspelt: fsspec refuses them, but their values are secrets all the same
                                  "secrt", "scret", "tokn", "pasword", "credentals", "sesion_token"])
def test_secret_names(name):
    assert is_secret_name(name)


@pytest.mark.parametrize("name", ["endpoint_url", "region_name", "username", "anon", "design", "signal", "threshold",
                                  "access", "Accept", "region", "requester_pays", "port", "host", "project", "retries",
                                  "account_name", "connection_string", "protocol", "profile", "timeout", "headers"])
def test_ordinary_names(name):
    assert not is_secret_name(name)


@pytest.mark.parametrize("text", ["key" * 30000, "'key" * 30000, "x-key" * 20000, "a=" * 50000, "a: " * 30000,
                                  "https://" * 20000, "@" * 100000, '"token":' * 20000, "password" * 10000 + " " * 10000,
                                  "http://" + ":" * 100000 + "@", "sig" * 30000 + "=",
                                  "https://host/" + "a" * 100000])
def test_hostile_text_is_redacted_in_linear_time(text):
    started = time.perf_counter()
    redact_text(text)
    redact_url(text)
    assert time.perf_counter() - started < 2.0


def test_an_object_store_url_with_credentials_in_it_is_refused_in_one_line_without_them(tmp_path):
    """s3fs read `s3://KEY:SECRET@bucket` as a bucket named 'KEY:SECRET@bucket': botocore refused
    it in a traceback that printed the secret, with exit status 1, from every command."""
    from tests.conftest import cellseg

    url = "s3://AKIAEXAMPLE:secret123@bucket/x"
    commands = [("predict", "--model-version", "general", "--images", url, "--out", str(tmp_path / "o.zarr")),
                ("results", url), ("verify", url), ("synth", "--out", url),
                ("train", "--images", url, "--masks", url, "--out", str(tmp_path / "run"))]
    for command in commands:
        run = cellseg(*command, check=False)
        assert run.returncode == 2, (command, run.stderr)
        assert "secret123" not in run.stdout + run.stderr and "Traceback" not in run.stderr, run.stderr
        assert ("'s3://AKIAEXAMPLE:********@bucket/x' has credentials in it, which s3:// URLs do not take"
                in run.stderr.splitlines()[-1]), run.stderr
    bad = cellseg("results", "s3://Bad_Bucket!/r.zarr", check=False)
    assert bad.returncode == 2 and bad.stderr.splitlines() == [
        "cellseg results: error: 's3://Bad_Bucket!/r.zarr': Invalid bucket name \"Bad_Bucket!\": a bucket's name "
        "holds only letters, digits, '.', '-' and '_'"]
    assert credentials_in_bucket_url("https://user:pw@host/x") is None  # a web server's basic login is its own
    # AWS secret keys hold '/' and '+'; a '?' or '#' cut redact_url's view of the URL short
    for secret in ("abc/def+ghi", "p?w", "p#w"):
        url = f"s3://AKIA:{secret}@bucket/x"
        assert redact_url(url) == "s3://AKIA:********@bucket/x" and secret not in redact_text(f"at {url} now")
        run = cellseg("results", url, check=False)
        assert run.returncode == 2 and secret not in run.stderr and "has credentials in it" in run.stderr, run.stderr
    for name in ("abfs://container@account.dfs.core.windows.net/p", "s3://bucket/a:b@c.png"):
        assert credentials_in_bucket_url(name) is None  # Azure's container@account; a key holding ':' and '@'


def test_a_settings_error_about_a_field_named_like_a_secret_keeps_its_problem(tmp_path):
    """`predict: {bogus_key: 1}` was refused as `predict.bogus_key: ********`: the problem itself
    was masked as if it were the secret, and the user could not tell what was wrong."""
    from tests.conftest import cellseg

    settings = tmp_path / "settings.yaml"
    settings.write_text("predict:\n  bogus_key: hunter2\n")
    run = cellseg("--config", str(settings), "config", "show", check=False)
    assert run.returncode == 2 and "hunter2" not in run.stderr
    assert run.stderr.rstrip().endswith("predict.bogus_key: Extra inputs are not permitted (got '********')")
    assert redact_text("storage_key: hunter2") == f"storage_key: {MASK}"  # a value that is no such problem: masked
