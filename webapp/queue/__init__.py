"""The job store (docs/architecture.md §17, §18): SQLite for one container (``store``), Redis for a fleet
(``streams``), chosen by JOB_STORE's scheme; both keep the same contract."""

from __future__ import annotations

from typing import TYPE_CHECKING, TypeAlias

if TYPE_CHECKING:
    from webapp.queue.store import JobStore
    from webapp.queue.streams import RedisJobStore
    from webapp.settings import Settings

Store: TypeAlias = "JobStore | RedisJobStore"  # what routes, claimers, deliverers and hooks ask


def open_store(settings: Settings) -> Store:
    """The store JOB_STORE names (nothing is opened until it is first used)."""
    if settings.job_store.startswith(("redis://", "rediss://")):
        from webapp.queue.streams import RedisJobStore

        return RedisJobStore(settings)
    from webapp.queue.store import JobStore

    return JobStore(settings)
