"""What a migration waits for while it waits: its ungranted lock and the sessions blocking it.

`LockWatch` runs beside one file: after a short delay (so a file that gets
its locks at once costs nothing) it opens a second connection (through the
chokepoint, by the factory it is given) and polls ``pg_locks`` for the
migration session's lock that is not granted, with ``pg_blocking_pids()``
and ``pg_stat_activity`` for who holds it. When the file then fails on
``lock_timeout`` the last observation says exactly which lock it waited for,
on what, and behind whom; after the rollback that can no longer be read.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import Connection
from psycopg.rows import tuple_row

__all__ = ["LockWait", "LockWatch"]

_WAITING = """
SELECT l.mode,
       CASE WHEN l.locktype = 'relation' THEN l.relation::regclass::text
            ELSE l.locktype || coalesce(' ' || l.transactionid::text, '') END,
       b.pid, coalesce(nullif(a.application_name, ''), '(no application_name)'), coalesce(a.state, 'unknown')
FROM pg_locks l
CROSS JOIN LATERAL unnest(pg_blocking_pids(l.pid)) AS b(pid)
LEFT JOIN pg_stat_activity a ON a.pid = b.pid
WHERE l.pid = %s AND NOT l.granted
ORDER BY b.pid
"""


@dataclass(frozen=True)
class LockWait:
    """One observation: the lock mode waited for, on what, and each blocker as (pid, application_name, state)."""

    mode: str
    target: str
    blockers: tuple[tuple[int, str, str], ...]

    def describe(self) -> str:
        """``it waited for AccessExclusiveLock on orders, blocked by pid 123 (application_name 'x', idle …)``."""
        who = "; ".join(f"pid {pid} (application_name {name!r}, {state})" for pid, name, state in self.blockers)
        return f"it waited for {self.mode} on {self.target}, blocked by {who}"


class LockWatch:
    """Watch session ``pid`` from a second connection (``open_connection()``) while a file runs; a context manager.

    ``delay`` seconds before the first look (no connection at all when the
    file is done sooner), then every ``interval`` seconds. `last` is the
    latest `LockWait` seen, or None. A failure of the watch itself (cannot
    connect, a query error) only means nothing is observed.
    """

    def __init__(
        self, open_connection: Callable[[], Connection[Any]], pid: int, *, delay: float = 0.2, interval: float = 0.1
    ) -> None:
        self._open = open_connection
        self._pid = pid
        self._delay = delay
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="precog-db lock watch", daemon=True)
        self.last: LockWait | None = None

    def __enter__(self) -> LockWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        if self._stop.wait(self._delay):
            return
        try:
            conn = self._open()
        except Exception:  # the watch is best effort: the message then lists the holders instead
            return
        try:
            with conn.cursor(row_factory=tuple_row) as cur:
                while not self._stop.is_set():
                    cur.execute(_WAITING, (self._pid,))
                    rows = cur.fetchall()
                    if rows:
                        self.last = LockWait(
                            str(rows[0][0]),
                            str(rows[0][1]),
                            tuple((int(r[2]), str(r[3]), str(r[4])) for r in rows),
                        )
                    self._stop.wait(self._interval)
        except psycopg.Error:
            return
        finally:
            with contextlib.suppress(psycopg.Error):
                conn.close()
