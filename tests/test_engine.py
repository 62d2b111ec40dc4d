"""The engine in this process with a fake model: who is charged for a failed generation, Retry-After, and
progress. The fake stands in for the pipeline so these run in a second; the same behaviours are checked on
the real pipeline under gunicorn in test_hostile.py and test_faults.py."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import wait
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import wait_for
from webapp.board import lifecycle
from webapp.board.lifecycle import Lifecycle
from webapp.board.slots import Board, State
from webapp.engine.core import Engine, NotReady, Overloaded, RejectedByModel, WorkerUnhealthy
from webapp.engine.runner import Runner
from webapp.model.profile import profile
from webapp.model.request import GenerationParams
from webapp.settings import Settings


class OutOfMemoryError(RuntimeError):
    """Named as torch's own (torch.OutOfMemoryError): the faults module matches errors by class name."""


class FakeModel:
    """Images are the prompts themselves. "bad" fails any call it is in (the request's fault), "huge" too, as
    out of memory; "sick" fails its call and the next one (the worker's fault); "slow" takes SLOW_S per
    image; "gate" waits for the gate."""

    device = "cpu"
    profile = profile("StableDiffusionPipeline", (64, 64), 8, None, "float32")
    SLOW_S = 0.5

    def __init__(self) -> None:
        self.calls: list[list[str]] = []
        self.gate = threading.Event()
        self.sick = False

    def use_adapters(self, loras):
        return 0.0

    def generate(self, batch, on_step):
        prompts = [params.prompt for params in batch]
        self.calls.append(prompts)
        if self.sick or "sick" in prompts:
            self.sick = not self.sick
            raise RuntimeError("the device failed this call")
        if prompts == ["warm-up"]:  # the load's warm-up and the canary: its image is checked
            return [[Image.effect_noise((64, 64), 64)]]
        if "fatal-alone" in prompts:  # breaks the device only when it runs on its own
            if len(prompts) == 1:
                raise RuntimeError("CUDA error: an illegal memory access was encountered")
            raise TypeError("a batch this model cannot take")
        if "huge" in prompts:
            raise OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        if "bad" in prompts:
            raise TypeError("TextEncodeInput must be Union[TextInputSequence, Tuple[InputSequence, InputSequence]]")
        if "gate" in prompts:
            self.gate.wait(30)
        if "slow" in prompts:
            time.sleep(self.SLOW_S * sum(params.num_images for params in batch))
        for step in range(batch[0].num_inference_steps):
            on_step(step)
        return [[params.prompt] * params.num_images for params in batch]


MODELS: list[FakeModel] = []


def fake_loader(settings: Settings, slot: int) -> FakeModel:
    MODELS.append(FakeModel())
    return MODELS[-1]


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    settings = Settings.from_env(
        {
            "MODEL_LOADER": "tests.test_engine:fake_loader",
            "MAX_ONGOING": "4",
            "MAX_QUEUED": "2",
            "MAX_BATCH_SIZE": "4",
            "BATCH_WAIT_MS": "300",
            "MAX_CONSECUTIVE_FAILURES": "3",
            "THREADS": "8",
        }
    )
    board = Board.create(tmp_path, capacity=1, expected_workers=1)
    lifecycle.assign(board, 0)
    exits: list[str] = []
    engine = Engine(settings, Lifecycle(board, 0), on_unhealthy=exits.append)
    engine.start()
    wait_for(lambda: engine.state is State.READY, 10, "the fake model to load")
    yield engine
    engine.stop()
    board.remove()


def params(prompt: str, steps: int = 2, images: int = 1) -> GenerationParams:
    return GenerationParams(prompt, None, steps, 7.5, 64, 64, tuple(range(images)))


def test_one_bad_job_in_a_batch_fails_alone_and_the_others_get_their_images(engine):
    jobs = [engine.submit(params(p)) for p in ("one", "bad", "two", "three")]
    wait([job.future for job in jobs], timeout=10)
    assert [job.future.result() for job in jobs if job.params.prompt != "bad"] == [["one"], ["two"], ["three"]]
    with pytest.raises(RejectedByModel):
        jobs[1].future.result()
    model = MODELS[-1]
    assert ["one", "bad", "two", "three"] in model.calls, "the jobs never shared a call"
    assert engine.state is State.READY
    assert engine.lifecycle.board.read(0).failed == 1 and engine.lifecycle.board.read(0).served == 3


def test_bad_requests_never_make_the_worker_unhealthy(engine):
    for _ in range(12):
        job = engine.submit(params("bad"))
        with pytest.raises(RejectedByModel):
            job.future.result(timeout=10)
    assert engine.state is State.READY  # MAX_CONSECUTIVE_FAILURES is 3 here: none of the 12 counted


def test_out_of_memory_for_one_request_is_charged_to_it_and_says_so(engine):
    job = engine.submit(params("huge", images=4))
    with pytest.raises(RejectedByModel) as rejected:
        job.future.result(timeout=10)
    assert rejected.value.out_of_memory
    ok = engine.submit(params("fine"))
    assert ok.future.result(timeout=10) == ["fine"]
    assert engine.state is State.READY


def test_failures_of_the_worker_itself_still_make_it_unhealthy(engine):
    for _ in range(3):
        job = engine.submit(params("sick"))
        with pytest.raises(RuntimeError, match="device failed"):
            job.future.result(timeout=10)
    wait_for(lambda: engine.state is State.UNHEALTHY, 5, "the worker to turn UNHEALTHY")
    assert "3 generations failed in a row" in engine.lifecycle.board.read(0).error


def test_a_good_generation_ends_the_worker_failure_streak(engine):
    for prompt in ("sick", "sick", "fine", "sick", "sick"):
        engine.submit(params(prompt)).future.exception(timeout=10)
    assert engine.state is State.READY


def test_retry_after_covers_every_image_held_at_the_measured_cost_per_image(engine):
    engine.submit(params("slow")).future.result(timeout=10)  # measures about SLOW_S per image
    per_image = FakeModel.SLOW_S
    MODELS[-1].gate.clear()
    held = [engine.submit(params("gate", steps=1, images=1)) for _ in range(6)]  # 4 running, 2 queued
    with pytest.raises(Overloaded) as shed:
        engine.submit(params("one more"))
    MODELS[-1].gate.set()
    wait([job.future for job in held], timeout=10)
    # 6 images wait at about SLOW_S each: the client should come back in about 3 s, not 6 / batch size.
    assert shed.value.retry_after_s >= int(per_image * len(held))


def test_each_step_is_reported_once_then_the_end(engine):
    job = engine.submit(params("fine", steps=5))
    seen = []
    while (item := job.updates.get(timeout=10)) is not None:
        seen.append(item)
    assert seen == [1, 2, 3, 4, 5]
    assert job.future.result() == ["fine"]


def test_a_bug_in_running_a_batch_fails_its_jobs_with_503_and_turns_the_worker_unhealthy(engine, monkeypatch):
    def broken(self, batch):
        raise RuntimeError("a bug in the runner")

    monkeypatch.setattr(Runner, "run", broken)
    job = engine.submit(params("fine"))
    with pytest.raises(WorkerUnhealthy, match="a bug in the runner"):
        job.future.result(timeout=10)
    assert engine.state is State.UNHEALTHY
    assert "engine thread crashed" in engine.lifecycle.board.read(0).error


def test_jobs_waiting_to_run_again_alone_are_answered_when_the_worker_turns_unhealthy_meanwhile(engine):
    jobs = [engine.submit(params(p)) for p in ("fatal-alone", "one", "two")]
    wait([job.future for job in jobs], timeout=10)
    assert all(job.future.done() for job in jobs), "a job of the split batch was never answered"
    for job in jobs[1:]:
        assert isinstance(job.future.exception(), WorkerUnhealthy)
    assert engine.state is State.UNHEALTHY


def test_a_place_held_before_a_drain_is_still_served_and_a_new_one_is_refused(engine):
    """A request that holds its place (``reserve``) while its upload decodes keeps it through a drain (a
    rolling deploy): its job is queued and served, and the engine waits for it before it stops. A request
    that comes after the drain began is refused, as every new one is."""
    engine.reserve()
    engine.drain()
    with pytest.raises(NotReady):
        engine.reserve()
    job = engine.submit(params("decoded meanwhile"), reserved=True)
    assert job.future.result(timeout=10) == ["decoded meanwhile"]
    assert engine.scheduler.reserved == 0


def test_a_place_given_back_counts_no_more(engine):
    engine.reserve()
    assert engine.lifecycle.board.read(0).queued == 1
    engine.release()
    assert engine.lifecycle.board.read(0).queued == 0 and engine.scheduler.reserved == 0
