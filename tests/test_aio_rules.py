"""precog_db.aio's own shape, and fork() with an asyncio pool.

The chokepoint, the production guard, the stamp and the gates, for both layers:
tests/test_rules_common_async.py.
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from precog_db import aio, dangerous_operation
from tests._helpers.server import Server

REPO = Path(__file__).resolve().parent.parent


class TestShape:
    def test_only_the_chokepoint_opens_async_connections(self) -> None:
        """No module but precog_db/_connection_async.py calls AsyncConnection.connect (psycopg_pool's worker aside)."""
        offenders = [
            p.name
            for p in (REPO / "precog_db").rglob("*.py")
            if p.name != "_connection_async.py" and "AsyncConnection.connect(" in p.read_text()
        ]
        assert offenders == []

    def test_the_module_exports_exactly_the_issue_names(self) -> None:
        """precog_db.aio's public names are the seven of the issue, and the class a connection_class= subclasses.

        ``PrecogAsyncConnection`` is that class's deprecated old name, the same object.
        """
        assert aio.PrecogAsyncConnection is aio.AsyncPrecogConnection
        assert sorted(aio.__all__) == sorted(
            [
                "AsyncPrecogConnection",
                "PrecogAsyncConnection",
                "get_cursor",
                "get_connection",
                "initialize_pool",
                "get_pool",
                "close_pool",
                "truncate_tables",
                "delete_all",
            ]
        )

    def test_a_gated_async_def_is_still_a_coroutine_function(self) -> None:
        """dangerous_operation keeps an async def a coroutine function (and the helpers are too)."""

        @dangerous_operation()
        async def wipe() -> None:
            return None

        assert inspect.iscoroutinefunction(wipe)
        assert inspect.iscoroutinefunction(aio.truncate_tables)
        assert inspect.iscoroutinefunction(aio.delete_all)


def test_fork_child_never_uses_the_parents_asyncio_pool(pg_server: Server, test_db: str) -> None:
    """A forked child is refused the inherited asyncio pool and opens its own with the same settings."""
    settings = pg_server.settings(test_db)
    fields: dict[str, Any] = {k: getattr(settings, k) for k in ("host", "port", "dbname", "user", "sslmode")}
    fields["password"] = str(settings.password) if settings.password else ""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DB_", "PRECOG_"))}
    out = subprocess.run(
        [sys.executable, str(REPO / "tests" / "aio_fork_workload.py"), json.dumps(fields)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=REPO / "tests",
        check=False,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["inherited"] == "PoolStateError", result
    assert "fork" in result["message"]
    assert result["own_pool"] is True and result["same_target"] is True
    assert result["child_pid"] != result["parent_pid"]
    assert result["parent_alive"] is True  # the child did not close the parent's connection
