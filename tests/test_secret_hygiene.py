"""Secret hygiene: a representative workload under a sentinel password leaves it nowhere.

A throwaway cluster requires ``scram-sha-256`` for every role but the
superuser. The workload runs the success paths and the failure paths
(unreachable server, wrong password, invalid configuration, refusals, lost
connections, a restart, an exhausted pool, the gated helpers and the
``precog-db`` command line) with the sentinel as the password, and captures:

* everything printed to the process's stdout/stderr (``capfd``);
* every stdlib log record at DEBUG, psycopg and psycopg.pool included (``caplog``);
* every structlog event *before* any masking processor (the library must not
  hand a secret to the logger at all), and the rendered JSON lines;
* every exception raised: ``str``, ``repr``, the chained ``__cause__`` /
  ``__context__``, the formatted traceback, and structlog's dict traceback
  with frame locals (what ``dict_tracebacks`` logs by default);
* the audit log file.

The sentinel must appear in none of them.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import traceback
from collections.abc import Callable, Iterator, MutableMapping
from pathlib import Path
from typing import Any

import pytest
import structlog
from psycopg import sql

from precog_db import (
    PrecogDBError,
    close_pool,
    configure_logging,
    delete_all,
    get_connection,
    get_cursor,
    get_pool,
    initialize_pool,
    load_settings,
    pool_metrics,
    truncate_tables,
)
from precog_db.cli import main as cli_main
from precog_db.connection import connect, tool_connection_args
from precog_db.environment import Environment
from precog_db.local.cluster import free_port
from precog_db.settings import DatabaseSettings
from tests._helpers.faults import own_server
from tests._helpers.server import Server

pytestmark = pytest.mark.fault

SENTINEL = "Hyg13ne-S3ntinel-Pw"
OTHER_PASSWORD = "a-different-password-42"
APP_ROLE = "precog_app"
OTHER_ROLE = "other_app"


@pytest.fixture
def scram_server() -> Iterator[Server]:
    """A throwaway cluster where every role but postgres must log in with scram-sha-256."""
    with own_server() as server:
        assert server.cluster is not None
        hba = server.cluster.data_dir / "pg_hba.conf"
        hba.write_text(
            "host all postgres 127.0.0.1/32 trust\nhost all all 127.0.0.1/32 scram-sha-256\n", encoding="utf-8"
        )
        with server.connect() as admin:
            admin.execute("SELECT pg_reload_conf()")
            admin.execute(
                sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(sql.Identifier(APP_ROLE), sql.Literal(SENTINEL))
            )
            admin.execute(
                sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                    sql.Identifier(OTHER_ROLE), sql.Literal(OTHER_PASSWORD)
                )
            )
            for name in ("hygiene_test", "hygiene_staging"):
                admin.execute(
                    sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(name), sql.Identifier(APP_ROLE))
                )
        yield server


class Capture:
    """Collects what the workload raised and what structlog was handed."""

    def __init__(self) -> None:
        self.raised: list[BaseException] = []
        self.events: list[dict[str, Any]] = []

    def processor(self, _logger: Any, _method: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        self.events.append(dict(event_dict))
        return event_dict

    def attempt(self, step: Callable[[], object]) -> None:
        """Run one step; keep what it raised (every step is allowed to fail, never to leak)."""
        try:
            step()
        except Exception as exc:
            self.raised.append(exc)


def _renderings(exc: BaseException) -> Iterator[str]:
    """Every way an exception reaches a log or a terminal, for it and each exception chained to it.

    Suppressed contexts (``raise ... from None``) are walked too: they stay
    reachable, and their frames keep their locals.
    """
    transformer = structlog.tracebacks.ExceptionDictTransformer(show_locals=True)
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield str(current)
        yield repr(current)
        yield "".join(traceback.format_exception(current))
        # What structlog's dict_tracebacks processor logs: every frame, with its locals.
        yield json.dumps(transformer((type(current), current, current.__traceback__)), default=repr)
        # The same locals untruncated, as a debugger or a verbose renderer shows them.
        frame_tb = current.__traceback__
        while frame_tb is not None:
            yield repr(frame_tb.tb_frame.f_locals)
            frame_tb = frame_tb.tb_next
        current = current.__cause__ or current.__context__


@pytest.fixture
def logging_captured() -> Iterator[Capture]:
    """structlog configured as a service would (JSON to stderr), with a raw capture ahead of masking."""
    previous = structlog.get_config()
    capture = Capture()
    configure_logging(json=True, level="debug")
    processors = list(structlog.get_config()["processors"])
    structlog.configure(processors=[capture.processor, *processors])
    try:
        yield capture
    finally:
        structlog.configure(**previous)


def test_sentinel_password_appears_nowhere(
    scram_server: Server,
    logging_captured: Capture,
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """Success and failure paths under a sentinel password: not printed, logged, raised or audited anywhere."""
    caplog.set_level(logging.DEBUG)
    for name in ("psycopg", "psycopg.pool", "precog_db"):
        caplog.set_level(logging.DEBUG, logger=name)  # restored at teardown: later tests log as before
    audit_log = tmp_path / "audit.log"
    monkeypatch.setenv("PRECOG_AUDIT_LOG", str(audit_log))
    monkeypatch.setenv("PRECOG_ENV", "test")
    cap = logging_captured
    server = scram_server
    assert server.cluster is not None

    def app(dbname: str = "hygiene_test", env: Environment = Environment.TEST, **kw: Any) -> DatabaseSettings:
        fields: dict[str, Any] = {
            "user": APP_ROLE, "password": SENTINEL, "pool_min": 2, "pool_max": 2, "pool_timeout": 1.0,
            "connect_timeout": 2, "statement_timeout_ms": 1000,
        }  # fmt: skip
        fields.update(kw)
        return server.settings(dbname, env=env, **fields)

    # Containers holding the password on its way to libpq mask it in their repr (frame locals).
    assert SENTINEL not in repr(app().connect_kwargs()) and SENTINEL not in repr(app().replace(password=SENTINEL))

    # 1. The success paths, with the failures a service meets every day.
    initialize_pool(settings=app())
    _workload(cap, server)
    close_pool()

    # 2. The server restarts under the pool: lost connections, then "cannot be reached", then recovery.
    initialize_pool(settings=app())
    with get_cursor() as cur:
        cur.execute("SELECT 1")
    server.cluster.stop("fast")
    cap.attempt(_select)
    cap.attempt(_select)
    server.cluster.start()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            _select()
            break
        except PrecogDBError as exc:
            cap.raised.append(exc)
            time.sleep(0.2)
    close_pool()

    # 3. Failure paths at open: unreachable server, wrong password, unstamped staging, unconfirmed prod.
    cap.attempt(lambda: initialize_pool(settings=app(port=free_port())))
    close_pool()
    cap.attempt(lambda: initialize_pool(settings=app(user=OTHER_ROLE)))
    close_pool()
    cap.attempt(lambda: initialize_pool(settings=app("hygiene_staging", env=Environment.STAGING)))
    close_pool()
    cap.attempt(lambda: initialize_pool(settings=app("hygiene_prod", env=Environment.PROD)))
    close_pool()

    # 4. Invalid configuration carrying the password.
    config = tmp_path / "config"
    config.mkdir()
    (config / ".env.test").write_text(f"DB_PASSWORD={SENTINEL}\nDB_PORT=not-a-port\n")
    (config / ".env.test").chmod(0o600)
    cap.attempt(lambda: load_settings("test", config_dir=config, environ={}))
    (config / ".env.test").write_text(f"DB_PORT={SENTINEL}\n")
    cap.attempt(lambda: load_settings("test", config_dir=config, environ={}))
    (config / ".env.test").write_text(f"DB_PASSWORD\n{SENTINEL}\n")
    cap.attempt(lambda: load_settings("test", config_dir=config, environ={}))
    cap.attempt(lambda: app().replace(password=SENTINEL, port=0))
    (config / ".env.staging").write_text(f"DB_PASSWORD={SENTINEL}\n")
    (config / ".env.staging").chmod(0o644)
    cap.attempt(lambda: load_settings("staging", config_dir=config, environ={}))

    # 5. The command line, with the password in the environment and in --database.
    monkeypatch.setenv("DB_HOST", server.host)
    monkeypatch.setenv("DB_PORT", str(server.port))
    monkeypatch.setenv("DB_USER", APP_ROLE)
    monkeypatch.setenv("DB_PASSWORD", SENTINEL)
    monkeypatch.setenv("DB_NAME", "hygiene_test")
    monkeypatch.setenv("DB_SSLMODE", "disable")
    empty = tmp_path / "empty-config"
    empty.mkdir()
    common = ["--env", "test", "--config-dir", str(empty)]
    codes = [
        cli_main([*common, "env"]),
        cli_main([*common, "--json", "env"]),
        cli_main([*common, "check"]),
        cli_main([*common, "--database", f"user={OTHER_ROLE}", "check"]),
        cli_main([*common, "--database", f"postgresql://{OTHER_ROLE}:{SENTINEL}@{server.host}/x", "check"]),
        cli_main([*common, "--database", f"host=x password={SENTINEL} junk", "env"]),
        cli_main(["--env", "staging", "--config-dir", str(config), "env"]),
        cli_main(["--config-dir", str(empty), "audit", "tail"]),
    ]
    assert codes[0] == 0 and codes[2] == 0, codes  # the success paths did succeed
    assert codes[3] != 0 and codes[4] != 0, codes  # wrong password refused

    # --- what leaked? -------------------------------------------------------------------
    printed = capfd.readouterr()
    audit_text = audit_log.read_text(encoding="utf-8") if audit_log.exists() else ""
    records = caplog.records

    assert len(cap.raised) >= 12, [type(e).__name__ for e in cap.raised]
    kinds = {type(e).__name__ for e in cap.raised}
    for expected in ("DatabaseUnavailableError", "ConnectionLostError", "PoolExhaustedError", "ConfigurationError"):
        assert expected in kinds, kinds
    assert "password authentication failed" in " ".join(str(e) for e in cap.raised)
    assert audit_text.count("\n") >= 3, "the audit log recorded the refusals and gated calls"
    assert any(r.name.startswith("psycopg") for r in records), "psycopg's own logging was captured"
    assert cap.events, "structlog events were captured"
    assert_nowhere(SENTINEL, cap, printed, records, audit_text)


def assert_nowhere(
    secret: str, cap: Capture, printed: Any, records: list[logging.LogRecord], audit_text: str, *extra: str
) -> None:
    """``secret`` is in none of the places a password could leak to (see the module docstring)."""
    logged = "\n".join(f"{r.name} {r.levelname} {r.getMessage()} {r.args!r} {r.exc_text or ''}" for r in records)
    places = {
        "stdout": printed.out,
        "stderr": printed.err,
        "stdlib logging": logged,
        "structlog events (raw, before masking)": repr(cap.events),
        "audit log": audit_text,
        **{f"extra {i}": text for i, text in enumerate(extra)},
    }
    for where, text in places.items():
        assert secret not in text, f"the password leaked into {where}"
    for raised in cap.raised:
        for text in _renderings(raised):
            assert secret not in text, f"the password leaked through {type(raised).__name__}: {text[:300]}"


def _select() -> None:
    with get_cursor() as cur:
        cur.execute("SELECT 1")


def _workload(cap: Capture, server: Server) -> None:
    """Reads, writes, SQL errors, refusals, gated helpers, a statement timeout, lost connections, exhaustion."""

    def setup() -> None:
        with get_cursor(commit=True) as cur:
            cur.execute("CREATE TABLE trades (id int, qty int)")
            cur.execute("INSERT INTO trades VALUES (1, 10), (2, 20)")

    def boom() -> None:
        with get_cursor(commit=True) as cur:
            cur.execute("INSERT INTO trades VALUES (3, 30)")
            raise RuntimeError("application error inside a block")

    def sql_error() -> None:
        with get_cursor() as cur:
            cur.execute("SELECT * FROM no_such_table")

    def read_only_write() -> None:
        with get_cursor() as cur:
            cur.execute("DELETE FROM trades")

    def too_slow() -> None:
        with get_cursor() as cur:
            cur.execute("SELECT pg_sleep(3)")

    def exhausted() -> None:
        with get_connection(), get_connection(), get_cursor() as cur:
            cur.execute("SELECT 1")

    def lost() -> None:
        def kill() -> None:
            time.sleep(0.3)
            with server.connect() as admin:
                pids = [
                    r[0]
                    for r in admin.execute(
                        "SELECT pid, pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s",
                        (APP_ROLE,),
                    ).fetchall()
                ]
                # Wait until the idle backends are really gone, so later steps do not race their FATAL.
                while admin.execute("SELECT 1 FROM pg_stat_activity WHERE pid = ANY(%s)", (pids,)).fetchone():
                    time.sleep(0.05)

        killer = threading.Thread(target=kill)
        killer.start()
        try:
            with get_cursor() as cur:
                cur.execute("SELECT pg_sleep(0.9)")
        finally:
            killer.join()

    cap.attempt(setup)
    for step in (boom, sql_error, read_only_write, too_slow, exhausted, lost):
        cap.attempt(step)
    with get_cursor() as cur:
        cur.execute("SELECT count(*) AS n FROM trades")
        assert cur.fetchone() == {"n": 2}
    cap.attempt(lambda: delete_all("trades"))
    cap.attempt(lambda: truncate_tables("trades", "no_such_table"))
    cap.attempt(lambda: delete_all("trades\x00; DROP TABLE trades"))
    with get_connection() as conn, conn.transaction():
        conn.execute("INSERT INTO trades VALUES (4, 40)")


def _selected(cap: Capture) -> bool:
    """One `_select`; a library error is recorded. Caught here, not in the test, so the recorded
    traceback starts in this frame: the test's own locals (which hold the sentinels) are not in it."""
    try:
        _select()
    except PrecogDBError as exc:
        cap.raised.append(exc)
        return False
    return True


FILE_SENTINEL = "F1le-S3ntinel-Rotat3d"
PROVIDER_SENTINEL = "Pr0vider-S3ntinel-T0ken"


def test_password_file_and_provider_values_appear_nowhere(
    scram_server: Server,
    logging_captured: Capture,
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """Passwords read from DB_PASSWORD_FILE or returned by a provider, in success and failure paths, leak nowhere."""
    caplog.set_level(logging.DEBUG)
    for name in ("psycopg", "psycopg.pool", "precog_db"):
        caplog.set_level(logging.DEBUG, logger=name)  # restored at teardown: later tests log as before
    audit_log = tmp_path / "audit.log"
    monkeypatch.setenv("PRECOG_AUDIT_LOG", str(audit_log))
    cap = logging_captured
    server = scram_server
    with server.connect() as admin:
        for role, secret in ((APP_ROLE, FILE_SENTINEL), (OTHER_ROLE, PROVIDER_SENTINEL)):
            admin.execute(sql.SQL("ALTER ROLE {} PASSWORD {}").format(sql.Identifier(role), sql.Literal(secret)))
    secret_file = tmp_path / "db-password"
    secret_file.write_text(FILE_SENTINEL + "\n")
    secret_file.chmod(0o600)
    token = {"value": PROVIDER_SENTINEL}

    def provider() -> str:
        return token["value"]

    def app(**kw: Any) -> DatabaseSettings:
        fields: dict[str, Any] = {
            "user": APP_ROLE, "password": "", "password_file": str(secret_file), "pool_min": 2, "pool_max": 2,
            "pool_timeout": 1.0, "connect_timeout": 2, "statement_timeout_ms": 1000,
        }  # fmt: skip
        fields.update(kw)
        return server.settings("hygiene_test", **fields)

    by_provider = app(user=OTHER_ROLE, password_file="", password_provider=provider)
    assert "password_provider" not in repr(by_provider) and "provider" not in str(by_provider)

    # 1. The pool on the file, with the everyday failures; a rotation to a wrong value and back; drain().
    initialize_pool(settings=app())
    _workload(cap, server)
    pool = get_pool()
    secret_file.write_text(FILE_SENTINEL + "-wrong\n")
    pool.drain()
    cap.attempt(_select)
    cap.attempt(lambda: connect(app(), operation="hygiene"))
    secret_file.write_text(FILE_SENTINEL + "\n")
    pool.drain()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not _selected(cap):
        time.sleep(0.2)
    metrics_text = repr(pool_metrics())
    close_pool()

    # 2. The pool on the provider; the provider failing and returning garbage holding the token.
    initialize_pool(settings=by_provider)
    _select()
    token["value"] = PROVIDER_SENTINEL + "\x00"
    cap.attempt(lambda: connect(by_provider, operation="hygiene"))
    token["value"] = PROVIDER_SENTINEL + "-wrong"
    cap.attempt(lambda: connect(by_provider, operation="hygiene"))
    cap.attempt(lambda: tool_connection_args(by_provider.replace(dbname="hygiene_staging", env="staging")))
    token["value"] = PROVIDER_SENTINEL
    args, _env = tool_connection_args(by_provider)
    close_pool()

    # 3. Unusable files holding the value: NUL inside, readable by others in staging.
    secret_file.write_text(FILE_SENTINEL + "\x00\n")
    cap.attempt(lambda: connect(app(), operation="hygiene"))
    secret_file.write_text(FILE_SENTINEL + "\n")
    secret_file.chmod(0o644)
    cap.attempt(lambda: connect(app(dbname="hygiene_staging", env=Environment.STAGING), operation="hygiene"))
    secret_file.chmod(0o600)

    # 4. The command line with DB_PASSWORD_FILE in the environment.
    monkeypatch.setenv("DB_HOST", server.host)
    monkeypatch.setenv("DB_PORT", str(server.port))
    monkeypatch.setenv("DB_USER", APP_ROLE)
    monkeypatch.setenv("DB_PASSWORD_FILE", str(secret_file))
    monkeypatch.setenv("DB_NAME", "hygiene_test")
    monkeypatch.setenv("DB_SSLMODE", "disable")
    empty = tmp_path / "empty-config"
    empty.mkdir()
    common = ["--env", "test", "--config-dir", str(empty)]
    codes = [cli_main([*common, "env"]), cli_main([*common, "--json", "env"]), cli_main([*common, "check"])]
    assert codes == [0, 0, 0], codes

    printed = capfd.readouterr()
    audit_text = audit_log.read_text(encoding="utf-8") if audit_log.exists() else ""
    kinds = {type(e).__name__ for e in cap.raised}
    assert {"DatabaseUnavailableError", "ConfigurationError", "PoolExhaustedError"} <= kinds, kinds
    assert "password authentication failed" in " ".join(str(e) for e in cap.raised)
    for secret in (FILE_SENTINEL, PROVIDER_SENTINEL):
        assert_nowhere(secret, cap, printed, caplog.records, audit_text, metrics_text, repr(args))
