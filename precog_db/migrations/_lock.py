"""The migration lock: one session-level advisory lock per database serializes migration runs.

A second run waits for it, saying who holds it, up to a timeout
(``SET LOCAL lock_timeout`` around one blocking ``pg_advisory_lock``), then
fails clearly (`MigrationLockError`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg import Connection
from psycopg.rows import tuple_row

from precog_db.connection import PrecogConnection
from precog_db.errors import MigrationLockError

__all__ = ["LOCK_KEY", "migration_lock"]

#: Advisory lock key shared by every migration run ("precogmg" in ASCII).
LOCK_KEY = 0x707265636F676D67


def _lock_holder(conn: Connection[Any]) -> str:
    classid, objid = (LOCK_KEY >> 32) & 0xFFFFFFFF, LOCK_KEY & 0xFFFFFFFF
    with conn.cursor(row_factory=tuple_row) as cur:
        cur.execute(
            """
            SELECT a.pid, a.usename, a.application_name, a.client_addr::text, a.backend_start
            FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
            WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
              AND l.classid::bigint = %s AND l.objid::bigint = %s
              AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
            """,
            (classid, objid),
        )
        row = cur.fetchone()
    if row is None:
        return "another run"
    started = row[4].strftime("%H:%M:%S %Z") if row[4] is not None else "?"
    return (
        f"another run (server pid {row[0]}, role {row[1]}, {row[2] or 'no application name'} from "
        f"{row[3] or 'a local socket'}, connected at {started})"
    )


def _to_signed(key: int) -> int:
    return key - (1 << 64) if key >= 1 << 63 else key


def _try_lock(conn: Connection[Any]) -> bool:
    with conn.cursor(row_factory=tuple_row) as cur:
        cur.execute("SELECT pg_try_advisory_lock(%s)", (_to_signed(LOCK_KEY),))
        row = cur.fetchone()
    return bool(row and row[0])


def _wait_for_lock(conn: Connection[Any], timeout: float) -> bool:
    """Block in ``pg_advisory_lock`` for at most ``timeout`` s (``lock_timeout``); False when it expired (55P03).

    The session-level lock outlives the short transaction that scopes ``SET LOCAL``.
    The connection's reply bound (`precog_db.connection.PrecogConnection`) is
    widened by ``timeout`` meanwhile: waiting for a lock is not a silent server.
    """
    bound = conn.reply_timeout if isinstance(conn, PrecogConnection) else None
    if isinstance(conn, PrecogConnection) and bound is not None:
        conn.reply_timeout = bound + timeout
    try:
        with conn.transaction(), conn.cursor() as cur:
            cur.execute("SELECT set_config('lock_timeout', %s, true)", (f"{max(1, round(timeout * 1000))}ms",))
            cur.execute("SELECT set_config('statement_timeout', '0', true)")
            cur.execute("SELECT pg_advisory_lock(%s)", (_to_signed(LOCK_KEY),))
    except psycopg.errors.LockNotAvailable:
        return False
    finally:
        if isinstance(conn, PrecogConnection):
            conn.reply_timeout = bound
    return True


@contextmanager
def migration_lock(
    conn: Connection[Any],
    *,
    timeout: float,
    on_wait: Callable[[str], None] | None = None,
) -> Iterator[None]:
    """Hold the migration advisory lock of this database for the block.

    When another session holds it, ``on_wait`` is called once with a
    sentence naming the holder, and the session blocks in
    ``pg_advisory_lock`` under ``SET LOCAL lock_timeout`` (the server ends the
    wait with SQLSTATE 55P03 after ``timeout``); then `MigrationLockError`.
    ``conn`` must be in autocommit mode (the lock is session-level and
    survives the per-file transactions).
    """
    if not _try_lock(conn):
        holder = _lock_holder(conn)
        if on_wait is not None:
            on_wait(f"{holder} holds the migration lock on this database; waiting up to {timeout:g}s for it")
        if timeout <= 0 or not _wait_for_lock(conn, timeout):
            raise MigrationLockError(
                f"gave up after {timeout:g}s waiting for the migration lock held by {holder}; nothing was "
                "applied. Wait for that run to finish and try again, or raise --lock-timeout"
            )
    try:
        yield
    finally:
        if not conn.closed and not conn.broken:
            with conn.cursor() as cur:
                cur.execute("SELECT pg_advisory_unlock(%s)", (_to_signed(LOCK_KEY),))
