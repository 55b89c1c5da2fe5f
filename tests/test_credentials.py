"""Rotating credentials against a real server that requires scram-sha-256: DB_PASSWORD_FILE, DB_PASSFILE, a provider.

The proof (`TestRotationUnderLoad`): a role's password is changed with
``ALTER ROLE … PASSWORD`` and the password file rewritten while threads keep
reading through the pool; `PrecogPool.drain` then replaces every connection.
No request fails, and every backend of the role that exists afterwards started
after the old password stopped working, so it authenticated with the new one.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from precog_db import (
    ConfigurationError,
    DatabaseUnavailableError,
    close_pool,
    get_cursor,
    get_pool,
    initialize_pool,
    load_settings,
)
from precog_db.backup import find_tool
from precog_db.connection import connect, connection_kwargs, tool_connection_args
from precog_db.environment import Environment
from precog_db.settings import DatabaseSettings
from tests._helpers.faults import own_server
from tests._helpers.server import Server

pytestmark = pytest.mark.fault

ROLE = "rotating_app"
OLD = "old-Passw0rd-before-rotation"
NEW = "new-Passw0rd-after-rotation"


@pytest.fixture(scope="module")
def scram_server() -> Iterator[Server]:
    """A throwaway cluster where ``rotating_app`` must log in over 127.0.0.1 with scram-sha-256."""
    with own_server(password_encryption="scram-sha-256") as server:
        assert server.cluster is not None
        hba = server.cluster.data_dir / "pg_hba.conf"
        hba.write_text(
            "host all postgres 127.0.0.1/32 trust\nhost all all 127.0.0.1/32 scram-sha-256\n", encoding="utf-8"
        )
        with server.connect() as admin:
            admin.execute("SELECT pg_reload_conf()")
            admin.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(sql.Identifier(ROLE), sql.Literal(OLD)))
            admin.execute(sql.SQL("GRANT ALL ON SCHEMA public TO {}").format(sql.Identifier(ROLE)))
        yield server


@pytest.fixture
def role(scram_server: Server) -> Iterator[Server]:
    """The scram server with ``rotating_app``'s password set back to the old one and none of its sessions left."""
    with scram_server.connect() as admin:
        admin.execute(sql.SQL("ALTER ROLE {} PASSWORD {}").format(sql.Identifier(ROLE), sql.Literal(OLD)))
    yield scram_server
    close_pool()
    with scram_server.connect() as admin:
        admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s", (ROLE,))


def pg_dump() -> str:
    """The pg_dump the backup module would use against PostgreSQL 15."""
    return str(find_tool("pg_dump", 15))


def write_secret(path: Path, value: str, mode: int = 0o600) -> None:
    """Replace ``path`` atomically, as a Kubernetes secret mount or a Vault agent does (new file, then rename)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(value + "\n", encoding="utf-8")
    tmp.chmod(mode)
    os.replace(tmp, path)


def app_settings(server: Server, **kw: Any) -> DatabaseSettings:
    """Settings for ``rotating_app`` on the scram server (no password: each test gives its source)."""
    values: dict[str, Any] = {"user": ROLE, "password": "", "pool_min": 2, "pool_max": 4, "pool_timeout": 10.0}
    values.update(kw)
    return server.settings(**values)


def rotate(server: Server) -> str:
    """Change the role's password on the server; return the server's clock right after (old password dead from then)."""
    with server.connect() as admin:
        admin.execute(sql.SQL("ALTER ROLE {} PASSWORD {}").format(sql.Identifier(ROLE), sql.Literal(NEW)))
        row = admin.execute("SELECT clock_timestamp()::text").fetchone()
    assert row is not None
    return str(row[0])


def role_backends(server: Server, after: str | None = None) -> list[tuple[int, bool]]:
    """(pid, started after ``after``) for every session of the role."""
    with server.connect() as admin:
        rows = admin.execute(
            "SELECT pid, backend_start > %s::timestamptz FROM pg_stat_activity WHERE usename = %s",
            (after or "-infinity", ROLE),
        ).fetchall()
    return [(int(pid), bool(late)) for pid, late in rows]


class TestRotationUnderLoad:
    def test_rotating_the_password_file_under_load_fails_no_request(self, role: Server, tmp_path: Path) -> None:
        """ALTER ROLE, rewrite DB_PASSWORD_FILE, drain(): no request fails; every later session has the new password."""
        secret = tmp_path / "password"
        write_secret(secret, OLD)
        initialize_pool(settings=app_settings(role, password_file=str(secret)))
        pool = get_pool()
        stop = threading.Event()
        outcomes: list[tuple[str, int]] = []
        lock = threading.Lock()

        def worker() -> None:
            deadline = time.monotonic() + 20
            for _ in range(20_000):  # bounded in count and in time
                if stop.is_set() or time.monotonic() > deadline:
                    return
                try:
                    with get_cursor() as cur:
                        cur.execute("SELECT pg_backend_pid() AS pid")
                        row = cur.fetchone()
                        pid = int(row["pid"]) if row else -1
                    outcome = "ok"
                except Exception as exc:
                    outcome, pid = type(exc).__name__, -1
                with lock:
                    outcomes.append((outcome, pid))

        threads = [threading.Thread(target=worker) for _ in range(4)]
        for t in threads:
            t.start()
        try:
            time.sleep(0.5)
            with lock:
                before = {pid for _, pid in outcomes}
            rotated_at = rotate(role)
            write_secret(secret, NEW)
            pool.drain()
            drained = len(outcomes)
            time.sleep(1.5)
        finally:
            stop.set()
            for t in threads:
                t.join(30)
        assert not any(t.is_alive() for t in threads)
        failures = [o for o, _ in outcomes if o != "ok"]
        assert failures == [], f"{len(failures)} of {len(outcomes)} requests failed: {sorted(set(failures))}"
        assert drained > 20 and len(outcomes) - drained > 20, "the load ran before and after the rotation"
        late_pids = {pid for _, pid in outcomes[-20:]}
        assert late_pids.isdisjoint(before), "the connections used after the drain are new ones"
        backends = role_backends(role, after=rotated_at)
        assert backends and all(late for _, late in backends), (
            "every session of the role left after the drain started after the old password was replaced"
        )
        assert late_pids <= {pid for pid, _ in backends}
        with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
            psycopg.connect(host=role.host, port=role.port, dbname="precog_test", user=ROLE, password=OLD).close()

    def test_provider_is_called_for_every_connection_and_drain_picks_up_its_new_token(self, role: Server) -> None:
        """The provider is called per connection attempt; after a rotation, drain() makes the pool use its new value."""
        current = {"password": OLD}
        calls: list[float] = []

        def provider() -> str:
            calls.append(time.monotonic())
            return current["password"]

        initialize_pool(settings=app_settings(role, password_provider=provider, pool_min=2, pool_max=2))
        pool = get_pool()
        pool.wait(timeout=10)
        opened = len(calls)
        assert opened >= 3, "the probe and each of the two pooled connections asked the provider"
        with get_cursor() as cur:
            cur.execute("SELECT 1")
        assert len(calls) == opened, "a checkout does not call the provider: only a new connection does"
        rotate(role)
        current["password"] = NEW
        pool.drain()
        pool.wait(timeout=10)
        with get_cursor() as cur:
            cur.execute("SELECT pg_backend_pid() AS pid")
        assert len(calls) >= opened + 2
        # A direct connection and pg_dump resolve the password the same way.
        settings = pool.settings
        connect(settings, operation="test").close()
        args, env = tool_connection_args(settings, operation="test")
        dump = subprocess.run([pg_dump(), "--schema-only", *args], env=env, capture_output=True, text=True, timeout=60)
        assert dump.returncode == 0, dump.stderr


class TestPasswordFile:
    def test_trailing_newline_is_stripped_and_the_file_is_reread(self, role: Server, tmp_path: Path) -> None:
        """The file's content minus its trailing newline is the password, read again for each direct connection."""
        secret = tmp_path / "password"
        secret.write_text(OLD + "\r\n")
        settings = app_settings(role, password_file=str(secret))
        connect(settings, operation="test").close()
        rotate(role)
        with pytest.raises(DatabaseUnavailableError, match="password authentication failed"):
            connect(settings, operation="test")
        write_secret(secret, NEW)
        connect(settings, operation="test").close()

    def test_pg_dump_gets_the_password_from_the_file(self, role: Server, tmp_path: Path) -> None:
        """tool_connection_args hands pg_dump the file's current password as PGPASSWORD (and nothing else)."""
        secret = tmp_path / "password"
        write_secret(secret, OLD)
        args, env = tool_connection_args(app_settings(role, password_file=str(secret)), operation="test")
        dump = subprocess.run([pg_dump(), "--schema-only", *args], env=env, capture_output=True, text=True, timeout=60)
        assert dump.returncode == 0, dump.stderr
        assert not any(OLD in a for a in args)

    @pytest.mark.parametrize(
        ("content", "message"),
        [(None, "does not exist"), ("", "empty password"), ("\n", "empty password"), ("a\x00b", "NUL")],
    )
    def test_unusable_file_is_refused_naming_the_variable(
        self, content: str | None, message: str, tmp_path: Path
    ) -> None:
        """A missing, empty or binary password file is a ConfigurationError naming DB_PASSWORD_FILE and the path."""
        secret = tmp_path / "password"
        if content is not None:
            secret.write_text(content)
        settings = DatabaseSettings(env=Environment.TEST, password_file=str(secret))
        with pytest.raises(ConfigurationError, match=message) as info:
            connection_kwargs(settings)
        assert "DB_PASSWORD_FILE" in str(info.value) and str(secret) in str(info.value)

    def test_staging_file_readable_by_others_is_refused(self, tmp_path: Path) -> None:
        """In staging/prod a password file group/others can read is refused, the rule for every secrets file."""
        secret = tmp_path / "password"
        write_secret(secret, OLD, mode=0o644)
        staging = DatabaseSettings(env=Environment.STAGING, dbname="appdb", password_file=str(secret))
        with pytest.raises(ConfigurationError, match="chmod 600") as info:
            connection_kwargs(staging)
        assert OLD not in str(info.value)
        secret.chmod(0o600)
        assert connection_kwargs(staging)["password"] == OLD
        # dev/test follow the .env rule too: not enforced there.
        secret.chmod(0o644)
        assert connection_kwargs(DatabaseSettings(env=Environment.TEST, password_file=str(secret)))["password"] == OLD

    def test_resolved_password_is_masked_in_repr(self, tmp_path: Path) -> None:
        """The password read from the file is a Secret: the kwargs dict that carries it shows '***'."""
        secret = tmp_path / "password"
        write_secret(secret, OLD)
        kwargs = connection_kwargs(DatabaseSettings(env=Environment.TEST, password_file=str(secret)))
        assert kwargs["password"] == OLD and OLD not in repr(kwargs)


class TestPassfile:
    def test_libpq_passfile_is_used_and_its_permission_rule_enforced(self, role: Server, tmp_path: Path) -> None:
        """DB_PASSFILE reaches libpq; a passfile group/others can read is refused up front instead of ignored."""
        passfile = tmp_path / "pgpass"
        passfile.write_text(f"{role.host}:{role.port}:*:{ROLE}:{OLD}\n")
        passfile.chmod(0o600)
        settings = app_settings(role, passfile=str(passfile))
        connect(settings, operation="test").close()
        args, env = tool_connection_args(settings, operation="test")
        dump = subprocess.run([pg_dump(), "--schema-only", *args], env=env, capture_output=True, text=True, timeout=60)
        assert dump.returncode == 0, dump.stderr
        passfile.chmod(0o640)
        with pytest.raises(ConfigurationError, match="chmod 600"):
            connect(settings, operation="test")
        passfile.unlink()
        with pytest.raises(ConfigurationError, match="does not exist"):
            connect(settings, operation="test")


class TestProvider:
    def test_failing_provider_is_reported_without_its_chain(self, role: Server) -> None:
        """A provider that raises gives DatabaseUnavailableError naming the provider's error, with no chained frames."""

        def provider() -> str:
            raise TimeoutError("token endpoint did not answer")

        with pytest.raises(DatabaseUnavailableError, match=r"password provider .* raised TimeoutError") as info:
            connect(app_settings(role, password_provider=provider), operation="test")
        assert info.value.__cause__ is None and info.value.__context__ is None

    @pytest.mark.parametrize("value", [None, "", 42])
    def test_provider_returning_no_text_is_refused(self, value: object) -> None:
        """A provider that returns no password is a ConfigurationError saying what it must return."""
        settings = DatabaseSettings(env=Environment.TEST, password_provider=lambda: value)  # type: ignore[arg-type,return-value]
        with pytest.raises(ConfigurationError, match="must return the password as a str"):
            connection_kwargs(settings)


class TestSettings:
    def test_two_sources_in_one_layer_are_refused(self, tmp_path: Path) -> None:
        """DB_PASSWORD and DB_PASSWORD_FILE set in the same place is ambiguous and refused, naming both."""
        with pytest.raises(ConfigurationError, match=r"DB_PASSWORD .* and DB_PASSWORD_FILE"):
            load_settings("test", config_dir=tmp_path, environ={"DB_PASSWORD": "x", "DB_PASSWORD_FILE": "/p"})
        with pytest.raises(ConfigurationError, match="DB_PASSFILE"):
            DatabaseSettings(env=Environment.TEST, password="x", passfile="/p")
        with pytest.raises(ConfigurationError, match="password_provider"):
            DatabaseSettings(env=Environment.TEST, password_file="/p", password_provider=lambda: "x")

    def test_a_higher_layer_replaces_a_lower_layers_password_source(self, tmp_path: Path) -> None:
        """DB_PASSWORD_FILE in the process environment replaces a DB_PASSWORD from a .env file, as any override does."""
        (tmp_path / ".env.test").write_text("DB_PASSWORD=from-the-file\n")
        settings = load_settings("test", config_dir=tmp_path, environ={"DB_PASSWORD_FILE": "/run/secrets/pw"})
        assert settings.password == "" and settings.password_file == "/run/secrets/pw"
        provided = load_settings("test", config_dir=tmp_path, environ={}, password_provider=lambda: "token")
        assert provided.password == "" and provided.password_provider is not None
        assert "password_provider" not in repr(provided)

    def test_env_variables_are_documented(self) -> None:
        """DB_PASSWORD_FILE and DB_PASSFILE are known settings (no 'unknown setting' warning, listed by `env`)."""
        from precog_db.settings import ENV_VARS

        assert "DB_PASSWORD_FILE" in ENV_VARS and "DB_PASSFILE" in ENV_VARS
        page = (Path(__file__).resolve().parent.parent / "docs" / "CONFIGURATION.md").read_text()
        assert "DB_PASSWORD_FILE" in page and "DB_PASSFILE" in page


def test_a_fixed_password_works_as_before(role: Server) -> None:
    """A fixed DB_PASSWORD still works exactly as before (the default source)."""
    initialize_pool(settings=app_settings(role, password=OLD, env=Environment.TEST))
    with get_cursor() as cur:
        cur.execute("SELECT current_user AS u")
        assert cur.fetchone() == {"u": ROLE}


@pytest.mark.asyncio
class TestAsyncPool:
    async def test_asyncio_pool_resolves_the_provider_for_every_connection(self, role: Server) -> None:
        """The asyncio pool asks the provider for each new connection: after a rotation its new connections log in."""
        from precog_db import aio

        current = {"password": OLD}
        calls: list[float] = []

        def provider() -> str:
            calls.append(time.monotonic())
            return current["password"]

        pool = await aio.initialize_pool(
            settings=app_settings(role, password_provider=provider, pool_min=1, pool_max=2)
        )
        try:
            await pool.wait(timeout=10)
            opened = len(calls)
            assert opened >= 2, "the probe and the pooled connection asked the provider"
            rotate(role)
            current["password"] = NEW
            await pool.drain()
            await pool.wait(timeout=10)
            async with aio.get_cursor() as cur:
                await cur.execute("SELECT current_user AS who")
                assert await cur.fetchone() == {"who": ROLE}
            assert len(calls) > opened, "the replacement connection asked the provider again"
        finally:
            await aio.close_pool()


class TestUrlPasswordPrecedence:
    """21.8: a process DATABASE_URL's password beats a .env file's DB_PASSWORD_FILE / DB_PASSFILE (CONFIGURATION)."""

    @pytest.mark.parametrize("variable", ["DB_PASSWORD_FILE", "DB_PASSFILE"])
    def test_process_url_password_beats_a_files_password_source(
        self, role: Server, tmp_path: Path, variable: str
    ) -> None:
        """The URL's (right) password logs in; the file's source (a wrong password) is dropped, as a lower layer."""
        wrong = tmp_path / "wrong-password"
        entry = f"*:*:*:{ROLE}:wrong-{NEW}" if variable == "DB_PASSFILE" else f"wrong-{NEW}"
        write_secret(wrong, entry)
        config = tmp_path / "config"
        config.mkdir()
        (config / ".env.test").write_text(f"{variable}={wrong}\n")
        url = f"postgresql://{ROLE}:{OLD}@{role.host}:{role.port}/postgres?sslmode=disable"
        settings = load_settings("test", config_dir=config, environ={"DATABASE_URL": url})
        assert settings.password == OLD and (settings.password_file, settings.passfile) == ("", "")
        assert settings.origins["password"] == "DATABASE_URL in the process environment"
        conn = connect(settings, operation="test")
        try:
            assert conn.execute("SELECT current_user").fetchone() == (ROLE,)
        finally:
            conn.close()

    def test_the_layers_around_it_keep_their_order(self, tmp_path: Path) -> None:
        """A file's DB_PASSWORD_FILE beats that file's URL; a process DB_PASSWORD_FILE beats the process URL."""
        config = tmp_path / "config"
        config.mkdir()
        (config / ".env.test").write_text(
            f"DATABASE_URL=postgresql://{ROLE}:from-file-url@h/postgres\nDB_PASSWORD_FILE=/run/secrets/file\n"
        )
        same_file = load_settings("test", config_dir=config, environ={})
        assert (same_file.password, same_file.password_file) == ("", "/run/secrets/file")
        (config / ".env.test").write_text(f"DATABASE_URL=postgresql://{ROLE}:from-shared-url@h/postgres\n")
        (config / ".env").write_text("DB_PASSFILE=/run/secrets/shared\n")
        own_url = load_settings("test", config_dir=config, environ={})
        assert (own_url.password, own_url.passfile) == ("from-shared-url", "")
        url = f"postgresql://{ROLE}:from-process-url@h/postgres"
        process = load_settings("test", config_dir=config, environ={"DATABASE_URL": url, "DB_PASSWORD_FILE": "/p"})
        assert (process.password, process.password_file) == ("", "/p")


class TestProviderErrorsStaySecret:
    """21.9: a provider's exception text can quote the credential; only its type is shown (21.9b: no word of it)."""

    LEAK = "s3cr3t"

    def _settings(self, role: Server) -> DatabaseSettings:
        def provider() -> str:
            raise RuntimeError(f"token {self.LEAK} expired")

        return app_settings(role, password_provider=provider, pool_min=1, pool_max=2, pool_timeout=3.0)

    def _assert_clean(self, error: BaseException) -> None:
        import traceback

        assert isinstance(error, DatabaseUnavailableError), repr(error)
        assert "raised RuntimeError; its message is not shown because it may contain the secret" in str(error)
        assert "expired" not in str(error) and "token" not in str(error)
        # 21.9b: not wrapped a second time as a server that cannot be reached
        assert str(error).count("password provider") == 1 and "Check that the server is running" not in str(error)
        chain: list[BaseException] = []
        seen: BaseException | None = error
        while seen is not None and len(chain) < 20:  # bounded walk of the cause/context chain
            chain.append(seen)
            seen = seen.__cause__ or seen.__context__
        texts = [str(e) + repr(e) for e in chain] + ["".join(traceback.format_exception(error))]
        assert all(self.LEAK not in t for t in texts), texts

    @pytest.mark.parametrize("entry", ["connect", "connect_async", "pool", "aio pool", "tool_connection_args"])
    def test_the_secret_in_the_message_reaches_no_error_chain_or_log(
        self, role: Server, entry: str, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """Every entry point that resolves the password: error, repr, chain, traceback, structlog, logging, stderr."""
        import asyncio
        import logging

        from structlog.testing import capture_logs

        from precog_db import aio
        from precog_db._connection_async import connect as connect_async

        settings = self._settings(role)

        async def through_aio_pool() -> None:
            try:
                await aio.initialize_pool(settings=settings)
                async with aio.get_cursor() as cur:
                    await cur.execute("SELECT 1")
            finally:
                await aio.close_pool()

        async def through_connect_async() -> None:
            conn = await connect_async(settings, operation="test")
            await conn.close()

        def through_pool() -> None:
            try:
                initialize_pool(settings=settings)
                with get_cursor() as cur:
                    cur.execute("SELECT 1")
            finally:
                close_pool()

        calls: dict[str, Callable[[], object]] = {
            "connect": lambda: connect(settings, operation="test").close(),
            "connect_async": lambda: asyncio.run(through_connect_async()),
            "pool": through_pool,
            "aio pool": lambda: asyncio.run(through_aio_pool()),
            "tool_connection_args": lambda: tool_connection_args(settings),
        }
        caplog.set_level(logging.DEBUG)
        with capture_logs() as logs, pytest.raises(DatabaseUnavailableError) as raised:
            calls[entry]()
        self._assert_clean(raised.value)
        captured = capsys.readouterr()
        everything = repr(logs) + caplog.text + repr([r.__dict__ for r in caplog.records]) + captured.out + captured.err
        assert self.LEAK not in everything

    @pytest.mark.parametrize(
        ("message", "secret"),
        [
            ("the rotated token is Quokkalantern", "Quokkalantern"),
            ("vault says: password for app_rw was Zebracrossingsun", "Zebracrossingsun"),
            ("refusing password correct horse battery staple", "battery staple"),
            ("credential expired: 'Nimbusfoxtrot'", "Nimbusfoxtrot"),
        ],
    )
    @pytest.mark.parametrize("layer", ["sync", "asyncio"])
    def test_no_word_of_the_message_is_shown(self, role: Server, message: str, secret: str, layer: str) -> None:
        """21.9b: a secret in plain words (a letters-only token, a passphrase) is not shown: no word is."""
        import asyncio

        from precog_db._connection_async import connect as connect_async

        def provider() -> str:
            raise RuntimeError(message)

        settings = app_settings(role, password_provider=provider)

        async def through_connect_async() -> None:
            conn = await connect_async(settings, operation="test")
            await conn.close()

        with pytest.raises(DatabaseUnavailableError) as raised:
            if layer == "sync":
                connect(settings, operation="test").close()
            else:
                asyncio.run(through_connect_async())
        self.LEAK = secret
        self._assert_clean(raised.value)
        own_words = {"password", "credential"}  # the error's own wording ("the password provider", "credentials")
        shown = [w for w in message.split() if len(w) > 3 and w not in own_words and w in str(raised.value)]
        assert shown == [], str(raised.value)

    def test_a_provider_that_calls_sys_exit_is_the_same_error(self, role: Server) -> None:
        """21.9b: SystemExit from a provider (its code quoting the secret) is turned into the provider error."""
        import sys

        def provider() -> str:
            sys.exit(f"could not fetch token {self.LEAK}")

        with pytest.raises(DatabaseUnavailableError, match="raised SystemExit; its message is not shown") as raised:
            connect(app_settings(role, password_provider=provider), operation="test")
        assert raised.value.__cause__ is None and raised.value.__context__ is None
        assert self.LEAK not in str(raised.value) + repr(raised.value)

    def test_a_keyboard_interrupt_in_a_provider_still_interrupts(self, role: Server) -> None:
        """Only errors and SystemExit are turned into the provider error; Ctrl-C is not swallowed."""

        def provider() -> str:
            raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            connect(app_settings(role, password_provider=provider), operation="test")

    def test_the_audit_log_gets_nothing_of_the_message(
        self, role: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """21.9b: an audited workflow (backup_database) records the failure without a word of the provider's text."""
        from precog_db.backup import backup_database

        audit_log = tmp_path / "audit.log"
        monkeypatch.setenv("PRECOG_AUDIT_LOG", str(audit_log))

        def provider() -> str:
            raise RuntimeError("the rotated token is Quokkalantern")

        with pytest.raises(DatabaseUnavailableError):
            backup_database(
                app_settings(role, password_provider=provider), server_major=15, purpose="test", root=tmp_path / "b"
            )
        text = audit_log.read_text()
        assert "RuntimeError" in text and "Quokkalantern" not in text and "rotated" not in text, text

    def test_a_provider_error_whose_text_itself_raises_chains_nothing(self, role: Server) -> None:
        """An exception whose __str__ raises (quoting the secret) gives the type alone, still with no chain."""
        leak = self.LEAK

        class Opaque(Exception):
            def __str__(self) -> str:
                raise ValueError(f"token {leak} in __str__")

        def provider() -> str:
            raise Opaque

        with pytest.raises(DatabaseUnavailableError, match=r"raised Opaque; its message is not shown") as raised:
            connect(app_settings(role, password_provider=provider), operation="test")
        assert raised.value.__cause__ is None and raised.value.__context__ is None
