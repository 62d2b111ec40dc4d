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
from webapp.board.lifecycle import Lifecycle
from webapp.board.slots import Board
from webapp.runtime import Runtime
from webapp.settings import Settings

DOCKER = ROOT / "docker"
K8S_PRESTOP_S = 10
CLOUD_RUN_SIGTERM_GRACE_S = 10  # Cloud Run sends SIGKILL this long after SIGTERM
# A ready pod waits up to a startup probe's period to be let in, and /readyz answers in about a ms: probe often
# (docs/deployment.md). ALB checks a target every 5 s at the most.
STARTUP_PROBE_PERIOD_S = 2
ALB_SHORTEST_INTERVAL_S = 5


def load_yaml(name: str) -> list[dict]:
    return [doc for doc in yaml.safe_load_all((DOCKER / name).read_text()) if doc]


def plain_env(pairs: list[dict]) -> dict[str, str]:
    """A container's environment given as values (not API_KEYS_FILE, nor what comes from a Secret or the pod)."""
    return {item["name"]: item["value"] for item in pairs if item["name"] != "API_KEYS_FILE" and "value" in item}


def scaled_object() -> dict:
    (scaled,) = [d for d in load_yaml("kubernetes-keda.yaml") if d["kind"] == "ScaledObject"]
    return scaled


def load_json(name: str) -> dict:
    return json.loads((DOCKER / name).read_text())


def env_settings(pairs: list[dict]) -> Settings:
    """The settings a manifest's environment gives, validated exactly as the server would at start (but
    for API_KEYS_FILE, which only exists inside the pod: its mount is checked on its own, and the values
    the pod gets from a Secret or its own name, checked where they are made)."""
    env = plain_env(pairs)
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


def startup_seconds(probe: dict) -> int:
    """The startup probe's whole budget, after checking it probes often enough not to hold a ready pod back."""
    assert probe["periodSeconds"] <= STARTUP_PROBE_PERIOD_S, probe
    return probe_seconds(probe)


def test_kubernetes_probes_ports_and_grace_agree_with_the_app(routes):
    deployment, service, _budget = load_yaml("kubernetes.yaml")
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
    assert startup_seconds(container["startupProbe"]) >= settings.startup_budget_needed()
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
    assert startup_seconds(container["startupProbe"]) >= settings.startup_budget_needed()
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
    assert group["HealthCheckIntervalSeconds"] == ALB_SHORTEST_INTERVAL_S
    # ECS deregisters the target, waits out the delay, then sends SIGTERM: in-flight requests (at most
    # REQUEST_TIMEOUT long) finish first, and gunicorn's drain fits in stopTimeout.
    delay = int(dict((a["Key"], a["Value"]) for a in group["Attributes"])["deregistration_delay.timeout_seconds"])
    assert delay >= settings.request_timeout
    assert container["stopTimeout"] >= settings.graceful_timeout + 5


# -- scaling out (README "Scaling out") ------------------------------------------------------------------
SCHEMA_VERSIONS = ("1.31.0", "1.37.0")  # the oldest Kubernetes these manifests claim, and the newest bundled


def validate_offline(document: dict) -> None:
    """Kubernetes' own OpenAPI schemas, bundled by kubernetes-validate, strict: no unknown field passes."""
    import kubernetes_validate

    for version in SCHEMA_VERSIONS:
        kubernetes_validate.validate(document, version, strict=True)


def as_pod(containers: list[dict]) -> dict:
    """A CRD's containers inside a Pod, so the core Container schema checks them."""
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "check"}, "spec": {"containers": containers}}


def as_hpa(behavior: dict) -> dict:
    """KEDA's HPA behaviour inside an HPA, so the autoscaling/v2 schema checks it."""
    spec = {
        "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "check"},
        "maxReplicas": 2,
        "behavior": behavior,
    }
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": "check"},
        "spec": spec,
    }


def test_the_kubernetes_manifests_pass_the_kubernetes_schemas_offline():
    import kubernetes_validate

    for name in ("kubernetes.yaml", "kubernetes-hpa.yaml", "kubernetes-redis.yaml"):
        for document in load_yaml(name):
            validate_offline(document)
    scaled = scaled_object()
    validate_offline(as_hpa(scaled["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]))
    (inference,) = load_yaml("kserve-inferenceservice.yaml")
    validate_offline(as_pod(inference["spec"]["predictor"]["containers"]))
    # The schemas can say no: a misspelt probe and a replica count as text are both refused.
    deployment = load_yaml("kubernetes.yaml")[0]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    for broken in ({**container, "readinessprobe": container["readinessProbe"]}, {**container, "ports": "8080"}):
        with pytest.raises(kubernetes_validate.ValidationError):
            validate_offline(as_pod([broken]))


def deployment_settings() -> tuple[dict, Settings]:
    deployment = load_yaml("kubernetes.yaml")[0]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return deployment, env_settings(container["env"])


def test_a_scale_down_or_a_node_drain_never_cuts_off_a_job_nor_takes_every_ready_pod():
    deployment, settings = deployment_settings()
    pod = deployment["spec"]["template"]["spec"]
    labels = deployment["spec"]["selector"]["matchLabels"]
    # Every job a draining pod holds ends (done, or 504 at its deadline) inside gunicorn's drain, which ends
    # inside the kubelet's grace period.
    assert settings.request_timeout <= settings.graceful_timeout
    assert pod["terminationGracePeriodSeconds"] >= K8S_PRESTOP_S + settings.graceful_timeout
    (budget,) = [d for d in load_yaml("kubernetes.yaml") if d["kind"] == "PodDisruptionBudget"]
    assert budget["spec"]["selector"]["matchLabels"] == labels
    scaled = scaled_object()
    assert budget["spec"]["maxUnavailable"] < scaled["spec"]["minReplicaCount"], "a drain leaves a ready pod"
    assert budget["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow", "a pod that never got ready blocks none"
    spread = {c["topologyKey"]: c for c in pod["topologySpreadConstraints"]}
    assert spread["kubernetes.io/hostname"]["whenUnsatisfiable"] == "DoNotSchedule"
    assert all(c["labelSelector"]["matchLabels"] == labels and c["maxSkew"] == 1 for c in spread.values())
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


def test_keda_and_the_hpa_scale_on_the_same_per_pod_load_with_the_same_arithmetic():
    deployment, settings = deployment_settings()
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    per_pod_target = settings.workers * settings.max_ongoing  # full batches, nothing waiting
    per_pod_capacity = settings.workers * (settings.max_ongoing + settings.max_queued)

    scaled = scaled_object()
    assert (scaled["apiVersion"], scaled["kind"]) == ("keda.sh/v1alpha1", "ScaledObject")
    spec = scaled["spec"]
    assert spec["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    (trigger,) = [t for t in spec["triggers"] if t["type"] == "prometheus"]
    assert (trigger["type"], trigger["metricType"]) == ("prometheus", "AverageValue")  # divided by replicas
    metadata = trigger["metadata"]
    assert all(isinstance(value, str) for value in metadata.values()), "KEDA's trigger metadata is strings"
    assert metadata["serverAddress"].startswith("http")
    assert float(metadata["threshold"]) == per_pod_target < per_pod_capacity
    assert metadata["ignoreNullValues"] == "false", "no series means Prometheus lost the pods, not zero load"
    for key, value in pod_labels.items():
        assert f'{key}="{value}"' in metadata["query"]
    assert spec["minReplicaCount"] <= spec["fallback"]["replicas"] <= spec["maxReplicaCount"]
    assert spec["cooldownPeriod"] >= settings.startup_budget_needed()
    assert spec["pollingInterval"] * 4 <= settings.startup_budget_needed()
    behavior = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    assert behavior["scaleUp"]["stabilizationWindowSeconds"] == 0
    # Scale down only after a quiet spell longer than a cold start, one pod per drain.
    assert behavior["scaleDown"]["stabilizationWindowSeconds"] >= settings.startup_budget_needed()
    assert [p["value"] for p in behavior["scaleDown"]["policies"] if p["type"] == "Pods"] == [1]
    assert all(p["periodSeconds"] >= grace for p in behavior["scaleDown"]["policies"])

    hpa, adapter = load_yaml("kubernetes-hpa.yaml")
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (
        spec["minReplicaCount"],
        spec["maxReplicaCount"],
    )
    assert hpa["spec"]["behavior"] == behavior
    (metric,) = hpa["spec"]["metrics"]
    (rule,) = yaml.safe_load(adapter["data"]["config.yaml"])["rules"]
    assert metric["pods"]["metric"]["name"] == rule["name"]["as"]
    assert float(metric["pods"]["target"]["averageValue"]) == per_pod_target
    assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}


def test_the_kserve_inference_service_probes_over_http_and_scales_on_the_same_target(routes):
    (service,) = load_yaml("kserve-inferenceservice.yaml")
    assert (service["apiVersion"], service["kind"]) == ("serving.kserve.io/v1beta1", "InferenceService")
    predictor = service["spec"]["predictor"]
    (container,) = predictor["containers"]
    assert container["name"] == "kserve-container"
    settings = env_settings(container["env"])
    assert container["ports"] == [{"containerPort": 8080, "protocol": "TCP"}] and settings.port == 8080
    for kind, route in (("startupProbe", "/readyz"), ("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        assert container[kind]["httpGet"] == {"path": route, "port": settings.port}, "not KServe's TCP default"
        assert route in routes
    assert startup_seconds(container["startupProbe"]) >= settings.startup_budget_needed()
    assert settings.model_name == service["metadata"]["name"], "the name KServe's clients ask /v2/models about"
    assert {"/v2/health/live", "/v2/health/ready", "/v2/models/<path:name>/ready"} <= routes
    assert predictor["scaleMetric"] == "concurrency"  # in-flight requests per pod; one request is one job
    assert predictor["scaleTarget"] == settings.workers * settings.max_ongoing
    assert predictor["containerConcurrency"] == settings.workers * (settings.max_ongoing + settings.max_queued)
    assert predictor["timeout"] >= settings.request_timeout <= settings.graceful_timeout
    assert predictor["minReplicas"] >= 2
    delay = service["metadata"]["annotations"]["autoscaling.knative.dev/scale-down-delay"]
    assert int(delay.removesuffix("s")) >= settings.startup_budget_needed()


def test_cloud_run_and_fargate_autoscaling_agree_with_the_admission_limits():
    (service,) = load_yaml("cloudrun-service.yaml")
    annotations = service["spec"]["template"]["metadata"]["annotations"]
    assert (
        1
        <= int(annotations["autoscaling.knative.dev/minScale"])
        <= int(annotations["autoscaling.knative.dev/maxScale"])
    )

    scaling = load_json("fargate-autoscaling.json")
    ecs = load_json("fargate-service.json")
    group = load_json("fargate-target-group.json")
    target, policy = scaling["scalableTarget"], scaling["scalingPolicy"]
    assert target["ResourceId"] == policy["ResourceId"] == f"service/CLUSTER/{ecs['serviceName']}"
    assert target["ScalableDimension"] == policy["ScalableDimension"] == "ecs:service:DesiredCount"
    assert 2 <= target["MinCapacity"] == ecs["desiredCount"] <= target["MaxCapacity"]
    tracking = policy["TargetTrackingScalingPolicyConfiguration"]
    metric = tracking["PredefinedMetricSpecification"]
    assert metric["PredefinedMetricType"] == "ALBRequestCountPerTarget"
    assert f"/targetgroup/{group['Name']}/" in metric["ResourceLabel"]
    assert tracking["TargetValue"] > 0
    (container,) = load_json("fargate-task-definition.json")["containerDefinitions"]
    settings = env_settings(container["environment"])
    assert tracking["ScaleInCooldown"] >= settings.startup_budget_needed()


def test_the_fleet_shares_one_redis_and_keda_scales_on_its_backlog(tmp_path):
    """kubernetes.yaml's replicas read JOB_STORE from the Secret kubernetes-redis.yaml's Redis takes its
    password from; KEDA's redis-streams trigger watches the stream and group the store uses, with the same
    per-pod arithmetic as the Prometheus trigger; the Redis arguments are run by Debian's redis-server."""
    import redis

    from tests.conftest import free_port, terminate, wait_for
    from webapp.queue import open_store
    from webapp.queue.lua import GROUP

    deployment, settings = deployment_settings()
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    sourced = {item["name"]: item["valueFrom"] for item in container["env"] if "valueFrom" in item}
    secret = sourced["JOB_STORE"]["secretKeyRef"]
    assert sourced["REPLICA_NAME"] == {"fieldRef": {"fieldPath": "metadata.name"}}  # unique per pod

    redis_set, service = load_yaml("kubernetes-redis.yaml")
    (redis_container,) = redis_set["spec"]["template"]["spec"]["containers"]
    (password_env,) = redis_container["env"]
    assert password_env["valueFrom"]["secretKeyRef"] == {"name": secret["name"], "key": "password"}
    assert secret["key"] == "url"
    (port,) = service["spec"]["ports"]

    scaled = scaled_object()
    (trigger,) = [t for t in scaled["spec"]["triggers"] if t["type"] == "redis-streams"]
    metadata = trigger["metadata"]
    assert metadata["address"] == f"{service['metadata']['name']}.default.svc:{port['port']}"
    url = f"redis://:secret@{service['metadata']['name']}:{port['port']}/0"
    store = open_store(Settings.from_env({**plain_env(container["env"]), "JOB_STORE": url}))
    assert (metadata["stream"], metadata["consumerGroup"]) == (store.stream, GROUP)
    assert int(metadata["lagCount"]) == settings.workers * settings.max_ongoing  # as the Prometheus threshold
    (auth,) = [d for d in load_yaml("kubernetes-keda.yaml") if d["kind"] == "TriggerAuthentication"]
    assert trigger["authenticationRef"]["name"] == auth["metadata"]["name"]
    assert auth["spec"]["secretTargetRef"] == [{"parameter": "password", "name": secret["name"], "key": "password"}]

    # The arguments as Redis reads them: append-only with an fsync a second, no eviction, the password.
    args = [arg.replace("$(REDIS_PASSWORD)", "manifest-test") for arg in redis_container["args"]]
    port_here = free_port()
    command = ["redis-server", *args, "--bind", "127.0.0.1", "--port", str(port_here), "--dir", str(tmp_path)]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        client = redis.Redis(port=port_here, password="manifest-test", socket_timeout=2)
        wait_for(lambda: _pings(client), 30, "redis-server with the manifest's arguments")
        config = {key: client.config_get(key)[key] for key in ("appendonly", "appendfsync", "maxmemory-policy")}
        assert config == {"appendonly": "yes", "appendfsync": "everysec", "maxmemory-policy": "noeviction"}
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=port_here, socket_timeout=2).ping()

        # What KEDA reads (XINFO GROUPS): the lag is the jobs no worker has taken, and stays known when a
        # queued job is canceled (its entry is left for a claim to drop, not deleted).
        local_url = f"redis://:manifest-test@127.0.0.1:{port_here}/0"
        local = open_store(Settings.from_env({**plain_env(container["env"]), "JOB_STORE": local_url}))
        submitted = [local.submit("alice", "generate", {"prompt": "a red circle", "seed": n})[0] for n in range(5)]
        local.claim("replica-a/1")
        local.claim("replica-a/1")
        local.cancel(submitted[3].id)
        (group,) = client.xinfo_groups(metadata["stream"])
        assert (group["name"].decode(), group["lag"], group["pending"]) == (metadata["consumerGroup"], 3, 2)
    finally:
        terminate(proc, 30)


def _pings(client) -> bool:
    import redis

    try:
        return bool(client.ping())
    except (redis.ConnectionError, redis.BusyLoadingError):
        return False


def test_every_manifest_that_runs_several_replicas_takes_its_job_store_from_a_secret():
    """Each platform here runs more than one replica: with the SQLite default, a job would be known only to
    the replica that took it (a poll on another is 404) and lost with it. So each reads JOB_STORE, a Redis
    URL with its password, from the platform's secret store, never from the manifest's text."""
    deployment = load_yaml("kubernetes.yaml")[0]["spec"]["template"]["spec"]["containers"][0]["env"]
    (inference,) = load_yaml("kserve-inferenceservice.yaml")
    kserve = inference["spec"]["predictor"]["containers"][0]["env"]
    (service,) = load_yaml("cloudrun-service.yaml")
    cloudrun = service["spec"]["template"]["spec"]["containers"][0]["env"]
    for env in (deployment, kserve, cloudrun):
        (store,) = [item for item in env if item["name"] == "JOB_STORE"]
        assert "value" not in store and "secretKeyRef" in store["valueFrom"], store
    assert [item["valueFrom"] for item in kserve if item["name"] == "REPLICA_NAME"] == [
        {"fieldRef": {"fieldPath": "metadata.name"}}
    ]
    (container,) = load_json("fargate-task-definition.json")["containerDefinitions"]
    assert "JOB_STORE" not in {item["name"] for item in container["environment"]}
    (secret,) = [item for item in container["secrets"] if item["name"] == "JOB_STORE"]
    assert secret["valueFrom"].startswith("arn:aws:secretsmanager:")
    assert load_json("fargate-task-definition.json")["executionRoleArn"].startswith("arn:aws:iam::")  # reads it
