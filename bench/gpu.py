"""Each model family on the device this runs on: load, warm-up, seconds per image, batching, peak memory.

    .venv/bin/python bench/gpu.py --tiny                      # the tiny SDXL, SD3 and FLUX builds (offline)
    .venv/bin/python bench/gpu.py --model stabilityai/stable-diffusion-xl-base-1.0 --model /models/flux-dev

Each model goes through the server's own path: ``webapp.model.pipeline.load`` (the dtype DTYPE=auto picks for its
family on this device), ``webapp.model.profile.Limits.of`` (the size a request gets by default), and the
checked warm-up (``webapp.engine.loader.check_warm_up``). Then, at the default size and steps: seconds per image
alone (median of --repeats), and images per second for --batch images in one pipeline call against the
same images one call each. Peak device memory is torch's own count (CUDA only). One row per model, printed
as a table; nothing is asserted about speed.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def measure(model_id: str, repeats: int, batch: int, steps: int | None) -> dict[str, object]:
    import torch

    from webapp.engine import loader
    from webapp.model import pipeline
    from webapp.model.profile import Limits
    from webapp.model.request import GenerationParams
    from webapp.settings import Settings

    cuda = torch.cuda.is_available()
    settings = Settings.from_env({**os.environ, "MODEL_ID": model_id, "MAX_IMAGE_SIZE": "8192"})
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    model = pipeline.load(settings, 0)
    if cuda:
        torch.cuda.synchronize()
    loaded = time.perf_counter()
    limits = Limits.of(settings, model.profile)
    loader.check_warm_up(model, limits)
    if cuda:
        torch.cuda.synchronize()
    warmed = time.perf_counter()
    width, height = limits.default_size
    count = steps or limits.default_steps

    def run(seeds: tuple[int, ...]) -> float:
        params = GenerationParams(
            "a red circle on a white background", None, count, limits.default_guidance or 0.0, width, height, seeds
        )
        begun = time.perf_counter()
        model.generate([params], lambda step: None)
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - begun

    alone = [run((seed,)) for seed in range(repeats)]
    one_by_one = sum(run((seed,)) for seed in range(batch))
    together = run(tuple(range(batch)))
    row = {
        "model": model_id,
        "family": model.profile.family,
        "dtype": model.profile.dtype,
        "size": f"{width}x{height}",
        "steps": count,
        "load_s": loaded - started,
        "warmup_s": warmed - loaded,
        "s_per_image": statistics.median(alone),
        "unbatched_ips": batch / one_by_one,
        "batched_ips": batch / together,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "device": model.device,
    }
    return row


def release() -> None:
    """Free the last model's device memory before the next loads."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", default=[], help="a MODEL_ID to measure (repeatable)")
    parser.add_argument("--tiny", action="store_true", help="also the tiny random-weight SDXL, SD3 and FLUX builds")
    parser.add_argument("--repeats", type=int, default=3, help="single-image runs per model (median)")
    parser.add_argument("--batch", type=int, default=4, help="images in the batched call")
    parser.add_argument("--steps", type=int, help="denoising steps (default: the model's default)")
    args = parser.parse_args()

    models = list(args.model)
    scratch = tempfile.TemporaryDirectory(prefix="gpu-bench-")
    if args.tiny:
        from webapp.model.tiny_model import FAMILY_BUILDS, build_family

        for family in FAMILY_BUILDS:
            folder = Path(scratch.name) / f"tiny-{family}"
            build_family(family).save_pretrained(folder)
            models.append(str(folder))
    if not models:
        parser.error("name a --model, or --tiny")

    rows = []
    for model in models:
        rows.append(measure(model, args.repeats, args.batch, args.steps))
        release()
    print(
        "| model | family | device | dtype (auto) | size | steps | load s | warm-up s | s/image | "
        f"images/s, {args.batch} alone | images/s, {args.batch} batched | batched/alone | peak GiB |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        peak = "n/a (no CUDA)" if row["peak_gib"] is None else f"{row['peak_gib']:.2f}"
        name = Path(str(row["model"])).name if str(row["model"]).startswith(("/", ".")) else row["model"]
        print(
            f"| {name} | {row['family']} | {row['device']} | {row['dtype']} | {row['size']} | {row['steps']} | "
            f"{row['load_s']:.2f} | {row['warmup_s']:.2f} | {row['s_per_image']:.3f} | {row['unbatched_ips']:.2f} | "
            f"{row['batched_ips']:.2f} | {row['batched_ips'] / row['unbatched_ips']:.2f}x | {peak} |"
        )
    scratch.cleanup()


if __name__ == "__main__":
    main()
