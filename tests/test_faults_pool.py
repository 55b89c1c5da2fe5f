"""Pool behaviour under abuse on a real server: exhaustion, a leak soak, and fork().

Each test owns a throwaway cluster. Measured results are printed with a
``RELIABILITY`` prefix (run with ``-s``) and quoted in docs/RELIABILITY.md.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.pq import TransactionStatus

from precog_db import PoolExhaustedError, get_connection, get_cursor, initialize_pool
from tests._helpers.faults import own_server, pool_sessions, report, settled_pool_stats

pytestmark = pytest.mark.fault


class TestExhaustion:
    def test_64_threads_against_a_pool_of_4(self) -> None:
        """60 waiters behind 4 busy holders get PoolExhaustedError on time, naming pool, env and setting."""
        timeout = 1.0
        with own_server() as server:
            initialize_pool(settings=server.settings(pool_min=4, pool_max=4, pool_timeout=timeout))
            settled_pool_stats()
            holding = threading.Barrier(4 + 1)
            results: list[tuple[str, float, str]] = []
            lock = threading.Lock()

            def holder() -> None:
                with get_cursor() as cur:
                    holding.wait()
                    cur.execute("SELECT pg_sleep(%s)", (timeout * 3,))
                with lock:
                    results.append(("held", 0.0, ""))

            def waiter() -> None:
                started = time.monotonic()
                try:
                    with get_cursor() as cur:
                        cur.execute("SELECT 1")
                    outcome, message = "ok", ""
                except PoolExhaustedError as exc:
                    outcome, message = "exhausted", str(exc)
                except Exception as exc:
                    outcome, message = type(exc).__name__, str(exc)
                with lock:
                    results.append((outcome, time.monotonic() - started, message))

            holders = [threading.Thread(target=holder) for _ in range(4)]
            for t in holders:
                t.start()
            holding.wait()
            waiters = [threading.Thread(target=waiter) for _ in range(60)]
            for t in waiters:
                t.start()
            for t in [*waiters, *holders]:
                t.join(timeout * 10)
                assert not t.is_alive(), "a thread hung"

            waited = [r for r in results if r[0] != "held"]
            assert len(waited) == 60 and {r[0] for r in waited} == {"exhausted"}, {r[0] for r in waited}
            times = [r[1] for r in waited]
            assert min(times) >= timeout * 0.95 and max(times) < timeout + 2.0, (min(times), max(times))
            message = waited[0][2]
            for part in ("precog-test", "(test)", "DB_POOL_MAX_CONN", "DB_POOL_TIMEOUT"):
                assert part in message, message

            stats = settled_pool_stats()
            assert stats["pool_available"] == stats["pool_size"] == 4 and stats.get("requests_waiting", 0) == 0
            assert stats.get("returns_bad", 0) == 0
            assert [state for _, state in pool_sessions(server)] == ["idle"] * 4
            with get_cursor() as cur:
                cur.execute("SELECT 1")
            report(
                "exhaustion",
                threads=64,
                pool=4,
                pool_timeout_s=timeout,
                exhausted=len(waited),
                error_after_min_s=round(min(times), 2),
                error_after_max_s=round(max(times), 2),
            )


class _Boom(Exception):
    pass


_SOAK_BLOCKS = 20_000
_SOAK_THREADS = 4


class TestLeakSoak:
    @pytest.mark.slow
    def test_twenty_thousand_blocks_leave_nothing_behind(self) -> None:
        """20,000 mixed blocks (clean, raising, SQL errors, commits, abandoned transactions) leak nothing."""
        with own_server() as server:
            with server.connect("precog_test") as admin:
                admin.execute("CREATE TABLE soak (id bigint PRIMARY KEY, kind int NOT NULL)")
            initialize_pool(settings=server.settings(pool_min=4, pool_max=4))
            settled_pool_stats()
            per_thread = _SOAK_BLOCKS // _SOAK_THREADS
            committed: list[set[int]] = [set() for _ in range(_SOAK_THREADS)]
            counts: list[dict[str, int]] = [{} for _ in range(_SOAK_THREADS)]
            deadline = time.monotonic() + 240
            started = time.monotonic()

            def run(index: int) -> None:
                for seq in range(per_thread):
                    if time.monotonic() > deadline:
                        return
                    row_id = index * 1_000_000 + seq
                    kind = seq % 9
                    try:
                        if _soak_block(kind, row_id):
                            committed[index].add(row_id)
                        outcome = "ok"
                    except (_Boom, psycopg.Error) as exc:
                        outcome = type(exc).__name__
                    counts[index][outcome] = counts[index].get(outcome, 0) + 1

            threads = [threading.Thread(target=run, args=(i,)) for i in range(_SOAK_THREADS)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(300)
                assert not t.is_alive()
            elapsed = time.monotonic() - started

            total: dict[str, int] = {}
            for count in counts:
                for k, v in count.items():
                    total[k] = total.get(k, 0) + v
            assert sum(total.values()) == _SOAK_BLOCKS, f"only {sum(total.values())} blocks within the time bound"
            assert set(total) == {"ok", "_Boom", "DivisionByZero", "ReadOnlyWriteError"}, total

            # Every connection is back, idle, with the promised session state; none was thrown away.
            stats = settled_pool_stats()
            assert stats["pool_available"] == stats["pool_size"] == 4, stats
            assert stats.get("requests_waiting", 0) == 0 and stats.get("returns_bad", 0) == 0, stats
            assert stats["connections_num"] == 4, "a block cost a connection"
            with get_connection() as a, get_connection() as b, get_connection() as c, get_connection() as d:
                for held in (a, b, c, d):
                    assert held.info.transaction_status == TransactionStatus.IDLE
                    assert held.autocommit is True and held.read_only is False
                    row = held.execute("SHOW default_transaction_read_only").fetchone()
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
                threads=_SOAK_THREADS,
                seconds=round(elapsed, 1),
                blocks_per_s=round(_SOAK_BLOCKS / elapsed),
                outcomes=total,
                committed_rows=len(expected),
                connections_opened=stats["connections_num"],
            )


def _soak_block(kind: int, row_id: int) -> bool:
    """One block of the soak; True when it committed a row."""
    if kind == 0:  # clean read
        with get_cursor() as cur:
            cur.execute("SELECT 1")
            cur.fetchone()
    elif kind == 1:  # exception inside a read block
        with get_cursor() as cur:
            cur.execute("SELECT 1")
            raise _Boom
    elif kind == 2:  # SQL error inside a read block
        with get_cursor() as cur:
            cur.execute("SELECT 1 / 0")
    elif kind == 3:  # committed write
        with get_cursor(commit=True) as cur:
            cur.execute("INSERT INTO soak VALUES (%s, %s)", (row_id, kind))
        return True
    elif kind == 4:  # exception inside a write block: rolled back
        with get_cursor(commit=True) as cur:
            cur.execute("INSERT INTO soak VALUES (%s, %s)", (row_id, kind))
            raise _Boom
    elif kind == 5:  # SQL error after a write: rolled back
        with get_cursor(commit=True) as cur:
            cur.execute("INSERT INTO soak VALUES (%s, %s)", (row_id, kind))
            cur.execute("SELECT 1 / 0")
    elif kind == 6:  # raw connection, explicit transaction
        with get_connection() as conn, conn.transaction():
            conn.execute("INSERT INTO soak VALUES (%s, %s)", (row_id, kind))
        return True
    elif kind == 7:  # write without commit=True: refused by the read-only session
        with get_cursor() as cur:
            cur.execute("INSERT INTO soak VALUES (%s, %s)", (row_id, kind))
    else:  # raw connection left inside an open transaction: rolled back at checkin
        with get_connection() as conn:
            conn.autocommit = False
            conn.read_only = False
            conn.execute("INSERT INTO soak VALUES (%s, %s)", (row_id, kind))
    return False


class TestFork:
    def test_child_gets_its_own_pool_and_the_parent_keeps_its_connections(self) -> None:
        """After fork the child opens its own pool (same settings); its exit leaves the parent's connections alive."""
        with own_server() as server:
            with server.connect("precog_test") as admin:
                admin.execute("CREATE TABLE fork_log (who text NOT NULL)")
            fields: dict[str, Any] = {
                "host": server.host,
                "port": server.port,
                "user": server.user,
                "dbname": "precog_test",
                "pool_min": 2,
                "pool_max": 2,
                "sslmode": "disable",
            }
            script = Path(__file__).with_name("fork_workload.py")
            repo = str(Path(__file__).resolve().parent.parent)
            done = subprocess.run(
                [sys.executable, str(script), json.dumps(fields)],
                capture_output=True,
                text=True,
                timeout=120,
                cwd=repo,
                env={"PATH": "/usr/bin:/bin", "PYTHONPATH": repo},
                check=False,
            )
            assert done.returncode == 0, done.stderr[-3000:]
            result = json.loads(done.stdout.strip().splitlines()[-1])
            assert "child_error" not in result, result
            assert result["child_exit"] == 0
            assert result["stale_pool"] == "PoolStateError"
            assert result["child_pool_is_new"] and result["child_pool_same_settings"]
            assert not set(result["child_pids"]) & set(result["parent_pids_before"]), "child used parent sockets"
            assert result["parent_pids_after"] == result["parent_pids_before"], "parent's connections were lost"
            assert result["rows"] == {"child": 20, "parent": 20}
            report(
                "fork",
                parent_backends=result["parent_pids_before"],
                child_backends=result["child_pids"],
                parent_backends_after_child_exit=result["parent_pids_after"],
                stale_pool_use=result["stale_pool"],
            )
