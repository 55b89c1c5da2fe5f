"""The identity stamp read over a given connection, written once: this asyncio source generates `_stamp_sync`.

The SQL and every decision are in `precog_db._stamp_check` (no I/O); this is
the I/O that drives them (`precog_db._steps_async.run`). The chokepoint
(`precog_db._connection_async` and its generated twin) runs `verify_stamp` on
every new connection.
"""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg import AsyncConnection

from precog_db._stamp_check import Stamp, judge_stamp, read_steps, system_identifier_steps, unreadable_error
from precog_db._steps_async import run
from precog_db.settings import DatabaseSettings


async def read_stamp_on(conn: AsyncConnection[Any], settings: DatabaseSettings) -> Stamp | None:
    """Read the stamp over an open connection; None when the database is unstamped."""
    try:
        return await run(conn, read_steps())
    except psycopg.errors.InsufficientPrivilege:
        raise unreadable_error(settings) from None


async def verify_stamp(settings: DatabaseSettings, conn: AsyncConnection[Any], *, quiet: bool = False) -> Stamp | None:
    """Check the database behind ``conn`` against the environment of ``settings``.

    The chokepoint calls it on every new connection (``quiet`` after the
    pool's first, so the warnings are logged once per pool). Returns the stamp
    (None when unstamped) or raises `EnvironmentMismatchError`,
    `RestoredCopyError`, `UnstampedDatabaseError` or `StampError`: the rules
    are `precog_db._stamp_check.judge_stamp`'s (see `precog_db.stamp`).
    """
    return judge_stamp(settings, await read_stamp_on(conn, settings), quiet=quiet)


async def cluster_system_identifier(conn: AsyncConnection[Any]) -> int | None:
    """The cluster's ``system_identifier``, or None when this role may not read ``pg_control_system()``.

    PostgreSQL grants ``pg_control_system()`` to PUBLIC by default; an
    administrator can revoke it, and some managed services do not provide it.
    """
    return await run(conn, system_identifier_steps())
