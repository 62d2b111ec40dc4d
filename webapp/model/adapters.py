"""LoRA adapters: where they come from, and which of them a worker keeps loaded (docs/architecture.md §16).

``listing(folder)`` reads LORA_DIR at request time (one ``scandir``, no file opened): each ``.safetensors``
file is an adapter named by its stem, each subfolder holding a ``.safetensors`` file one named by the
folder. Names are checked against ``NAME``, so a request can only ever name a listed adapter, never a path.
An adapter's ``stamp`` (modification time and size) tells a changed file from the one loaded or found bad.

``Cache`` is the worker's bookkeeping of loaded adapters, without torch: which are loaded and in what order
they were last used (LRU, evicting the least recently used that the batch does not need), and which are
known bad until their file changes. ``webapp.model.pipeline.DiffusersModel.use_adapters`` does the loading
it plans, on the engine thread, between batches.
"""

from __future__ import annotations

import os
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
SUFFIX = ".safetensors"
# Weights in Python's pickle format run code when they are loaded: never loaded, and an adapter that holds one
# (beside its safetensors file or instead of it) is refused by name rather than left for diffusers to choose.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")

Loras = tuple[tuple[str, float], ...]  # (name, scale) per adapter a request asks for, in its order


@dataclass(frozen=True)
class Adapter:
    name: str
    path: Path  # the file, or the folder holding it, as LORA_DIR lists it
    stamp: tuple[int, int]  # (mtime_ns, size) of the weights file
    weights: Path | None = None  # the one safetensors file load_lora_weights reads (its weight_name), and no other
    problem: str | None = None  # why this adapter is refused by name (a pickle file, two candidates): never loaded


class AdapterFailed(Exception):
    """An adapter could not be used: its file is corrupt, built for another base model, or gone. The
    request's fault (a 422 naming it), never the worker's."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"adapter {name!r}: {reason}")
        self.name = name
        self.reason = reason


def _weights(folder: Path) -> tuple[Path | None, str | None]:
    """The one safetensors file of an adapter folder, or why there is none to load: a pickle file there (beside
    a safetensors file or instead of it), or more than one safetensors file. Symlinks are followed (a Hugging
    Face cache snapshot is made of them)."""
    entries = sorted(folder.iterdir())
    pickles = [entry.name for entry in entries if entry.suffix in PICKLE_SUFFIXES and entry.is_file()]
    found = [entry for entry in entries if entry.suffix == SUFFIX and entry.is_file()]
    if pickles:
        return None, f"its folder holds a pickle file ({', '.join(pickles)}); only {SUFFIX} weights are loaded"
    if len(found) > 1:
        names = ", ".join(entry.name for entry in found)
        return None, f"its folder holds {len(found)} {SUFFIX} files ({names}); keep exactly one"
    if not found:
        return None, None
    return found[0], None


def listing(folder: Path | None) -> dict[str, Adapter]:
    """The adapters in ``folder`` (LORA_DIR), by name; empty when there is none or it cannot be read. An
    entry that cannot be loaded safely (a pickle file, a folder of two candidates) is listed with its
    ``problem``, so a request naming it is refused with that reason."""
    if folder is None:
        return {}
    found: dict[str, Adapter] = {}
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return {}
    for entry in entries:
        path = Path(entry.path)
        problem: str | None = None
        try:
            if entry.is_file() and path.suffix == SUFFIX:
                name, weights = path.stem, path
            elif entry.is_file() and path.suffix in PICKLE_SUFFIXES:
                name, weights = path.stem, None
                problem = f"{path.name} is a pickle file; only {SUFFIX} weights are loaded"
            elif entry.is_dir():
                name = path.name
                weights, problem = _weights(path)
            else:
                continue
        except OSError:
            continue
        if not NAME.match(name) or (weights is None and problem is None):
            continue
        try:
            stat = (weights or path).stat()
        except OSError:
            continue
        found[name] = Adapter(name, path, (stat.st_mtime_ns, stat.st_size), weights, problem)
    return dict(sorted(found.items()))


@dataclass
class Cache:
    """Which adapters a worker holds loaded (at most ``size``), in least-recently-used order, and which
    failed to load (by stamp: a changed file is tried again)."""

    size: int
    loaded: OrderedDict[str, tuple[int, int]] = field(default_factory=OrderedDict)
    bad: dict[str, tuple[tuple[int, int], str]] = field(default_factory=dict)

    def known_bad(self, adapter: Adapter) -> str | None:
        """Why ``adapter`` failed before, if its file has not changed since."""
        seen = self.bad.get(adapter.name)
        return seen[1] if seen is not None and seen[0] == adapter.stamp else None

    def holds(self, adapter: Adapter) -> bool:
        """Whether this very file is loaded; marks it used."""
        if self.loaded.get(adapter.name) == adapter.stamp:
            self.loaded.move_to_end(adapter.name)
            return True
        return False

    def evictions(self, wanted: set[str]) -> list[str]:
        """The adapters to unload so that one more fits, least recently used first, never one in ``wanted``."""
        spare = [name for name in self.loaded if name not in wanted]
        return spare[: max(0, len(self.loaded) + 1 - self.size)]
