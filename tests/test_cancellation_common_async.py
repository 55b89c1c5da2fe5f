"""Interrupted blocks in both layers: a cancelled task (asyncio) or a signal handler raising (sync) loses nothing.

The asyncio source: tests/test_cancellation_common.py is generated from it
(tools/async_to_sync.py). An interrupt is what each layer's callers meet:
here the task running the block is cancelled (``Task.cancel``, as
``asyncio.timeout`` does); in the sync layer a real SIGALRM handler raises a
job timeout (`JobTimeout`), as job runners do. Either way the block's
connection is never lost or lent again mid-transaction, nothing uncommitted
is stored, and an interrupt that lands while COMMIT is in flight is reported
as `CommitOutcomeUnknownError` chained from it. Random interrupts by the
hundred, ``KeyboardInterrupt``/``SystemExit`` and the cancellation storm stay
per layer: tests/test_interrupts.py, tests/test_aio_faults.py.
"""

from __future__ import annotations

import asyncio  # ASYNC-ONLY
import signal
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from types import FrameType
from typing import Any

import pytest
import pytest_asyncio  # ASYNC-ONLY

from precog_db import CommitOutcomeUnknownError
from precog_db.settings import DatabaseSettings
from tests._helpers.fault_proxy import FaultProxy, fault_proxy
from tests._helpers.faults import wait_until
from tests._helpers.server import Server

if True:  # ASYNC
    from precog_db import aio as api
    from precog_db.apool import AsyncPrecogPool as Pool

    fixture = pytest_asyncio.fixture
    Block = Callable[[], Coroutine[Any, Any, None]]

    @pytest_asyncio.fixture(autouse=True)
    async def _asyncio_pool_closed() -> AsyncIterator[None]:
        """The asyncio pool is closed after each test, on the test's own loop."""
        try:
            yield
        finally:
            await api.close_pool()
else:
    import precog_db as api
    from precog_db.pool import PrecogPool as Pool

    fixture = pytest.fixture
    Block = Callable[[], None]

pytestmark = pytest.mark.asyncio  # ASYNC-ONLY


class JobTimeout(Exception):
    """What a job runner raises from its SIGALRM handler (the sync layer's interrupt)."""


if True:  # ASYNC
    #: What an interrupted block raises in this layer.
    INTERRUPT: type[BaseException] = asyncio.CancelledError
else:
    INTERRUPT = JobTimeout

_HOLD = 2.0  # seconds the proxy holds the server's replies: the COMMIT is done there, its reply not yet here
_POLLS = 200  # bound on the polls (of 0.02 s) waiting for the COMMIT to reach the server


async def _pause(seconds: float) -> None:
    if True:  # ASYNC
        await asyncio.sleep(seconds)
    else:
        time.sleep(seconds)


async def _interrupted(block: Block, *, after: float = 0.0, when: Callable[[], bool] = lambda: True) -> Any:
    """What ``block()`` raised (None if nothing) when interrupted ``after`` seconds in, once ``when()`` holds.

    ``when`` is polled every 0.02 s, at most `_POLLS` times. asyncio: the task running the block is
    cancelled. Sync: a SIGALRM handler raises `JobTimeout` (re-arming itself while ``when()`` is false).
    """
    if True:  # ASYNC
        task = asyncio.create_task(block())
        await asyncio.sleep(after)
        for _ in range(_POLLS):
            if when() or task.done():
                break
            await asyncio.sleep(0.02)
        task.cancel()
        try:
            await task
        except BaseException as exc:  # CancelledError included: it is what is under test
            return exc
        return None
    else:
        polls = {"n": 0, "fired": 0}

        def handler(signum: int, frame: FrameType | None) -> None:
            if polls["fired"]:
                return
            if not when() and polls["n"] < _POLLS:
                polls["n"] += 1
                signal.setitimer(signal.ITIMER_REAL, 0.02)
                return
            polls["fired"] += 1
            raise JobTimeout("job timed out")

        previous = signal.signal(signal.SIGALRM, handler)
        signal.setitimer(signal.ITIMER_REAL, max(after, 1e-3))
        try:
            block()
        except BaseException as exc:
            return exc
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
        return None


def _sessions(pg_server: Server, dbname: str) -> tuple[int, int]:
    """(sessions of the test's pools on ``dbname``, of which not idle), seen by the server."""
    with pg_server.connect(dbname) as admin:
        row = admin.execute(
            "SELECT count(*), count(*) FILTER (WHERE state <> 'idle') FROM pg_stat_activity "
            "WHERE datname = %s AND application_name = 'precog-test' AND pid <> pg_backend_pid()",
            (dbname,),
        ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


async def _assert_no_leak(pool: Pool, pg_server: Server, dbname: str) -> None:
    """Every connection is back in the pool, and the server sees exactly those, all idle (bounded wait)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        stats = pool.get_stats()
        settled = stats.get("pool_available", 0) == stats.get("pool_size", -1) >= pool.min_size
        if settled and _sessions(pg_server, dbname) == (stats["pool_size"], 0):
            return
        await _pause(0.05)
    stats = pool.get_stats()
    assert stats.get("pool_available", 0) == stats.get("pool_size", -1), stats
    assert _sessions(pg_server, dbname) == (stats["pool_size"], 0), stats


async def _assert_clean(pool: Pool, pg_server: Server, dbname: str) -> None:
    """Every connection is back in the pool (bounded wait), and no session is idle in a transaction.

    Looser than `_assert_no_leak`: a statement left running by an interrupted block (its connection
    closed) may still be listed on the server until it ends.
    """
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        stats = pool.get_stats()
        if stats.get("pool_available", 0) == stats.get("pool_size", -1) >= pool.min_size:
            break
        await _pause(0.05)
    stats = pool.get_stats()
    assert stats.get("pool_available", 0) == stats.get("pool_size", -1), stats
    with pg_server.connect(dbname) as admin:
        stuck = admin.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND application_name = 'precog-test' AND state LIKE 'idle in transaction%'"
        ).fetchone()
    assert stuck == (0,)


@fixture
async def small(test_settings: DatabaseSettings) -> Pool:
    """The layer's pool with at most 2 connections (both open before the test), a 30 s checkout timeout."""
    pool = await api.initialize_pool(settings=test_settings.replace(pool_min=2, pool_max=2, pool_timeout=30.0))
    await pool.wait(timeout=10)
    return pool


@pytest.fixture(autouse=True)
def _no_statement_outlives_its_test(pg_server: Server, test_db: str) -> Iterator[None]:
    """After the test, end any statement of its pools still running, so that it cannot hide in the next test."""
    yield
    with pg_server.connect(test_db) as admin:
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = current_database() "
            "AND application_name = 'precog-test' AND pid <> pg_backend_pid() AND state = 'active'"
        )


def _count(pg_server: Server, test_db: str, table: str) -> int:
    with pg_server.connect(test_db) as admin:
        row = admin.execute(f"SELECT count(*) FROM {table}").fetchone()
    assert row is not None
    return int(row[0])


class TestInterruptedStatement:
    async def test_interrupted_statement_is_cancelled_on_the_server(
        self, small: Pool, pg_server: Server, test_db: str
    ) -> None:
        """A block interrupted in a long statement: the interrupt propagates, the statement ends, nothing leaks."""

        async def sleeper() -> None:
            async with api.get_cursor() as cur:
                await cur.execute("SELECT pg_sleep(30)")

        assert isinstance(await _interrupted(sleeper, after=0.5), INTERRUPT)
        with pg_server.connect(test_db) as admin:
            running = admin.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'SELECT pg_sleep(30)%' AND state = 'active'"
            ).fetchone()
        assert running == (0,)
        await _assert_no_leak(small, pg_server, test_db)

    async def test_interrupted_write_block_is_rolled_back(self, small: Pool, pg_server: Server, test_db: str) -> None:
        """A commit=True block interrupted mid-statement commits nothing and leaves no session in a transaction."""
        with pg_server.connect(test_db) as admin:
            admin.execute("DROP TABLE IF EXISTS irq_cancel")
            admin.execute("CREATE TABLE irq_cancel (x int)")

        async def writer() -> None:
            async with api.get_cursor(commit=True) as cur:
                await cur.execute("INSERT INTO irq_cancel VALUES (1)")
                await cur.execute("SELECT pg_sleep(30)")

        assert isinstance(await _interrupted(writer, after=0.5), INTERRUPT)
        assert _count(pg_server, test_db, "irq_cancel") == 0
        await _assert_no_leak(small, pg_server, test_db)

    async def test_interrupted_first_statement_loses_nothing(
        self, small: Pool, pg_server: Server, test_db: str
    ) -> None:
        """Interrupted while the BEGIN+first statement of a commit=True block is in flight: not committed, no leak."""
        with pg_server.connect(test_db) as admin:
            admin.execute("DROP TABLE IF EXISTS irq_first")
            admin.execute("CREATE TABLE irq_first (x int)")

        async def slow() -> None:
            async with api.get_cursor(commit=True) as cur:
                await cur.execute("INSERT INTO irq_first SELECT 1 FROM pg_sleep(5)")

        assert isinstance(await _interrupted(slow, after=0.3), INTERRUPT)
        assert _count(pg_server, test_db, "irq_first") == 0
        async with api.get_cursor(commit=True) as cur:  # the pool lends a working connection
            await cur.execute("INSERT INTO irq_first VALUES (2)")
        assert _count(pg_server, test_db, "irq_first") == 1
        await _assert_clean(small, pg_server, test_db)


class TestInterruptWhileCommitIsInFlight:
    """Issue 21.4: an interrupt that lands while COMMIT is in flight is reported as an unknown outcome."""

    async def test_interrupted_slow_commit_is_an_unknown_outcome(
        self, small: Pool, pg_server: Server, test_db: str
    ) -> None:
        """Interrupted while a slow COMMIT runs (a deferred trigger): CommitOutcomeUnknownError; no leak."""
        with pg_server.connect(test_db) as admin:
            admin.execute("DROP TABLE IF EXISTS irq_slow_commit")
            admin.execute("CREATE TABLE irq_slow_commit (x int)")
            # A deferred constraint trigger runs at COMMIT: this one makes COMMIT take 1 s.
            admin.execute(
                "CREATE OR REPLACE FUNCTION irq_slow() RETURNS trigger LANGUAGE plpgsql AS "
                "$$ BEGIN PERFORM pg_sleep(1); RETURN NULL; END $$"
            )
            admin.execute(
                "CREATE CONSTRAINT TRIGGER irq_slow AFTER INSERT ON irq_slow_commit "
                "DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION irq_slow()"
            )

        async def writer() -> None:
            async with api.get_cursor(commit=True) as cur:
                await cur.execute("INSERT INTO irq_slow_commit VALUES (1)")

        caught = await _interrupted(writer, after=0.4)  # the INSERT is instant; COMMIT is running its trigger
        assert isinstance(caught, CommitOutcomeUnknownError), repr(caught)
        assert "while COMMIT was in flight" in str(caught)
        assert isinstance(caught.__cause__, INTERRUPT)
        await _assert_no_leak(small, pg_server, test_db)

    @pytest.mark.parametrize("pipelined", [False, True], ids=["plain", "pipeline"])
    async def test_interrupt_during_commit_is_an_unknown_outcome(
        self, pipelined: bool, test_settings: DatabaseSettings, pg_server: Server, test_db: str
    ) -> None:
        """The proxy delivers the COMMIT (with pipeline=True the whole block) and holds the server's reply.

        The server has committed while the client still waits: the interrupt lands in that window (once
        the proxy saw the COMMIT's bytes go through, bounded). The caller gets `CommitOutcomeUnknownError`
        chained from the interrupt, never the interrupt alone (which reads as "not committed"), and the
        connection, whose state is unknown, is closed.
        """
        with pg_server.connect(test_db) as admin:
            admin.execute("DROP TABLE IF EXISTS irq_commit")
            admin.execute("CREATE TABLE irq_commit (i int)")
        with fault_proxy(pg_server.host, pg_server.port) as proxy:
            pool = await api.initialize_pool(settings=test_settings.replace(port=proxy.port, pool_min=1, pool_max=1))
            await pool.wait(timeout=10)
            caught, pid = await _commit_interrupted_in_flight(pipelined, proxy)
            proxy.hold_replies(0)
            assert isinstance(caught, CommitOutcomeUnknownError), repr(caught)
            assert isinstance(caught.__cause__, INTERRUPT), repr(caught.__cause__)
            assert "while COMMIT was in flight" in str(caught) and "may have committed" in str(caught)
            async with api.get_cursor() as cur:  # the connection was closed: the pool lends a new one
                await cur.execute("SELECT pg_backend_pid() AS pid")
                row = await cur.fetchone()
                assert row is not None and row["pid"] != pid
            assert pool.get_stats()["pool_size"] == 1
            await api.close_pool()  # before the proxy goes
        with pg_server.connect(test_db) as admin:
            assert admin.execute("SELECT count(*) FROM irq_commit").fetchone() == (1,)  # it WAS committed
            assert wait_until(
                lambda: (
                    admin.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone() == (0,)
                ),
                timeout=10,
            )  # the interrupted connection was closed, not kept

    async def test_interrupted_pipelined_block_is_an_unknown_outcome(
        self, small: Pool, pg_server: Server, test_db: str
    ) -> None:
        """pipeline=True: interrupted while the block (COMMIT included) is in flight: unknown outcome, no leak."""
        with pg_server.connect(test_db) as admin:
            admin.execute("DROP TABLE IF EXISTS irq_pipe")
            admin.execute("CREATE TABLE irq_pipe (x int)")

        async def slow() -> None:
            async with api.get_cursor(commit=True, pipeline=True) as cur:
                await cur.execute("INSERT INTO irq_pipe SELECT 1 FROM pg_sleep(5)")

        caught = await _interrupted(slow, after=0.3)
        assert isinstance(caught, CommitOutcomeUnknownError), repr(caught)
        assert isinstance(caught.__cause__, INTERRUPT)
        async with api.get_cursor(commit=True) as cur:
            await cur.execute("INSERT INTO irq_pipe VALUES (2)")
        assert _count(pg_server, test_db, "irq_pipe") >= 1
        await _assert_clean(small, pg_server, test_db)


async def _commit_interrupted_in_flight(pipelined: bool, proxy: FaultProxy) -> tuple[Any, int]:
    """(what the caller got, the borrowed backend's pid) for a block interrupted once its COMMIT is at the server."""
    pid = {"pid": 0}

    async def writer() -> None:
        async with api.get_cursor(commit=True, pipeline=pipelined) as cur:
            pid["pid"] = cur._conn.info.backend_pid  # no I/O (cur.connection would send the BEGIN)
            await cur.execute("INSERT INTO irq_commit VALUES (1)")
            proxy.hold_replies(_HOLD)

    caught = await _interrupted(writer, after=0.02, when=lambda: proxy.sent_while_held > 0)
    return caught, pid["pid"]
