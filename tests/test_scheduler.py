"""The scheduler alone: admission, batch forming, deadlines and arrival order, with times given by the test.
No model, no threads, no server: each test runs in microseconds."""

from __future__ import annotations

import pytest
from PIL import Image

from webapp.engine.scheduler import Job, Outcome, Overloaded, Scheduler
from webapp.model.request import GenerationParams


def job(name: str = "a", size: int = 64, steps: int = 2, images: int = 1, deadline: float = 100.0) -> Job:
    params = GenerationParams(name, None, steps, 7.5, size, size, tuple(range(images)))
    return Job(params, deadline=deadline, enqueued=0.0)


def names(jobs: list[Job]) -> list[str]:
    return [each.params.prompt for each in jobs]


def take(scheduler: Scheduler, now: float = 1.0) -> list[Job]:
    scheduler.fill(now)
    return scheduler.start(now)


def test_admission_holds_max_ongoing_plus_max_queued_then_sheds_with_a_retry_after():
    scheduler = Scheduler(max_ongoing=2, max_queued=1, max_batch_size=4)
    for name in "abc":
        scheduler.admit(job(name))
    with pytest.raises(Overloaded) as shed:
        scheduler.admit(job("d"))
    assert "holds 3 jobs" in str(shed.value) and shed.value.retry_after_s >= 1
    assert scheduler.counts() == {"queued": 3, "in_flight": 0, "served": 0, "failed": 0, "shed": 1}


def test_running_jobs_count_against_admission_too():
    scheduler = Scheduler(max_ongoing=1, max_queued=1, max_batch_size=1)
    scheduler.admit(job("a"))
    assert names(take(scheduler)) == ["a"]
    scheduler.admit(job("b"))
    with pytest.raises(Overloaded):
        scheduler.admit(job("c"))


def test_compatible_jobs_share_a_batch_up_to_max_batch_size_images():
    scheduler = Scheduler(max_ongoing=8, max_queued=8, max_batch_size=4)
    for name, images in (("a", 1), ("b", 2), ("c", 2), ("d", 1)):
        scheduler.admit(job(name, images=images))
    batch = take(scheduler)
    assert names(batch) == ["a", "b", "d"]  # c's 2 images would make 5
    assert [each.batch_images for each in batch] == [4, 4, 4] and batch[0].batch_jobs == 3


def test_a_batch_never_holds_more_than_max_ongoing_jobs():
    scheduler = Scheduler(max_ongoing=2, max_queued=8, max_batch_size=8)
    for name in "abcd":
        scheduler.admit(job(name))
    assert names(take(scheduler)) == ["a", "b"]


def test_only_jobs_with_the_same_size_steps_and_guidance_share_a_call():
    scheduler = Scheduler(max_ongoing=8, max_queued=8, max_batch_size=8)
    scheduler.admit(job("a", size=64))
    scheduler.admit(job("b", size=128))
    scheduler.admit(job("c", size=64, steps=3))
    scheduler.admit(job("d", size=64))
    assert names(take(scheduler)) == ["a", "d"]


def edit(name: str, strength: float, inpaint: bool = False) -> Job:
    picture = Image.new("RGB", (64, 64))
    mask = Image.new("L", (64, 64), 255) if inpaint else None
    params = GenerationParams(name, None, 2, 7.5, 64, 64, (0,), image=picture, mask=mask, strength=strength)
    return Job(params, deadline=100.0, enqueued=0.0)


def test_only_jobs_of_the_same_mode_and_strength_share_a_call():
    """Each mode is its own pipeline, and strength decides where an edit's schedule starts."""
    scheduler = Scheduler(max_ongoing=8, max_queued=8, max_batch_size=8)
    for each in (
        job("text"),
        edit("image 0.5", 0.5),
        edit("image 0.8", 0.8),
        edit("inpaint 0.5", 0.5, inpaint=True),
        edit("image 0.5 again", 0.5),
        job("text again"),
    ):
        scheduler.admit(each)
    order = []
    while scheduler.pending:
        order.append(names(take(scheduler)))
        scheduler.finish(Outcome.SERVED, 2.0)
    assert order == [["text", "text again"], ["image 0.5", "image 0.5 again"], ["image 0.8"], ["inpaint 0.5"]]


def test_only_jobs_naming_the_same_adapters_at_the_same_scales_share_a_call():
    """A pipeline call runs with one adapter set: set_adapters is called once per batch."""
    scheduler = Scheduler(max_ongoing=8, max_queued=8, max_batch_size=8)
    for name, loras in (
        ("plain", ()),
        ("night", (("night", 1.0),)),
        ("night at half", (("night", 0.5),)),
        ("night again", (("night", 1.0),)),
        ("plain again", ()),
    ):
        params = GenerationParams(name, None, 2, 7.5, 64, 64, (0,), loras=loras)
        scheduler.admit(Job(params, deadline=100.0, enqueued=0.0))
    order = []
    while scheduler.pending:
        order.append(names(take(scheduler)))
        scheduler.finish(Outcome.SERVED, 2.0)
    assert order == [["plain", "plain again"], ["night", "night again"], ["night at half"]]


def test_arrival_order_is_kept_a_job_is_only_overtaken_by_jobs_sharing_its_batch():
    scheduler = Scheduler(max_ongoing=8, max_queued=8, max_batch_size=8)
    for name, size in (("a", 64), ("b", 128), ("c", 64), ("d", 128), ("e", 256)):
        scheduler.admit(job(name, size=size))
    order = []
    while scheduler.pending:
        batch = take(scheduler)
        order.append(names(batch))
        scheduler.finish(Outcome.SERVED, 2.0)
    assert order == [["a", "c"], ["b", "d"], ["e"]]


def test_a_job_larger_than_a_batch_still_runs_alone():
    scheduler = Scheduler(max_ongoing=4, max_queued=4, max_batch_size=2)
    scheduler.admit(job("big", images=4))
    scheduler.admit(job("small"))
    assert names(take(scheduler)) == ["big"]


def test_expired_and_abandoned_jobs_are_dropped_unrun_and_returned_to_be_told():
    scheduler = Scheduler(max_ongoing=4, max_queued=4, max_batch_size=4)
    late, gone, live = job("late", deadline=5.0), job("gone"), job("live")
    for each in (late, gone, live):
        scheduler.admit(each)
    gone.abandon()
    dropped = scheduler.fill(now=6.0)
    assert dropped == [late, gone]
    assert names(scheduler.start(6.0)) == ["live"]
    assert scheduler.counts()["queued"] == 0


def test_a_job_cancelled_while_its_batch_forms_is_left_out_when_it_starts():
    scheduler = Scheduler(max_ongoing=4, max_queued=4, max_batch_size=4)
    first, second = job("first"), job("second")
    scheduler.admit(first)
    scheduler.admit(second)
    scheduler.fill(1.0)
    second.future.cancel()
    assert scheduler.start(1.0) == [first]


def test_jobs_forming_a_batch_still_count_as_queued_and_against_admission():
    scheduler = Scheduler(max_ongoing=2, max_queued=0, max_batch_size=4)
    scheduler.admit(job("a"))
    scheduler.admit(job("b"))
    scheduler.fill(1.0)  # both wait for BATCH_WAIT_MS in the batch being formed
    assert scheduler.counts()["queued"] == 2
    with pytest.raises(Overloaded):
        scheduler.admit(job("c"))


def test_room_for_more_ends_at_either_limit():
    scheduler = Scheduler(max_ongoing=2, max_queued=4, max_batch_size=3)
    scheduler.admit(job("a", images=2))
    scheduler.fill(1.0)
    assert scheduler.has_room()
    scheduler.admit(job("b"))
    scheduler.fill(1.0)
    assert not scheduler.has_room()  # 3 images


def test_steps_reach_every_running_job_and_say_when_nobody_waits_any_more():
    scheduler = Scheduler(max_ongoing=4, max_queued=4, max_batch_size=4)
    one, two = job("one", deadline=10.0), job("two", deadline=20.0)
    scheduler.admit(one)
    scheduler.admit(two)
    take(scheduler)
    assert scheduler.step(0, now=5.0) is False
    assert (one.steps_done, two.steps_done) == (1, 1) and one.updates.get_nowait() == 1
    assert scheduler.step(1, now=15.0) is False  # two still waits
    two.abandon()
    assert scheduler.step(2, now=16.0) is True


def test_a_stall_is_measured_from_the_last_step_and_only_while_something_runs():
    scheduler = Scheduler(max_ongoing=4, max_queued=4, max_batch_size=4)
    assert scheduler.stalled_for(now=100.0) == 0.0
    scheduler.admit(job("a"))
    take(scheduler, now=10.0)
    scheduler.step(0, now=12.0)
    assert scheduler.stalled_for(now=20.0) == 8.0


def test_outcomes_count_served_and_failed_and_only_served_calls_set_the_cost_per_image():
    scheduler = Scheduler(max_ongoing=4, max_queued=4, max_batch_size=4)
    scheduler.admit(job("a", images=2))
    take(scheduler, now=0.0)
    batch, elapsed = scheduler.finish(Outcome.SERVED, now=4.0)
    assert names(batch) == ["a"] and elapsed == 4.0 and batch[0].finished == 4.0
    assert scheduler.seconds_per_image == 2.0
    scheduler.admit(job("b"))
    take(scheduler, now=5.0)
    scheduler.finish(Outcome.FAILED, now=50.0)
    assert scheduler.seconds_per_image == 2.0
    assert scheduler.counts() == {"queued": 0, "in_flight": 0, "served": 1, "failed": 1, "shed": 0}


def test_retry_after_is_the_images_held_times_the_measured_seconds_per_image():
    scheduler = Scheduler(max_ongoing=1, max_queued=4, max_batch_size=4)
    scheduler.admit(job("a"))
    take(scheduler, now=0.0)
    scheduler.finish(Outcome.SERVED, now=1.5)  # 1.5 s per image
    for name in "bcd":
        scheduler.admit(job(name, images=2))
    assert scheduler.retry_after() == 9  # 6 images x 1.5 s


def test_clearing_hands_back_every_job_held_running_forming_and_queued():
    scheduler = Scheduler(max_ongoing=1, max_queued=4, max_batch_size=1)
    for name in "abc":
        scheduler.admit(job(name))
    take(scheduler)
    scheduler.fill(1.0)
    assert names(scheduler.clear()) == ["a", "b", "c"]
    assert scheduler.counts()["queued"] == 0 and scheduler.counts()["in_flight"] == 0


def test_a_place_held_for_a_job_still_decoding_counts_against_capacity_until_given_back():
    """A request holds its place (``reserve``) before its upload is decoded, so a full worker refuses it
    before it costs a decode; the place is queued work on the board, and is given back when its job is
    queued or when it will never be."""
    scheduler = Scheduler(max_ongoing=1, max_queued=1, max_batch_size=1)
    scheduler.reserve()
    scheduler.admit(job())
    assert scheduler.counts()["queued"] == 2
    with pytest.raises(Overloaded):
        scheduler.reserve()
    with pytest.raises(Overloaded):
        scheduler.admit(job())
    scheduler.release()
    assert scheduler.counts()["queued"] == 1
    scheduler.reserve()
    assert scheduler.shed == 2
