"""GET /metrics on real gunicorn servers: every scrape adds up all workers, dead ones included."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT, Metrics, wait_for

pytestmark = pytest.mark.slow  # the fast lane leaves it out (docs/development.md)

P = "honest_diffusion_"
MONOTONIC_SUFFIXES = ("_total", "_count", "_sum", "_bucket")


def test_the_master_imports_no_prometheus_client_before_it_sets_the_metrics_folder():
    # prometheus_client picks multiprocess mode at its first import; the master sets the folder in
    # on_starting, so loading the config (what the master does first) must not import it.
    code = "import runpy, sys; runpy.run_path('gunicorn.conf.py'); sys.exit('prometheus_client' in sys.modules)"
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_every_scrape_adds_up_the_counts_of_both_workers(ready_server):
    # Each worker counted its own load and state changes in its own process; whichever worker answers a
    # scrape must report both.
    for _ in range(6):
        metrics = ready_server.metrics()
        assert metrics.value(P + "load_attempts_total", outcome="ok") == 2
        assert metrics.value(P + "load_duration_seconds_count", outcome="ready") == 2
        assert metrics.value(P + "worker_state_changes_total", state="READY") == 2
        assert metrics.value(P + "worker_state", state="READY") == 2
        assert metrics.value(P + "ready") == 1 and metrics.value(P + "alive") == 1
        assert metrics.value(P + "workers_expected") == 2


def test_generations_are_counted_with_their_queue_waits_batches_and_statuses(ready_server):
    before = ready_server.metrics()
    for seed in range(3):
        response = ready_server.post("/generate", json={"prompt": "counted", "num_inference_steps": 2, "seed": seed})
        assert response.status_code == 200
    assert ready_server.post("/generate", json={"prompt": "x", "width": 7}).status_code == 422
    assert ready_server.get("/no/such/path").status_code == 404
    after = ready_server.metrics()

    def grew(name: str, **labels: str) -> float:
        return after.value(name, **labels) - before.value(name, **labels)

    assert grew(P + "http_requests_total", method="POST", route="/generate", status="200") == 3
    assert grew(P + "http_requests_total", method="POST", route="/generate", status="422") == 1
    assert grew(P + "http_request_duration_seconds_count", route="/generate") == 4
    assert grew(P + "queue_wait_seconds_count") == 3
    assert grew(P + "generation_duration_seconds_count", outcome="served") == 3
    assert grew(P + "batch_images_sum") == 3
    assert grew(P + "batch_jobs_count") == 3
    # Unknown paths share one label, so a scanner cannot make a series per path.
    assert grew(P + "http_requests_total", route="unmatched", status="404") == 1
    assert "/no/such/path" not in after.text


def test_the_scrape_is_prometheus_text_and_the_board_shows_each_slot(ready_server):
    response = ready_server.get("/metrics")
    assert response.headers["Content-Type"].startswith("text/plain; version=")
    metrics = Metrics(response.text)
    for slot in ("0", "1"):
        assert metrics.value(P + "worker_state", slot=slot, state="READY") == 1
        assert metrics.value(P + "worker_state", slot=slot, state="LOADING") == 0
        assert 0 <= metrics.value(P + "worker_heartbeat_age_seconds", slot=slot) < 10
        assert metrics.value(P + "worker_queued_jobs", slot=slot) == 0
    assert metrics.value(P + "readiness_changes_total", to="ready") == 1


def test_the_access_log_leaves_probes_out_and_carries_request_ids(ready_server):
    ready_server.get("/healthz")
    ready_server.get("/metrics", headers={"X-Request-ID": "trace-42"})

    def access_line():
        lines = [line for line in ready_server.log_lines() if "request_id=trace-42" in line]
        return lines[0] if lines else None

    line = wait_for(access_line, 10, "the access log line of the scrape")
    assert "event=request" in line and "path=/metrics" in line and "status=200" in line
    requests_logged = [line for line in ready_server.log_lines() if "event=request " in line]
    assert not [line for line in requests_logged if "path=/readyz" in line or "path=/healthz" in line]


def test_a_killed_workers_counts_survive_and_its_files_are_folded_into_the_totals(start_server, tmp_path):
    server = start_server()
    server.wait_ready()
    for seed in range(3):
        assert server.post("/generate", json={"prompt": "kept", "num_inference_steps": 2, "seed": seed}).ok
    before = server.metrics()
    (folder,) = tmp_path.glob("honest-diffusion-*/metrics")
    victim = server.workers()[0]["pid"]
    assert (folder / f"counter_{victim}.db").exists()

    os.kill(victim, signal.SIGKILL)
    # The fold deletes the dead worker's files one after another: wait for all of them.
    wait_for(lambda: not list(folder.glob(f"*_{victim}.db")), 30, "the master to fold the dead worker's files")
    assert (folder / "counter_exited.db").exists() and (folder / "histogram_exited.db").exists()

    wait_for(lambda: server.metrics().value(P + "readiness_changes_total", to="not_ready") == 1, 30, "a change")
    after = server.metrics()
    for sample in before.samples:
        if sample.name.startswith(P) and sample.name.endswith(MONOTONIC_SUFFIXES):
            assert after.value(sample.name, **sample.labels) >= sample.value, (sample.name, sample.labels)
    assert after.value(P + "http_requests_total", route="/generate", status="200") == 3

    server.wait_ready()
    healed = server.metrics()
    assert healed.value(P + "worker_state_changes_total", state="READY") == 3
    assert healed.value(P + "readiness_changes_total", to="ready") == 2


def _counter_file(path, value: float) -> None:
    from prometheus_client.mmap_dict import MmapedDict, mmap_key

    store = MmapedDict(str(path))
    store.write_value(mmap_key(P + "x_total", P + "x_total", [], [], "x"), value, 0.0)
    store.close()


def _read(path) -> list[float]:
    from prometheus_client.mmap_dict import MmapedDict

    return [value for _, value, _, _ in MmapedDict.read_all_values_from_file(str(path))]


def test_the_master_folds_dead_workers_files_but_never_waits_on_a_scrape(tmp_path, monkeypatch):
    from webapp.board import metric_files

    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    dead_pid = 2**22 + 12345  # above pid_max's default: no such process
    _counter_file(tmp_path / f"counter_{dead_pid}.db", 3)
    _counter_file(tmp_path / "counter_exited.db", 4)
    _counter_file(tmp_path / f"counter_{os.getpid()}.db", 100)  # a live process: left alone

    with metric_files.scrape_lock(str(tmp_path)):  # a scrape in progress (or a SIGSTOPped one)
        started = time.monotonic()
        metric_files.fold_exited(dead_pid, wait_s=0.2)
        assert time.monotonic() - started < 5
    assert (tmp_path / f"counter_{dead_pid}.db").exists(), "folded under a scrape's lock"

    metric_files.fold_exited(dead_pid)
    assert not (tmp_path / f"counter_{dead_pid}.db").exists()
    assert _read(tmp_path / "counter_exited.db") == [7]
    assert _read(tmp_path / f"counter_{os.getpid()}.db") == [100]


def test_a_scrape_skips_the_empty_file_of_a_worker_that_is_just_starting(tmp_path):
    from webapp.board import metric_files

    _counter_file(tmp_path / "counter_101.db", 5)
    (tmp_path / "counter_102.db").touch()  # created, not yet sized: what a booting worker leaves for an instant
    (family,) = list(metric_files.FolderCollector(str(tmp_path)).collect())
    assert [sample.value for sample in family.samples] == [5]
