"""The module structure docs/architecture.md §9 describes: no import circle, no module importing one of a
layer above its own, torch and diffusers only in the pipeline modules. Read from the source with ast."""

from __future__ import annotations

import ast

from tests.conftest import ROOT

PACKAGE = ROOT / "webapp"
# Lowest first. A module may import only modules of a lower layer.
LAYERS: list[set[str]] = [
    {"errors", "logs", "settings", "recorder", "faults", "board", "tiny_model", "images", "scenes"},
    {"params", "readiness", "profile"},
    {"openai_params", "auth"},
    {"lifecycle", "scheduler", "client", "metric_files"},
    {"loader", "pipeline"},
    {"runner"},
    {"engine"},
    {"runtime"},
    {"jobs"},
    {"generate", "demo", "health", "metrics", "worker", "openai_api"},
    {"openapi"},
    {"app"},
    {"hooks", "__init__", "cli"},
]
LAYER = {name: rank for rank, names in enumerate(LAYERS) for name in names}
HEAVY = {"torch", "diffusers", "transformers", "accelerate"}


def imports(name: str) -> set[str]:
    tree = ast.parse((PACKAGE / f"{name}.py").read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "webapp":
                found |= {alias.name for alias in node.names}
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
    return found


def webapp_imports(name: str) -> set[str]:
    named = set()
    for module in imports(name):
        if module.startswith("webapp."):
            named.add(module.split(".")[1])
        elif module in LAYER:
            named.add(module)
    return named - {name}


def test_every_module_has_a_layer():
    assert {path.stem for path in PACKAGE.glob("*.py")} == set(LAYER)


def test_no_module_imports_one_of_its_own_layer_or_above():
    wrong = [(name, other) for name in LAYER for other in webapp_imports(name) if LAYER[other] >= LAYER[name]]
    assert wrong == []


def test_only_the_pipeline_modules_import_torch_and_diffusers():
    heavy = {name for name in LAYER if {module.split(".")[0] for module in imports(name)} & HEAVY}
    assert heavy == {"pipeline", "tiny_model"}
