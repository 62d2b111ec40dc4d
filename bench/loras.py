"""LoRA adapters per request: what loading one costs, what drawing with one costs, and a workload that cycles
through more adapters than a worker's cache holds, beside the same workload with every adapter resident.
Run from the repository root:

    .venv/bin/python bench/loras.py

It loads the embedded model with the server's loader, in this process, and drives the engine's own calls
(``DiffusersModel.use_adapters`` then ``generate``, as the engine thread runs a batch), one image per call
at 64x64 and ``--steps`` steps (20, the model's default). The adapters are copies of the shipped ``night`` adapter
(webapp/model/weights/loras) under ``--adapters`` names in a temporary LORA_DIR:

- **first use**: the load of an adapter not held (``load_lora_weights``), median over the copies;
- **per image**: no adapter, and one adapter held, alternated, median of ``--runs`` each;
- **cycling**: ``--requests`` requests naming the adapters in turn, with a cache of ``--cache`` (fewer than
  the adapters, so each request evicts and loads), against a cache that holds them all (every request a
  hit after the first round): hit rate and the p50 / p99 of a request's engine time (load + image).

No test asserts these figures; tests/test_bench.py runs it short.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapters", type=int, default=6, help="adapters in the folder")
    parser.add_argument("--cache", type=int, default=2, help="LORA_CACHE_SIZE of the cycling run")
    parser.add_argument("--requests", type=int, default=36, help="requests in each cycling run")
    parser.add_argument("--runs", type=int, default=9, help="images per configuration of the per-image row")
    parser.add_argument("--steps", type=int, default=20, help="denoising steps per image")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from webapp.model import pipeline
    from webapp.model.request import GenerationParams
    from webapp.settings import EMBEDDED_LORA_DIR, Settings

    folder = Path(tempfile.mkdtemp(prefix="bench-loras-"))
    try:
        names = [f"night{index}" for index in range(args.adapters)]
        for name in names:
            shutil.copy(EMBEDDED_LORA_DIR / "night.safetensors", folder / f"{name}.safetensors")
        size = (EMBEDDED_LORA_DIR / "night.safetensors").stat().st_size

        def model_with(cache: int) -> pipeline.DiffusersModel:
            settings = Settings.from_env({"LORA_DIR": str(folder), "LORA_CACHE_SIZE": str(cache), "MAX_LORAS": "1"})
            return pipeline.load(settings, 0)

        def request(model: pipeline.DiffusersModel, loras: tuple, seed: int = 0) -> tuple[float, float]:
            params = GenerationParams("a red circle at night", None, args.steps, 4.0, 64, 64, (seed,), loras=loras)
            began = time.monotonic()
            loading = model.use_adapters(loras)
            model.generate([params], lambda step: None)
            return loading, time.monotonic() - began

        model = model_with(args.adapters)
        request(model, ())  # the first call pays for lazy set-up
        first_use = [model.use_adapters(((name, 1.0),)) for name in names]
        plain, adapted = [], []
        for _ in range(args.runs):
            plain.append(request(model, ())[1])
            adapted.append(request(model, ((names[0], 1.0),))[1])
        print(f"Embedded model, CPU, 64x64, {args.steps} steps; adapter file {size / 1e3:.0f} kB (rank 8, float32)\n")
        print("| measure | value | compared to | ratio |")
        print("|---|---|---|---|")
        median_load = statistics.median(first_use)
        print(
            f"| first use of an adapter: load_lora_weights (median of {len(first_use)}) | {median_load * 1000:.1f} ms "
            f"| one image {statistics.median(plain) * 1000:.0f} ms | {median_load / statistics.median(plain):.2f}x |"
        )
        print(
            f"| one image with an adapter held (median of {args.runs}) | {statistics.median(adapted) * 1000:.0f} ms "
            f"| without {statistics.median(plain) * 1000:.0f} ms | "
            f"{statistics.median(adapted) / statistics.median(plain):.2f}x |"
        )
        rows = {}
        for label, cache in (("cycling", args.cache), ("resident", args.adapters)):
            model = model_with(cache)
            request(model, ())
            hits, times = 0, []
            for index in range(args.requests):
                loading, took = request(model, ((names[index % len(names)], 1.0),), index)
                hits += loading == 0.0
                times.append(took)
            rows[label] = (hits / args.requests, percentile(times, 0.5), percentile(times, 0.99))
        cycling, resident = rows["cycling"], rows["resident"]
        print(
            f"| {args.requests} requests cycling {args.adapters} adapters, cache {args.cache}: hit rate, p50 / p99 "
            f"| {cycling[0]:.0%}, {cycling[1] * 1000:.0f} / {cycling[2] * 1000:.0f} ms | cache {args.adapters} "
            f"(all resident): {resident[0]:.0%}, {resident[1] * 1000:.0f} / {resident[2] * 1000:.0f} ms "
            f"| {cycling[1] / resident[1]:.2f}x / {cycling[2] / resident[2]:.2f}x |"
        )
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
