"""The package structure docs/architecture.md §9 draws, as import-linter contracts in pyproject.toml: each
layer imports only the layers below it, and nothing but the model's pipeline and builders imports torch or
diffusers. ``lint-imports`` reads the imports from the source; a contract it reports broken fails here."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

from tests.conftest import ROOT

PACKAGE = ROOT / "webapp"


def contracts() -> list[dict]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]


def test_the_import_contracts_hold():
    lint = Path(sys.executable).parent / "lint-imports"
    done = subprocess.run([str(lint)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"Contracts: {len(contracts())} kept, 0 broken." in done.stdout


def test_every_package_and_top_module_is_in_a_layer():
    (layers,) = [contract["layers"] for contract in contracts() if contract["type"] == "layers"]
    named = {name.strip() for layer in layers for name in layer.split("|")}
    present = {f"webapp.{path.stem}" for path in PACKAGE.glob("*.py") if path.stem != "__init__"}
    present |= {f"webapp.{path.parent.name}" for path in PACKAGE.glob("*/__init__.py")}
    assert present == named


def test_the_architecture_doc_draws_the_same_layers():
    (layers,) = [contract["layers"] for contract in contracts() if contract["type"] == "layers"]
    doc = (ROOT / "docs" / "architecture.md").read_text()
    section = doc[doc.index("## 9. Repository layout") : doc.index("## 10.")]
    for layer in layers:
        for name in layer.split("|"):
            assert f"`{name.strip().removeprefix('webapp.')}" in section, name


# What gunicorn's master may import before it binds its port: the config file's own imports (settings,
# the hooks, the worker class, logging). The app and the libraries only a worker needs come after the bind
# (ServerHooks.when_ready), so a TCP probe finds the port open sooner (docs/architecture.md §13).
AFTER_THE_BIND = ("webapp.app", "webapp.runtime", "webapp.engine.core", "flask", "numpy", "torch", "diffusers")


def test_the_config_file_imports_nothing_the_master_only_needs_after_binding():
    probe = (
        "import json, runpy, sys; runpy.run_path('gunicorn.conf.py'); "
        f"print(json.dumps([name for name in {AFTER_THE_BIND!r} if name in sys.modules]))"
    )
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", done.stdout
