"""Adapter churn and a worker's memory: adapters cycled through a cache of one, each load evicting the last,
with a one-step image drawn after every load (text-to-image and image-to-image in turn), beside the same loop
drawing the same images with no adapter. Run from the repository root:

    .venv/bin/python bench/lora_churn.py

Each run is a fresh process that loads the embedded model with the server's own loader
(``webapp.model.pipeline.load``) and drives ``DiffusersModel.use_adapters`` and ``generate`` as the engine
thread does; three copies of the shipped ``night`` adapter are named in turn with ``LORA_CACHE_SIZE=1``, so
every request loads one and evicts one. Resident memory (VmRSS, after a garbage collection) is printed every
``--every`` loads, and each run's slope is fitted from its 500th load on (the first hundreds warm the
allocator up). ``mapped`` is the same loop with safetensors' default ``mmap`` backend, as the server loaded
adapters before (``pipeline._read_not_mapped``). No test asserts these figures; tests/test_bench.py runs it
short.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NIGHT = ROOT / "webapp" / "model" / "weights" / "loras" / "night.safetensors"
NAMES = ("a", "b", "c")


def rss_mb() -> float:
    gc.collect()
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def run(kind: str, loads: int, every: int, folder: str) -> list[tuple[int, float]]:
    """One configuration in this process: (loads so far, RSS MB) every ``every`` iterations."""
    sys.path.insert(0, str(ROOT))
    from PIL import Image

    from webapp.model import pipeline
    from webapp.model.request import GenerationParams
    from webapp.settings import Settings

    if kind == "mapped":  # the loader as it was: safetensors maps each adapter file
        pipeline._read_not_mapped = contextlib.nullcontext  # type: ignore[assignment]
    settings = Settings.from_env({"LORA_DIR": folder, "LORA_CACHE_SIZE": "1", "MAX_LORAS": "1"})
    model = pipeline.load(settings, 0)
    picture = Image.new("RGB", (64, 64), "white")
    picture.paste((255, 0, 0), (16, 16, 48, 48))
    text = GenerationParams("a red circle on a white background", None, 1, 1.0, 64, 64, (7,))
    edit = GenerationParams(
        "a blue circle on a white background",
        None,
        2,
        1.0,
        64,
        64,
        (7,),
        image=picture,
        strength=0.5,
        denoising_steps=1,
    )
    points = []
    for index in range(loads + 1):
        if index % every == 0:
            points.append((index, round(rss_mb(), 2)))
        loras = () if kind == "none" else ((NAMES[index % len(NAMES)], 1.0),)
        model.use_adapters(loras)
        model.generate([text if index % 2 == 0 else edit], lambda step: None)
    return points


def slope(points: list[tuple[int, float]], start: int) -> float:
    """Least-squares MB per 1000 loads over the points from ``start`` on."""
    kept = [(x, y) for x, y in points if x >= start]
    if len(kept) < 2:
        return float("nan")
    mean_x = sum(x for x, _ in kept) / len(kept)
    mean_y = sum(y for _, y in kept) / len(kept)
    spread = sum((x - mean_x) ** 2 for x, _ in kept)
    return 1000 * sum((x - mean_x) * (y - mean_y) for x, y in kept) / spread


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loads", type=int, default=5000, help="adapter loads (and images) per run")
    parser.add_argument("--mapped-loads", type=int, default=2000, help="loads of the mmap run (0: skip it)")
    parser.add_argument("--every", type=int, default=500)
    parser.add_argument("--child", nargs=3, metavar=("KIND", "LOADS", "FOLDER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, loads, folder = args.child
        print(json.dumps(run(kind, int(loads), args.every, folder)))
        return
    with tempfile.TemporaryDirectory() as folder:
        for name in NAMES:
            shutil.copy(NIGHT, Path(folder) / f"{name}.safetensors")
        runs: dict[str, list[tuple[int, float]]] = {}
        plan = [("adapters", args.loads), ("none", args.loads)]
        if args.mapped_loads:
            plan.append(("mapped", args.mapped_loads))
        for kind, loads in plan:
            command = [sys.executable, __file__, "--every", str(args.every), "--child", kind, str(loads), folder]
            done = subprocess.run(command, capture_output=True, text=True, check=True, timeout=7200)
            runs[kind] = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"{kind}: {runs[kind]}", file=sys.stderr, flush=True)
    start = min(500, args.loads // 2)
    print(
        f"\nembedded model, LORA_CACHE_SIZE=1, 3 copies of the night adapter named in turn (a load and an eviction "
        f"each), one 1-step 64x64 image after each (text and image-to-image in turn); RSS MB every {args.every}\n"
    )
    labels = {"adapters": "adapters (pread)", "none": "no adapters", "mapped": "adapters (mmap, before)"}
    header = "| loads | " + " | ".join(labels[kind] for kind in runs) + " |"
    print(header)
    print("|---" * (len(runs) + 1) + "|")
    for index, (loads, _) in enumerate(runs["adapters"]):
        cells = [f"{runs[kind][index][1]:.1f}" if index < len(runs[kind]) else "" for kind in runs]
        print(f"| {loads} | " + " | ".join(cells) + " |")
    slopes = " | ".join(f"{slope(runs[kind], start):+.2f}" for kind in runs)
    print(f"| MB per 1000 loads, from load {start} | {slopes} |")


if __name__ == "__main__":
    main()
