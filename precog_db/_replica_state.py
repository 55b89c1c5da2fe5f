"""Read replicas, the part both layers share and that does no I/O (docs/TOPOLOGY.md, "Read replicas").

The asyncio source `precog_db._replicas_async` (and `precog_db._replicas_sync`,
generated from it) measures replicas and picks one; everything it decides
with is here, written once: the timings, the SQL of the two queries, what a
context still needs to see (`note_commit`, a `contextvars.ContextVar`, so per
thread and per asyncio task), each replica's last measurement and the rules
drawn from it (`ReplicaState`), and the settings of a replica's pool
(`replica_settings`).
"""

from __future__ import annotations

import contextvars
from collections.abc import Sequence
from time import monotonic
from typing import Any

from precog_db.connection import _GATE
from precog_db.log import get_logger
from precog_db.settings import DatabaseSettings, replica_endpoint

log = get_logger()

#: Seconds a replica's measured lag and replay position are trusted before they are measured again.
CHECK_INTERVAL = 0.2
#: Seconds a replica that could not be reached or measured is left alone (reads go elsewhere meanwhile).
RETRY_AFTER = 5.0
#: Longest wait, in seconds, for a connection to measure a replica, and for its reply: a replica that is down
#: or silent costs a read about this much (twice at most).
MEASURE_WAIT = 0.5
#: The WAL position this context must see: None (no write), True (wrote, position not asked yet), or an LSN.
NEED: contextvars.ContextVar[int | bool | None] = contextvars.ContextVar("precog_db_replica_need", default=None)

#: On a replica: its replay position (NULL once it is not in recovery: promoted, or never a standby),
#: and its lag in ms. A promoted standby keeps reporting the last position it replayed, so
#: ``pg_is_in_recovery()`` is what tells. The lag is 0 when it has replayed all its WAL receiver
#: received; with no WAL receiver (cut off from its primary: it cannot know what it is missing) it is
#: the age of its last replayed transaction, infinite if it replayed none; else that age too.
PROBE = (
    "SELECT CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() - '0/0'::pg_lsn END,"
    " CASE WHEN NOT EXISTS (SELECT FROM pg_stat_wal_receiver)"
    " THEN coalesce(extract(epoch FROM now() - pg_last_xact_replay_timestamp())::float8 * 1000, 'Infinity')"
    " WHEN pg_last_wal_receive_lsn() IS NOT DISTINCT FROM pg_last_wal_replay_lsn() THEN 0"
    " ELSE coalesce(extract(epoch FROM now() - pg_last_xact_replay_timestamp())::float8 * 1000, 0) END"
)
#: On the primary: its WAL insert position, at or past every commit it acknowledged.
PRIMARY_LSN = "SELECT pg_current_wal_insert_lsn() - '0/0'::pg_lsn"


def note_commit() -> None:
    """A ``commit=True`` block of this thread or task committed: its next replica read must see the write."""
    NEED.set(True)


def replica_settings(settings: DatabaseSettings, entry: str) -> DatabaseSettings:
    """The settings of the replica ``entry`` (`precog_db.settings.replica_endpoint`: ``host[:port]``,
    ``[IPv6]:port``, a bare IPv6 address); the port defaults to the writer's first DB_PORT."""
    host, port = replica_endpoint(entry)
    default_port = int(str(settings.port).split(",")[0])
    return settings.replace(
        host=host,
        port=port if port is not None else default_port,
        replica_hosts=(),
        target_session_attrs="any",
        pooler="none",
        pool_min=0,
        application_name=f"{settings.application_name} replica",
    )


def may_use_replicas(settings: DatabaseSettings) -> bool:
    """Replicas are configured and this context is not inside a `dangerous_operation` gate."""
    return bool(settings.replica_hosts) and _GATE.get() is None


def settle(need: int | None, replicas: Sequence[ReplicaState]) -> None:
    """Once every replica has replayed this context's last write, its reads stop asking for it."""
    if need is not None and all(r.replayed >= need for r in replicas):
        NEED.set(None)


class ReplicaState:
    """What was last measured on one replica, and what follows from it. No I/O."""

    def __init__(self, settings: DatabaseSettings) -> None:
        self.settings = settings
        self.replayed = -1
        self.lag_ms = 0.0
        self.checked_at = float("-inf")
        self.failed_at = float("-inf")

    def resting(self, now: float) -> bool:
        """It failed less than `RETRY_AFTER` seconds ago: leave it alone."""
        return now - self.failed_at < RETRY_AFTER

    def must_measure(self, need: int | None, now: float) -> bool:
        """The last measurement is older than `CHECK_INTERVAL`, or did not reach the position ``need``."""
        return now - self.checked_at > CHECK_INTERVAL or (need is not None and self.replayed < need)

    def serves(self, need: int | None, max_lag_ms: int) -> bool:
        """Fresh enough (lag at most ``max_lag_ms``) and past ``need``, as last measured."""
        return self.lag_ms <= max_lag_ms and (need is None or self.replayed >= need)

    def failed(self, exc: BaseException) -> bool:
        """It could not be opened or measured: rest it, say why (never the message: it may hold the address)."""
        self.failed_at = monotonic()
        log.warning("replica_unusable", replica=self.settings.where(), reason=type(exc).__name__)
        return False

    def measured(self, row: tuple[Any, ...] | None) -> bool:
        """Record a `PROBE` row; False (and rest it) if the server is not in recovery any more (promoted)."""
        if row is None or row[0] is None:
            self.failed_at = monotonic()
            return False
        self.replayed, self.lag_ms, self.checked_at = int(row[0]), float(row[1]), monotonic()
        return True
