"""Edits against text-to-image: a worker's memory with and without the edit pipelines, and the time per image
of each mode at the same size and steps. Run from the repository root:

    .venv/bin/python bench/edits.py

Each configuration runs in a fresh process (so one's allocations cannot flatter another's) that loads the
configured model with the server's own loader:

- **text only**: the text-to-image pipeline as ``from_pretrained`` gives it, then text-to-image images;
- **with edits**: the same, plus ``edit_pipelines`` (from_pipe, and the one-step check each mode passes at
  load), then images in every mode.

Memory is the process's resident set (VmRSS) and proportional set size (Pss, /proc/self/smaps_rollup)
after the load and after the images. Time is one image per pipeline call, the median of ``--runs``, with
``--steps`` steps at ``--size`` x ``--size``; image-to-image at strength 0.8 (its default: it runs 80 % of
the steps) and at 1.0 (all of them), inpainting at its default 1.0 with half the image masked. The input is a
rendered scene of the embedded model. Each mode is compared with text-to-image in the same process; the
text-only process's text-to-image shows whether the edit pipelines slow it. No test asserts these figures;
tests/test_bench.py runs it short.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def memory_mb() -> dict[str, float]:
    """This process's VmRSS and Pss, in MB."""
    figures = {}
    for path, key, name in (("/proc/self/status", "VmRSS:", "rss"), ("/proc/self/smaps_rollup", "Pss:", "pss")):
        for line in Path(path).read_text().splitlines():
            if line.startswith(key):
                figures[name] = int(line.split()[1]) / 1024
                break
    return figures


def measure(edits: bool, runs: int, steps: int, size: int) -> dict[str, object]:
    """One configuration, in this process: load, memory, then the median time per image of each mode."""
    sys.path.insert(0, str(ROOT))
    import torch

    from webapp.model import pipeline, scenes
    from webapp.model.request import GenerationParams, edit_steps
    from webapp.settings import Settings

    settings = Settings.from_env({})
    started = time.monotonic()
    if edits:
        model = pipeline.load(settings, 0)
    else:  # the loader's own steps, less the edit pipelines
        torch.set_num_threads(settings.torch_threads or 2)
        pipe = pipeline.AutoPipelineForText2Image.from_pretrained(pipeline.model_location(settings))
        pipe.set_progress_bar_config(disable=True)
        model = pipeline.DiffusersModel(pipe, "cpu", pipeline.profile_of(pipe, "float32"))
    load_s = time.monotonic() - started
    loaded = memory_mb()
    picture = scenes.render(scenes.Scene("circle", "red", "white"), size)
    mask = picture.convert("L").point(lambda value: 255 if value > 250 else 0)  # the white background
    modes = {"text-to-image": {}}
    if edits:
        modes |= {
            "image-to-image, strength 0.8": {"image": picture, "strength": 0.8},
            "image-to-image, strength 1.0": {"image": picture, "strength": 1.0},
            "inpainting, strength 1.0": {"image": picture, "mask": mask, "strength": 1.0},
        }
    timings = {}
    for name, edit in modes.items():
        params = GenerationParams(
            "a blue circle on a white background",
            None,
            steps,
            model.profile.default_guidance,
            size,
            size,
            (0,),
            denoising_steps=edit_steps(steps, edit["strength"], model.profile.family) if edit else 0,
            **edit,
        )
        model.generate([params], lambda step: None)  # the first call of a mode pays for its lazy set-up
        seconds = []
        for _ in range(runs):
            began = time.monotonic()
            model.generate([params], lambda step: None)
            seconds.append(time.monotonic() - began)
        timings[name] = {"median_s": statistics.median(seconds), "steps": params.steps_run}
    return {"load_s": load_s, "loaded": loaded, "after": memory_mb(), "timings": timings}


def run_child(edits: bool, args: argparse.Namespace) -> dict[str, object]:
    command = [sys.executable, __file__, "--child", "edits" if edits else "text", "--runs", str(args.runs)]
    command += ["--steps", str(args.steps), "--size", str(args.size)]
    done = subprocess.run(command, capture_output=True, text=True, check=True, cwd=ROOT)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=7, help="timed images per mode (median)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--child", choices=["text", "edits"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child == "edits", args.runs, args.steps, args.size)))
        return 0
    text, edits = run_child(False, args), run_child(True, args)
    print(f"Embedded model, CPU, {args.size}x{args.size}, {args.steps} steps, median of {args.runs}\n")
    print("| measure | with edits | text only | ratio |")
    print("|---|---|---|---|")
    for when in ("loaded", "after"):
        for kind in ("rss", "pss"):
            mine, theirs = edits[when][kind], text[when][kind]
            label = "after load" if when == "loaded" else "after images in every mode it serves"
            print(f"| {kind.upper()} {label} | {mine:.1f} MB | {theirs:.1f} MB | {mine / theirs:.3f}x |")
    print(f"| load (from_pretrained{' + edit pipelines'}) | {edits['load_s']:.2f} s | {text['load_s']:.2f} s | |")
    base = edits["timings"]["text-to-image"]["median_s"]
    print("\n| mode | steps run | s per image | against text-to-image in the same process |")
    print("|---|---|---|---|")
    for name, figures in edits["timings"].items():
        seconds = figures["median_s"]
        print(f"| {name} | {figures['steps']} | {seconds:.3f} | {seconds / base:.2f}x |")
    alone = text["timings"]["text-to-image"]["median_s"]
    print(f"| text-to-image, in the text-only process | {args.steps} | {alone:.3f} | {alone / base:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
