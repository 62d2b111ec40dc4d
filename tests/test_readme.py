"""The README and docs/ are part of the product: the README's commands match CI, the tables that mirror
declarations match the code wherever they live, and the docs build as a site with no broken link."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT
from webapp.settings import VARIABLES, Settings
from webapp.tools import doctables

README = (ROOT / "README.md").read_text()
DOCS = ROOT / "docs"


def fenced_commands() -> list[str]:
    return re.findall(r"```sh\n(.+?)\n```", README, flags=re.S)


def test_the_readme_is_a_short_front_door():
    assert len(README.splitlines()) <= 200
    assert not re.search(r"\b\d+ (tests|passed)\b", README), "no test count in prose: it changes with every run"


def test_ci_runs_the_readme_test_command_exactly():
    serve, test = fenced_commands()[:2]
    assert "gunicorn -c gunicorn.conf.py" in serve
    assert "pytest" in test
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test in ci_lines


def test_the_settings_the_readme_names_are_declared():
    declared = {variable.name for variable in VARIABLES} | {"WEB_CONCURRENCY"}
    rows = [line for line in README.splitlines() if re.match(r"^\| `[A-Z_]+`", line)]
    named = {name for row in rows for name in re.findall(r"`([A-Z_]+)`", row.split("|")[1])}
    assert named and named <= declared, named - declared


def test_requirements_pin_torch_to_the_local_cpu_wheel():
    assert "torch==2.13.0" in (ROOT / "requirements.txt").read_text().splitlines()


@pytest.mark.parametrize("name", sorted(doctables.tables()))
def test_the_docs_tables_are_the_ones_derived_from_the_declarations(name):
    """The settings, the request fields (ours and OpenAI's) and the error codes, each table where the doc has
    it (``python -m webapp.tools.doctables`` writes them)."""
    text = (DOCS / name).read_text()
    assert doctables.rewrite(text, doctables.tables()[name]) == text


def test_every_error_code_is_declared_with_its_status():
    from webapp import errors

    declared = {value for name, value in vars(errors).items() if name.isupper() and isinstance(value, errors.Code)}
    assert declared == set(errors.CODES)
    assert all(code.status is None or 400 <= code.status < 600 for code in errors.CODES)


def test_rewriting_a_table_changes_only_that_table():
    text = "intro\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\nafter\n\n| a | b |\n|---|---|\n| 3 | 4 |\n"
    assert doctables.rewrite(text, ["| a | b |\n|---|---|\n| 5 | 6 |"]) == text.replace("| 1 | 2 |", "| 5 | 6 |")


def test_the_docs_build_as_a_site_with_no_broken_link_or_orphan_page(tmp_path):
    mkdocs = Path(sys.executable).parent / "mkdocs"
    done = subprocess.run(
        [str(mkdocs), "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_route_of_the_app_is_in_the_api_docs_table(tmp_path):
    from webapp.app import create_app
    from webapp.board.lifecycle import Lifecycle
    from webapp.board.slots import Board
    from webapp.runtime import Runtime

    board = Board.create(tmp_path, capacity=1, expected_workers=1)
    try:  # an app with a runtime whose engine never started: only its URL map is read
        app = create_app(Runtime(Settings.from_env({}), board, Lifecycle(board, 0), None))
    finally:
        board.remove()
    table = [line.split(" | ")[0] for line in (DOCS / "api.md").read_text().splitlines() if line.startswith("| `")]
    listed = {route for cell in table for route in re.findall(r"`([A-Z]+ /[^`]*)`", cell)}
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static":
            continue
        path = re.sub(r"<(?:[a-z]+:)?([a-z_]+)>", r"<\1>", rule.rule)
        for method in sorted(rule.methods - {"HEAD", "OPTIONS"}):
            assert f"{method} {path}" in listed, f"{method} {path} is not in docs/api.md's table of routes"
