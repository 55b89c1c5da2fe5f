"""The checkout/checkin fast path: LIFO reuse, FIFO waiters, and every safety rule still applied.

These check properties, never timings (timings live in bench/).
"""

from __future__ import annotations

import threading
import time

import psycopg
import pytest
from psycopg_pool import PoolClosed

from precog_db import PoolExhaustedError, PoolStateError, get_connection, get_cursor, get_pool, initialize_pool
from precog_db._pool_lending import _Slot, _Waiter
from precog_db.pool import PrecogPool
from precog_db.settings import DatabaseSettings
from tests._helpers.server import Server


def _backend(pool: PrecogPool) -> int:
    conn = pool.checkout()
    try:
        return int(conn.info.backend_pid)
    finally:
        pool.checkin(conn)


def _wait_until(predicate: object, what: str, limit: float = 10.0) -> None:
    deadline = time.monotonic() + limit
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            pytest.fail(f"gave up after {limit}s waiting for {what}")
        time.sleep(0.005)


class TestOrder:
    def test_most_recently_returned_connection_is_handed_out_first(self, test_settings: DatabaseSettings) -> None:
        """With several idle connections, checkout returns the one checked in last (LIFO), not the oldest."""
        pool = initialize_pool(settings=test_settings.replace(pool_min=3, pool_max=3))
        pool.wait(timeout=10)
        held = [pool.checkout() for _ in range(3)]
        for conn in held:
            pool.checkin(conn)
        last = held[-1]
        for _ in range(3):
            conn = pool.checkout()
            assert conn is last
            pool.checkin(conn)

    def test_waiters_are_served_in_arrival_order(self, test_settings: DatabaseSettings) -> None:
        """Callers queued for a busy pool get the connection first come, first served."""
        pool = initialize_pool(settings=test_settings.replace(pool_min=1, pool_max=1, pool_timeout=30))
        served: list[int] = []
        blocker = pool.checkout()
        threads = []

        def borrow(i: int) -> None:
            with get_cursor() as cur:
                served.append(i)
                cur.execute("SELECT 1")

        for i in range(6):
            t = threading.Thread(target=borrow, args=(i,))
            t.start()
            threads.append(t)
            _wait_until(lambda n=i + 1: pool.get_stats().get("requests_waiting", 0) == n, f"waiter {i} to queue")
        pool.checkin(blocker)
        for t in threads:
            t.join(timeout=30)
        assert served == list(range(6))


class TestWaiter:
    """The hand-off protocol between a queued caller and whoever returns a connection (no server needed)."""

    def test_handed_connection_lands_in_the_callers_holder(self) -> None:
        """set() stores the connection straight into the waiting caller's holder and wakes it."""
        slot, conn = _Slot(), object()
        waiter = _Waiter(slot)
        assert waiter.set(conn)  # type: ignore[arg-type]
        assert waiter.wait(5)
        assert slot._conn is conn

    def test_timeout_then_abandon_refuses_a_later_hand_off(self) -> None:
        """A caller whose wait expired and who gave up cannot be handed a connection afterwards."""
        slot = _Slot()
        waiter = _Waiter(slot)
        assert not waiter.wait(0.01)
        assert waiter.abandon()
        assert not waiter.set(object())  # type: ignore[arg-type]
        assert slot._conn is None

    def test_hand_off_racing_the_timeout_is_not_lost(self) -> None:
        """If the connection arrives before the caller gives up, abandon refuses and the holder keeps it."""
        slot, conn = _Slot(), object()
        waiter = _Waiter(slot)
        waiter.set(conn)  # type: ignore[arg-type]
        assert not waiter.abandon()
        assert slot._conn is conn

    def test_fail_wakes_the_caller_with_the_error(self) -> None:
        """fail() (the pool closing) wakes the waiting caller with that error, once, and no connection."""
        slot = _Slot()
        waiter = _Waiter(slot)
        woken: list[bool] = []

        t = threading.Thread(target=lambda: woken.append(waiter.wait(10)))
        t.start()
        time.sleep(0.05)
        assert waiter.fail(PoolClosed("closing"))
        t.join(timeout=10)
        assert woken == [True] and isinstance(waiter.error, PoolClosed)
        assert not waiter.set(object())  # type: ignore[arg-type]
        assert slot._conn is None


class TestSafetyOnTheFastPath:
    def test_connection_left_in_transaction_is_rolled_back(self, test_settings: DatabaseSettings) -> None:
        """A connection returned inside a transaction is rolled back, never handed out mid-transaction."""
        pool = initialize_pool(settings=test_settings.replace(pool_min=1, pool_max=1))
        with get_connection() as conn:
            conn.execute("BEGIN")  # BEGIN READ WRITE would be refused unsent (21.7)
            conn.execute("SET LOCAL application_name = 'hot_path_probe'")
        with get_connection() as conn:
            assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
            assert conn.execute("SHOW application_name").fetchone() != ("hot_path_probe",)
        assert pool.get_stats()["pool_available"] == 1

    def test_expired_connection_is_replaced_on_checkin(self, test_settings: DatabaseSettings) -> None:
        """A connection past max_lifetime is closed when it comes back, and a new one takes its place."""
        pool = initialize_pool(settings=test_settings.replace(pool_min=1, pool_max=1), max_lifetime=1.0)
        conn = pool.checkout()
        first_pid = conn.info.backend_pid
        time.sleep(1.1)
        pool.checkin(conn)
        assert conn.closed
        _wait_until(lambda: pool.get_stats().get("pool_available", 0) == 1, "the replacement connection")
        assert _backend(pool) != first_pid

    def test_dead_idle_connection_is_not_handed_out(self, test_settings: DatabaseSettings, pg_server: Server) -> None:
        """An idle connection whose backend was terminated is discarded at checkout; the caller gets a live one."""
        pool = initialize_pool(settings=test_settings.replace(pool_min=1, pool_max=2))
        victim = _backend(pool)
        with pg_server.connect() as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (victim,))
        time.sleep(0.2)
        for _ in range(3):
            with get_cursor() as cur:
                cur.execute("SELECT pg_backend_pid() AS pid")
                row = cur.fetchone()
                assert row is not None and row["pid"] != victim

    def test_waiter_gets_pool_closed_when_the_pool_closes(self, test_settings: DatabaseSettings) -> None:
        """A caller queued for a connection is woken with PoolClosed when the pool closes, not left hanging."""
        pool = initialize_pool(settings=test_settings.replace(pool_min=1, pool_max=1, pool_timeout=30))
        held = pool.checkout()
        errors: list[BaseException] = []

        def wait() -> None:
            try:
                pool.checkout()
            except BaseException as exc:
                errors.append(exc)

        t = threading.Thread(target=wait)
        t.start()
        _wait_until(lambda: pool.get_stats().get("requests_waiting", 0) == 1, "the caller to queue")
        pool.close(timeout=1)
        t.join(timeout=10)
        assert len(errors) == 1 and isinstance(errors[0], PoolClosed)
        held.close()

    def test_waiter_times_out_with_the_pool_exhausted_error(self, test_settings: DatabaseSettings) -> None:
        """A queued caller that waits past the timeout gets PoolExhaustedError and leaves the queue."""
        pool = initialize_pool(settings=test_settings.replace(pool_min=1, pool_max=1, pool_timeout=0.3))
        held = pool.checkout()
        with pytest.raises(PoolExhaustedError):
            pool.checkout()
        assert pool.get_stats().get("requests_waiting", 0) == 0
        pool.checkin(held)
        with get_cursor() as cur:  # the returned connection is not lost to the departed waiter
            cur.execute("SELECT 1")

    def test_closed_pool_refuses_checkout(self, test_settings: DatabaseSettings) -> None:
        """After close, checkout raises PoolClosed instead of handing out a connection."""
        pool = initialize_pool(settings=test_settings)
        pool.checkin(pool.checkout())
        pool.close()
        with pytest.raises(PoolClosed):
            pool.checkout()

    def test_requests_are_counted(self, test_settings: DatabaseSettings) -> None:
        """Fast-path checkouts still show in the pool's requests_num statistic."""
        initialize_pool(settings=test_settings)
        before = get_pool().get_stats().get("requests_num", 0)
        for _ in range(5):
            with get_cursor() as cur:
                cur.execute("SELECT 1")
        assert get_pool().get_stats()["requests_num"] >= before + 5


class TestBlocks:
    def test_cursor_block_cannot_be_entered_twice(self, test_settings: DatabaseSettings) -> None:
        """Entering one get_cursor() block while it is open raises PoolStateError and leaks no connection."""
        pool = initialize_pool(settings=test_settings.replace(pool_min=1, pool_max=1))
        block = get_cursor()
        with block as cur:
            with pytest.raises(PoolStateError, match="get_cursor"):
                block.__enter__()
            cur.execute("SELECT 1")
        assert pool.get_stats()["pool_available"] == 1

    def test_connection_block_cannot_be_entered_twice(self, test_settings: DatabaseSettings) -> None:
        """Entering one get_connection() block while it is open raises PoolStateError."""
        pool = initialize_pool(settings=test_settings.replace(pool_min=1, pool_max=1))
        block = get_connection()
        with block, pytest.raises(PoolStateError, match="get_connection"):
            block.__enter__()
        assert pool.get_stats()["pool_available"] == 1

    def test_rollback_exception_rolls_back_quietly(self, test_settings: DatabaseSettings) -> None:
        """Raising psycopg.Rollback in a commit=True block undoes the block's writes and is swallowed."""
        initialize_pool(settings=test_settings)
        with get_cursor(commit=True) as cur:
            cur.execute("DROP TABLE IF EXISTS hot_path_rollback")
            cur.execute("CREATE TABLE hot_path_rollback (x int)")
        with get_cursor(commit=True) as cur:
            cur.execute("INSERT INTO hot_path_rollback VALUES (1)")
            raise psycopg.Rollback()
        with get_cursor() as cur:
            cur.execute("SELECT count(*) AS n FROM hot_path_rollback")
            assert cur.fetchone() == {"n": 0}

    def test_cursor_is_closed_after_the_block(self, test_settings: DatabaseSettings) -> None:
        """The cursor cannot be used once its connection is back in the pool."""
        initialize_pool(settings=test_settings)
        with get_cursor() as cur:
            cur.execute("SELECT 1")
        assert cur.closed
        with pytest.raises(psycopg.InterfaceError):
            cur.execute("SELECT 1")


class TestPsycopgPoolHooks:
    def test_reset_hook_runs_and_connections_come_back(self, test_settings: DatabaseSettings) -> None:
        """With psycopg_pool's reset= callback, returned connections go through it and are lent again."""
        resets: list[int] = []

        def reset(conn: psycopg.Connection[object]) -> None:
            resets.append(conn.info.backend_pid)

        pool = initialize_pool(settings=test_settings.replace(pool_min=1, pool_max=1), reset=reset)
        for _ in range(3):
            with get_cursor() as cur:
                cur.execute("SELECT 1")
        _wait_until(lambda: len(resets) == 3, "three resets")
        _wait_until(lambda: pool.get_stats().get("pool_available", 0) == 1, "the connection to come back")
        assert pool.get_stats()["pool_size"] == 1

    def test_check_hook_runs_on_checkout(self, test_settings: DatabaseSettings) -> None:
        """With psycopg_pool's check= callback, every checkout runs it and counts once in requests_num."""
        checks: list[int] = []

        def check(conn: psycopg.Connection[object]) -> None:
            checks.append(conn.info.backend_pid)

        pool = initialize_pool(settings=test_settings.replace(pool_min=1, pool_max=1), check=check)
        before = pool.get_stats().get("requests_num", 0)
        for _ in range(3):
            with get_cursor() as cur:
                cur.execute("SELECT 1")
        assert len(checks) == 3
        assert pool.get_stats()["requests_num"] == before + 3

    def test_foreign_connection_is_refused_at_checkin(self, test_settings: DatabaseSettings, pg_server: Server) -> None:
        """checkin() of a connection the pool did not lend raises PoolStateError and leaves the pool as it was."""
        pool = initialize_pool(settings=test_settings.replace(pool_min=1, pool_max=1))
        pool.wait(timeout=10)
        with pg_server.connect() as stranger, pytest.raises(PoolStateError, match="not lent"):
            pool.checkin(stranger)
        assert pool.get_stats()["pool_available"] == 1 and pool.get_stats()["pool_size"] == 1
