"""Round trips per operation on the wire, direct and behind Debian's PgBouncer (docs/TOPOLOGY.md).

Run: ``python -m bench.topology``. Starts a throwaway cluster, a PgBouncer in
transaction and one in session mode in front of it (the test harness's
helpers), and counts the ``ReadyForQuery`` messages that reach the client
through `bench.wire.RoundTripCounter`, placed between the client and the
server or the PgBouncer, for each operation of the pool.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from conftest import Server, start_throwaway_cluster
from topology_helpers import pgbouncer

from bench.wire import RoundTripCounter
from precog_db import close_pool, get_cursor, initialize_pool


def _read_one() -> None:
    with get_cursor() as cur:
        cur.execute("SELECT %s::int", (1,))
        cur.fetchone()


def _read_two() -> None:
    with get_cursor() as cur:
        cur.execute("SELECT %s::int", (1,))
        cur.execute("SELECT %s::int", (2,))


def _write_one() -> None:
    with get_cursor(commit=True) as cur:
        cur.execute("INSERT INTO rt VALUES (%s)", (1,))


OPERATIONS: dict[str, Callable[[], None]] = {
    "get_cursor(): 1 SELECT": _read_one,
    "get_cursor(): 2 SELECTs": _read_two,
    "get_cursor(commit=True): 1 INSERT": _write_one,
}


def _count(server: Server, port: int, **settings: Any) -> dict[str, float]:
    with RoundTripCounter("127.0.0.1", port) as counter:
        initialize_pool(settings=server.settings(port=counter.port, pool_min=1, pool_max=1, **settings))
        try:
            with get_cursor(commit=True) as cur:
                cur.execute("CREATE TABLE IF NOT EXISTS rt (x int)")
            out = {}
            for name, operation in OPERATIONS.items():
                operation()  # warm
                counter.reset()
                for _ in range(20):
                    operation()
                out[name] = counter.round_trips / 20
            return out
        finally:
            close_pool()


def main() -> int:
    cluster = start_throwaway_cluster()
    try:
        server = Server(host=cluster.host, port=cluster.port, user="postgres", password="", admin_db="postgres")
        server.fresh_database("precog_test")
        report = {"direct (DB_POOLER=none)": _count(server, server.port)}
        for mode in ("session", "transaction"):
            with pgbouncer(server, pool_mode=mode, pool_size=2) as port:
                report[f"PgBouncer {mode} mode"] = _count(server, port, pooler=mode)
    finally:
        cluster.destroy()
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
