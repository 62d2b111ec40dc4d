"""A client for /generate that waits out a loading or busy server, within a deadline.

    python -m webapp.tools.client "a lighthouse at dusk" -o out.png --url http://127.0.0.1:8080

Each try has its own timeout; all of them share one overall deadline. Connection errors, 502, 503 and
504 are retried with exponential backoff and jitter, waiting at least what the server's Retry-After
asks; a 4xx is the caller's mistake and is never retried, and neither is a 500 (a server bug). The
retry policy is declared with tenacity, like the server's load policy.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Any

import requests
from tenacity import RetryCallState, Retrying, retry_if_exception_type, stop_before_delay, wait_exponential_jitter

from webapp.api.fields import FIELDS
from webapp.api.images import FORMATS

RETRY_STATUSES = frozenset({502, 503, 504})
DEFAULT_URL = "http://127.0.0.1:8080"
URL_VARIABLE = "HONEST_DIFFUSION_URL"
KEY_VARIABLE = "HONEST_DIFFUSION_API_KEY"


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
    api_key: str | None = None  # sent as Authorization: Bearer when set

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
                        headers=self._headers(accept),
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

    def _headers(self, accept: str) -> dict[str, str]:
        headers = {"Accept": accept}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers


def _file_base64(path: str) -> str:
    """An image field's flag names a file; the request carries it in base64."""
    try:
        with open(path, "rb") as file:
            return base64.b64encode(file.read()).decode("ascii")
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"cannot read {path}: {exc.strerror}") from None


KINDS = {"text": str, "choice": str, "integer": int, "number": float, "image": _file_base64}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The generate command's arguments: the request's flags come from its field declarations."""
    parser.add_argument("prompt")
    parser.add_argument("-o", "--output", help="file to write (default out.<format>)")
    parser.add_argument("--url", default=os.environ.get(URL_VARIABLE, DEFAULT_URL), help=f"(${URL_VARIABLE})")
    parser.add_argument("--api-key", default=os.environ.get(KEY_VARIABLE), help=f"(${KEY_VARIABLE})")
    for field in FIELDS:
        if not field.flag:
            continue
        choices = field.choices or None
        meaning = f"{field.meaning} Give a file's path." if field.kind == "image" else field.meaning
        parser.add_argument(f"--{field.flag}", type=KINDS[field.kind], choices=choices, dest=field.name, help=meaning)
    parser.add_argument("--deadline", type=float, default=300.0, help="overall seconds to keep trying")
    parser.add_argument("--try-timeout", type=float, default=60.0, help="seconds for one try")


def run(args: argparse.Namespace) -> int:
    """Generate one image as ``args`` ask and write it; 0 on success, 1 on failure."""
    flagged = [field for field in FIELDS if field.flag]
    given = {field.name: getattr(args, field.name) for field in flagged if getattr(args, field.name) is not None}
    payload = {"prompt": args.prompt} | given
    output_format = payload.get("output_format", "png")
    output = args.output or f"out.{output_format}"
    client = Client(args.url, per_try_timeout=args.try_timeout, deadline=args.deadline, api_key=args.api_key)
    try:
        response = client.generate(payload, accept=FORMATS[output_format])
    except GenerationError as exc:
        detail = exc.response.json().get("error") if exc.response is not None and _is_json(exc.response) else None
        print(f"error: {json.dumps(detail) if detail else exc}", file=sys.stderr)
        return 1
    with open(output, "wb") as out:
        out.write(response.content)
    print(f"wrote {output} (seed {response.headers.get('X-Seed')})")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Generate one image, waiting for the server if it is not ready.")
    add_arguments(parser)
    return run(parser.parse_args(argv))


def _is_json(response: requests.Response) -> bool:
    return response.headers.get("Content-Type", "").startswith("application/json")


if __name__ == "__main__":
    sys.exit(main())
