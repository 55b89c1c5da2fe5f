"""Attacks on the pools' ``check=`` and ``reset=`` callbacks, both layers, one scenario body each (issue 22).

A careless callback: one that raises an interrupt, closes the connection,
leaves a transaction open or hangs. Whatever it does, no connection is lent
inside a transaction or closed, none is lost, and the pool keeps serving
(docs/RELIABILITY.md, rows 22.x). Against the session's real PostgreSQL, in a
database of the test's own so its sessions can be counted.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg.pq import TransactionStatus

from precog_db import PoolExhaustedError
from tests._helpers.faults import wait_until
from tests._helpers.server import Server
from tests._helpers.topology import pgbouncer
from tests.test_chokepoint import drop_database, make_database, sessions_on
from tests.test_pool_psycopg_semantics import LAYERS, PoolLayer, _sleep_now, finishes

UNIQUE = uuid.uuid4().hex[:8]


@pytest.fixture
def own_db(pg_server: Server) -> Iterator[str]:
    """A database of this test's own, with no session on it: sessions counted there are the test's."""
    name = make_database(pg_server, f"hook_atk_{uuid.uuid4().hex[:8]}")
    assert wait_until(lambda: sessions_on(pg_server, name) == 0, timeout=10), "setup sessions did not end"
    yield name
    drop_database(pg_server, name)


@pytest.fixture(params=LAYERS)
def pool_layer(request: pytest.FixtureRequest) -> PoolLayer:
    return PoolLayer(request.param)


async def _pause(db: PoolLayer, seconds: float) -> None:
    await (asyncio.sleep(seconds) if db.name == "asyncio" else _sleep_now(seconds))


async def _until_available(db: PoolLayer, pool: Any, n: int) -> bool:
    """Whether the pool holds ``n`` idle connections within 10 s (bounded in count and time)."""
    for _ in range(200):
        if pool.get_stats().get("pool_available", 0) == n:
            return True
        await _pause(db, 0.05)
    return False


class TestCheckAttacks:
    """22.6-22.7: a check= callback that misbehaves."""

    @pytest.mark.timeout(120)
    @pytest.mark.parametrize("misdeed", ["BEGIN", "close"])
    def test_a_check_that_leaves_a_transaction_or_closes_is_a_failed_check(
        self, pool_layer: PoolLayer, pg_server: Server, own_db: str, misdeed: str
    ) -> None:
        """A check= that opens a transaction (or closes the connection) and returns: that connection is
        never lent; it counts as a failed check, and the error says what the check left behind."""
        lent: list[Any] = []

        async def check(conn: Any) -> None:
            if misdeed == "BEGIN":
                await conn.execute("BEGIN")
            else:
                await conn.close()

        async def scenario(db: PoolLayer) -> None:
            settings = pg_server.settings(own_db, pool_min=1, pool_max=1, pool_timeout=2.0)
            pool = await db.create(settings, check=db.hook(check), name=f"chk-{misdeed}-{db.name}-{UNIQUE}")
            try:
                await db.wait(pool)
                with pytest.raises(PoolExhaustedError, match="check= callback") as info:
                    conn = await db.checkout(pool)  # the defect: lent inside a transaction / closed
                    lent.append((conn.info.transaction_status, conn.closed))
                    await db.checkin(pool, conn)
                assert "left the connection" in str(info.value), info.value
            finally:
                await db.close(pool)

        pool_layer.run(scenario)
        assert lent == []
        assert wait_until(lambda: sessions_on(pg_server, own_db) == 0, timeout=10)

    @pytest.mark.timeout(120)
    def test_a_check_that_raises_an_interrupt(self, pool_layer: PoolLayer, pg_server: Server, own_db: str) -> None:
        """A check= raising KeyboardInterrupt (sync) / CancelledError (asyncio) once: it propagates, the
        connection it held is given back or replaced (never lost, never lent as it was), and the next
        checkout is served an idle connection."""
        raised: list[int] = []
        served: list[int] = []

        async def check(conn: Any) -> None:
            if not raised:
                raised.append(conn.info.backend_pid)
                raise asyncio.CancelledError() if isinstance(conn, psycopg.AsyncConnection) else KeyboardInterrupt()

        async def scenario(db: PoolLayer) -> None:
            settings = pg_server.settings(own_db, pool_min=1, pool_max=1, pool_timeout=10.0)
            pool = await db.create(settings, check=db.hook(check), name=f"chk-int-{db.name}-{UNIQUE}")
            try:
                await db.wait(pool)
                with pytest.raises((KeyboardInterrupt, asyncio.CancelledError)):
                    await db.checkout(pool)
                conn = await db.checkout(pool)
                try:
                    cur = await conn.execute("SELECT pg_backend_pid()")
                    row = await cur.fetchone()
                    served.append(row[0])
                    assert conn.info.transaction_status == TransactionStatus.IDLE
                finally:
                    await db.checkin(pool, conn)
                assert await _until_available(db, pool, 1)
                assert sessions_on(pg_server, own_db) == 1  # the interrupted one is gone, not leaked
            finally:
                await db.close(pool)

        pool_layer.run(scenario)
        assert len(raised) == 1 and len(served) == 1, (raised, served)
        assert wait_until(lambda: sessions_on(pg_server, own_db) == 0, timeout=10)


class TestResetAttacks:
    """22.9-22.10: a reset= callback that misbehaves."""

    @pytest.mark.timeout(120)
    @pytest.mark.parametrize("misdeed", ["raise", "BEGIN"])
    def test_a_failing_reset_discards_the_connection(
        self, pool_layer: PoolLayer, pg_server: Server, own_db: str, misdeed: str
    ) -> None:
        """A reset= that raises (or leaves a transaction open): the returned connection is closed and
        replaced, the pool stays full, and nothing is ever lent inside a transaction."""
        seen: list[tuple[int, Any]] = []

        async def reset(conn: Any) -> None:
            if misdeed == "BEGIN":
                await conn.execute("BEGIN")
            else:
                raise RuntimeError("the reset says no")

        async def scenario(db: PoolLayer) -> None:
            settings = pg_server.settings(own_db, pool_min=1, pool_max=1, pool_timeout=10.0)
            pool = await db.create(settings, reset=db.hook(reset), name=f"rst-{misdeed}-{db.name}-{UNIQUE}")
            try:
                await db.wait(pool)
                for _ in range(3):
                    conn = await db.checkout(pool)
                    seen.append((conn.info.backend_pid, conn.info.transaction_status))
                    await conn.execute("SELECT 1")
                    await db.checkin(pool, conn)
                assert await _until_available(db, pool, 1)
                assert sessions_on(pg_server, own_db) == 1
            finally:
                await db.close(pool)

        pool_layer.run(scenario)
        assert [status for _, status in seen] == [TransactionStatus.IDLE] * 3, seen
        assert len({pid for pid, _ in seen}) == 3, seen  # each return's connection was discarded
        assert wait_until(lambda: sessions_on(pg_server, own_db) == 0, timeout=10)

    @pytest.mark.timeout(120)
    def test_a_hanging_reset_does_not_hang_the_pool(
        self, pool_layer: PoolLayer, pg_server: Server, own_db: str
    ) -> None:
        """A reset= that never returns holds its connection: a checkout waits for its timeout and says so,
        and closing the pool ends (bounded) instead of hanging with it."""
        release = threading.Event()
        entered: list[int] = []

        async def reset(conn: Any) -> None:
            entered.append(conn.info.backend_pid)
            if isinstance(conn, psycopg.AsyncConnection):
                await asyncio.Event().wait()  # never set: ends when the worker is cancelled
            else:
                release.wait(60)

        async def scenario(db: PoolLayer) -> None:
            settings = pg_server.settings(own_db, pool_min=1, pool_max=1, pool_timeout=1.0)
            pool = await db.create(settings, reset=db.hook(reset), name=f"rst-hang-{db.name}-{UNIQUE}")
            try:
                await db.wait(pool)
                conn = await db.checkout(pool)
                await db.checkin(pool, conn)
                with pytest.raises(PoolExhaustedError):
                    await db.checkout(pool)
            finally:
                if db.name == "sync":
                    pool.close(timeout=1.0)
                else:
                    await pool.close(timeout=1.0)

        try:
            assert finishes(lambda: pool_layer.run(scenario), limit=30) is None
        finally:
            release.set()
        assert len(entered) == 1
        assert wait_until(lambda: sessions_on(pg_server, own_db) == 0, timeout=20)


class TestHooksBehindASessionPooler:
    """22.12: check= and reset= behind DB_POOLER=session see the session the library set up."""

    @pytest.mark.timeout(120)
    def test_check_and_reset_see_the_session_setup(
        self, pool_layer: PoolLayer, pg_server: Server, test_db: str
    ) -> None:
        """Behind PgBouncer in session mode, each hook sees the read-only default and the statement timeout
        the library sets with SET (after every DISCARD ALL too), and the borrower's SET never reaches them."""
        seen: list[tuple[str, str, str, str]] = []

        async def look(conn: Any, hook: str) -> None:
            cur = await conn.execute(
                "SELECT current_setting('default_transaction_read_only'), current_setting('statement_timeout'),"
                " current_setting('application_name')"
            )
            row = await cur.fetchone()
            seen.append((hook, *row))

        async def check(conn: Any) -> None:
            await look(conn, "check")

        async def reset(conn: Any) -> None:
            await look(conn, "reset")

        async def scenario(db: PoolLayer) -> None:
            with pgbouncer(pg_server, pool_mode="session", pool_size=2) as port:
                settings = pg_server.settings(
                    test_db, port=port, pooler="session", statement_timeout_ms=4000, pool_min=1, pool_max=1
                )
                pool = await db.create(
                    settings, check=db.hook(check), reset=db.hook(reset), name=f"hooks-ses-{db.name}-{UNIQUE}"
                )
                try:
                    await db.wait(pool)
                    for _ in range(2):
                        conn = await db.checkout(pool)
                        await conn.execute("SET application_name = 'borrower'")
                        await db.checkin(pool, conn)
                    for _ in range(100):  # the last reset runs in a worker: bounded in count and time
                        if len(seen) == 4:
                            break
                        await _pause(db, 0.05)
                finally:
                    await db.close(pool)

        pool_layer.run(scenario)
        assert [hook for hook, *_ in seen] == ["check", "reset", "check", "reset"], seen
        assert all(ro == "on" and timeout == "4s" and name != "borrower" for _, ro, timeout, name in seen), seen
