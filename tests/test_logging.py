"""Logging: secrets are masked, the library never configures structlog on import, and its events
(psycopg_pool's included) go to stderr or to the application's structlog, never to stdout."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from typing import Any

import pytest
import structlog
from structlog.testing import capture_logs

from precog_db import Environment, configure_logging, initialize_pool
from precog_db.log import PoolLogForwarder, get_logger, mask_secrets, pool_event, redact, unroute_pool_logging
from tests._helpers.server import REPO, Server

SECRET = "Sentinel-pw-31337"


class TestMasking:
    @pytest.mark.parametrize(
        "text",
        [
            f"host=db port=5432 password={SECRET} dbname=x",
            f"host=db password='{SECRET}' dbname=x",
            f"postgresql://precog:{SECRET}@db:5432/precog_prod",
            f"PASSWORD = {SECRET}",
        ],
    )
    def test_redact_connection_strings(self, text: str) -> None:
        """Passwords inside conninfo strings and URLs are masked."""
        assert SECRET not in redact(text)

    def test_processor_masks_keys_and_nested_values(self) -> None:
        """Secret-looking keys are masked, nested dicts and lists too; other values stay."""
        event = {
            "event": "x",
            "password": SECRET,
            "api_token": SECRET,
            "db_secret": SECRET,
            "nested": {"Password": SECRET, "dsn": f"password={SECRET}"},
            "items": [f"postgres://user:{SECRET}@h/db", "plain"],
            "host": "db1",
        }
        out = mask_secrets(None, "info", event)
        assert SECRET not in repr(out)
        assert out["host"] == "db1" and out["items"][1] == "plain"


class TestConfigureLogging:
    def test_json_output_is_masked(self, capsys: pytest.CaptureFixture[str]) -> None:
        """configure_logging(json=True) writes JSON lines with secrets masked."""
        try:
            configure_logging(json=True)
            structlog.get_logger("precog_db").warning("connecting", dsn=f"host=x password={SECRET}", password=SECRET)
            err = capsys.readouterr().err.strip().splitlines()[-1]
            record = json.loads(err)
            assert record["event"] == "connecting" and record["level"] == "warning"
            assert SECRET not in err
        finally:
            structlog.reset_defaults()
            unroute_pool_logging()

    def test_configure_logging_routes_psycopg_pool_through_structlog(self, capsys: pytest.CaptureFixture[str]) -> None:
        """After configure_logging(json=True), a psycopg_pool warning is a JSON event on stderr, not a plain line."""
        try:
            configure_logging(json=True)
            logging.getLogger("psycopg.pool").warning("error connecting in %r: %s", "precog-dev", "refused")
            err = capsys.readouterr().err.strip().splitlines()
            record = json.loads(err[-1])
            assert record["event"] == "pool_connection_failed" and record["pool"] == "precog-dev"
            assert len(err) == 1, err  # once: not also through the root handler
        finally:
            structlog.reset_defaults()
            unroute_pool_logging()
        assert logging.getLogger("psycopg.pool").propagate

    def test_bad_level_is_a_clear_error(self) -> None:
        """An unknown level name raises ValueError naming the valid ones."""
        with pytest.raises(ValueError, match="debug, info"):
            configure_logging(level="loud")

    def test_import_does_not_configure_structlog(self) -> None:
        """Importing precog_db leaves structlog unconfigured: the application owns logging."""
        code = "import structlog, precog_db; print(structlog.is_configured())"
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        assert out.stdout.strip() == "False"


# A service in a subprocess: opens a dev pool on an unstamped database through a TCP proxy, then cuts
# the proxy so that psycopg_pool fails to reconnect and logs through stdlib logging. argv[1] says how
# the "application" configured logging: none, structlog (JSON on stdout) or stdlib (basicConfig on stdout).
SERVICE = """
import logging, sys, threading
sys.path.insert(0, {tests!r})
mode = sys.argv[1]
if mode == "structlog":
    import structlog
    structlog.configure(
        processors=[structlog.processors.add_log_level, structlog.processors.JSONRenderer()],
        logger_factory=structlog.PrintLoggerFactory(file=sys.stdout),
    )
elif mode == "stdlib":
    logging.basicConfig(stream=sys.stdout, format="STDLIB %(name)s %(levelname)s %(message)s")
from tests._helpers.fault_proxy import FaultProxy
from precog_db import close_pool, get_cursor, get_pool, initialize_pool, load_settings

failed = threading.Event()
def seen(record):
    if record.getMessage().startswith("error connecting"):
        failed.set()
    return True
logging.getLogger("psycopg.pool").addFilter(seen)   # a filter observes records, it is not a handler

with FaultProxy({host!r}, {port}) as proxy:
    settings = load_settings("dev", host="127.0.0.1", port=proxy.port, dbname={db!r}, user={user!r},
                             password={password!r}, pool_min=1, pool_max=2, sslmode="disable")
    initialize_pool(settings=settings)
    if mode == "stdlib-late":   # the application sets up stdlib logging only after the pool opened
        logging.basicConfig(stream=sys.stdout, format="STDLIB %(name)s %(levelname)s %(message)s")
    with get_cursor() as cur:
        cur.execute("SELECT 1")
    proxy.stop_accepting()
    proxy.drop_all()
    get_pool().check()              # finds the dead connection; the pool's reconnection fails
    ok = failed.wait(60)
    close_pool()
sys.exit(0 if ok else 3)
"""


def run_service(pg_server: Server, mode: str) -> subprocess.CompletedProcess[str]:
    """Run SERVICE against a fresh unstamped database in a subprocess; fail with its output if it failed."""
    db = pg_server.fresh_database("precog_logging")
    code = SERVICE.format(
        tests=str(REPO),
        host=pg_server.host,
        port=pg_server.port,
        db=db,
        user=pg_server.user,
        password=pg_server.password,
    )
    out = subprocess.run([sys.executable, "-c", code, mode], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    return out


class TestWhereLibraryLogsGo:
    def test_unconfigured_events_go_to_stderr_and_stdout_stays_empty(self, pg_server: Server) -> None:
        """With nothing configured, library and psycopg_pool events are rendered on stderr; stdout stays empty."""
        out = run_service(pg_server, "none")
        assert out.stdout == ""
        for event in ("database_unstamped", "pool_opened", "pool_connection_failed", "pool_closed"):
            assert event in out.stderr, out.stderr
        assert "pool=precog-dev" in out.stderr
        # Python's unformatted "last resort" lines are gone: every psycopg_pool line is a structured event.
        assert not [line for line in out.stderr.splitlines() if line.startswith("error connecting")], out.stderr

    def test_configured_structlog_receives_every_event_structured(self, pg_server: Server) -> None:
        """An application's structlog setup gets library and psycopg_pool events as structured events, once."""
        out = run_service(pg_server, "structlog")
        events = [json.loads(line) for line in out.stdout.splitlines()]
        names = [e["event"] for e in events]
        assert "database_unstamped" in names and "pool_opened" in names
        failures = [e for e in events if e["event"] == "pool_connection_failed"]
        assert failures, names
        assert failures[0]["pool"] == "precog-dev" and failures[0]["logger"] == "psycopg.pool"
        assert failures[0]["level"] == "warning" and "error" in failures[0]
        assert "error connecting" not in out.stderr, out.stderr

    @pytest.mark.parametrize("mode", ["stdlib", "stdlib-late"])
    def test_an_application_stdlib_setup_keeps_psycopg_pool_records(self, pg_server: Server, mode: str) -> None:
        """When the application configures stdlib handlers (before or after the pool opened), psycopg_pool's
        records go to them, not to structlog."""
        out = run_service(pg_server, mode)
        assert "STDLIB psycopg.pool WARNING error connecting in 'precog-dev'" in out.stdout, out.stdout
        assert "pool_connection_failed" not in out.stdout + out.stderr

    def test_capture_logs_sees_library_events(self, pg_server: Server) -> None:
        """Under structlog.testing.capture_logs the library's own events arrive as structured dicts."""
        db = pg_server.fresh_database("precog_logging")
        with capture_logs() as logs:
            initialize_pool(settings=pg_server.settings(db, env=Environment.DEV))
        events = {e["event"]: e for e in logs}
        assert events["database_unstamped"]["log_level"] == "warning"
        assert events["pool_opened"]["pool"] == "precog-dev"

    def test_forwarder_turns_a_pool_record_into_a_structured_event(self) -> None:
        """PoolLogForwarder makes psycopg_pool's 'error connecting' record a pool_connection_failed event."""
        record = logging.LogRecord(
            "psycopg.pool", logging.WARNING, __file__, 1, "error connecting in %r: %s", ("precog-dev", "refused"), None
        )
        forwarder = PoolLogForwarder(yield_to_app=False)
        with capture_logs() as logs:
            forwarder.handle(record)
        assert logs == [
            {
                "event": "pool_connection_failed",
                "log_level": "warning",
                "pool": "precog-dev",
                "error": "refused",
                "logger": "psycopg.pool",
            }
        ]

    def test_unknown_pool_records_keep_their_message(self) -> None:
        """A psycopg_pool record with a template not in the table keeps its text under the event psycopg_pool."""
        record = logging.LogRecord("psycopg.pool", logging.WARNING, __file__, 1, "something new: %s", ("x",), None)
        assert pool_event(record) == ("psycopg_pool", {"logger": "psycopg.pool", "message": "something new: x"})

    def test_unconfigured_logger_writes_to_stderr(self, capsys: pytest.CaptureFixture[str]) -> None:
        """With structlog unconfigured, get_logger() renders on stderr and masks secrets."""
        structlog.reset_defaults()
        get_logger().warning("hello_library", dsn="host=x password=hunter2")
        captured = capsys.readouterr()
        assert captured.out == ""
        assert "hello_library" in captured.err and "hunter2" not in captured.err


def test_configure_logging_takes_keywords_only() -> None:
    """`configure_logging(True)` is a TypeError: the flag must be spelled `json=True`."""
    with pytest.raises(TypeError):
        untyped: Any = configure_logging  # the type checker refuses the call too; this checks the runtime
        untyped(True)
