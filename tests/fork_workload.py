"""Run by tests/test_faults_pool.py in a subprocess: open a pool, fork, use the database in both processes.

The child ends with a normal interpreter exit (``sys.exit``), so finalizers
run there, as in a pre-forking server's worker. Prints one JSON object.
Usage: python fork_workload.py '<json of DatabaseSettings fields>'
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from precog_db import PoolStateError, get_connection, get_cursor, get_pool, initialize_pool
from precog_db.environment import Environment
from precog_db.settings import DatabaseSettings


def backend_pids() -> list[int]:
    """Check out both pooled connections at once and return their server pids."""
    with get_connection() as first, get_connection() as second:
        pids = []
        for conn in (first, second):
            row = conn.execute("SELECT pg_backend_pid()").fetchone()
            assert row is not None
            pids.append(int(row[0]))
    return sorted(pids)


def main() -> None:
    settings = DatabaseSettings(env=Environment.TEST, **json.loads(sys.argv[1]))
    pool = initialize_pool(settings=settings)
    before = backend_pids()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        out: dict[str, Any] = {}
        try:
            try:
                pool.checkout()
                out["stale_pool"] = "handed out a connection"
            except PoolStateError:
                out["stale_pool"] = "PoolStateError"
            own = get_pool()
            out["child_pool_is_new"] = own is not pool
            out["child_pool_same_settings"] = own.settings == settings
            out["child_pids"] = backend_pids()
            for _ in range(20):
                with get_cursor(commit=True) as cur:
                    cur.execute("INSERT INTO fork_log (who) VALUES ('child')")
        except Exception as exc:
            out["child_error"] = repr(exc)
        os.write(write_end, json.dumps(out).encode())
        os.close(write_end)
        sys.exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        result: dict[str, Any] = json.loads(pipe.read() or b"{}")
    _, status = os.waitpid(pid, 0)
    result["child_exit"] = os.waitstatus_to_exitcode(status)
    result["parent_pids_before"] = before
    result["parent_pids_after"] = backend_pids()
    for _ in range(20):
        with get_cursor(commit=True) as cur:
            cur.execute("INSERT INTO fork_log (who) VALUES ('parent')")
    with get_cursor() as cur:
        cur.execute("SELECT who, count(*) AS n FROM fork_log GROUP BY who")
        result["rows"] = {row["who"]: row["n"] for row in cur.fetchall()}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
