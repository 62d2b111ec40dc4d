"""A real HAProxy from Debian, health-checking /readyz, in front of two real instances: through a slow
load, a killed worker and a drain, no client request fails while the other instance is ready."""

from __future__ import annotations

import shutil
import sys

import pytest

from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))
import loadbalancer  # bench/ holds the scenario, shared with the operator's script

pytestmark = pytest.mark.slow  # the fast lane leaves it out (docs/development.md)


def test_haproxy_steered_by_readyz_never_sends_a_client_to_an_instance_that_cannot_serve():
    assert shutil.which("haproxy"), "Debian's haproxy is needed: apt-get install haproxy (README test command)"
    report = loadbalancer.run()
    print({k: v for k, v in report.items() if k != "failures"})
    assert report["failed requests"] == 0, report["failures"]
    assert report["client requests"] > 20
    # Each transition was seen by HAProxy (run() raises if one never happens), within its check rhythm.
    for key in ("worker SIGKILL -> A DOWN (s)", "SIGTERM -> B DOWN (s)", "B ready -> HAProxy UP (s)"):
        assert report[key] < 30, (key, report[key])
