"""What encoding a finished image costs, per format and size: the server's own ``webapp.api.images.encode``.

    .venv/bin/python bench/encoding.py [--repeats 7] [--sizes 512 1024]

On a fast GPU the pipeline call can take tens of milliseconds, so encoding (on the request's CPU thread)
is a large share of the server's own overhead. Two kinds of picture, since compressors care:
- ``noise``: what the embedded tiny model draws (random weights), the worst case for every format;
- ``scene``: smooth gradients, soft shapes and light grain, a stand-in for a real model's picture.
Each row is the median of ``--repeats`` encodings in this process, plus base64 for a JSON answer, with the
bytes it made and both compared with png of the same picture. Pillow's encoders run on one thread, as in a request.
"""

from __future__ import annotations

import argparse
import base64
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from webapp.api.images import DEFAULT_QUALITY, FORMATS, encode


def picture(kind: str, side: int) -> Image.Image:
    rng = np.random.default_rng(0)
    if kind == "noise":
        return Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8))
    y, x = np.mgrid[0:side, 0:side] / side
    sky = np.stack([0.3 + 0.5 * y, 0.5 + 0.3 * y, 0.9 - 0.4 * y], axis=-1)
    sun = np.exp(-(((x - 0.7) ** 2 + (y - 0.3) ** 2) / 0.01))[..., None] * np.array([1.0, 0.8, 0.3])
    hills = (y > 0.6 + 0.1 * np.sin(x * 9)).astype(float)[..., None] * np.array([-0.4, 0.1, -0.5])
    grain = rng.normal(0, 0.02, (side, side, 3))
    pixels = np.clip(sky + sun + hills + grain, 0, 1)
    return Image.fromarray((pixels * 255).astype(np.uint8))


def measure(image: Image.Image, output_format: str, quality: int, repeats: int) -> tuple[float, float, int]:
    """(median encode ms, median base64 ms, bytes)."""
    encode_ms, b64_ms, size = [], [], 0
    for _ in range(repeats):
        started = time.perf_counter()
        data = encode(image, output_format, quality)
        encoded = time.perf_counter()
        base64.b64encode(data)
        done = time.perf_counter()
        encode_ms.append((encoded - started) * 1000)
        b64_ms.append((done - encoded) * 1000)
        size = len(data)
    return statistics.median(encode_ms), statistics.median(b64_ms), size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--quality", type=int, default=DEFAULT_QUALITY, help="output_compression for jpeg/webp")
    args = parser.parse_args()
    print("| picture | size | format | encode ms | base64 ms | KiB | time vs png | bytes vs png |")
    print("|---|---|---|---|---|---|---|---|")
    for kind in ("scene", "noise"):
        for side in args.sizes:
            image = picture(kind, side)
            rows = {name: measure(image, name, args.quality, args.repeats) for name in FORMATS}
            png_ms, _, png_bytes = rows["png"]
            for output_format, (ms, b64, size) in rows.items():
                print(
                    f"| {kind} | {side}x{side} | {output_format} | {ms:.1f} | {b64:.1f} | {size / 1024:.0f} | "
                    f"{ms / png_ms:.2f}x | {size / png_bytes:.2f}x |"
                )
    print(f"\n(median of {args.repeats} runs each; jpeg and webp at output_compression={args.quality})")


if __name__ == "__main__":
    main()
