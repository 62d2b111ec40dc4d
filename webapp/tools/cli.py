"""``honest-diffusion``: one command for operators (docs/architecture.md §11).

honest-diffusion status [--url URL] [--wait SECONDS] [--json]
    The container's verdict from /readyz and one row per worker. Exit 0 ready, 1 not ready,
    2 unreachable (or not this server), so a script can wait on it.
honest-diffusion config [--json]
    The effective settings, validated as the server validates them, with where each value came from
    (API keys redacted). A bad value prints the line the server would stop with, and exits 1.
honest-diffusion generate PROMPT [-o FILE] [--url URL] [--api-key KEY] [request flags]
    The retrying client (webapp.tools.client): waits out a loading or busy server within a deadline.
honest-diffusion jobs list [--status S] [--limit N] | show ID | cancel ID   [--url URL] [--api-key KEY] [--json]
    The asynchronous jobs of the key (docs/architecture.md §17). Exit 0, 1 for an answer other than 200.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

import requests

from webapp.queue.store import STATUSES
from webapp.settings import Settings, SettingsError, effective, refusal
from webapp.tools import client

READY, NOT_READY, UNREACHABLE = 0, 1, 2
COLUMNS = ("slot", "state", "pid", "attempt", "heartbeat_age_s", "in_flight", "queued", "model", "error")


def _operator_key() -> str | None:
    """The key ``status`` sends, so that PROBE_DETAIL=brief still shows it every row: HONEST_DIFFUSION_API_KEY,
    else the first of the server's own API_KEYS when the command runs where the server's environment is."""
    given = os.environ.get(client.KEY_VARIABLE, "").strip()
    if given:
        return given
    keys = [key.strip() for key in os.environ.get("API_KEYS", "").split(",") if key.strip()]
    return keys[0] if keys else None


def _readyz(url: str, timeout: float, key: str | None = None) -> tuple[int, dict[str, Any] | str]:
    """(exit code, /readyz body) or (UNREACHABLE, why)."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        response = requests.get(url.rstrip("/") + "/readyz", timeout=timeout, headers=headers)
        body = response.json()
    except (requests.RequestException, ValueError) as exc:
        return UNREACHABLE, f"{url} is unreachable: {exc}"
    if not isinstance(body, dict) or "status" not in body or response.status_code not in (200, 503):
        return UNREACHABLE, f"{url}/readyz answered {response.status_code} without a verdict: is this the server?"
    return (READY if response.status_code == 200 else NOT_READY), body


def _cell(row: dict[str, Any], column: str) -> str:
    if column == "attempt":
        return f"{row.get('attempt')}/{row.get('max_attempts')}"
    if column == "error":
        return str(row.get("problem") or row.get("error") or "")
    value = row.get(column)
    return "-" if value is None else str(value)


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows
    )


def status(args: argparse.Namespace) -> int:
    end = time.monotonic() + args.wait
    while True:
        code, body = _readyz(args.url, args.timeout, args.api_key)
        if code == READY or time.monotonic() >= end:
            break
        time.sleep(min(0.5, max(0.0, end - time.monotonic())))
    if isinstance(body, str):
        print(body, file=sys.stderr)
        return code
    if args.json:
        print(json.dumps(body, indent=2))
        return code
    print(f"{body['status']}: {body['reason']} (READY_POLICY={body['policy']}, needs {body['required_ready']})")
    if "workers" not in body:
        print(f"(PROBE_DETAIL=brief: each worker's row needs an API key: --api-key or ${client.KEY_VARIABLE})")
        return code
    rows = [[column.upper() for column in COLUMNS]]
    rows += [[_cell(worker, column) for column in COLUMNS] for worker in body["workers"]]
    print(_table(rows))
    return code


def config(args: argparse.Namespace) -> int:
    environ = os.environ
    try:
        settings = Settings.from_env(environ)
    except SettingsError as exc:
        print(refusal(exc), file=sys.stderr)
        return 1
    rows = effective(settings, environ)
    workers = environ.get("WEB_CONCURRENCY")
    if args.json:
        shown = {row.variable: {"value": row.value, "source": row.source} for row in rows}
        shown["WEB_CONCURRENCY"] = {"value": workers or "1", "source": "environment" if workers else "default"}
        print(json.dumps(shown, indent=2))
        return 0
    table = [["VARIABLE", "VALUE", "SOURCE"]] + [[row.variable, row.value or "(empty)", row.source] for row in rows]
    table.append(["WEB_CONCURRENCY", workers or "1", "environment" if workers else "default (gunicorn's own)"])
    print(_table(table))
    return 0


JOB_COLUMNS = ("id", "status", "attempt", "progress", "created", "error")


def _job_cell(job: dict[str, Any], column: str) -> str:
    if column == "progress":
        progress = job.get("progress") or {}
        return f"{progress['step']}/{progress.get('total', '?')}" if progress else "-"
    if column == "created":
        return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(job["created_at"]))
    if column == "error":
        error = job.get("error") or {}
        return f"{error['code']}: {error['message']}" if error else ""
    return str(job.get(column, "-"))


def jobs(args: argparse.Namespace) -> int:
    """List, show or cancel jobs over HTTP, as a client would (the key decides which jobs it sees)."""
    base = args.url.rstrip("/") + "/v1/jobs"
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    try:
        if args.action == "list":
            params = {"limit": str(args.limit), **({"status": args.status} if args.status else {})}
            response = requests.get(base, params=params, headers=headers, timeout=args.timeout)
        elif args.action == "show":
            response = requests.get(f"{base}/{args.id}", headers=headers, timeout=args.timeout)
        else:
            response = requests.post(f"{base}/{args.id}/cancel", headers=headers, timeout=args.timeout)
        body = response.json()
    except (requests.RequestException, ValueError) as exc:
        print(f"{args.url} is unreachable: {exc}", file=sys.stderr)
        return UNREACHABLE
    if response.status_code != 200:
        error = body.get("error", {}) if isinstance(body, dict) else {}
        print(f"{response.status_code} {error.get('code')}: {error.get('message')}", file=sys.stderr)
        return 1
    if args.json or args.action != "list":
        print(json.dumps(body, indent=2))
        return 0
    rows = [[column.upper() for column in JOB_COLUMNS]]
    rows += [[_job_cell(job, column) for column in JOB_COLUMNS] for job in body["data"]]
    print(_table(rows))
    return 0


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="honest-diffusion", description="Operate an honest-diffusion server.")
    commands = top.add_subparsers(dest="command", required=True)
    status_parser = commands.add_parser("status", help="the container's readiness and one row per worker")
    status_parser.add_argument("--url", default=os.environ.get(client.URL_VARIABLE, client.DEFAULT_URL))
    status_parser.add_argument("--wait", type=float, default=0.0, help="seconds to keep asking until ready")
    status_parser.add_argument("--timeout", type=float, default=5.0, help="seconds for one request")
    status_parser.add_argument("--json", action="store_true", help="print /readyz's body as it is")
    status_parser.add_argument(
        "--api-key", default=_operator_key(), help=f"for the rows under PROBE_DETAIL=brief (${client.KEY_VARIABLE})"
    )
    status_parser.set_defaults(run=status)
    config_parser = commands.add_parser("config", help="the effective settings and where each came from")
    config_parser.add_argument("--json", action="store_true")
    config_parser.set_defaults(run=config)
    jobs_parser = commands.add_parser("jobs", help="list, show or cancel asynchronous jobs")
    jobs_parser.add_argument("action", choices=("list", "show", "cancel"))
    jobs_parser.add_argument("id", nargs="?", help="the job's id (show, cancel)")
    jobs_parser.add_argument("--status", choices=STATUSES)
    jobs_parser.add_argument("--limit", type=int, default=20, help="jobs to list, newest first (1 to 100)")
    jobs_parser.add_argument("--url", default=os.environ.get(client.URL_VARIABLE, client.DEFAULT_URL))
    jobs_parser.add_argument("--timeout", type=float, default=10.0, help="seconds for one request")
    jobs_parser.add_argument("--json", action="store_true", help="print the answer as it is")
    jobs_parser.add_argument("--api-key", default=_operator_key(), help=f"whose jobs (${client.KEY_VARIABLE})")
    jobs_parser.set_defaults(run=jobs)
    generate_parser = commands.add_parser("generate", help="generate one image, waiting out a loading server")
    client.add_arguments(generate_parser)
    generate_parser.set_defaults(run=client.run)
    return top


def main(argv: list[str] | None = None) -> int:
    top = parser()
    args = top.parse_args(argv)
    if args.command == "jobs" and args.action != "list" and not args.id:
        top.error(f"jobs {args.action} needs a job's id")
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
