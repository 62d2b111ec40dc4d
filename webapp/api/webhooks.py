"""Webhooks of asynchronous jobs (docs/architecture.md §17): the URL guard at submit and at delivery, and the
worker's deliverer.

Deliveries follow the Standard Webhooks specification, signed by its reference package (``standardwebhooks``)
with WEBHOOK_SECRET: ``webhook-id`` (one per event, the same on every retry), ``webhook-timestamp`` and
``webhook-signature`` (``v1,<base64 HMAC-SHA256 of id.timestamp.body>``). The body is
``{"type": "job.<event>", "timestamp", "data": <the job>}``, built once, when first sent, and kept, so a retry
sends the same bytes.

The outbox is the store's ``deliveries`` table, written in the transaction of the change it reports, so a
restart loses none; delivery is at least once (a deliverer that died after the receiver answered, before it
wrote so down, sends it again under the same webhook-id, which is what receivers deduplicate by). Retries
follow a tenacity policy: a timeout, a connection error, 429 or 5xx is tried again after the next delay of
WEBHOOK_RETRY_SCHEDULE, or after the receiver's Retry-After when it sends one; 410 stops for good, as does
any other 4xx; the schedule running out fails the delivery.

The guard (SSRF): http and https only, no user info, and every address the host resolves to must be public,
or with WEBHOOK_ALLOW_PRIVATE=1 loopback or private; link-local (cloud metadata) and multicast never. It runs
at submit (422 naming ``webhook``) and again before each delivery, and redirects are not followed. A name that
resolves differently between the check and the connection (DNS rebinding) is not caught: the window is one
lookup wide.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import socket
import threading
import urllib.parse
from typing import Any

import requests
import tenacity
from standardwebhooks.webhooks import Webhook

from webapp import errors
from webapp.errors import InvalidRequest
from webapp.queue import Store
from webapp.queue.store import WEBHOOK_EVENTS, StoreUnavailable
from webapp.settings import Settings
from webapp.telemetry import logs
from webapp.telemetry.recorder import recorder

log = logs.get(__name__)
FIELD, FILTER_FIELD = "webhook", "webhook_events_filter"
DEFAULT_EVENTS = ("completed",)
MAX_URL_CHARS = 2048
MAX_RETRY_AFTER_S = 86400.0


class Refused(Exception):
    """A webhook URL the guard does not let through; the message says why."""


def check_url(url: str, settings: Settings) -> None:
    """Raise Refused unless ``url`` is an http(s) URL whose host resolves only to addresses the guard allows."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise Refused("must be an http or https URL with a host")
    if parts.username or parts.password:
        raise Refused("must not carry a user name or password")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
        found = socket.getaddrinfo(parts.hostname, port, proto=socket.IPPROTO_TCP)
    except (OSError, ValueError) as exc:
        raise Refused(f"its host {parts.hostname!r} cannot be resolved: {exc}") from None
    for *_, address in found:
        ip = ipaddress.ip_address(address[0].split("%")[0])
        if ip.is_link_local or ip.is_multicast or ip.is_unspecified or ip.is_reserved:
            raise Refused(f"its host resolves to {ip}, a link-local, multicast or reserved address")
        if not ip.is_global and not settings.webhook_allow_private:
            raise Refused(f"its host resolves to {ip}, a loopback or private address (WEBHOOK_ALLOW_PRIVATE=1 allows)")


def read_fields(payload: object, settings: Settings) -> tuple[object, str | None, tuple[str, ...]]:
    """Take ``webhook`` and ``webhook_events_filter`` out of a job's body: (the rest, the URL, the events);
    InvalidRequest (422) naming the field for a bad one, or for a webhook the guard refuses."""
    if not isinstance(payload, dict) or (FIELD not in payload and FILTER_FIELD not in payload):
        return payload, None, ()
    rest = {key: value for key, value in payload.items() if key not in (FIELD, FILTER_FIELD)}
    url, events = payload.get(FIELD), payload.get(FILTER_FIELD, list(DEFAULT_EVENTS))
    if url is None:
        if FILTER_FIELD in payload and events is not None:
            raise InvalidRequest(errors.INVALID_FIELD, f"{FILTER_FIELD} needs a webhook", FILTER_FIELD)
        return rest, None, ()
    if not isinstance(url, str) or not 0 < len(url) <= MAX_URL_CHARS:
        raise InvalidRequest(
            errors.INVALID_FIELD, f"webhook must be a URL of at most {MAX_URL_CHARS} characters", FIELD
        )
    if not settings.webhook_secret.get_secret_value():
        message = "webhook: this server signs no webhooks (the operator has not set WEBHOOK_SECRET)"
        raise InvalidRequest(errors.INVALID_FIELD, message, FIELD)
    if events is None:
        events = list(DEFAULT_EVENTS)
    if (
        not isinstance(events, list)
        or not events
        or not all(isinstance(event, str) and event in WEBHOOK_EVENTS for event in events)
    ):
        message = f"{FILTER_FIELD} must be a non-empty list of {', '.join(WEBHOOK_EVENTS)}"
        raise InvalidRequest(errors.INVALID_FIELD, message, FILTER_FIELD)
    try:
        check_url(url, settings)
    except Refused as exc:
        raise InvalidRequest(errors.INVALID_FIELD, f"webhook {exc}", FIELD) from None
    return rest, url, tuple(dict.fromkeys(events))


class Failed(Exception):
    """A delivery attempt that did not land; ``retry_after_s`` is the receiver's Retry-After, if it sent one."""

    def __init__(self, message: str, retriable: bool, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retriable = retriable
        self.retry_after_s = retry_after_s


def _receiver_says(retry_state: tenacity.RetryCallState) -> float:
    """The receiver's Retry-After, when its answer carried one (0 otherwise: the schedule decides)."""
    failure = retry_state.outcome.exception() if retry_state.outcome else None
    return min(failure.retry_after_s or 0.0, MAX_RETRY_AFTER_S) if isinstance(failure, Failed) else 0.0


def retry_policy(settings: Settings) -> tenacity.Retrying:
    """When to try a delivery again: retriable failures only, after the schedule's next delay or the
    receiver's Retry-After, whichever is later, until the schedule runs out."""
    schedule = settings.webhook_retry_schedule
    scheduled = tenacity.wait_chain(*(tenacity.wait_fixed(delay) for delay in schedule))
    return tenacity.Retrying(
        retry=tenacity.retry_if_exception(lambda exc: isinstance(exc, Failed) and exc.retriable),
        wait=lambda state: max(scheduled(state), _receiver_says(state)),
        stop=tenacity.stop_after_attempt(len(schedule) + 1),
    )


def next_try_in(policy: tenacity.Retrying, attempt: int, failure: Failed) -> float | None:
    """Seconds until the next attempt after ``attempt`` failed with ``failure``, or None: no more attempts.
    The store keeps the attempt count and the due time, so the policy is asked one attempt at a time."""
    state = tenacity.RetryCallState(policy, fn=None, args=(), kwargs={})
    state.attempt_number = attempt
    state.set_exception((Failed, failure, None))
    if not policy.retry(state) or policy.stop(state):
        return None
    return float(policy.wait(state))


def _retry_after(response: requests.Response) -> float | None:
    value = response.headers.get("Retry-After", "").strip()
    return float(value) if value.isdigit() else None


def send(url: str, delivery_id: str, body: str, settings: Settings) -> None:
    """One signed attempt; Failed unless the receiver answered 2xx."""
    try:
        check_url(url, settings)
    except Refused as exc:
        raise Failed(f"refused: webhook {exc}", retriable=False) from None
    now = datetime.datetime.now(datetime.UTC)
    signer = Webhook(settings.webhook_secret.get_secret_value())
    headers = {
        "Content-Type": "application/json",
        "webhook-id": delivery_id,
        "webhook-timestamp": str(int(now.timestamp())),
        "webhook-signature": signer.sign(delivery_id, now, body),
        "User-Agent": "honest-diffusion-webhooks",
    }
    try:
        response = requests.post(
            url, data=body.encode("utf-8"), headers=headers, timeout=settings.webhook_timeout, allow_redirects=False
        )
    except requests.RequestException as exc:
        raise Failed(f"{type(exc).__name__}: {exc}", retriable=True) from None
    status = response.status_code
    if 200 <= status < 300:
        return
    if status == 429 or status >= 500:
        raise Failed(f"receiver answered {status}", retriable=True, retry_after_s=_retry_after(response))
    raise Failed(f"receiver answered {status}" + (" (gone: no more retries)" if status == 410 else ""), False)


class Deliverer:
    """A worker's thread that sends due webhook deliveries, one at a time, from the store's outbox."""

    def __init__(self, store: Store, settings: Settings, describe: Any, slot: int) -> None:
        self.store, self.settings, self.describe, self.slot = store, settings, describe, slot
        self.outbox = store.outbox
        self.policy = retry_policy(settings)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"webhooks-{slot}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            sent = False
            try:
                if self.store.exists():
                    sent = self._send_one()
            except StoreUnavailable:
                pass  # the claimer logs it; due deliveries wait in the store
            except Exception:
                log.exception("webhook_error", slot=self.slot)
            if not sent:
                self._stop.wait(self.settings.job_poll_interval)

    def _send_one(self) -> bool:
        delivery = self.outbox.claim(self.settings.webhook_timeout + 30)
        if delivery is None:
            return False
        body = delivery["payload"]
        if body is None:
            job = self.store.get(delivery["job_id"])
            data = self.describe(job) if job is not None else {"id": delivery["job_id"]}
            stamp = datetime.datetime.now(datetime.UTC).isoformat().replace("+00:00", "Z")
            body = json.dumps({"type": f"job.{delivery['event']}", "timestamp": stamp, "data": data})
            self.outbox.keep_payload(delivery["id"], body)
        try:
            send(delivery["url"], delivery["id"], body, self.settings)
        except Failed as failure:
            delay = next_try_in(self.policy, delivery["attempt"], failure)
            if delay is None:
                self.outbox.ended(delivery["id"], "failed", str(failure))
                outcome = "refused" if str(failure).startswith("refused") else "failed"
            else:
                self.outbox.later(delivery["id"], delay, str(failure))
                outcome = "retried"
            log.info("webhook", outcome=outcome, job=delivery["job_id"], kind=delivery["event"], error=str(failure))
        else:
            self.outbox.ended(delivery["id"], "delivered")
            outcome = "delivered"
        recorder().webhook_deliveries.labels(outcome).inc()
        return True
