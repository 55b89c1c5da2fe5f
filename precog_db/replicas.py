"""Read replicas: where `get_cursor(replica=True)` reads (docs/TOPOLOGY.md).

``DB_REPLICA_HOSTS`` lists streaming standbys, ``host[:port]`` each. Each gets
its own `PrecogPool`, opened on first use and closed with the writer pool; its
connections pass the same chokepoint (naming rule, gate, production guard,
reply bound, identity stamp: a physical standby carries the primary's stamp).

A read goes to the first replica that is

* **fresh enough**: its replay lag, checked at most every `CHECK_INTERVAL`
  seconds with one query on the replica, is at most ``DB_REPLICA_MAX_LAG_MS``
  (a replica that has replayed everything it received lags 0, however long
  ago the last write was);
* **caught up with this thread's or task's own writes**: after a
  ``get_cursor(commit=True)`` block commits, the next replica read in the same
  thread or asyncio task (a `contextvars.ContextVar`) first asks the primary
  for its WAL insert position (one round trip) and uses a replica only once
  it has replayed that far (known from the last check, or one more query);
  otherwise it reads from the primary. No sleep, no waiting: the primary is
  always a correct answer. Other threads and tasks are not held back.

Never a replica: ``commit=True`` blocks (refused), anything inside a
`dangerous_operation` gate, migrations, backups, restores and the stamp (they
open their own direct connections and never look at the replicas).
"""

from __future__ import annotations

import contextvars
import threading
from time import monotonic
from typing import Any

import psycopg
from psycopg import Connection

from precog_db.connection import _GATE
from precog_db.errors import PrecogDBError
from precog_db.log import get_logger
from precog_db.pool import create_pool
from precog_db.settings import DatabaseSettings, replica_endpoint

__all__ = ["CHECK_INTERVAL", "RETRY_AFTER", "choose", "note_commit", "replica_settings"]

log = get_logger()

#: Seconds a replica's measured lag and replay position are trusted before they are measured again.
CHECK_INTERVAL = 0.2
#: Seconds a replica that could not be reached or measured is left alone (reads go elsewhere meanwhile).
RETRY_AFTER = 5.0
#: Longest wait, in seconds, for a connection to measure a replica: a replica that is down costs a read this much.
_MEASURE_WAIT = 0.5
#: The WAL position this context must see: None (no write), True (wrote, position not asked yet), or an LSN.
_NEED: contextvars.ContextVar[int | bool | None] = contextvars.ContextVar("precog_db_replica_need", default=None)

_PROBE = (
    "SELECT pg_last_wal_replay_lsn() - '0/0'::pg_lsn,"
    " CASE WHEN pg_last_wal_receive_lsn() IS NOT DISTINCT FROM pg_last_wal_replay_lsn() THEN 0"
    " ELSE coalesce(extract(epoch FROM now() - pg_last_xact_replay_timestamp()) * 1000, 0) END"
)
_PRIMARY_LSN = "SELECT pg_current_wal_insert_lsn() - '0/0'::pg_lsn"


def note_commit() -> None:
    """A ``commit=True`` block of this thread or task committed: its next replica read must see the write."""
    _NEED.set(True)


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


class _Slot:
    __slots__ = ("_conn",)

    def __init__(self) -> None:
        self._conn: Connection[Any] | None = None


class Replica:
    """One replica's pool and what was last measured on it."""

    def __init__(self, settings: DatabaseSettings) -> None:
        self.settings = settings
        self.pool: Any = None
        self.replayed = -1
        self.lag_ms = 0.0
        self.checked_at = float("-inf")
        self.failed_at = float("-inf")
        self.lock = threading.Lock()

    def _measure(self) -> bool:
        """One query on the replica: its replay position and lag. False if it cannot be used now."""
        slot = _Slot()
        try:
            self.pool.lend(slot, min(_MEASURE_WAIT, self.settings.pool_timeout))
            conn = slot._conn
            assert conn is not None
            row = conn.execute(_PROBE, prepare=False).fetchone()
        except (psycopg.Error, PrecogDBError) as exc:
            self.failed_at = monotonic()
            log.warning("replica_unusable", replica=self.settings.where(), reason=type(exc).__name__)
            return False
        finally:
            if slot._conn is not None:
                self.pool.give_back(slot)
        if row is None or row[0] is None:  # not in recovery any more (promoted): not a replica
            self.failed_at = monotonic()
            return False
        self.replayed, self.lag_ms, self.checked_at = int(row[0]), float(row[1]), monotonic()
        return True

    def usable(self, need: int | None, max_lag_ms: int) -> bool:
        now = monotonic()
        if now - self.failed_at < RETRY_AFTER:
            return False
        if self.pool is None:
            with self.lock:
                if self.pool is None:
                    try:
                        self.pool = create_pool(self.settings, prod_confirmed=_confirmed())
                    except (psycopg.Error, PrecogDBError) as exc:
                        self.failed_at = monotonic()
                        log.warning("replica_unusable", replica=self.settings.where(), reason=type(exc).__name__)
                        return False
        stale = now - self.checked_at > CHECK_INTERVAL
        if (stale or (need is not None and self.replayed < need)) and not self._measure():
            return False
        return self.lag_ms <= max_lag_ms and (need is None or self.replayed >= need)


def _confirmed() -> bool:
    from precog_db.guard import production_confirmed

    return production_confirmed()


def choose(primary: Any) -> Any:
    """The pool a ``get_cursor(replica=True)`` block reads from: a fresh replica's, else ``primary``."""
    settings: DatabaseSettings = primary.settings
    if not settings.replica_hosts or _GATE.get() is not None:
        return primary
    replicas: list[Replica] | None = getattr(primary, "_precog_replicas", None)
    if replicas is None:
        replicas = [Replica(replica_settings(settings, entry)) for entry in settings.replica_hosts]
        primary._precog_replicas = replicas
    need = _NEED.get()
    if need is True:
        need = _primary_position(primary)
        if need is None:
            return primary
        _NEED.set(need)
    for replica in replicas:
        if replica.usable(need if isinstance(need, int) else None, settings.replica_max_lag_ms):
            if need is not None and replica.replayed >= need and all(r.replayed >= need for r in replicas):
                _NEED.set(None)  # every replica has it now: no more checks for this write
            return replica.pool
    return primary


def _primary_position(primary: Any) -> int | None:
    """The primary's WAL insert position now (one round trip): at or past this context's last commit."""
    slot = _Slot()
    try:
        primary.lend(slot)
        conn = slot._conn
        assert conn is not None
        row = conn.execute(_PRIMARY_LSN, prepare=False).fetchone()
    except (psycopg.Error, PrecogDBError):
        return None
    finally:
        if slot._conn is not None:
            primary.give_back(slot)
    return None if row is None else int(row[0])
