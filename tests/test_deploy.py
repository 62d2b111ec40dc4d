"""Static checks of docker/: the Dockerfile passes hadolint, every manifest parses, and ports, probe
routes, timeouts and budgets agree with the app's settings and URL map. No Docker engine runs here."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path, PurePosixPath

import pytest
import yaml

from tests.conftest import ROOT
from webapp import create_app
from webapp.board import Board
from webapp.lifecycle import Lifecycle
from webapp.runtime import Runtime
from webapp.settings import Settings

DOCKER = ROOT / "docker"
K8S_PRESTOP_S = 10
CLOUD_RUN_SIGTERM_GRACE_S = 10  # Cloud Run sends SIGKILL this long after SIGTERM


def load_yaml(name: str) -> list[dict]:
    return [doc for doc in yaml.safe_load_all((DOCKER / name).read_text()) if doc]


def load_json(name: str) -> dict:
    return json.loads((DOCKER / name).read_text())


def env_settings(pairs: list[dict]) -> Settings:
    """The settings a manifest's environment gives, validated exactly as the server would at start (but
    for API_KEYS_FILE, which only exists inside the pod: its mount is checked on its own)."""
    env = {item["name"]: item["value"] for item in pairs if item["name"] != "API_KEYS_FILE"}
    return Settings.from_env(env).for_workers(int(env.get("WEB_CONCURRENCY", "1")))  # gunicorn reads that one


@pytest.fixture(scope="module")
def routes(tmp_path_factory) -> set[str]:
    board = Board.create(tmp_path_factory.mktemp("board"), capacity=1, expected_workers=1)
    try:
        app = create_app(Runtime(Settings.from_env({}), board, Lifecycle(board, 0), None))
        return {rule.rule for rule in app.url_map.iter_rules()}
    finally:
        board.remove()


def test_the_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    result = subprocess.run([hadolint, str(DOCKER / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_dockerfile_runs_gunicorn_as_a_numeric_non_root_user_on_the_app_port():
    text = (DOCKER / "Dockerfile").read_text()
    assert re.search(r"^EXPOSE 8080$", text, re.M)
    assert Settings.from_env({}).port == 8080
    assert re.search(r'^CMD \["gunicorn", "-c", "gunicorn.conf.py"\]$', text, re.M)
    users = re.findall(r"^USER (\S+)$", text, re.M)
    assert users and all(user.isdigit() and user != "0" for user in users)
    for source in re.findall(r"^COPY (?:--chown=\S+ )?(\S+) ", text, re.M):
        assert (ROOT / source).exists(), source
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    assert {"*", "!requirements.txt", "!gunicorn.conf.py", "!webapp/"} <= set(ignore)


def probe_seconds(probe: dict) -> int:
    return probe["periodSeconds"] * probe["failureThreshold"]


def test_kubernetes_probes_ports_and_grace_agree_with_the_app(routes):
    deployment, service = load_yaml("kubernetes.yaml")
    assert (deployment["kind"], service["kind"]) == ("Deployment", "Service")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    settings = env_settings(container["env"])
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": settings.port}

    for kind, route in (("startupProbe", "/readyz"), ("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        probe = container[kind]["httpGet"]
        assert probe["path"] == route and route in routes
        assert probe["port"] in ports
    assert probe_seconds(container["startupProbe"]) >= settings.startup_budget_needed()
    assert container["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", str(K8S_PRESTOP_S)]
    assert pod["terminationGracePeriodSeconds"] >= K8S_PRESTOP_S + settings.graceful_timeout
    for section in ("requests", "limits"):
        assert container["resources"][section]["nvidia.com/gpu"] == str(settings.workers)
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    keys_file = PurePosixPath(next(item["value"] for item in container["env"] if item["name"] == "API_KEYS_FILE"))
    secrets = {volume["name"] for volume in pod["volumes"] if "secret" in volume}
    mounts = {PurePosixPath(m["mountPath"]): m for m in container["volumeMounts"] if m["name"] in secrets}
    assert keys_file.parent in mounts and mounts[keys_file.parent].get("readOnly"), "keys come from a Secret"
    scrape = deployment["spec"]["template"]["metadata"]["annotations"]
    assert scrape["prometheus.io/path"] == "/metrics" and "/metrics" in routes
    assert int(scrape["prometheus.io/port"]) == settings.port


def test_cloud_run_probes_concurrency_and_shutdown_agree_with_the_app(routes):
    (service,) = load_yaml("cloudrun-service.yaml")
    spec = service["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    settings = env_settings(container["env"])
    assert container["ports"][0]["containerPort"] == settings.port
    assert "PORT" not in {item["name"] for item in container["env"]}, "Cloud Run sets PORT itself"
    assert container["startupProbe"]["httpGet"]["path"] == "/readyz" in routes
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz" in routes
    assert probe_seconds(container["startupProbe"]) >= settings.startup_budget_needed()
    assert spec["containerConcurrency"] == settings.workers * (settings.max_ongoing + settings.max_queued)
    assert settings.graceful_timeout < CLOUD_RUN_SIGTERM_GRACE_S
    assert spec["timeoutSeconds"] >= settings.request_timeout
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert spec["nodeSelector"]["run.googleapis.com/accelerator"]


def test_fargate_health_checks_and_draining_agree_with_the_app(routes):
    task = load_json("fargate-task-definition.json")
    service = load_json("fargate-service.json")
    group = load_json("fargate-target-group.json")
    (container,) = task["containerDefinitions"]
    settings = env_settings(container["environment"])
    assert container["portMappings"][0]["containerPort"] == settings.port == group["Port"]
    assert service["loadBalancers"][0]["containerPort"] == settings.port

    check = container["healthCheck"]
    assert "/healthz" in " ".join(check["command"]) and "/healthz" in routes
    assert check["startPeriod"] >= settings.startup_budget_needed()
    assert service["healthCheckGracePeriodSeconds"] >= settings.startup_budget_needed()
    assert group["HealthCheckPath"] == "/readyz" in routes
    assert group["Matcher"]["HttpCode"] == "200"
    # ECS deregisters the target, waits out the delay, then sends SIGTERM: in-flight requests (at most
    # REQUEST_TIMEOUT long) finish first, and gunicorn's drain fits in stopTimeout.
    delay = int(dict((a["Key"], a["Value"]) for a in group["Attributes"])["deregistration_delay.timeout_seconds"])
    assert delay >= settings.request_timeout
    assert container["stopTimeout"] >= settings.graceful_timeout + 5
