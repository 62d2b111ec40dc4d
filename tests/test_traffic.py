"""Admission, deadlines and batching on real one-worker servers, driven concurrently over HTTP."""

from __future__ import annotations

import base64
import io
import threading

import numpy as np
import pytest
import requests
from PIL import Image

from tests.conftest import running_server, wait_for
from tests.test_faults import LONG_JOB, Background, in_flight

pytestmark = pytest.mark.slow  # the fast lane leaves it out (docs/development.md)

ONE_WORKER = {"WEB_CONCURRENCY": "1"}
P = "honest_diffusion_"


@pytest.fixture(scope="module")
def server(model_cache, tmp_path_factory):
    """One worker for the deadline and batching tests, which each wait until it is idle again, and read its
    counters as differences: a job queued behind a running one waits whatever MAX_BATCH_SIZE is (a running
    call is never joined)."""
    with running_server(model_cache, tmp_path_factory.mktemp("traffic"), **ONE_WORKER) as server:
        yield server


def idle(server):
    row = server.workers()[0]
    return row if row["in_flight"] == 0 and row["queued"] == 0 else None


def test_overload_at_four_times_capacity_sheds_at_once_and_serves_every_accepted_request(start_server):
    # Capacity 3 jobs (1 running + 2 waiting); 12 requests arrive together.
    server = start_server(**ONE_WORKER, MAX_ONGOING="1", MAX_QUEUED="2", MAX_BATCH_SIZE="1", THREADS="16")
    server.wait_ready()
    job = {"prompt": "crowd", "num_inference_steps": 10, "seed": 1}
    requests_ = [Background(server, job, timeout=120) for _ in range(12)]

    health_codes: list[int] = []
    stop = threading.Event()

    def probe_health():
        while not stop.is_set():
            health_codes.append(requests.get(server.url + "/healthz", timeout=10).status_code)

    prober = threading.Thread(target=probe_health, daemon=True)
    prober.start()
    results = [r.wait(120) for r in requests_]
    stop.set()
    prober.join(15)

    assert all(isinstance(r, requests.Response) for r in results), results
    accepted = [(r, b) for r, b in zip(results, requests_, strict=True) if r.status_code == 200]
    shed = [(r, b) for r, b in zip(results, requests_, strict=True) if r.status_code != 200]
    assert len(accepted) >= 3 and shed, [r.status_code for r in results]
    for response, _ in shed:
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "overloaded"
        assert int(response.headers["Retry-After"]) >= 1
    # Shed requests were answered at once, not queued behind the work: each came back before the last
    # accepted one finished.
    last_accepted = max(b.finished_at for _, b in accepted)
    assert all(b.finished_at < last_accepted for _, b in shed)
    assert health_codes and set(health_codes) == {200}
    status, body = server.readyz()
    assert status == 200
    assert body["workers"][0]["shed"] == len(shed)
    assert body["workers"][0]["served"] >= len(accepted)
    metrics = server.metrics()
    assert metrics.value(P + "jobs_shed_total") == len(shed)
    assert metrics.value(P + "http_requests_total", route="/generate", status="503") == len(shed)
    assert metrics.value(P + "http_requests_total", route="/generate", status="200") == len(accepted)
    # Every accepted job waited in the queue once and ran in a batch of one (MAX_BATCH_SIZE=1).
    assert metrics.value(P + "queue_wait_seconds_count") == len(accepted)
    assert metrics.value(P + "batch_images_bucket", le="1.0") == len(accepted)


def test_a_job_whose_deadline_passes_in_the_queue_is_dropped_unrun(server):
    wait_for(lambda: idle(server), 60, "the worker to be idle")
    served_before = server.workers()[0]["served"]
    before = server.metrics()
    long = Background(server, LONG_JOB)
    wait_for(lambda: in_flight(server), 60, "the long job to start")

    late = server.post("/generate", json={"prompt": "in a hurry", "num_inference_steps": 1, "timeout_s": 0.5})
    assert late.status_code == 504
    assert late.json()["error"]["code"] == "timeout"
    assert "in the queue" in late.json()["error"]["message"]

    assert long.wait(120).status_code == 200

    row = wait_for(lambda: idle(server), 30, "the worker to be idle")
    assert row["served"] == served_before + 1, "the expired job must never have run"
    metrics = server.metrics()
    for phase, more in (("queued", 1), ("running", 0)):
        counted = metrics.value(P + "jobs_timed_out_total", phase=phase)
        assert counted == before.value(P + "jobs_timed_out_total", phase=phase) + more, phase


def test_a_running_job_past_its_deadline_is_interrupted_between_steps(server):
    wait_for(lambda: idle(server), 60, "the worker to be idle")
    served_before = server.workers()[0]["served"]
    before = server.metrics()
    response = server.post("/generate", json=LONG_JOB, headers={"X-Request-Timeout": "1"})
    assert response.status_code == 504
    assert "while running" in response.json()["error"]["message"]

    wait_for(lambda: not in_flight(server), 30, "the device to be free again")
    assert "event=batch_interrupted" in server.log_tail(300)
    assert server.workers()[0]["served"] == served_before
    metrics = server.metrics()
    for name, labels in (
        ("jobs_timed_out_total", {"phase": "running"}),
        ("generation_duration_seconds_count", {"outcome": "interrupted"}),
    ):
        assert metrics.value(P + name, **labels) == before.value(P + name, **labels) + 1, name
    after = server.post("/generate", json={"prompt": "next", "num_inference_steps": 1})
    assert after.status_code == 200


def test_deadlines_above_request_timeout_are_refused_not_clamped(server):
    body = server.post("/generate", json={"prompt": "x", "timeout_s": 121}).json()
    assert body["error"]["field"] == "timeout_s" and "REQUEST_TIMEOUT=120" in body["error"]["message"]
    header = server.post("/generate", json={"prompt": "x"}, headers={"X-Request-Timeout": "soon"})
    assert header.status_code == 422 and header.json()["error"]["field"] == "X-Request-Timeout"


def decode(response_json) -> np.ndarray:
    (image,) = response_json["images"]
    with Image.open(io.BytesIO(base64.b64decode(image["png_base64"]))) as png:
        return np.asarray(png.convert("RGB"), dtype=np.int16)


def test_a_seed_gives_the_same_image_alone_or_in_a_batch(server):
    wait_for(lambda: idle(server), 60, "the worker to be idle")
    # Three compatible jobs queue behind a long one, so they share the next pipeline call (MAX_BATCH_SIZE: 4).
    long = Background(server, LONG_JOB)
    wait_for(lambda: in_flight(server), 60, "the long job to start")
    jobs = [{"prompt": f"lamp {seed}", "num_inference_steps": 3, "seed": seed} for seed in (5, 6, 7)]
    together = [Background(server, job) for job in jobs]
    wait_for(lambda: server.workers()[0]["queued"] == 3, 60, "the three jobs to queue")
    batched = [r.wait(120).json() for r in together]
    assert long.wait(120).status_code == 200
    assert [b["batch"]["images"] for b in batched] == [3, 3, 3], [b["batch"] for b in batched]

    alone = []
    for job in jobs:
        body = server.post("/generate", json=job).json()
        assert body["batch"] == {"jobs": 1, "images": 1}
        alone.append(body)
    for in_batch, by_itself in zip(batched, alone, strict=True):
        # Batched and single UNet/VAE calls differ by about 1e-6 in float; after rounding to 8 bits a
        # pixel may land one level apart. Anything larger would mean the seed did not pick the image.
        difference = np.abs(decode(in_batch) - decode(by_itself))
        assert difference.max() <= 2, difference.max()
        assert difference.mean() < 0.05
    assert np.abs(decode(batched[0]) - decode(batched[1])).mean() > 1, "different seeds gave the same image"
