"""The benchmark suite runs end to end (short), finds no false readiness and no request failed through a SIGKILL.
No timing is asserted: the benchmarks fork their servers from this process's fork server (bench/servers.py),
so their start and memory figures here are not a fresh start's."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import FORKS, ROOT

pytestmark = pytest.mark.slow  # the fast lane leaves it out (docs/development.md)
FORKED = "note: servers forked from the test suite's fork server"


def bench(*command: str, timeout: float = 600, servers: bool = True, **env: str) -> subprocess.CompletedProcess:
    """Run ``bench/<command>`` to the end; one that starts ``servers`` forks them from this process's fork
    server, and says so (a bench that silently started fresh interpreters would cost minutes)."""
    forks = FORKS[0]
    assert forks.ready(), "the fork server could not start"
    full_env = dict(os.environ, PYTHONPATH=str(ROOT), TEST_FORK_SERVER=forks.address, **env)
    done = subprocess.run([sys.executable, f"bench/{command[0]}", *command[1:]], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr[-4000:]
    assert (FORKED in done.stdout) == servers, done.stdout
    return done


def test_the_suite_prints_its_table_and_finds_no_false_readiness():
    done = bench("suite.py", "--images", "2", "--samples", "10", "--seconds", "1", "--runs", "1", timeout=900)
    rows = {line.split(" | ")[0].lstrip("| "): line for line in done.stdout.splitlines() if line.startswith("| ")}
    for measure in (
        "start to the port open, a TCP probe passes (median of 1)",
        "start to /healthz 200 (median of 1)",
        "start to /readyz 200, 1 worker (median of 1)",
        "start to /readyz 200, 2 workers (median of 1)",
        "start to first image, 2 workers (median of 1)",
        "memory, 2 workers, master imports the model code",
        "SIGKILL to /readyz 200 again (replacement loaded, median of 1)",
        "SIGKILL of a worker to /readyz 503",
        "SIGSTOP of a worker to /readyz 503",
        "throughput, 8 clients, batching on",
    ):
        assert measure in rows, done.stdout
    false_ready = rows["false-ready time (2 workers, start + kill + stop)"]
    assert "| 0.000 s |" in false_ready and false_ready.endswith("| pass |"), false_ready
    through_kill = rows["requests failed through 1 SIGKILLs, one client, one request at a time"]
    assert "| 0 of " in through_kill and through_kill.endswith("| pass |"), through_kill


def test_the_slow_client_bench_prints_its_rows_and_no_probe_fails():
    done = bench("slowclients.py", "--seconds", "1", "--connections", "10", "--skip-stock")
    rows = [line.split(" | ") for line in done.stdout.splitlines() if line.startswith("| this server")]
    assert [(row[1].split(" (")[0], row[2]) for row in rows] == [
        ("none", "/healthz"),
        ("none", "/readyz"),
        ("10 of each kind", "/healthz"),
        ("10 of each kind", "/readyz"),
    ], done.stdout
    assert all(int(row[3]) > 0 and row[4] == "0" for row in rows), done.stdout  # probes sent, none failed


def test_the_encoding_bench_prints_a_row_per_picture_size_and_format():
    result = bench("encoding.py", "--repeats", "1", "--sizes", "64", timeout=120, servers=False)
    rows = [line for line in result.stdout.splitlines() if line.startswith("| scene") or line.startswith("| noise")]
    assert len(rows) == 2 * 3
    assert all(float(row.split("|")[4]) > 0 for row in rows)


def test_the_quality_bench_checks_its_analyzer_and_prints_a_row_per_model(tmp_path):
    result = bench(
        "quality.py", "--images", "2", "--steps", "1", timeout=300, servers=False, MODEL_CACHE_DIR=str(tmp_path)
    )
    assert "analyzer on the renderer's own scenes: 100.0% right" in result.stdout
    assert "outline fit on the renderer's own scenes: 100.0% of shapes right" in result.stdout
    lines = result.stdout.splitlines()
    rows = [line.split(" | ") for line in lines if line.startswith("| builtin:")]
    assert [row[0] for row in rows] == ["| builtin:scenes-64", "| builtin:scenes-64, guidance 1.0 (no CFG)",
                                        "| builtin:tiny-sd (random weights)"]  # fmt: skip
    assert all(row[4].endswith("%") and row[5].endswith("%") and float(row[6].rstrip(" |")) > 0 for row in rows)
    table = lines.index("| asked shape: all three right | builtin:scenes-64 |")
    shapes = [line.split(" | ")[0] for line in lines[table:]]
    assert shapes[2:5] == ["| circle", "| square", "| triangle"], result.stdout


def test_the_scaling_bench_prints_a_row_per_load_and_sets_the_policy_beside_them():
    done = bench("scaling.py", "--seconds", "1")
    rows = [line.split(" | ") for line in done.stdout.splitlines() if line.startswith("| ") and "---" not in line]
    assert [row[0].lstrip("| ") for row in rows[1:]] == ["one client", "target", "capacity"], done.stdout
    assert [int(row[1]) for row in rows[1:]] == [1, 8, 24]  # from the task definition: 2 x 4, 2 x (4 + 8)
    assert all(int(row[2]) > 0 and row[5].rstrip(" |") == "0" for row in rows[1:]), done.stdout  # served, no errors
    assert "ALBRequestCountPerTarget TargetValue 250 requests/min per task" in done.stdout


def test_the_gpu_bench_measures_each_family_through_the_servers_own_path():
    # No GPU here: the harness runs on the CPU with the tiny builds, so the command in the README works.
    done = bench("gpu.py", "--tiny", "--repeats", "1", "--batch", "2", "--steps", "1", servers=False)
    rows = [line.split(" | ") for line in done.stdout.splitlines() if line.startswith("| tiny-")]
    assert [(row[1], row[3], row[4]) for row in rows] == [
        ("sdxl", "float32", "64x64"),
        ("sd3", "float32", "64x64"),
        ("flux", "float32", "256x256"),
    ], done.stdout
    assert all(float(row[8]) > 0 for row in rows), done.stdout


def test_the_probe_bench_prints_both_priorities_and_the_images_they_drew():
    done = bench("probes.py", "--rounds", "1", "--samples", "10", "--seconds", "2")
    rows = [line.split(" | ") for line in done.stdout.splitlines() if line.startswith(("| 10 ", "| 0 "))]
    assert [row[0] for row in rows] == ["| 10", "| 0"], done.stdout
    assert all(float(row[1]) > 0 and float(row[3].rstrip(" |")) > 0 for row in rows), done.stdout


def test_the_edit_bench_prints_memory_and_every_mode_beside_text_to_image():
    done = bench("edits.py", "--runs", "1", "--steps", "4", servers=False)
    rows = {line.split(" | ")[0].lstrip("| ") for line in done.stdout.splitlines() if line.startswith("| ")}
    assert {"RSS after images in every mode it serves", "PSS after images in every mode it serves"} <= rows
    assert {"text-to-image", "image-to-image, strength 0.8", "inpainting, strength 1.0"} <= rows, done.stdout


def test_the_lora_bench_prints_first_use_per_image_and_the_cycling_workload():
    done = bench(
        "loras.py", "--adapters", "3", "--cache", "1", "--requests", "6", "--runs", "1", "--steps", "2", servers=False
    )
    rows = [line.split(" | ")[0].lstrip("| ") for line in done.stdout.splitlines() if line.startswith("| ")]
    assert rows[1].startswith("first use of an adapter") and rows[2].startswith("one image with an adapter held")
    assert rows[3].startswith("6 requests cycling 3 adapters, cache 1"), done.stdout


def test_the_upload_bomb_bench_prints_a_row_per_route():
    done = bench("uploads.py", "--clients", "6", "--runs", "1", "--limits", "default")
    rows = [line for line in done.stdout.splitlines() if line.startswith("| /") or line.startswith("| both")]
    assert len(rows) == 3 and all("| 1048576 |" in row for row in rows), done.stdout


def test_the_adapter_churn_bench_prints_its_slopes():
    done = bench("lora_churn.py", "--loads", "8", "--mapped-loads", "4", "--every", "4", servers=False)
    assert "| loads | adapters (pread) | no adapters | adapters (mmap, before) |" in done.stdout, done.stdout
    assert "| MB per 1000 loads, from load 4 |" in done.stdout, done.stdout


def test_the_jobs_bench_prints_its_rows_and_loses_no_job():
    done = bench("jobs.py", "--seconds", "1", "--rounds", "1", "--jobs", "4")
    rows = {line.split(" | ")[0].lstrip("| "): line for line in done.stdout.splitlines() if line.startswith("| ")}
    assert "images/s through jobs (submit, long poll)" in rows, done.stdout
    assert "submit p50 / p99, every worker generating" in rows, done.stdout
    lost = rows["jobs lost through a worker SIGKILL and a whole-server SIGKILL + restart"]
    assert lost.startswith("| jobs lost through a worker SIGKILL and a whole-server SIGKILL + restart | 0 of 4 |"), lost
    assert rows["completed webhooks duplicated / missing"].endswith("| pass |"), done.stdout


def test_the_fleet_bench_prints_both_stores_one_and_two_replicas_and_loses_no_job():
    done = bench("fleet.py", "--seconds", "1", "--rounds", "1", "--jobs", "3", "--lease", "2")
    rows = {line.split(" | ")[0].lstrip("| "): line for line in done.stdout.splitlines() if line.startswith("| ")}
    for store in ("SQLite", "Redis"):
        assert f"a job through {store}, submit to done (median)" in rows, done.stdout
    assert "images/s through jobs, two replicas on one Redis" in rows, done.stdout
    lost = rows["jobs lost through a worker SIGKILL, a whole-replica SIGKILL and a Redis restart"]
    assert "| 0 of 3 |" in lost and lost.endswith("| pass |"), lost
