"""A client for /generate that waits out a loading or busy server, within a deadline.

    python -m webapp.client "a lighthouse at dusk" -o out.png --url http://127.0.0.1:8080

Each try has its own timeout; all of them share one overall deadline. Connection errors, 502, 503 and
504 are retried with exponential backoff and jitter, waiting at least what the server's Retry-After
asks; a 4xx is the caller's mistake and is never retried, and neither is a 500 (a server bug). The
retry policy is declared with tenacity, like the server's load policy.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from typing import Any

import requests
from tenacity import RetryCallState, Retrying, retry_if_exception_type, stop_before_delay, wait_exponential_jitter

from webapp.params import FIELDS

RETRY_STATUSES = frozenset({502, 503, 504})


class RetryableStatus(Exception):
    """The server answered with a status worth trying again (the response is kept)."""

    def __init__(self, response: requests.Response) -> None:
        super().__init__(f"HTTP {response.status_code}: {response.text[:200]}")
        self.response = response


class GenerationError(Exception):
    """The request failed for good: a 4xx or 500, or the deadline passed. ``response`` if there was one."""

    def __init__(self, message: str, response: requests.Response | None = None) -> None:
        super().__init__(message)
        self.response = response


def _retry_after(exc: BaseException | None) -> float:
    if isinstance(exc, RetryableStatus):
        value = exc.response.headers.get("Retry-After", "")
        try:
            return max(0.0, float(value))
        except ValueError:
            return 0.0  # an HTTP date or garbage: fall back to our own backoff
    return 0.0


@dataclass
class Client:
    """``generate`` posts a request and returns the successful response, retrying as described above."""

    base_url: str
    per_try_timeout: float = 60.0
    deadline: float = 300.0
    backoff_initial: float = 0.5
    backoff_max: float = 30.0
    session: requests.Session | None = None

    def generate(self, payload: dict[str, Any], accept: str = "application/json") -> requests.Response:
        session = self.session or requests.Session()
        end = time.monotonic() + self.deadline
        backoff = wait_exponential_jitter(multiplier=self.backoff_initial, max=self.backoff_max)

        last: BaseException | None = None  # the failure before the current try, for the final message

        def wait(state: RetryCallState) -> float:
            nonlocal last
            last = state.outcome.exception() if state.outcome else None
            return min(max(backoff(state), _retry_after(last)), max(0.0, end - time.monotonic()))

        policy = Retrying(
            retry=retry_if_exception_type((RetryableStatus, requests.ConnectionError, requests.Timeout)),
            wait=wait,
            stop=stop_before_delay(self.deadline),
            reraise=True,
        )
        try:
            for attempt in policy:
                with attempt:
                    remaining = end - time.monotonic()
                    if remaining <= 0:
                        response = last.response if isinstance(last, RetryableStatus) else None
                        raise GenerationError(f"gave up within {self.deadline:g} s: {last}", response)
                    response = session.post(
                        self.base_url.rstrip("/") + "/generate",
                        json=payload,
                        headers={"Accept": accept},
                        timeout=min(self.per_try_timeout, remaining),
                    )
                    if response.status_code in RETRY_STATUSES:
                        raise RetryableStatus(response)
                    if response.status_code >= 400:
                        raise GenerationError(f"HTTP {response.status_code}: {response.text[:500]}", response)
                    return response
        except RetryableStatus as exc:
            raise GenerationError(f"gave up within {self.deadline:g} s: {exc}", exc.response) from exc
        except (requests.ConnectionError, requests.Timeout) as exc:
            raise GenerationError(f"gave up within {self.deadline:g} s: {exc}") from exc
        raise AssertionError("unreachable: the retry loop returns or raises")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Generate one image, waiting for the server if it is not ready.")
    parser.add_argument("prompt")
    parser.add_argument("-o", "--output", default="out.png", help="PNG file to write (default out.png)")
    parser.add_argument("--url", default="http://127.0.0.1:8080")
    flagged = [field for field in FIELDS if field.flag]  # the request's own declaration: one place
    for field in flagged:
        kind = {"text": str, "integer": int, "number": float}[field.kind]
        parser.add_argument(f"--{field.flag}", type=kind, dest=field.name, help=field.meaning)
    parser.add_argument("--deadline", type=float, default=300.0, help="overall seconds to keep trying")
    parser.add_argument("--try-timeout", type=float, default=60.0, help="seconds for one try")
    args = parser.parse_args(argv)
    given = {field.name: getattr(args, field.name) for field in flagged if getattr(args, field.name) is not None}
    payload = {"prompt": args.prompt} | given
    client = Client(args.url, per_try_timeout=args.try_timeout, deadline=args.deadline)
    try:
        response = client.generate(payload, accept="image/png")
    except GenerationError as exc:
        detail = exc.response.json().get("error") if exc.response is not None and _is_json(exc.response) else None
        print(f"error: {json.dumps(detail) if detail else exc}", file=sys.stderr)
        return 1
    with open(args.output, "wb") as out:
        out.write(response.content)
    print(f"wrote {args.output} (seed {response.headers.get('X-Seed')})")
    return 0


def _is_json(response: requests.Response) -> bool:
    return response.headers.get("Content-Type", "").startswith("application/json")


if __name__ == "__main__":
    sys.exit(main())
