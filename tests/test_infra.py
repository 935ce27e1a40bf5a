"""Tests for infra/ and deployments/prefect.yaml: the compose site, the worker image and the
deployments agree with each other and with the flows they name."""

from __future__ import annotations

import importlib
import inspect
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = REPO_ROOT / "infra" / "docker-compose.yml"
DOCKERFILE = REPO_ROOT / "infra" / "Dockerfile"
PREFECT_YAML = REPO_ROOT / "deployments" / "prefect.yaml"

# A reference to an environment variable, optionally with a default or an error: ${VAR}, ${VAR:?msg}.
ENV_REFERENCE = re.compile(r"\$\{[A-Za-z_][A-Za-z0-9_]*(?:[:?+-][^}]*)?\}")
SECRET_KEY = re.compile(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY", re.IGNORECASE)


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


@pytest.fixture(scope="module")
def prefect_yaml() -> dict:
    return yaml.safe_load(PREFECT_YAML.read_text())


@pytest.fixture(scope="module")
def deployments(prefect_yaml) -> dict[str, dict]:
    return {deployment["name"]: deployment for deployment in prefect_yaml["deployments"]}


def environment(service: dict) -> dict[str, str]:
    """A service's environment as a dict, whether written as a mapping or as KEY=value items."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {key: "" if value is None else str(value) for key, value in env.items()}


def depends_on(service: dict) -> set[str]:
    found = service.get("depends_on") or []
    return set(found) if isinstance(found, list) else set(found.keys())


def command_words(service: dict) -> list[str]:
    command = service.get("command") or []
    return shlex.split(command) if isinstance(command, str) else list(command)


def option(words: list[str], name: str) -> str:
    """The value following `name` in an argument list (or given as name=value)."""
    for index, word in enumerate(words):
        if word == name:
            return words[index + 1]
        if word.startswith(name + "="):
            return word.split("=", 1)[1]
    raise AssertionError(f"{name} not found in {words}")


# --- a minimal Dockerfile parser ------------------------------------------------------------


def parse_dockerfile(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per instruction; joins `\\` continuations, drops comments."""
    instructions = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("#") or not line:
            continue  # comment and blank lines may sit inside a continued instruction, too
        if line.endswith("\\"):
            pending += line[:-1].strip() + " "
            continue
        line = (pending + line).strip()
        pending = ""
        if line:
            keyword, _, arguments = line.partition(" ")
            instructions.append((keyword.upper(), arguments.strip()))
    if pending.strip():
        keyword, _, arguments = pending.strip().partition(" ")
        instructions.append((keyword.upper(), arguments.strip()))
    return instructions


def instruction_words(arguments: str) -> list[str]:
    """Arguments in exec (JSON array) or shell form, as a list of words."""
    return json.loads(arguments) if arguments.startswith("[") else shlex.split(arguments)


def copy_sources(arguments: str) -> list[str]:
    """The source paths of a COPY/ADD (everything but flags and the destination)."""
    words = [word for word in instruction_words(arguments) if not word.startswith("--")]
    return words[:-1]


def test_dockerfile_parser_joins_continuations_and_reads_both_forms():
    text = (
        "# comment\n"
        "FROM python:3.11-slim\n"
        "ENV A=1 \\\n"
        "    B=2\n"
        "RUN pip install \\\n"
        "    # a comment inside the instruction\n"
        "    torch numpy\n"
        "COPY --chown=app a.txt b/ ./dest/\n"
        'CMD ["prefect", "worker", "start", "--pool", "p"]\n'
    )

    parsed = parse_dockerfile(text)

    assert parsed == [
        ("FROM", "python:3.11-slim"),
        ("ENV", "A=1 B=2"),
        ("RUN", "pip install torch numpy"),
        ("COPY", "--chown=app a.txt b/ ./dest/"),
        ("CMD", '["prefect", "worker", "start", "--pool", "p"]'),
    ]
    assert copy_sources(parsed[3][1]) == ["a.txt", "b/"]
    assert option(instruction_words(parsed[4][1]), "--pool") == "p"


@pytest.fixture(scope="module")
def dockerfile() -> list[tuple[str, str]]:
    return parse_dockerfile(DOCKERFILE.read_text())


# --- docker-compose.yml -------------------------------------------------------------------


def test_compose_has_the_four_services(services):
    assert set(services) == {"postgres", "prefect-server", "minio", "worker"}


def test_worker_builds_the_repository_with_the_infra_dockerfile(services):
    build = services["worker"]["build"]
    context = (COMPOSE_FILE.parent / build["context"]).resolve()

    assert build["context"] == ".."
    assert context == REPO_ROOT
    assert (context / build["dockerfile"]).resolve() == DOCKERFILE
    assert DOCKERFILE.is_file()


def test_worker_depends_on_server_and_object_storage(services):
    assert depends_on(services["worker"]) >= {"prefect-server", "minio"}
    assert depends_on(services["prefect-server"]) == {"postgres"}


def test_worker_api_url_points_at_the_server_port(services):
    api = urlsplit(environment(services["worker"])["PREFECT_API_URL"])
    server_port = int(option(command_words(services["prefect-server"]), "--port"))

    assert api.scheme == "http"
    assert api.hostname == "prefect-server" and api.hostname in services
    assert api.port == server_port == 4200
    assert api.path == "/api"


def test_worker_reaches_minio_inside_the_network(services):
    endpoint = urlsplit(environment(services["worker"])["FSSPEC_S3_ENDPOINT_URL"])
    published = {int(str(port).split(":")[-1]) for port in services["minio"]["ports"]}

    assert endpoint.hostname == "minio"
    assert endpoint.port in published and endpoint.port == 9000


def test_server_database_is_the_postgres_service(services):
    url = environment(services["prefect-server"])["PREFECT_API_DATABASE_CONNECTION_URL"]
    postgres_env = environment(services["postgres"])
    # urlsplit cannot take a ${...} reference as a password; check the pieces around it.
    match = re.fullmatch(r"(?P<scheme>[^:]+)://(?P<user>[^:]+):(?P<password>.+)@(?P<host>[^:/]+):(?P<port>\d+)/(?P<db>\w+)", url)

    assert match is not None, url
    assert match["scheme"] == "postgresql+asyncpg"
    assert match["host"] == "postgres" and match["host"] in services
    assert int(match["port"]) == 5432
    assert match["user"] == postgres_env["POSTGRES_USER"]
    assert match["db"] == postgres_env["POSTGRES_DB"]
    assert ENV_REFERENCE.fullmatch(match["password"]), "the password must come from the environment"
    assert re.search(r"\$\{(\w+)", match["password"])[1] == re.search(r"\$\{(\w+)", postgres_env["POSTGRES_PASSWORD"])[1]


def test_compose_holds_no_literal_secrets(services):
    checked = 0
    for name, service in services.items():
        for key, value in environment(service).items():
            if SECRET_KEY.search(key):
                assert ENV_REFERENCE.fullmatch(value), f"{name}: {key} is a literal value, not a ${{VAR}} reference"
                checked += 1
            credentials = re.match(r"[a-z0-9+.-]+://[^:/@]+:(?P<password>[^@]+)@", value)
            if credentials:
                assert ENV_REFERENCE.fullmatch(credentials["password"]), f"{name}: {key} embeds a literal password"
                checked += 1
    # POSTGRES_PASSWORD, MINIO_ROOT_PASSWORD, the worker's two AWS keys and the database URL.
    assert checked == 5


def test_required_secrets_fail_loudly_when_unset(services):
    assert environment(services["postgres"])["POSTGRES_PASSWORD"].startswith("${POSTGRES_PASSWORD:?")
    assert environment(services["minio"])["MINIO_ROOT_PASSWORD"].startswith("${MINIO_ROOT_PASSWORD:?")


# --- Dockerfile ---------------------------------------------------------------------------


def test_every_copy_source_exists(dockerfile):
    sources = [source for keyword, arguments in dockerfile if keyword in ("COPY", "ADD") for source in copy_sources(arguments)]

    assert sources == ["pyproject.toml", "README.md", "cellseg", "flows", "deployments"]
    for source in sources:
        assert (REPO_ROOT / source).exists(), f"COPY source '{source}' is not in the build context"


def test_the_images_python_steps_run_against_this_checkout(dockerfile):
    """The build's `python -c` steps (compiling the numba steps into the package's cache) name
    functions that exist and run."""
    steps = [shlex.split(arguments) for keyword, arguments in dockerfile if keyword == "RUN"]
    scripts = [step[2] for step in steps if step[:2] == ["python", "-c"]]
    assert scripts and any("fused_norm.warm_up()" in script for script in scripts)
    for script in scripts:
        subprocess.run([sys.executable, "-c", script], check=True, timeout=300)


def test_worker_pool_matches_the_deployments(dockerfile, deployments, services):
    commands = [arguments for keyword, arguments in dockerfile if keyword == "CMD"]
    assert len(commands) == 1
    image_pool = option(instruction_words(commands[0]), "--pool")
    deployment_pools = {deployment["work_pool"]["name"] for deployment in deployments.values()}

    assert deployment_pools == {image_pool} == {"cellseg-process"}
    assert option(command_words(services["worker"]), "--pool") == image_pool
    assert option(instruction_words(commands[0]), "--type") == "process"


# --- deployments/prefect.yaml -------------------------------------------------------------


def test_the_deployments_exist(deployments):
    assert set(deployments) == {"train-unet", "tune-unet", "nightly-segmentation", "backfill"}


def test_nightly_runs_on_a_cron_schedule_reading_its_job_from_a_variable(deployments):
    nightly = deployments["nightly-segmentation"]
    (schedule,) = nightly["schedules"]
    minute, hour, day, month, weekday = schedule["cron"].split()

    assert (minute, hour, day, month, weekday) == ("0", "2", "*", "*", "*")
    # Read when each run starts, not filled in by `prefect deploy` (no {{ prefect.variables.* }} templates).
    assert nightly["parameters"] == {"job_variable": "cellseg_nightly"}
    assert "{{" not in (REPO_ROOT / "deployments/prefect.yaml").read_text().split("deployments:")[1]


FLOW_NAMES = {"train_unet": "train-unet", "segment_images_flow": "segment-images"}


@pytest.mark.parametrize("name", ["train-unet", "nightly-segmentation", "backfill"])
def test_entrypoint_is_a_prefect_flow_accepting_the_parameters(deployments, name):
    from prefect.flows import Flow

    deployment = deployments[name]
    path, function = deployment["entrypoint"].split(":")
    assert (REPO_ROOT / path).is_file(), f"{name}: entrypoint file {path} does not exist"

    module = importlib.import_module("cellseg." + path.removesuffix(".py").replace("/", "."))
    flow = getattr(module, function)

    assert isinstance(flow, Flow)
    assert flow.name == FLOW_NAMES[function]
    taken = inspect.signature(flow.fn).parameters
    assert next(iter(taken)) == "job"  # the whole job, or (segment-images) the variable holding one
    parameters = deployment.get("parameters", {})
    assert set(parameters) <= set(taken), f"{name}: parameters the flow does not take"
