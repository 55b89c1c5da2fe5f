"""Read replicas, the I/O: where ``get_cursor(replica=True)`` reads (docs/TOPOLOGY.md).

The asyncio source of both layers: `precog_db._replicas_sync` is generated
from it (tools/async_to_sync.py); the decisions, timings and SQL are in
`precog_db._replica_state`, and `precog_db.replicas` is the public home.

Each ``DB_REPLICA_HOSTS`` entry gets its own pool (the layer's own kind),
opened on first use, kept on the pool it reads for (``_precog_replicas``)
and closed with it. `choose` picks, for one read, the first replica that is
fresh enough and has this thread's or task's own last write, else the
primary: one `PROBE` on a replica at most every `CHECK_INTERVAL` seconds,
and after a commit one `PRIMARY_LSN` on the primary.
"""

from __future__ import annotations

if True:  # ASYNC
    import asyncio
else:
    import threading
from time import monotonic
from typing import Any

import psycopg
from psycopg import AsyncConnection

if True:  # ASYNC
    from precog_db import apool as pools
else:
    from precog_db import pool as pools
from precog_db._replica_state import (
    MEASURE_WAIT,
    NEED,
    PRIMARY_LSN,
    PROBE,
    ReplicaState,
    may_use_replicas,
    replica_settings,
    settle,
)
from precog_db.errors import PrecogDBError
from precog_db.guard import production_confirmed
from precog_db.settings import DatabaseSettings

__all__ = ["Replica", "choose"]


class _Lent:
    """Holds a lent connection from `lend` until it is given back, so no interrupt can lose it."""

    __slots__ = ("_conn",)

    def __init__(self) -> None:
        self._conn: AsyncConnection[Any] | None = None


async def _first_row(pool: pools.AsyncPrecogPool, sql: str, timeout: float | None = None) -> tuple[Any, ...] | None:
    """The first row of ``sql``, run on a connection ``pool`` lends and gets back whatever happens.

    ``timeout`` bounds the wait for the connection and, for the statement, the silence of the server
    (the connection's reply bound, `precog_db.connection.reply_timeout`, lowered meanwhile): a server
    that stops answering costs that much, and its connection is closed and replaced.
    """
    lent = _Lent()
    try:
        if True:  # ASYNC
            conn = lent._conn = await pool.lend(timeout)
        else:
            conn = pool.lend(lent, timeout)
        bound = getattr(conn, "reply_timeout", None)
        if timeout is not None:
            conn.reply_timeout = timeout if bound is None else min(bound, timeout)  # type: ignore[attr-defined]
        try:
            cursor = await conn.execute(sql, prepare=False)
            return await cursor.fetchone()
        finally:
            if timeout is not None:
                conn.reply_timeout = bound  # type: ignore[attr-defined]
    finally:
        if lent._conn is not None:
            if True:  # ASYNC
                await pool.give_back(lent._conn)
            else:
                pool.give_back(lent)


class Replica(ReplicaState):
    """One replica: its pool, opened on first use, and what was last measured on it."""

    def __init__(self, settings: DatabaseSettings) -> None:
        super().__init__(settings)
        self.pool: pools.AsyncPrecogPool | None = None
        if True:  # ASYNC
            self.lock = asyncio.Lock()
        else:
            self.lock = threading.Lock()

    async def usable(
        self, need: int | None, max_lag_ms: int, owner: pools.AsyncPrecogPool
    ) -> pools.AsyncPrecogPool | None:
        """Its pool, if it is fresh enough and has replayed ``need``; measured first when that is stale.

        ``owner`` is the pool it reads for: a replica pool opened after ``owner`` was closed is closed at once
        (``owner``'s close sets its flag before it closes the replica pools, so one of the two closes it).
        """
        now = monotonic()
        if self.resting(now):
            return None
        pool = self.pool
        if pool is None:
            if self.lock.locked():
                return None  # another reader is opening it (a silent replica takes DB_CONNECT_TIMEOUT): not this one
            async with self.lock:  # one pool per replica, whoever asks first
                if (pool := self.pool) is None:
                    try:
                        pool = self.pool = await pools.create_pool(self.settings, prod_confirmed=production_confirmed())
                    except (psycopg.Error, PrecogDBError) as exc:
                        self.failed(exc)
                        return None
                    if owner.closed:  # closed while this one opened: it must not outlive it
                        await pool.close(timeout=1.0)
                        return None
        if self.must_measure(need, now):
            try:
                row = await _first_row(pool, PROBE, min(MEASURE_WAIT, self.settings.pool_timeout))
            except (psycopg.Error, PrecogDBError) as exc:
                self.failed(exc)
                return None
            if not self.measured(row):
                return None
        return pool if self.serves(need, max_lag_ms) else None


async def choose(primary: pools.AsyncPrecogPool) -> pools.AsyncPrecogPool:
    """The pool a ``get_cursor(replica=True)`` block reads from: a fresh replica's, else ``primary``."""
    settings = primary.settings
    if not may_use_replicas(settings):
        return primary
    replicas: list[Replica] | None = getattr(primary, "_precog_replicas", None)
    if replicas is None:
        fresh = [Replica(replica_settings(settings, entry)) for entry in settings.replica_hosts]
        # Closed with it (its close). setdefault: two threads that get here at once share one list.
        replicas = vars(primary).setdefault("_precog_replicas", fresh)
    need = NEED.get()
    if need is True:
        need = await _primary_position(primary)
        if need is None:
            return primary
        NEED.set(need)
    for replica in replicas:
        pool = await replica.usable(need, settings.replica_max_lag_ms, primary)
        if pool is not None:
            settle(need, replicas)  # every replica has this context's write: no more checks for it
            return pool
    return primary


async def _primary_position(primary: pools.AsyncPrecogPool) -> int | None:
    """The primary's WAL insert position now (one round trip): at or past this context's last commit."""
    try:
        row = await _first_row(primary, PRIMARY_LSN)
    except (psycopg.Error, PrecogDBError):
        return None
    return None if row is None else int(row[0])
