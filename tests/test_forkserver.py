"""The suite's fork server (tests/forkserver.py, docs/development.md): it starts the tests' servers unless
their environment changes what the model libraries read at import, also after a test has imported the model
code in this process (which adds variables of its own to the environment: an earlier version then started
every later server as a fresh interpreter, silently, and the suite took minutes longer)."""

from __future__ import annotations

import pytest

from tests.forkserver import Forked

pytestmark = pytest.mark.slow  # starts servers (the fast lane is -m 'not slow')


def test_servers_are_forked_after_the_model_code_is_imported_here_and_fresh_when_the_import_would_differ(
    start_server,
):
    assert isinstance(start_server(WEB_CONCURRENCY="1").proc, Forked)

    import webapp.model.pipeline  # noqa: F401 - as test_families and test_training do, in this process

    refused = start_server(WEB_CONCURRENCY="1", MAX_QUEUED="lots")
    assert isinstance(refused.proc, Forked)
    assert refused.proc.wait(timeout=60) == 1  # SystemExit's message is printed, and the status is 1, as in Python
    assert "configuration error: MAX_QUEUED='lots' is invalid" in refused.log_tail()

    chatty = start_server(WEB_CONCURRENCY="1", TRANSFORMERS_VERBOSITY="info")  # transformers reads it at import
    assert not isinstance(chatty.proc, Forked)
