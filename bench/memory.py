"""Memory per pooled connection, measured in a fresh process: ``python -m bench.memory <kind>``.

The parent passes the target as JSON in ``PRECOG_BENCH_TARGET`` (so a password
never appears in a process listing) and reads one JSON line back. Client cost is
the growth of this process's resident set from "modules imported" to "pool
open, every connection used once", divided by the number of connections.
Server cost is each backend's private memory (``/proc/<pid>/smaps_rollup``,
only when the server runs on this machine and is readable) and the bytes in
the backend's memory contexts (``pg_backend_memory_contexts``, superuser only).
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import sys
from pathlib import Path
from typing import Any

from bench.server import Target

CONNECTIONS = 10
PK = "SELECT id, name, qty, price FROM bench_items WHERE id = %s"
CONTEXTS = "SELECT coalesce(sum(total_bytes), 0)::bigint FROM pg_backend_memory_contexts"


def rss_bytes() -> int:
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def backend_private_kib(pid: int) -> int | None:
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return None
    total = 0
    for line in text.splitlines():
        if line.startswith(("Private_Clean:", "Private_Dirty:")):
            total += int(line.split()[1])
    return total


def _psycopg_backend(conn: Any) -> tuple[int, int | None]:
    pid = conn.info.backend_pid
    try:
        row = conn.execute(CONTEXTS).fetchone()
        contexts = int(row[0] if not isinstance(row, dict) else next(iter(row.values())))
    except Exception:
        contexts = None
    return pid, contexts


def _private(backends: list[tuple[int, int | None]]) -> list[int | None]:
    """Each backend's private memory, read while its connection is still open."""
    if os.environ.get("PRECOG_BENCH_LOCAL") != "1":
        return [None for _ in backends]
    return [backend_private_kib(pid) for pid, _ in backends]


def measure(kind: str, target: Target) -> dict[str, Any]:
    backends: list[tuple[int, int | None]] = []
    if kind == "precog":
        import precog_db
        from precog_db.settings import DatabaseSettings

        imported = rss_bytes()
        settings = DatabaseSettings(
            env=precog_db.Environment.DEV,
            host=target.host,
            port=target.port,
            dbname=target.dbname,
            user=target.user,
            password=target.password,
            pool_min=CONNECTIONS,
            pool_max=CONNECTIONS,
            sslmode="disable",
        )
        pool = precog_db.initialize_pool(settings=settings)
        pool.wait(timeout=60)
        held = [pool.checkout() for _ in range(CONNECTIONS)]
        for conn in held:
            with conn.cursor() as cur:
                cur.execute(PK, (1,))
                cur.fetchone()
            backends.append(_psycopg_backend(conn))
        opened = rss_bytes()
        private = _private(backends)
        for conn in held:
            pool.checkin(conn)
        precog_db.close_pool()
    elif kind == "psycopg_pool":
        from psycopg.rows import dict_row
        from psycopg_pool import ConnectionPool

        imported = rss_bytes()
        ppool: Any = ConnectionPool(
            target.conninfo(), min_size=CONNECTIONS, max_size=CONNECTIONS, kwargs={"row_factory": dict_row}
        )
        ppool.wait(timeout=60)
        held = [ppool.getconn() for _ in range(CONNECTIONS)]
        for conn in held:
            conn.execute(PK, (1,)).fetchone()
            conn.rollback()
            backends.append(_psycopg_backend(conn))
        opened = rss_bytes()
        private = _private(backends)
        for conn in held:
            ppool.putconn(conn)
        ppool.close()
    elif kind == "bare":
        import psycopg

        imported = rss_bytes()
        held = [psycopg.connect(target.conninfo(), autocommit=True) for _ in range(CONNECTIONS)]
        for conn in held:
            conn.execute(PK, (1,)).fetchone()
            backends.append(_psycopg_backend(conn))
        opened = rss_bytes()
        private = _private(backends)
        for conn in held:
            conn.close()
    elif kind == "psycopg2":
        from psycopg2.extras import RealDictCursor
        from psycopg2.pool import ThreadedConnectionPool

        imported = rss_bytes()
        p2 = ThreadedConnectionPool(CONNECTIONS, CONNECTIONS, target.conninfo())
        held = [p2.getconn() for _ in range(CONNECTIONS)]
        for conn in held:
            with conn.cursor(cursor_factory=RealDictCursor) as cur:
                cur.execute(PK, (1,))
                cur.fetchone()
                try:
                    cur.execute(CONTEXTS)
                    contexts = int(next(iter(cur.fetchone().values())))
                except Exception:
                    contexts = None
            conn.rollback()
            backends.append((conn.get_backend_pid(), contexts))
        opened = rss_bytes()
        private = _private(backends)
        for conn in held:
            p2.putconn(conn)
        p2.closeall()
    elif kind == "asyncpg":
        import asyncpg

        imported = rss_bytes()
        private: list[int | None] = []

        async def go() -> int:
            apool = await asyncpg.create_pool(
                **target.connect_kwargs(), ssl=False, min_size=CONNECTIONS, max_size=CONNECTIONS
            )
            held = [await apool.acquire() for _ in range(CONNECTIONS)]
            for conn in held:
                await conn.fetchrow(PK.replace("%s", "$1"), 1)
                try:
                    contexts = int(await conn.fetchval(CONTEXTS))
                except Exception:
                    contexts = None
                backends.append((conn.get_server_pid(), contexts))
            used = rss_bytes()
            private.extend(_private(backends))
            for conn in held:
                await apool.release(conn)
            await apool.close()
            return used

        opened = asyncio.run(go())
    else:
        raise SystemExit(f"unknown kind {kind!r}")
    contexts_known = [c for _, c in backends if c is not None]
    private_known = [p for p in private if p is not None]
    return {
        "kind": kind,
        "connections": CONNECTIONS,
        "client_kib_per_connection": round((opened - imported) / CONNECTIONS / 1024, 1),
        "server_private_kib_per_backend": round(sum(private_known) / len(private_known)) if private_known else None,
        "server_context_kib_per_backend": (
            round(sum(contexts_known) / len(contexts_known) / 1024) if contexts_known else None
        ),
    }


def main() -> int:
    from bench.run import _quiet_logging

    _quiet_logging()
    gc.disable()  # keep the collector from moving the numbers between the two readings
    raw = json.loads(os.environ["PRECOG_BENCH_TARGET"])
    print(json.dumps(measure(sys.argv[1], Target(**raw))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
