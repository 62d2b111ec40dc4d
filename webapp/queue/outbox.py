"""The webhook deliveries' outbox (docs/architecture.md §17): a row per event a job's webhook filter takes,
written by the job store in the transaction of the change it reports (``announce``), so a restart loses
none, and leased, sent and retried by the workers' deliverers (``webapp.api.webhooks``) through ``Outbox``.
Same file, same connections as the job store; the table is declared with the store's schema."""

from __future__ import annotations

import secrets
import sqlite3
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from webapp.queue.store import JobStore


def announce(db: sqlite3.Connection, job_id: str, event: str, now: float) -> None:
    """Queue a webhook delivery of ``event`` for the job, in the transaction of the change it reports, if the
    job has a webhook whose filter takes the event."""
    db.execute(
        "INSERT INTO deliveries (id, job_id, event, url, next_at, created_at) "
        "SELECT ?, id, ?, webhook, ?, ? FROM jobs "
        "WHERE id = ? AND webhook IS NOT NULL AND instr(webhook_events, ?) > 0",
        ("msg_" + secrets.token_urlsafe(18), event, now, now, job_id, f",{event},"),
    )


class Outbox:
    """The deliveries in ``store``'s file: the oldest due one leased to a deliverer, then ended or put off."""

    def __init__(self, store: JobStore) -> None:
        self.store = store

    def claim(self, lease_s: float) -> sqlite3.Row | None:
        """The oldest delivery that is due (pending, or one whose deliverer's lease lapsed), leased for
        ``lease_s``; None when none is due (a read looks first)."""
        now = time.time()
        due = "(status = 'pending' AND next_at <= ?) OR (status = 'sending' AND lease_until < ?)"
        if not self.store.query(f"SELECT 1 FROM deliveries WHERE {due} LIMIT 1", now, now):
            return None
        with self.store.transaction() as db:
            return db.execute(
                "UPDATE deliveries SET status = 'sending', attempt = attempt + 1, lease_until = ? WHERE seq = ("
                "SELECT seq FROM deliveries WHERE (status = 'pending' AND next_at <= ?) OR "
                "(status = 'sending' AND lease_until < ?) ORDER BY next_at LIMIT 1) RETURNING *",
                (now + lease_s, now, now),
            ).fetchone()

    def keep_payload(self, delivery_id: str, payload: str) -> None:
        """Keep the body first sent, so every retry sends the same bytes under the same webhook-id."""
        with self.store.transaction() as db:
            db.execute("UPDATE deliveries SET payload = ? WHERE id = ? AND payload IS NULL", (payload, delivery_id))

    def ended(self, delivery_id: str, status: str, error: str | None = None) -> None:
        """``delivered``, or ``failed`` for good (refused, 410, a 4xx, or the schedule ran out)."""
        with self.store.transaction() as db:
            db.execute(
                "UPDATE deliveries SET status = ?, last_error = ?, lease_until = NULL WHERE id = ?",
                (status, error, delivery_id),
            )

    def later(self, delivery_id: str, delay_s: float, error: str) -> None:
        with self.store.transaction() as db:
            db.execute(
                "UPDATE deliveries SET status = 'pending', next_at = ?, last_error = ?, lease_until = NULL "
                "WHERE id = ?",
                (time.time() + delay_s, error, delivery_id),
            )

    def of_job(self, job_id: str) -> list[sqlite3.Row]:
        return self.store.query("SELECT * FROM deliveries WHERE job_id = ? ORDER BY seq", job_id)
