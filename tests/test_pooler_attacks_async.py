"""Attacks on the pooler cursors behind a real transaction-mode PgBouncer, over both layers (issue 22, 22.x rows).

Written once, for asyncio; tools/async_to_sync.py generates tests/test_pooler_attacks.py, which runs
every scenario on the sync pool. What is attacked: `precog_db._pooler_async` (and its generated twin)
with `precog_db.session`'s classifier behind it (docs/TOPOLOGY.md, "DB_POOLER=transaction"):
interrupts at every wait of the read wrapper and of a commit block's first statement, many borrowers
through a small pool, hand-built cursors, the borrower's own pipeline, server cursors,
``executemany(returning=True)``, a stream left half-way, COPY, notices and notifies, errors in the
wrapper, and ``prepare=True`` / ``prepare_threshold=0``.

After each attack the rules are checked from outside: no session of the test database is left idle in
a transaction, and a plain client of the same PgBouncer (one server connection unless said otherwise)
is served within a bounded time, so no server connection stays pinned to the attacker.
"""

# The two branches of `if True:  # ASYNC` below import the same names from each layer, which mypy,
# reading both, would call a redefinition.
# mypy: disable-error-code="no-redef"

from __future__ import annotations

import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import psycopg
import pytest
from psycopg.pq import TransactionStatus

from precog_db.settings import DatabaseSettings
from tests._helpers.server import TEST_DB, Server
from tests._helpers.topology import pgbouncer

if True:  # ASYNC
    import asyncio

    from pytest_asyncio import fixture

    from precog_db.aio import close_pool, get_connection, get_cursor, initialize_pool
else:
    import signal

    from pytest import fixture

    from precog_db import close_pool, get_connection, get_cursor, initialize_pool

pytestmark = pytest.mark.asyncio  # ASYNC-ONLY

_IDLE = TransactionStatus.IDLE


@pytest.fixture(scope="module")
def bouncer(pg_server: Server, test_db: str) -> Iterator[int]:
    """A transaction-mode PgBouncer with ONE server connection: whatever leaks or pins, the next client sees."""
    with pgbouncer(pg_server, pool_mode="transaction", pool_size=1) as port:
        yield port


@pytest.fixture
def tx_settings(pg_server: Server, bouncer: int) -> DatabaseSettings:
    return pg_server.settings(
        port=bouncer, pooler="transaction", direct_host=pg_server.host, direct_port=pg_server.port, pool_timeout=20.0
    )


@fixture(autouse=True)
async def _pool_closed() -> AsyncGenerator[None, None]:
    yield
    await close_pool()


class _Interrupted(Exception):
    """What a signal handler raises in the sync layer (an ``Exception``, as ``TimeoutError`` is)."""


def _served(port: int, timeout: float = 10.0) -> bool:
    """A plain client of the PgBouncer gets an answer within ``timeout`` (its server connection is not pinned)."""
    answers: list[Any] = []

    def probe() -> None:
        try:
            with psycopg.connect(
                f"host=127.0.0.1 port={port} user=postgres dbname={TEST_DB}",
                autocommit=True,
                prepare_threshold=None,
                connect_timeout=5,
            ) as conn:
                answers.append(conn.execute("SELECT 3").fetchone())
        except psycopg.Error as exc:  # an answer too, but the wrong one
            answers.append(exc)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return answers == [(3,)]


def _idle_in_transaction(pg_server: Server, test_db: str) -> int:
    """Server sessions of the test database (PgBouncer's included) idle inside a transaction, once settled.

    A client that closed its connection mid-transaction leaves PgBouncer to close the server one, which
    takes a moment: looked at until none is left (bounded: 100 looks, about 5 s).
    """
    left = -1
    with pg_server.connect(test_db) as admin:
        for _ in range(100):
            row = admin.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND pid <> pg_backend_pid() AND state LIKE 'idle in transaction%'"
            ).fetchone()
            assert row is not None
            left = int(row[0])
            if left == 0:
                break
            time.sleep(0.05)
    return left


async def _table(name: str) -> None:
    async with get_cursor(commit=True) as cur:
        await cur.execute(f"DROP TABLE IF EXISTS {name}")
        await cur.execute(f"CREATE TABLE {name} (x int)")


async def _values(table: str) -> list[int]:
    async with get_cursor() as cur:
        await cur.execute(f"SELECT coalesce(array_agg(x ORDER BY x), '{{}}') AS xs FROM {table}")
        row = await cur.fetchone()
    assert row is not None
    return list(row["xs"])


async def _still_sound(pg_server: Server, test_db: str, bouncer: int) -> None:
    """After an attack: nothing idle in a transaction, the PgBouncer serves others, the pool reads and writes."""
    assert _idle_in_transaction(pg_server, test_db) == 0
    assert _served(bouncer)
    async with get_connection() as conn:  # what the pool lends next
        assert conn.pgconn.transaction_status == _IDLE
        assert getattr(conn, "_pipeline", None) is None
    async with get_cursor() as cur:  # a read still runs in its own read-only transaction
        await cur.execute("SELECT current_setting('transaction_read_only') AS ro")
        assert await cur.fetchone() == {"ro": "on"}
    async with get_cursor(commit=True) as cur:
        await cur.execute("SELECT current_setting('transaction_read_only') AS ro")
        assert await cur.fetchone() == {"ro": "off"}


class _Hook:
    """Interrupt the ``at``-th wait on one connection: ``before`` it starts, or ``during`` it.

    asyncio: the task is cancelled (``before``: at a suspension point just ahead of the wait, as a
    contended ``conn.lock`` would be; ``during``: the cancellation lands at the wait's first
    suspension, or the next one). Sync: `_Interrupted` is raised, as a signal handler would raise it
    (``during``: at the generator's first wait for the socket, or as it ends if it never waits).
    """

    def __init__(self, conn: Any, at: int, mode: str) -> None:
        self.conn, self.at, self.mode = conn, at, mode
        self.calls = 0
        self.fired = False
        self.real = conn.wait
        conn.wait = self.wait

    def remove(self) -> None:
        self.conn.__dict__.pop("wait", None)

    async def wait(self, gen: Any, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        if self.calls == self.at and not self.fired:
            self.fired = True
            self.remove()
            if True:  # ASYNC
                task = asyncio.current_task()
                assert task is not None
                task.cancel()
                if self.mode == "before":
                    await asyncio.sleep(0)  # the cancellation lands here, before anything of this wait
            else:
                if self.mode == "before":
                    raise _Interrupted("before the wait")
                gen = _interrupted(gen)
        return await self.real(gen, *args, **kwargs)


if True:  # ASYNC
    _INTERRUPT: tuple[type[BaseException], ...] = (asyncio.CancelledError,)
else:
    _INTERRUPT = (_Interrupted,)

    def _interrupted(gen: Any) -> Any:
        """``gen``, with `_Interrupted` raised at its first wait for the socket (or as it ends)."""
        try:
            next(gen)
        except StopIteration:
            raise _Interrupted("as the wait ended") from None
        raise _Interrupted("while waiting for the server")
        yield  # a generator


async def _scenario(name: str, cur: Any) -> None:
    """One block's worth of statements for `TestInterrupts` (``cur`` from the block named in SCENARIOS)."""
    if name == "read":
        await cur.execute("SELECT %s::int AS one", (1,))
        await cur.fetchone()
    elif name == "failed read":  # the server's error, then the ROLLBACK the wrapper sends on its own
        await cur.execute("SELECT 1/0")
    elif name == "stream":
        async for _ in cur.stream("SELECT generate_series(1, 3) AS g"):
            pass
    elif name == "copy to":
        async with cur.copy("COPY (SELECT generate_series(1, 3)) TO STDOUT") as copy:
            async for _ in copy.rows():
                pass
    elif name == "first statement":
        await cur.execute("INSERT INTO pooler_attack_irq VALUES (%s)", (1,))
        await cur.execute("INSERT INTO pooler_attack_irq VALUES (%s)", (2,))
    else:  # "pipelined block"
        await cur.execute("INSERT INTO pooler_attack_irq VALUES (%s)", (1,))


#: scenario -> (commit, pipeline) of its get_cursor block
SCENARIOS = {
    "read": (False, False),
    "failed read": (False, False),
    "stream": (False, False),
    "copy to": (False, False),
    "first statement": (True, False),
    "pipelined block": (True, True),
}


class TestInterrupts:
    @pytest.mark.parametrize("mode", ["before", "during"])
    @pytest.mark.parametrize("name", sorted(SCENARIOS))
    async def test_interrupted_at_every_wait(
        self, tx_settings: DatabaseSettings, bouncer: int, pg_server: Server, test_db: str, name: str, mode: str
    ) -> None:
        """An interrupt at each wait in turn: the connection is closed or clean, PgBouncer's server is not pinned."""
        await initialize_pool(settings=tx_settings.replace(pool_min=1, pool_max=1))
        await _table("pooler_attack_irq")
        commit, pipeline = SCENARIOS[name]
        fired_at: list[int] = []
        for at in range(1, 16):  # far more waits than any scenario makes
            hook: _Hook | None = None
            try:
                async with get_cursor(commit=commit, pipeline=pipeline) as cur:
                    hook = _Hook(cur._conn, at, mode)
                    await _scenario(name, cur)
            except _INTERRUPT:
                fired_at.append(at)
            except psycopg.errors.DivisionByZero:
                assert name == "failed read"
            except psycopg.Error as exc:  # what an interrupt may leave: a lost connection, said so
                assert hook is not None and hook.fired, exc
                fired_at.append(at)
            finally:
                if hook is not None:
                    hook.remove()
            if hook is not None and not hook.fired:
                break  # every wait of the scenario has been interrupted once
            await _still_sound(pg_server, test_db, bouncer)
        assert fired_at, "no wait was interrupted"
        assert at > 1
        if commit:  # nothing half-committed: each interrupted block wrote all or nothing, and the last all
            values = await _values("pooler_attack_irq")
            assert values.count(1) >= 1 and (name == "pipelined block" or values.count(2) == values.count(1))

    async def test_a_statement_cut_by_a_timeout(
        self, tx_settings: DatabaseSettings, bouncer: int, pg_server: Server, test_db: str
    ) -> None:
        """asyncio.timeout (sync: a SIGALRM handler raising TimeoutError) mid-read: nothing pinned, nothing open."""
        await initialize_pool(settings=tx_settings.replace(pool_min=1, pool_max=1))
        for commit in (False, True):
            with pytest.raises(TimeoutError):
                async with _bounded(0.5), get_cursor(commit=commit) as cur:
                    await cur.execute("SELECT pg_sleep(3)")
            await _still_sound(pg_server, test_db, bouncer)


@asynccontextmanager
async def _bounded(seconds: float) -> AsyncIterator[None]:
    """TimeoutError when the block runs longer than ``seconds`` (sync: from a SIGALRM handler)."""
    if True:  # ASYNC
        async with asyncio.timeout(seconds):
            yield
    else:

        def alarm(signum: int, frame: Any) -> None:
            raise TimeoutError(f"interrupted after {seconds}s")

        previous = signal.signal(signal.SIGALRM, alarm)
        signal.setitimer(signal.ITIMER_REAL, seconds)
        try:
            yield
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
