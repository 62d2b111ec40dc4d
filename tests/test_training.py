"""training/train.py on a tiny budget: it writes a diffusers folder the server's own loader serves, and a
run resumed from its checkpoint ends with the weights of one that was never interrupted."""

from __future__ import annotations

import concurrent.futures
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.conftest import ROOT

pytestmark = pytest.mark.slow  # the fast lane leaves it out (docs/development.md)


TRAIN_ARGS = [
    "--batch", "4", "--vae-batch", "4", "--vae-whole-batch", "4", "--vae-steps", "2", "--vae-crop-steps", "1",
    "--vae-eval-every", "2", "--vae-target", "0", "--eval-every", "2", "--checkpoint-every", "1", "--threads", "1",
]  # fmt: skip


FAILING_VAE_ARGS = ["--vae-batch", "2", "--vae-steps", "1", "--vae-target", "0.5", "--threads", "1"]


def run_training(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "training/train.py", *args]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)


def train(out: Path, checkpoint: Path, unet_steps: int, *extra: str) -> str:
    result = run_training("--out", str(out), "--checkpoint", str(checkpoint), *TRAIN_ARGS, "--unet-steps",
                          str(unet_steps), *extra)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, object]:
    """The module's training runs that do not depend on one another, two at a time (each uses one thread,
    this machine has two cores): a whole straight run, one stopped early (the first half of the resumed
    run), and one whose VAE fails the analyzer. Each test asserts on its own run."""
    folder = tmp_path_factory.mktemp("training")
    jobs = {
        "straight": lambda: train(folder / "straight" / "model", folder / "straight" / "checkpoint", 4),
        "stopped": lambda: train(folder / "stopped" / "model", folder / "stopped" / "checkpoint", 4, "--stop-at", "2"),
        "vae fails": lambda: run_training(*FAILING_VAE_ARGS, "--out", str(folder / "failed" / "model")),
    }
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        futures = {name: pool.submit(job) for name, job in jobs.items()}
        return {"folder": folder, **{name: future.result() for name, future in futures.items()}}


@pytest.fixture(scope="module")
def straight(runs) -> Path:
    assert "vae done: 2 steps" in runs["straight"] and "wrote " in runs["straight"]
    return runs["folder"] / "straight" / "model"


def test_the_folder_is_served_by_the_servers_own_loader(straight):
    from webapp.model import pipeline
    from webapp.model.request import GenerationParams
    from webapp.settings import Settings

    model = pipeline.load(Settings.from_env({"MODEL_ID": str(straight)}), 0)
    assert model.profile.native_size == (64, 64) and model.profile.family == "sd"
    (images,) = model.generate(
        [GenerationParams("a red circle on a white background", None, 2, 7.5, 64, 64, (1,))], print
    )
    assert images[0].size == (64, 64)


def test_stop_at_ends_the_unet_phase_early_on_the_longer_schedule_and_writes_the_folder(runs):
    output = runs["stopped"]
    assert "unet step 2 " in output and "unet step 4 " not in output
    assert (runs["folder"] / "stopped" / "model" / "model_index.json").is_file()


def test_the_unet_never_starts_on_a_vae_the_analyzer_fails(runs):
    result = runs["vae fails"]
    assert result.returncode == 1
    assert "the VAE is below --vae-target 50%" in result.stderr
    assert "unet step" not in result.stdout and not (runs["folder"] / "failed" / "model").exists()


def test_a_resumed_run_ends_where_an_uninterrupted_one_does(straight, runs):
    """The run stopped at step 2 of 4, started again with the same arguments less --stop-at, as a person
    whose run was cut off would."""
    folder = runs["folder"] / "stopped"
    assert not any(line.startswith("resumed:") for line in runs["stopped"].splitlines())
    second = train(folder / "model", folder / "checkpoint", unet_steps=4)
    assert second.splitlines()[0].startswith("resumed: phase unet, step 2")
    for part in ("unet", "text_encoder", "vae"):
        (weights,) = (straight / part).glob("*.safetensors")
        expected, resumed = load_file(weights), load_file(folder / "model" / part / weights.name)
        assert expected.keys() == resumed.keys()
        assert all((expected[key] == resumed[key]).all() for key in expected), part


def test_the_shipped_model_is_safetensors_within_25_mb_with_its_model_card():
    from webapp.model.pipeline import SCENES_MODEL_DIR

    files = [path for path in SCENES_MODEL_DIR.rglob("*") if path.is_file()]
    weights = [path for path in files if path.suffix == ".safetensors"]
    assert {path.parent.name for path in weights} == {"unet", "vae", "text_encoder"}
    assert not [path for path in files if path.suffix in (".bin", ".pt", ".pth", ".ckpt")]
    assert sum(path.stat().st_size for path in files) <= 25 * 2**20
    card = (SCENES_MODEL_DIR / "README.md").read_text(encoding="utf-8")
    for needed in ("license", "training/train.py", "bench/quality.py", "cannot"):
        assert needed in card, needed


def test_the_lora_script_writes_an_adapter_the_server_loads_and_resumes_where_it_stopped(tmp_path):
    """Two steps, then two more from the checkpoint: the file is one diffusers LoRA safetensors file that the
    server's own use_adapters loads onto the embedded model."""
    from webapp.model import pipeline
    from webapp.settings import Settings

    out, checkpoint = tmp_path / "loras" / "taught.safetensors", tmp_path / "checkpoint"
    command = [sys.executable, "training/train_lora.py", "--out", str(out), "--checkpoint", str(checkpoint)]
    command += ["--batch", "2", "--judge", "0"]
    first = subprocess.run([*command, "--steps", "2"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr
    resumed = subprocess.run([*command, "--steps", "4"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0 and "resumed at step 2" in resumed.stdout, resumed.stdout + resumed.stderr
    model = pipeline.load(Settings.from_env({"LORA_DIR": str(out.parent)}), 0)
    assert model.use_adapters((("taught", 1.0),)) > 0
