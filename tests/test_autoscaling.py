"""The autoscalers' queries, proven against a real Prometheus from Debian scraping a real two-worker server.

The query texts are read from the manifests themselves: the KEDA ScaledObject's trigger query
(docker/kubernetes-keda.yaml) and prometheus-adapter's rule for the HPA (docker/kubernetes-hpa.yaml),
rendered the way the adapter renders it for one pod. No Kubernetes runs here, so the labels a cluster's
scrape job would add to every series (namespace, pod and the pod's app label) are given as the scrape
target's static labels. Under load the value must rise (jobs queue), and it must fall back to 0 when the
load stops; a worker that hangs and is then SIGKILLed must show in Prometheus as worker_untrusted 1 and
ready 0, then ready 1 again, each readiness change counted once more.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

from tests.conftest import ROOT, free_port, process_state, terminate, wait_for

pytestmark = pytest.mark.slow  # the fast lane leaves it out (docs/development.md)

DOCKER = ROOT / "docker"
# What a cluster's scrape job gives every series of the pod (see the comment at the top of the module).
POD_LABELS = {"namespace": "default", "pod": "honest-diffusion-0", "app": "honest-diffusion"}
METRIC_NAME = re.compile(r"\bhonest_diffusion_[a-z_]+\b")


def keda_query() -> str:
    documents = [d for d in yaml.safe_load_all((DOCKER / "kubernetes-keda.yaml").read_text()) if d]
    (scaled,) = [d for d in documents if d["kind"] == "ScaledObject"]
    (trigger,) = [t for t in scaled["spec"]["triggers"] if t["type"] == "prometheus"]
    return trigger["metadata"]["query"]


def adapter_rule() -> dict[str, Any]:
    documents = [d for d in yaml.safe_load_all((DOCKER / "kubernetes-hpa.yaml").read_text()) if d]
    (config,) = [d for d in documents if d["kind"] == "ConfigMap"]
    (rule,) = yaml.safe_load(config["data"]["config.yaml"])["rules"]
    return rule


def adapter_query(pods: list[str]) -> str:
    """The rule's metricsQuery as prometheus-adapter renders it when the HPA asks about ``pods``."""
    matchers = f'namespace="{POD_LABELS["namespace"]}",pod=~"{"|".join(pods)}"'
    return adapter_rule()["metricsQuery"].replace("<<.LabelMatchers>>", matchers).replace("<<.GroupBy>>", "pod")


class Prometheus:
    """A Prometheus on a free loopback port scraping ``target`` every second; stopped by pid in stop()."""

    def __init__(self, folder: Path, target: str) -> None:
        self.url = f"http://127.0.0.1:{free_port()}"
        config = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "scrape_configs": [
                {"job_name": "honest-diffusion", "static_configs": [{"targets": [target], "labels": POD_LABELS}]}
            ],
        }
        (folder / "prometheus.yml").write_text(yaml.safe_dump(config))
        self._log = open(folder / "prometheus.log", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [
                shutil.which("prometheus") or "prometheus",
                f"--config.file={folder / 'prometheus.yml'}",
                f"--storage.tsdb.path={folder / 'data'}",
                f"--web.listen-address={self.url.removeprefix('http://')}",
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self.log_path = folder / "prometheus.log"

    def ready(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"prometheus exited:\n{self.log_path.read_text()[-3000:]}")
        try:
            return requests.get(self.url + "/-/ready", timeout=2).status_code == 200
        except requests.ConnectionError:
            return False

    def query(self, text: str, at: float | None = None) -> list[dict[str, Any]]:
        """An instant query through the HTTP API, now or ``at`` (Unix time): the result vector."""
        params = {"query": text} if at is None else {"query": text, "time": f"{at:.3f}"}
        answer = requests.get(self.url + "/api/v1/query", params=params, timeout=10).json()
        assert answer["status"] == "success", answer
        assert answer["data"]["resultType"] == "vector", answer
        return answer["data"]["result"]

    def value(self, text: str, at: float | None = None, **labels: str) -> float | None:
        """The value of the one sample of ``text`` whose labels include ``labels``; None when there is none."""
        samples = [s for s in self.query(text, at) if all(s["metric"].get(k) == v for k, v in labels.items())]
        assert len(samples) <= 1, samples
        return float(samples[0]["value"][1]) if samples else None

    def names(self) -> set[str]:
        return set(requests.get(self.url + "/api/v1/label/__name__/values", timeout=10).json()["data"])

    def stop(self) -> None:
        terminate(self.proc, 30)
        self._log.close()


QUEUES = ("queued", "running")


def at_least(prometheus: Prometheus, text: str, floor: float) -> float | None:
    """The Unix time of an evaluation at which ``text`` was at least ``floor``, or None."""
    now = time.time()
    value = prometheus.value(text, at=now)
    return now if value is not None and value >= floor else None


def load(url: str, clients: int, stop: threading.Event, answers: list[int | str]) -> list[threading.Thread]:
    """``clients`` closed-loop clients posting slow jobs until ``stop``; each answer's status (or the
    exception that stood for one) in ``answers``."""

    def client(index: int) -> None:
        session = requests.Session()
        seed = 1000 * index
        while not stop.is_set():
            seed += 1
            job = {"prompt": "a red circle on a white background", "num_inference_steps": 20, "seed": seed}
            try:
                answers.append(session.post(url + "/generate", json=job, timeout=120).status_code)
            except requests.RequestException as exc:
                answers.append(repr(exc))

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for thread in threads:
        thread.start()
    return threads


def test_the_scaling_queries_of_the_manifests_follow_the_load_in_a_real_prometheus(start_server, tmp_path):
    assert shutil.which("prometheus"), "Debian's prometheus is needed: apt-get install prometheus (README)"
    # Two workers, 2 running + 10 queued each: 12 clients fill the running batches and queue the rest,
    # without a shed even when one worker accepts every connection (gunicorn does not balance them: with 6
    # queued each, a worker that took 9 of the 12 shed one). A hung worker is stale after 2 s.
    server = start_server(MAX_ONGOING="2", MAX_QUEUED="10", HEARTBEAT_TIMEOUT="2", HEARTBEAT_INTERVAL="0.2")
    server.wait_ready()
    prometheus = Prometheus(tmp_path, f"127.0.0.1:{server.port}")
    try:
        wait_for(prometheus.ready, 60, "prometheus to be ready")
        keda, hpa = keda_query(), adapter_query([POD_LABELS["pod"]])
        wait_for(lambda: prometheus.value(keda) == 0, 60, "the first scrapes: an idle server holds no job")
        assert prometheus.value(hpa, pod=POD_LABELS["pod"]) == 0

        # Every name a manifest's query uses is in a real scrape, and in Prometheus.
        texts = [keda, adapter_rule()["metricsQuery"], adapter_rule()["seriesQuery"]]
        used = {name for text in texts for name in METRIC_NAME.findall(text)}
        scraped = {sample.name for sample in server.metrics().samples}
        assert used and used <= scraped, used - scraped
        assert used <= prometheus.names()

        stop, answers = threading.Event(), list[int | str]()
        threads = load(server.url, 12, stop, answers)
        try:
            # Above the 8 that can queue (12 clients less 2 x 2 running): the running jobs count too.
            peak = wait_for(lambda: at_least(prometheus, keda, 10), 120, "the KEDA query to rise with the load")
            # At that instant both autoscalers' queries say the same, and it is queued + running.
            assert prometheus.value(hpa, at=peak, pod=POD_LABELS["pod"]) == prometheus.value(keda, at=peak)
            parts = [prometheus.value(f"sum(honest_diffusion_worker_{part}_jobs)", at=peak) for part in QUEUES]
            assert prometheus.value(keda, at=peak) == sum(value or 0 for value in parts)
            queued = "sum(honest_diffusion_worker_queued_jobs)"
            wait_for(lambda: (prometheus.value(queued) or 0) > 0, 60, "jobs to queue behind the running batches")
        finally:
            stop.set()
            for thread in threads:
                thread.join(timeout=180)
        assert answers and set(answers) == {200}, sorted(set(answers))
        wait_for(lambda: prometheus.value(keda) == 0, 60, "the KEDA query back to 0 once the load stops")
        assert prometheus.value(hpa, pod=POD_LABELS["pod"]) == 0

        # A worker hangs (SIGSTOP), then is killed: Prometheus sees it untrusted and the pod not ready, then
        # a replacement READY and the pod ready again, each change counted once more.
        changes = "honest_diffusion_readiness_changes_total"
        before = {to: prometheus.value(changes, to=to) or 0 for to in ("ready", "not_ready")}
        victim = server.workers()[1]
        slot = str(victim["slot"])
        os.kill(victim["pid"], signal.SIGSTOP)
        try:
            wait_for(
                lambda: prometheus.value("honest_diffusion_worker_untrusted", slot=slot) == 1,
                60,
                "worker_untrusted 1 for the hung worker's slot",
            )
            wait_for(lambda: prometheus.value("honest_diffusion_ready") == 0, 30, "ready 0 in Prometheus")
            assert prometheus.value("honest_diffusion_worker_untrusted", slot=str(1 - int(slot))) == 0
        finally:
            os.kill(victim["pid"], signal.SIGKILL)
        wait_for(lambda: process_state(victim["pid"]) in ("", "Z"), 30, "the hung worker to be gone")
        wait_for(lambda: prometheus.value("honest_diffusion_ready") == 1, 240, "ready 1 after the replacement loads")
        assert prometheus.value("honest_diffusion_worker_untrusted", slot=slot) == 0
        assert prometheus.value("honest_diffusion_worker_state", slot=slot, state="READY") == 1
        after = {to: prometheus.value(changes, to=to) or 0 for to in ("ready", "not_ready")}
        assert after["not_ready"] == before["not_ready"] + 1, (before, after)
        assert after["ready"] == before["ready"] + 1, (before, after)
        assert prometheus.value(keda) == 0
    finally:
        prometheus.stop()
