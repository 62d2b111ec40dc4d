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

Loras = tuple[tuple[str, float], ...]  # (name, scale) per adapter a request asks for, in its order


@dataclass(frozen=True)
class Adapter:
    name: str
    path: Path  # what load_lora_weights reads: the file, or the folder holding it
    stamp: tuple[int, int]  # (mtime_ns, size) of the weights file


class AdapterFailed(Exception):
    """An adapter could not be used: its file is corrupt, built for another base model, or gone. The
    request's fault (a 422 naming it), never the worker's."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"adapter {name!r}: {reason}")
        self.name = name
        self.reason = reason


def _weights(folder: Path) -> Path | None:
    """The safetensors file of an adapter folder: diffusers' default name, else the only one there."""
    default = folder / "pytorch_lora_weights.safetensors"
    if default.is_file():
        return default
    found = [entry for entry in folder.iterdir() if entry.suffix == SUFFIX and entry.is_file()]
    return found[0] if len(found) == 1 else None


def listing(folder: Path | None) -> dict[str, Adapter]:
    """The adapters in ``folder`` (LORA_DIR), by name; empty when there is none or it cannot be read."""
    if folder is None:
        return {}
    found: dict[str, Adapter] = {}
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return {}
    for entry in entries:
        path = Path(entry.path)
        if entry.is_file() and path.suffix == SUFFIX:
            name, weights = path.stem, path
        elif entry.is_dir():
            name, weights = path.name, _weights(path)
        else:
            continue
        if weights is None or not NAME.match(name):
            continue
        try:
            stat = weights.stat()
        except OSError:
            continue
        found[name] = Adapter(name, path, (stat.st_mtime_ns, stat.st_size))
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
