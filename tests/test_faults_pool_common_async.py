"""The pool of each layer under abuse on a real server: exhaustion by many callers, and a leak soak.

The asyncio source: tests/test_faults_pool_common.py is generated from it
(tools/async_to_sync.py). Concurrent callers are asyncio tasks on one loop
here, threads in the sync layer. Each test owns a throwaway cluster. Measured
results are printed with a ``RELIABILITY`` prefix (run with ``-s``) and quoted
in docs/RELIABILITY.md. fork() stays in tests/test_faults_pool.py.
"""

from __future__ import annotations

import asyncio  # ASYNC-ONLY
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any

import psycopg
import pytest
from psycopg.pq import TransactionStatus

from precog_db import PoolExhaustedError
from tests._helpers.faults import own_server, pool_sessions, report

if True:  # ASYNC
    from precog_db import aio as api
    from precog_db.apool import AsyncPrecogPool as Pool

    Block = Callable[[], Coroutine[Any, Any, None]]

    def _start(fn: Block) -> asyncio.Task[None]:
        """``fn()`` running concurrently: an asyncio task."""
        return asyncio.create_task(fn())

    async def _join(handles: list[asyncio.Task[None]], timeout: float) -> None:
        """Wait for every started ``fn``; fail if one has not ended within ``timeout`` seconds."""
        async with asyncio.timeout(timeout):
            await asyncio.gather(*handles)

    def _barrier(parties: int) -> asyncio.Barrier:
        return asyncio.Barrier(parties)
else:
    import precog_db as api
    from precog_db.pool import PrecogPool as Pool

    Block = Callable[[], None]

    def _start(fn: Block) -> threading.Thread:
        """``fn()`` running concurrently: a thread."""
        thread = threading.Thread(target=fn)
        thread.start()
        return thread

    def _join(handles: list[threading.Thread], timeout: float) -> None:
        """Wait for every started ``fn``; fail if one has not ended within ``timeout`` seconds."""
        for thread in handles:
            thread.join(timeout)
            assert not thread.is_alive(), "a thread hung"

    def _barrier(parties: int) -> threading.Barrier:
        return threading.Barrier(parties)


pytestmark = [pytest.mark.fault]
pytestmark.append(pytest.mark.asyncio)  # ASYNC-ONLY


async def _settled(pool: Pool, timeout: float = 10.0) -> dict[str, int]:
    """Pool stats once the background workers have refilled it (pool_available == pool_size), bounded."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and pool.get_stats().get("pool_available", 0) < pool.min_size:
        if True:  # ASYNC
            await asyncio.sleep(0.05)
        else:
            time.sleep(0.05)
    return dict(pool.get_stats())


class TestExhaustion:
    async def test_64_callers_against_a_pool_of_4(self) -> None:
        """60 waiters behind 4 busy holders get PoolExhaustedError on time, naming pool, env and setting."""
        timeout = 1.0
        with own_server() as server:
            pool = await api.initialize_pool(settings=server.settings(pool_min=4, pool_max=4, pool_timeout=timeout))
            try:
                await pool.wait(timeout=10)
                holding = _barrier(4 + 1)
                results: list[tuple[str, float, str]] = []
                lock = threading.Lock()

                async def holder() -> None:
                    async with api.get_cursor() as cur:
                        await holding.wait()
                        await cur.execute("SELECT pg_sleep(%s)", (timeout * 3,))
                    with lock:
                        results.append(("held", 0.0, ""))

                async def waiter() -> None:
                    started = time.monotonic()
                    try:
                        async with api.get_cursor() as cur:
                            await cur.execute("SELECT 1")
                        outcome, message = "ok", ""
                    except PoolExhaustedError as exc:
                        outcome, message = "exhausted", str(exc)
                    except Exception as exc:
                        outcome, message = type(exc).__name__, str(exc)
                    with lock:
                        results.append((outcome, time.monotonic() - started, message))

                holders = [_start(holder) for _ in range(4)]
                await holding.wait()
                waiters = [_start(waiter) for _ in range(60)]
                await _join([*waiters, *holders], timeout * 10)

                waited = [r for r in results if r[0] != "held"]
                assert len(waited) == 60 and {r[0] for r in waited} == {"exhausted"}, {r[0] for r in waited}
                times = [r[1] for r in waited]
                assert min(times) >= timeout * 0.95 and max(times) < timeout + 2.0, (min(times), max(times))
                message = waited[0][2]
                for part in ("precog-test", "(test)", "DB_POOL_MAX_CONN", "DB_POOL_TIMEOUT"):
                    assert part in message, message

                stats = await _settled(pool)
                assert stats["pool_available"] == stats["pool_size"] == 4 and stats.get("requests_waiting", 0) == 0
                assert stats.get("returns_bad", 0) == 0
                assert [state for _, state in pool_sessions(server)] == ["idle"] * 4
                async with api.get_cursor() as cur:
                    await cur.execute("SELECT 1")
                report(
                    "exhaustion",
                    callers=64,
                    pool=4,
                    pool_timeout_s=timeout,
                    exhausted=len(waited),
                    error_after_min_s=round(min(times), 2),
                    error_after_max_s=round(max(times), 2),
                )
            finally:
                await api.close_pool()  # before the server goes


class _Boom(Exception):
    pass


_SOAK_BLOCKS = 20_000
_SOAK_CALLERS = 4


class TestLeakSoak:
    @pytest.mark.slow
    async def test_twenty_thousand_blocks_leave_nothing_behind(self) -> None:
        """20,000 mixed blocks (clean, raising, SQL errors, commits, abandoned transactions) leak nothing."""
        with own_server() as server:
            with server.connect("precog_test") as admin:
                admin.execute("CREATE TABLE soak (id bigint PRIMARY KEY, kind int NOT NULL)")
            pool = await api.initialize_pool(settings=server.settings(pool_min=4, pool_max=4))
            try:
                await pool.wait(timeout=10)
                per_caller = _SOAK_BLOCKS // _SOAK_CALLERS
                committed: list[set[int]] = [set() for _ in range(_SOAK_CALLERS)]
                counts: list[dict[str, int]] = [{} for _ in range(_SOAK_CALLERS)]
                deadline = time.monotonic() + 240
                started = time.monotonic()

                def caller(index: int) -> Block:
                    async def run() -> None:
                        for seq in range(per_caller):
                            if time.monotonic() > deadline:
                                return
                            row_id = index * 1_000_000 + seq
                            kind = seq % 9
                            try:
                                if await _soak_block(kind, row_id):
                                    committed[index].add(row_id)
                                outcome = "ok"
                            except (_Boom, psycopg.Error) as exc:
                                outcome = type(exc).__name__
                            counts[index][outcome] = counts[index].get(outcome, 0) + 1

                    return run

                await _join([_start(caller(i)) for i in range(_SOAK_CALLERS)], 300)
                elapsed = time.monotonic() - started

                total: dict[str, int] = {}
                for count in counts:
                    for k, v in count.items():
                        total[k] = total.get(k, 0) + v
                assert sum(total.values()) == _SOAK_BLOCKS, f"only {sum(total.values())} blocks within the time bound"
                assert set(total) == {"ok", "_Boom", "DivisionByZero", "ReadOnlyWriteError"}, total

                # Every connection is back, idle, with the promised session state; none was thrown away.
                stats = await _settled(pool)
                assert stats["pool_available"] == stats["pool_size"] == 4, stats
                assert stats.get("requests_waiting", 0) == 0 and stats.get("returns_bad", 0) == 0, stats
                assert stats["connections_num"] == 4, "a block cost a connection"
                async with (
                    api.get_connection() as a,
                    api.get_connection() as b,
                    api.get_connection() as c,
                    api.get_connection() as d,
                ):
                    for held in (a, b, c, d):
                        assert held.info.transaction_status == TransactionStatus.IDLE
                        assert held.autocommit is True and held.read_only is False
                        row = await (await held.execute("SHOW default_transaction_read_only")).fetchone()
                        assert row == ("on",)
                sessions = pool_sessions(server)
                assert len(sessions) == 4 and all(state == "idle" for _, state in sessions), sessions

                # Data: exactly the committed blocks are on disk.
                expected = set().union(*committed)
                with server.connect("precog_test") as admin:
                    on_disk = {r[0] for r in admin.execute("SELECT id FROM soak").fetchall()}
                assert on_disk == expected, (len(on_disk - expected), len(expected - on_disk))
                report(
                    "leak_soak",
                    blocks=_SOAK_BLOCKS,
                    callers=_SOAK_CALLERS,
                    seconds=round(elapsed, 1),
                    blocks_per_s=round(_SOAK_BLOCKS / elapsed),
                    outcomes=total,
                    committed_rows=len(expected),
                    connections_opened=stats["connections_num"],
                )
            finally:
                await api.close_pool()  # before the server goes


async def _soak_block(kind: int, row_id: int) -> bool:
    """One block of the soak; True when it committed a row."""
    if kind == 0:  # clean read
        async with api.get_cursor() as cur:
            await cur.execute("SELECT 1")
            await cur.fetchone()
    elif kind == 1:  # exception inside a read block
        async with api.get_cursor() as cur:
            await cur.execute("SELECT 1")
            raise _Boom
    elif kind == 2:  # SQL error inside a read block
        async with api.get_cursor() as cur:
            await cur.execute("SELECT 1 / 0")
    elif kind == 3:  # committed write
        async with api.get_cursor(commit=True) as cur:
            await cur.execute("INSERT INTO soak VALUES (%s, %s)", (row_id, kind))
        return True
    elif kind == 4:  # exception inside a write block: rolled back
        async with api.get_cursor(commit=True) as cur:
            await cur.execute("INSERT INTO soak VALUES (%s, %s)", (row_id, kind))
            raise _Boom
    elif kind == 5:  # SQL error after a write: rolled back
        async with api.get_cursor(commit=True) as cur:
            await cur.execute("INSERT INTO soak VALUES (%s, %s)", (row_id, kind))
            await cur.execute("SELECT 1 / 0")
    elif kind == 6:  # raw connection, explicit transaction
        async with api.get_connection() as conn, conn.transaction():
            await conn.execute("INSERT INTO soak VALUES (%s, %s)", (row_id, kind))
        return True
    elif kind == 7:  # write without commit=True: refused by the read-only session
        async with api.get_cursor() as cur:
            await cur.execute("INSERT INTO soak VALUES (%s, %s)", (row_id, kind))
    else:  # raw connection left inside an open transaction: rolled back at checkin
        async with api.get_connection() as conn:
            if True:  # ASYNC
                await conn.set_autocommit(False)
                await conn.set_read_only(False)
            else:
                conn.autocommit = False
                conn.read_only = False
            await conn.execute("INSERT INTO soak VALUES (%s, %s)", (row_id, kind))
    return False
