"""The README is part of the product: its settings table and commands must match the code and CI."""

from __future__ import annotations

import re

from tests.conftest import ROOT
from webapp.settings import VARIABLES

README = (ROOT / "README.md").read_text()


def fenced_commands() -> list[str]:
    return re.findall(r"```sh\n(.+?)\n```", README, flags=re.S)


def test_the_settings_table_lists_every_variable_with_its_default():
    rows = dict(re.findall(r"^\| `([A-Z_]+)` \| `([^`]*)` \|", README, flags=re.M))
    expected = {v.name: (v.default or "(empty)") for v in VARIABLES}
    assert rows == expected


def test_ci_runs_the_readme_test_command_exactly():
    serve, test = fenced_commands()[:2]
    assert "gunicorn -c gunicorn.conf.py" in serve
    assert "pytest" in test
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test in ci_lines


def test_requirements_pin_torch_to_the_local_cpu_wheel():
    assert "torch==2.13.0" in (ROOT / "requirements.txt").read_text().splitlines()
