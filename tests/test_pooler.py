"""Behind Debian's real PgBouncer, what has one layer only: the settings rules, the tools' and the CLI's direct target.

The pool scenarios (reads, commit blocks, session-state refusals, prepared statements, direct
connections, session mode) run over both layers from one source: tests/test_pooler_common_async.py,
which generates tests/test_pooler_common.py (docs/TOPOLOGY.md).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from precog_db import ConfigurationError
from precog_db.connection import direct_settings, tool_connection_args
from precog_db.environment import Environment
from precog_db.settings import DatabaseSettings
from precog_db.stamp import read_stamp, stamp_database
from tests._helpers.cli import workspace
from tests._helpers.server import Server
from tests._helpers.topology import pgbouncer


@pytest.fixture(scope="module")
def bouncer(pg_server: Server, test_db: str) -> Iterator[int]:
    """A transaction-mode PgBouncer with ONE server connection in front of the session's server."""
    with pgbouncer(pg_server, pool_mode="transaction", pool_size=1) as port:
        yield port


@pytest.fixture
def tx_settings(pg_server: Server, bouncer: int) -> DatabaseSettings:
    """Settings that reach the session's test database through the transaction-mode PgBouncer, direct server set."""
    return pg_server.settings(
        port=bouncer, pooler="transaction", direct_host=pg_server.host, direct_port=pg_server.port
    )


class TestDirectConnections:
    """What has one layer only; connect(direct=True) and the pool's stamp check: tests/test_pooler_common*.py."""

    def test_refused_without_direct_host(self, pg_server: Server, bouncer: int) -> None:
        """The stamp and pg_dump/pg_restore targets are refused behind a transaction pooler with no direct host."""
        settings = pg_server.settings(port=bouncer, pooler="transaction")
        with pytest.raises(ConfigurationError, match="DB_DIRECT_HOST and DB_DIRECT_PORT"):
            read_stamp(settings=settings)
        with pytest.raises(ConfigurationError, match="DB_DIRECT_HOST"):
            stamp_database("test", settings=settings)
        with pytest.raises(ConfigurationError, match="DB_DIRECT_HOST"):
            tool_connection_args(settings, operation="back up")

    def test_tools_go_to_the_server(self, tx_settings: DatabaseSettings, pg_server: Server) -> None:
        """direct_settings and the tools' target name DB_DIRECT_HOST:PORT itself, not PgBouncer."""
        direct = direct_settings(tx_settings, operation="migrate")
        assert (direct.host, direct.port, direct.pooler) == (pg_server.host, pg_server.port, "none")
        args, _ = tool_connection_args(tx_settings, operation="back up")
        assert f"port={pg_server.port}" in args[0].replace("'", "")


class TestSettings:
    def test_statement_timeout_refused_in_transaction_mode(self) -> None:
        """DB_STATEMENT_TIMEOUT with DB_POOLER=transaction is refused with the fix (set it on the role)."""
        with pytest.raises(ConfigurationError, match="ALTER ROLE"):
            DatabaseSettings(env=Environment.TEST, pooler="transaction", statement_timeout_ms=1000)

    def test_bad_pooler(self) -> None:
        """An unknown DB_POOLER value names the valid ones."""
        with pytest.raises(ConfigurationError, match="none, session, transaction"):
            DatabaseSettings(env=Environment.TEST, pooler="statement")


class TestMigrateThroughThePooler:
    def test_migrate_up_needs_the_direct_host_and_then_uses_it(
        self, pg_server: Server, bouncer: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """`precog-db migrate up` behind a transaction pooler is refused without DB_DIRECT_HOST and applies with it."""
        with workspace(pg_server, tmp_path, monkeypatch) as ws:
            ws.add("dev")
            env_file = ws.config / ".env.dev"
            base = env_file.read_text().replace(f"DB_PORT={pg_server.port}", f"DB_PORT={bouncer}")
            env_file.write_text(base + "DB_POOLER=transaction\n")
            ws.write_migration("0001_create_widgets.sql", "CREATE TABLE widgets (id int);\n")
            refused = ws.run("--env", "dev", "migrate", "up")
            assert refused.code != 0 and "DB_DIRECT_HOST" in refused.err, refused
            assert ws.ledger("dev") == []
            env_file.write_text(
                base + f"DB_POOLER=transaction\nDB_DIRECT_HOST=127.0.0.1\nDB_DIRECT_PORT={pg_server.port}\n"
            )
            applied = ws.run("--env", "dev", "migrate", "up")
            assert applied.code == 0, applied
            assert [version for version, _ in ws.ledger("dev")] == [1]
