"""The README is part of the product: its settings table and commands must match the code and CI."""

from __future__ import annotations

import re

from tests.conftest import ROOT
from webapp.params import request_table
from webapp.settings import Settings, settings_table

README = (ROOT / "README.md").read_text()


def fenced_commands() -> list[str]:
    return re.findall(r"```sh\n(.+?)\n```", README, flags=re.S)


def test_the_settings_table_is_the_one_derived_from_the_declarations():
    assert settings_table() in README


def test_ci_runs_the_readme_test_command_exactly():
    serve, test = fenced_commands()[:2]
    assert "gunicorn -c gunicorn.conf.py" in serve
    assert "pytest" in test
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test in ci_lines


def test_requirements_pin_torch_to_the_local_cpu_wheel():
    assert "torch==2.13.0" in (ROOT / "requirements.txt").read_text().splitlines()


def test_the_request_table_is_the_one_derived_from_the_field_declarations():
    assert request_table(Settings.from_env({})) in README


def test_the_openai_request_table_is_the_one_derived_from_its_declarations():
    from webapp.openai_params import IMAGE_FIELDS

    assert request_table(Settings.from_env({}), IMAGE_FIELDS) in README
