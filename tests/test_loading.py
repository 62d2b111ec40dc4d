"""Which load errors are retried: real from_pretrained failures on broken copies of the tiny model,
the retry policy itself, and an engine whose model loads but fails its warm-up."""

from __future__ import annotations

import errno
import os
import shutil
import time

import pytest

from tests.conftest import wait_for
from webapp.board import lifecycle
from webapp.board.lifecycle import Lifecycle
from webapp.board.slots import Board, State
from webapp.engine import loader
from webapp.engine.core import Engine, NotReady
from webapp.model import faults
from webapp.model.request import GenerationParams
from webapp.settings import Settings

pytestmark = pytest.mark.slow  # the fast lane leaves it out (docs/development.md)

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    from webapp.model.tiny_model import ensure_built

    return ensure_built(tmp_path_factory.mktemp("tiny"))


@pytest.fixture
def broken_copy(tiny_folder, tmp_path):
    copy = tmp_path / "model"
    shutil.copytree(tiny_folder, copy)
    return copy


def load_error(location) -> BaseException:
    from diffusers import AutoPipelineForText2Image

    with pytest.raises(BaseException) as caught:
        AutoPipelineForText2Image.from_pretrained(str(location))
    return caught.value


def chain_names(exc: BaseException) -> list[str]:
    names = []
    while exc is not None:
        names.append(type(exc).__name__)
        exc = exc.__cause__ or exc.__context__
    return names


def truncate(path, keep=100):
    data = path.read_bytes()
    path.write_bytes(data[:keep])


def test_a_truncated_text_encoder_raises_safetensor_error_and_is_permanent(broken_copy):
    truncate(broken_copy / "text_encoder" / "model.safetensors")
    exc = load_error(broken_copy)
    assert "SafetensorError" in chain_names(exc)
    assert not isinstance(exc, OSError) or "SafetensorError" in chain_names(exc)
    assert not faults.is_transient(exc)


def test_truncated_unet_weights_are_permanent(broken_copy):
    (weights,) = (broken_copy / "unet").glob("*.safetensors")
    truncate(weights)
    exc = load_error(broken_copy)
    assert not faults.is_transient(exc)


def test_a_missing_model_index_is_permanent(broken_copy):
    (broken_copy / "model_index.json").unlink()
    exc = load_error(broken_copy)
    assert isinstance(exc, OSError)
    assert not faults.is_transient(exc)


def test_a_missing_absolute_path_is_permanent(tmp_path):
    exc = load_error(tmp_path / "nothing-here")
    assert not faults.is_transient(exc)


def test_an_uncached_hub_id_while_offline_is_permanent():
    exc = load_error("some-org/not-cached-anywhere")
    assert "OfflineModeIsEnabled" in chain_names(exc) or "LocalEntryNotFoundError" in chain_names(exc)
    assert not faults.is_transient(exc)


class ConnectError(Exception):
    """Named like httpx's: the classifier matches by name so it never imports httpx."""


class HfHubHTTPError(OSError):
    def __init__(self, status):
        super().__init__(f"HTTP {status}")
        self.response = type("Response", (), {"status_code": status})()


def wrapped(outer: BaseException, cause: BaseException) -> BaseException:
    outer.__cause__ = cause
    return outer


@pytest.mark.parametrize(
    ("exc", "transient"),
    [
        (ConnectionError("reset"), True),
        (TimeoutError("slow disk"), True),
        (OSError(errno.EIO, "I/O error"), True),
        (OSError(errno.ESTALE, "stale NFS handle"), True),
        (wrapped(OSError("couldn't connect to the hub"), ConnectError("name resolution failed")), True),
        (HfHubHTTPError(503), True),
        (HfHubHTTPError(429), True),
        (HfHubHTTPError(401), False),
        (OSError("Error no file named model_index.json found"), False),
        (FileNotFoundError(errno.ENOENT, "gone"), False),
        (ValueError("bad config"), False),
        (OverflowError("int too big to convert"), False),
        (ImportError("no module named xformers"), False),
        (RuntimeError("Error(s) in loading state_dict"), False),
        (wrapped(RuntimeError("load failed"), TimeoutError("read timed out")), True),
    ],
)
def test_transient_or_permanent(exc, transient):
    assert faults.is_transient(exc) is transient


def count_attempts(policy, error):
    calls = []
    with pytest.raises(type(error)):
        for attempt in policy:
            with attempt:
                calls.append(time.monotonic())
                raise error
    return calls


def test_transient_errors_are_retried_until_the_attempt_limit():
    policy = loader.retrying(3, 60, 0.01, 0.02, before_sleep=lambda state: None)
    assert len(count_attempts(policy, ConnectionError("down"))) == 3


def test_permanent_errors_stop_after_one_attempt():
    policy = loader.retrying(5, 60, 0.01, 0.02, before_sleep=lambda state: None)
    assert len(count_attempts(policy, ValueError("bad"))) == 1


def test_no_retry_starts_that_would_end_past_the_time_budget():
    policy = loader.retrying(100, 0.5, 0.4, 0.4, before_sleep=lambda state: None)
    calls = count_attempts(policy, ConnectionError("down"))
    assert 1 <= len(calls) <= 2
    assert calls[-1] - calls[0] < 0.5


def test_the_wait_before_a_retry_is_written_to_the_board_callback():
    waits = []
    policy = loader.retrying(3, 60, 0.05, 0.1, before_sleep=lambda s: waits.append(s.next_action.sleep))
    count_attempts(policy, ConnectionError("down"))
    assert len(waits) == 2
    assert all(0.05 <= w <= 0.2 for w in waits)


@pytest.fixture
def engine_board(tmp_path):
    board = Board.create(tmp_path, capacity=1, expected_workers=1)
    lifecycle.assign(board, 0)
    yield board
    board.remove()


def engine_settings(model_id, tmp_path) -> Settings:
    return Settings.from_env({"MODEL_ID": str(model_id), "MODEL_CACHE_DIR": str(tmp_path), "LOAD_BACKOFF_INITIAL": "0"})


def test_a_model_that_loads_but_cannot_generate_ends_failed_at_warm_up(broken_copy, engine_board, tmp_path):
    shutil.rmtree(broken_copy / "tokenizer")
    engine = Engine(engine_settings(broken_copy, tmp_path), Lifecycle(engine_board, 0))
    engine.start()
    try:
        record = wait_for(
            lambda: engine_board.read(0) if engine_board.read(0).state is State.FAILED else None,
            120,
            "the engine to report FAILED",
        )
    finally:
        engine.stop()
    assert record.attempt == 1
    assert record.error.startswith("permanent error on attempt 1:")
    assert engine.model is None
    with pytest.raises(NotReady):
        engine.submit(GenerationParams("x", None, 1, 1.0, 64, 64, (0,)))


def test_an_engine_on_the_real_tiny_model_becomes_ready_and_serves(tiny_folder, engine_board, tmp_path):
    engine = Engine(engine_settings(tiny_folder, tmp_path), Lifecycle(engine_board, 0))
    with pytest.raises(NotReady):
        engine.submit(GenerationParams("x", None, 1, 1.0, 64, 64, (0,)))
    engine.start()
    try:
        wait_for(lambda: engine_board.read(0).state is State.READY, 120, "the engine to report READY")
        assert engine.state is State.READY, "the board said READY before the engine's own state did"
        job = engine.submit(GenerationParams("a tree", None, 2, 5.0, 64, 64, (1, 2)))
        images = job.future.result(timeout=60)
    finally:
        engine.stop()
    assert [image.size for image in images] == [(64, 64), (64, 64)]
    record = engine_board.read(0)
    assert record.served == 1 and record.device == "cpu" and record.last_step_mono > 0


def test_an_accelerator_gets_its_weights_read_straight_onto_it_and_the_cpu_maps_the_files(tiny_folder):
    """docs/benchmarks.md, loading. No CUDA device runs here, so the GPU's placement is checked as the argument
    the loader passes; the path it takes (from_pretrained with a device_map, then .to) runs for real with the
    device map diffusers accepts on a CPU."""
    import numpy as np
    from diffusers import AutoPipelineForText2Image

    from webapp.model import pipeline

    assert pipeline.placement("cpu") == {}
    assert pipeline.placement("cuda:1") == {"device_map": "cuda"}
    assert pipeline.placement("cuda") == {"device_map": "cuda"}
    mapped = AutoPipelineForText2Image.from_pretrained(tiny_folder, device_map="cpu").to("cpu")
    drawn = mapped("a red circle", num_inference_steps=2, height=64, width=64, output_type="np").images
    assert drawn.shape == (1, 64, 64, 3) and np.isfinite(drawn).all()
