"""The baseline without the server: the bare pipeline in a fresh process, as a worker would run it.

Prints one JSON line: seconds to import the pipeline code (torch + diffusers), to load the model
(``webapp.model.pipeline.load``, the server's own loader, so the same ``from_pretrained`` and device choice),
and to run the same one-step warm-up the engine runs. Then, for each seed read from stdin (one per
line), it generates one image with the arguments the suite also sends through the server and prints the
seconds the call took, so the suite can alternate bare and HTTP calls under the same host conditions.
It reads the same environment (MODEL_ID, MODEL_CACHE_DIR, WEB_CONCURRENCY for the thread count) as a
worker. Run by ``bench/suite.py``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--prompt", default="a quiet harbour")
    args = parser.parse_args()

    started = time.perf_counter()
    from webapp.engine import loader
    from webapp.model import pipeline
    from webapp.model.profile import Limits
    from webapp.model.request import GenerationParams
    from webapp.settings import Settings
    from webapp.telemetry import logs

    imported = time.perf_counter()
    logs.configure("kv")  # stdout carries only the JSON result
    settings = Settings.from_env()
    model = pipeline.load(settings, 0)
    loaded = time.perf_counter()
    limits = Limits.of(settings, model.profile)
    width, height = limits.default_size
    model.generate([loader.warm_up_params(limits)], lambda step: None)
    warmed = time.perf_counter()

    result = {"import_s": imported - started, "load_s": loaded - imported, "warmup_s": warmed - loaded}
    print(json.dumps({**result, "total_s": warmed - started, "size": [width, height]}), flush=True)
    for line in sys.stdin:
        job = GenerationParams(args.prompt, None, args.steps, limits.default_guidance, width, height, (int(line),))
        sent = time.perf_counter()
        model.generate([job], lambda step: None)
        print(time.perf_counter() - sent, flush=True)


if __name__ == "__main__":
    main()
