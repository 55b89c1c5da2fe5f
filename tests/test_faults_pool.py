"""fork() and the sync pool on a real server (exhaustion and the leak soak: tests/test_faults_pool_common_async.py).

Each test owns a throwaway cluster. Measured results are printed with a
``RELIABILITY`` prefix (run with ``-s``) and quoted in docs/RELIABILITY.md.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests._helpers.faults import own_server, report

pytestmark = pytest.mark.fault


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
