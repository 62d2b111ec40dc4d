"""Settings: defaults, validation naming the variable, and a server that refuses a bad value."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import ROOT, Server, free_port, server_env, wait_for
from webapp.settings import BUILTIN_TINY_MODEL, SCENES_MODEL, TINY_MODEL_MAX_SIZE, VARIABLES, Settings, SettingsError


def test_defaults_validate():
    s = Settings.from_env({})
    assert (s.host, s.port, s.threads) == ("0.0.0.0", 8080, 16)
    assert s.workers is None  # gunicorn's count, known once the master starts
    assert s.model_id == SCENES_MODEL
    assert s.bind == "0.0.0.0:8080"
    assert s.required_ready(3) == 3


def test_every_variable_has_a_default_and_a_meaning():
    names = [v.name for v in VARIABLES]
    assert len(names) == len(set(names))
    assert all(v.meaning for v in VARIABLES)


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"PORT": "http"}, "PORT"),
        ({"PORT": "70000"}, "PORT"),
        ({"THREADS": "1"}, "THREADS"),
        ({"READY_POLICY": "most"}, "READY_POLICY"),
        ({"DEVICE": "tpu"}, "DEVICE"),
        ({"DTYPE": "float8"}, "DTYPE"),
        ({"LOAD_MAX_SECONDS": "nan"}, "LOAD_MAX_SECONDS"),
        ({"LOAD_MAX_ATTEMPTS": "-1"}, "LOAD_MAX_ATTEMPTS"),
        ({"MAX_IMAGE_SIZE": "1001"}, "MAX_IMAGE_SIZE"),
        ({"MODEL_LOADER": "no_colon"}, "MODEL_LOADER"),
        ({"ACCESS_LOG": "maybe"}, "ACCESS_LOG"),
        ({"MODEL_ID": ""}, "MODEL_ID"),
        ({"DEFAULT_STEPS": "60", "MAX_STEPS": "50"}, "DEFAULT_STEPS"),
        ({"HEARTBEAT_INTERVAL": "5", "HEARTBEAT_TIMEOUT": "6"}, "HEARTBEAT_TIMEOUT"),
    ],
)
def test_a_bad_value_is_refused_with_the_variable_named(env, named):
    with pytest.raises(SettingsError, match=named):
        Settings.from_env(env)


@pytest.mark.parametrize(
    ("env", "workers", "named"), [({}, 0, "WEB_CONCURRENCY"), ({"READY_POLICY": "3"}, 2, "READY_POLICY")]
)
def test_settings_that_depend_on_gunicorns_worker_count_are_checked_against_it(env, workers, named):
    with pytest.raises(SettingsError, match=named):
        Settings.from_env(env).for_workers(workers)


def test_policies_and_devices_that_are_valid():
    assert Settings.from_env({"READY_POLICY": "any"}).for_workers(4).required_ready(4) == 1
    assert Settings.from_env({"READY_POLICY": "2"}).for_workers(4).required_ready(4) == 2
    assert Settings.from_env({"DEVICE": "cuda:1"}).device == "cuda:1"
    assert Settings.from_env({"HOST": "::1"}).bind == "[::1]:8080"


@pytest.mark.parametrize(
    ("env", "args", "says"),
    [
        ({"READY_POLICY": "most"}, (), "configuration error: READY_POLICY='most' is invalid"),
        # gunicorn's own worker count, given on its command line, is what the setting is checked against
        ({"READY_POLICY": "3"}, ("--workers", "2"), "READY_POLICY=3 asks for more READY workers than the 2"),
    ],
)
def test_gunicorn_refuses_to_start_on_a_bad_value_and_names_it(env, args, says):
    env = {"PATH": "/usr/bin:/bin", "PORT": str(free_port()), "HOST": "127.0.0.1", **env}
    result = subprocess.run(
        [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert says in result.stderr
    assert "Listening at" not in result.stderr + result.stdout


def test_the_embedded_models_have_their_own_size_limit_unless_one_is_set():
    assert Settings.from_env({}).max_image_size == TINY_MODEL_MAX_SIZE
    assert Settings.from_env({"MODEL_ID": BUILTIN_TINY_MODEL}).max_image_size == TINY_MODEL_MAX_SIZE
    assert Settings.from_env({"MODEL_ID": "stabilityai/sd-turbo"}).max_image_size == 1024
    assert Settings.from_env({"MAX_IMAGE_SIZE": "512"}).max_image_size == 512
    assert Settings.from_env({}).for_workers(2).max_image_size == TINY_MODEL_MAX_SIZE


@pytest.mark.slow
def test_a_stock_worker_class_stops_gunicorn_rather_than_give_each_worker_a_board_of_its_own(tmp_path):
    """gunicorn's stock gthread worker imports ``wsgi_app`` (``webapp:create_app()``) by name. Before, that
    built an app with a standalone runtime in each worker, each with a private one-slot board, so /readyz
    described the one worker that answered; now create_app without a runtime refuses, and gunicorn stops."""
    env = server_env(
        tmp_path / "cache",
        tmp_path,
        WEB_CONCURRENCY="1",
        MODEL_LOADER="tests.loaders:gated",
        GATE_FILE=str(tmp_path / "never-opened"),
        PREIMPORT_MODEL="0",
    )
    server = Server(env, tmp_path / "gunicorn.log", ("--worker-class", "gthread"))
    try:
        wait_for(lambda: server.proc.poll() is not None, 120, "gunicorn to stop")
        assert server.proc.returncode != 0
        assert "create_app needs the worker's runtime" in "\n".join(server.log_lines())
    finally:
        server.stop()


def test_an_unset_replica_name_is_the_host_and_a_suffix_new_at_each_start_and_kept_for_the_workers():
    """Two replicas on one host must never share the name their leases carry: a start releases the jobs held
    under its own name (docs/architecture.md §18)."""
    import socket

    first, second = Settings.from_env({}), Settings.from_env({})
    assert first.replica_name.startswith(socket.gethostname() + "-")
    assert first.replica_name != second.replica_name
    assert first.for_workers(2).replica_name == first.replica_name  # the workers' leases carry the master's
    assert Settings.from_env({"REPLICA_NAME": "pod-7"}).replica_name == "pod-7"
