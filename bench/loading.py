"""Loading a pipeline of a real size: start to /readyz 200 with one and two workers, beside a bare process
and beside the floor, in one run. Run from the repository root:

    .venv/bin/python bench/loading.py

The model is SD 1.5's architecture with random weights (about 1.07 B parameters, 4.3 GB in float32),
built once into a cache folder outside the repository (``--cache``, default
``~/.cache/honest-diffusion/bench-sd15``) by real diffusers and transformers classes and saved with
``save_pretrained``; later runs reuse it. Its tokenizer is the embedded models' byte-level one, so nothing
is downloaded. Every start serves it at 256x256 (``MAX_IMAGE_SIZE=256``) so the warm-up step stays short
on a CPU.

- **floor**: in a fresh process, the same imports (torch, diffusers and the pipeline's classes), every
  safetensors file read into tensors (``safetensors.torch.load_file``, whose mapped tensors are then
  copied into memory, as loading into a model does; the page cache warm), plus the warm-up step as the
  bare process timed it: the least any server could take.
- **bare**: ``bench/bare.py``, a fresh process that imports, loads with the server's own loader
  (``from_pretrained``) and runs the server's warm-up.
- **1 worker / 2 workers**: ``gunicorn -c gunicorn.conf.py`` with that model, start to /readyz 200.

Each is timed from its process's start, median of ``--runs`` alternated. No test runs this bench: its model
is 4.3 GB. ``bench/suite.py`` measures the same starts on the embedded model.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from servers import ROOT, poll, server

DEFAULT_CACHE = Path.home() / ".cache" / "honest-diffusion" / "bench-sd15"
SIDE = "256"  # MAX_IMAGE_SIZE for every start: the warm-up's size

FLOOR = """
import sys, time
started = time.perf_counter()
sys.path.insert(0, sys.argv[2])
from safetensors.torch import load_file
from webapp.model import pipeline  # torch and diffusers, as bench/bare.py imports them
from diffusers import StableDiffusionPipeline, UNet2DConditionModel, AutoencoderKL, DDIMScheduler
from transformers import CLIPTextModel, CLIPTokenizer
imported = time.perf_counter()
from pathlib import Path
tensors = []
for path in sorted(Path(sys.argv[1]).glob("*/*.safetensors")):
    tensors += [t.clone() for t in load_file(path).values()]  # load_file maps the file: copy the bytes in
read = time.perf_counter()
import json
print(json.dumps({"import_s": imported - started, "read_s": read - imported, "tensors": len(tensors)}))
"""


def build(folder: Path) -> Path:
    """SD 1.5's architecture with random weights, saved to ``folder`` once."""
    if (folder / "model_index.json").is_file():
        return folder
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    sys.path.insert(0, str(ROOT))
    from webapp.model import tiny_model

    torch.manual_seed(0)
    tokenizer = tiny_model.build_tokenizer()
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,  # CLIP's, as SD 1.5 has; the byte-level tokenizer uses the first 514
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)  # SD 1.5's
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        sample_size=512,
    )
    parts = {"tokenizer": tokenizer, "text_encoder": text_encoder, "unet": unet, "vae": vae}
    pipe = tiny_model.assemble(parts)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def parameters(folder: Path) -> int:
    """The parameters in the folder's safetensors files, read from their headers."""
    from safetensors import safe_open

    count = 0
    for path in folder.glob("*/*.safetensors"):
        with safe_open(path, "pt") as weights:
            count += sum(math.prod(weights.get_slice(key).get_shape()) for key in weights.keys())  # noqa: SIM118
    return count


def warm_page_cache(folder: Path) -> None:
    for path in folder.glob("*/*.safetensors"):
        with path.open("rb") as file:
            while file.read(1 << 24):
                pass


def env_for(folder: Path) -> dict[str, str]:
    return {"MODEL_ID": str(folder), "MAX_IMAGE_SIZE": SIDE, "HF_HUB_OFFLINE": "1"}


def floor(folder: Path) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", FLOOR, str(folder), str(ROOT)],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, **env_for(folder), "WEB_CONCURRENCY": "1"},
    )
    return json.loads(done.stdout.splitlines()[-1])


def bare(folder: Path) -> dict:
    """bench/bare.py's own figures (import, load, warm-up) and its wall-clock start to ready."""
    spawned = time.monotonic()
    args = [sys.executable, str(ROOT / "bench" / "bare.py")]
    env = {**os.environ, **env_for(folder), "WEB_CONCURRENCY": "1"}
    with subprocess.Popen(args, cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) as proc:
        header = json.loads(proc.stdout.readline())
        header["ready_s"] = time.monotonic() - spawned
        proc.stdin.close()
    return header


def server_ready(folder: Path, cache: str, workers: int) -> float:
    env = {key: value for key, value in env_for(folder).items() if key != "HF_HUB_OFFLINE"}  # server() sets it
    with server(cache, WEB_CONCURRENCY=str(workers), **env) as (url, _, start):
        ready, _ = poll(url + "/readyz", lambda r: r.status_code == 200, 900)
    return ready - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="where the model is built once")
    parser.add_argument("--runs", type=int, default=3, help="runs of each start, alternated")
    args = parser.parse_args()

    built = time.monotonic()
    folder = build(args.cache)
    build_s = time.monotonic() - built
    size_gb = sum(p.stat().st_size for p in folder.glob("*/*.safetensors")) / 1e9
    warm_page_cache(folder)
    floors, bares, ones, twos = [], [], [], []
    with tempfile.TemporaryDirectory() as cache:
        for _ in range(args.runs):
            floors.append(floor(folder))
            bares.append(bare(folder))
            ones.append(server_ready(folder, cache, 1))
            twos.append(server_ready(folder, cache, 2))
    floor_parts = {key: statistics.median(f[key] for f in floors) for key in ("import_s", "read_s")}
    floor_parts["step_s"] = statistics.median(b["warmup_s"] for b in bares)  # the same step, in a bare process
    floor_s = sum(floor_parts.values())
    bare_load = statistics.median(b["load_s"] for b in bares)
    bare_import = statistics.median(b["import_s"] for b in bares)

    def row(name: str, values: list[float]) -> str:
        middle = statistics.median(values)
        return f"| {name} | {middle:.2f} s ({min(values):.2f}-{max(values):.2f}) | {middle / floor_s:.2f}x |"

    print(
        f"\nSD 1.5's architecture, random weights, {parameters(folder) / 1e9:.2f} B parameters, "
        f"{size_gb:.2f} GB of safetensors (float32), served at {SIDE}x{SIDE}; "
        f"{os.cpu_count()} CPUs, CPU only; median of {args.runs}, alternated"
        + (f"; built in {build_s:.0f} s" if build_s > 1 else "; built before")
        + "\n"
    )
    print("| start to ready | seconds | against the floor |")
    print("|---|---|---|")
    print(
        f"| floor: import {floor_parts['import_s']:.2f} + bytes into tensors {floor_parts['read_s']:.2f} + one "
        f"warm-up step {floor_parts['step_s']:.2f} (the bare process's) | {floor_s:.2f} s | 1.00x |"
    )
    print(
        row(
            f"bare process: import {bare_import:.2f} + from_pretrained {bare_load:.2f} + warm-up "
            f"{floor_parts['step_s']:.2f}, and the interpreter's start",
            [b["ready_s"] for b in bares],
        )
    )
    print(row("server, 1 worker, /readyz 200", ones))
    print(row("server, 2 workers, /readyz 200", twos))


if __name__ == "__main__":
    main()
