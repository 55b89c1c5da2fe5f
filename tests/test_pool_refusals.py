"""The pools refuse what they were not asked for, and say so (issue 21, items 10, 11, 22), in both layers.

- `initialize_pool` for the open pool's target but other connection settings
  (sslmode, password, statement timeout ...) is refused, naming the setting.
- A pooled connection the library refuses (a ``configure=`` that turns the
  read-only default off, a database re-stamped for another environment) is
  reported as that refusal, promptly, not as an unreachable server after the
  pool timeout; and it is never lent.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from precog_db import (
    ConfigurationError,
    DatabaseUnavailableError,
    EnvironmentMismatchError,
    PoolStateError,
    aio,
    get_cursor,
    initialize_pool,
    stamp_database,
)
from precog_db.environment import Environment
from precog_db.settings import DatabaseSettings
from tests._helpers.faults import wait_until
from tests._helpers.server import Server
from tests.test_chokepoint import drop_database, make_database, sessions_on

SECRET = "pw-Refusal-91q"
LAYERS = ["sync", "asyncio"]


def init_twice(layer: str, first: DatabaseSettings, second: DatabaseSettings) -> tuple[object, object]:
    """Initialize with ``first``, then with ``second``: (the pool, the second call's pool or exception)."""
    if layer == "sync":
        pool = initialize_pool(settings=first)
        try:
            return pool, initialize_pool(settings=second)
        except PoolStateError as exc:
            return pool, exc

    async def run() -> tuple[object, object]:
        pool = await aio.initialize_pool(settings=first)
        try:
            return pool, await aio.initialize_pool(settings=second)
        except PoolStateError as exc:
            return pool, exc
        finally:
            await aio.close_pool()

    return asyncio.run(run())


class TestOtherConnectionSettings:
    """21.10: the same target with another sslmode, password, statement timeout ... is refused, by name."""

    @pytest.mark.parametrize("layer", LAYERS)
    @pytest.mark.parametrize(
        ("field", "value"),
        [
            ("sslmode", "require"),
            ("statement_timeout_ms", 1234),
            ("tcp_user_timeout_ms", 4321),
            ("connect_timeout", 7),
            ("application_name", "other-app"),
            ("target_session_attrs", "any"),
        ],
    )
    def test_a_different_setting_is_named(
        self, layer: str, field: str, value: object, test_settings: DatabaseSettings
    ) -> None:
        assert getattr(test_settings, field) != value
        _pool, second = init_twice(layer, test_settings, test_settings.replace(**{field: value}))
        assert isinstance(second, PoolStateError), f"{field}: the open pool was returned ({second!r})"
        message = str(second)
        assert f"{field}={value!r}" in message and "close_pool()" in message, message
        assert f"(the open pool has {field}={getattr(test_settings, field)!r})" in message

    @pytest.mark.parametrize("layer", LAYERS)
    def test_a_different_password_is_named_not_shown(self, layer: str, test_settings: DatabaseSettings) -> None:
        _pool, second = init_twice(layer, test_settings, test_settings.replace(password=SECRET))
        assert isinstance(second, PoolStateError)
        assert "a different password" in str(second)
        assert SECRET not in str(second) and SECRET not in repr(second)

    @pytest.mark.parametrize("layer", LAYERS)
    def test_a_different_password_provider_is_named(self, layer: str, test_settings: DatabaseSettings) -> None:
        with_provider = test_settings.replace(password_provider=lambda: SECRET)
        _pool, second = init_twice(layer, with_provider, with_provider.replace(password_provider=lambda: SECRET))
        assert isinstance(second, PoolStateError) and "a different password_provider" in str(second)
        assert SECRET not in str(second)

    @pytest.mark.parametrize("layer", LAYERS)
    def test_the_same_settings_or_other_pool_sizes_reuse_the_pool(
        self, layer: str, test_settings: DatabaseSettings
    ) -> None:
        """Equal connection settings (even another object, or other pool sizes) still return the open pool."""
        same = test_settings.replace(application_name=test_settings.application_name)
        pool, second = init_twice(layer, test_settings, same)
        assert second is pool
        pool, second = init_twice(layer, test_settings, test_settings.replace(pool_max=test_settings.pool_max + 1))
        assert second is pool


@pytest.fixture
def own_db(pg_server: Server) -> Iterator[str]:
    name = make_database(pg_server, f"pool_ref_{uuid.uuid4().hex[:8]}")
    assert wait_until(lambda: sessions_on(pg_server, name) == 0, timeout=10), "setup sessions did not end"
    yield name
    drop_database(pg_server, name)


def table_exists(pg_server: Server, dbname: str, table: str) -> bool:
    with pg_server.connect(dbname) as conn:
        row = conn.execute("SELECT to_regclass(%s) IS NOT NULL", (table,)).fetchone()
    assert row is not None
    return bool(row[0])


#: Long enough that a caller left to wait out the pool timeout hits the test's own timeout first.
LONG_POOL_TIMEOUT = 600.0


class TestRefusedPoolConnections:
    """21.11 and 21.22: a refused pooled connection is reported as the refusal, at once, and never lent."""

    @pytest.mark.timeout(90)
    @pytest.mark.parametrize("layer", LAYERS)
    def test_configure_turning_read_only_off_is_refused(self, layer: str, pg_server: Server, own_db: str) -> None:
        """No write through a connection whose configure= turned the read-only default off; the caller is told."""
        settings = pg_server.settings(own_db, pool_min=1, pool_max=2, pool_timeout=LONG_POOL_TIMEOUT)
        if layer == "sync":

            def configure(conn: psycopg.Connection[Any]) -> None:
                conn.execute("SET default_transaction_read_only = off")

            initialize_pool(settings=settings, configure=configure)
            with pytest.raises(ConfigurationError) as info, get_cursor() as cur:
                cur.execute("CREATE TABLE written_after_configure (x int)")
            error: BaseException = info.value
        else:

            async def aconfigure(conn: psycopg.AsyncConnection[Any]) -> None:
                await conn.execute("SET default_transaction_read_only = off")

            async def run() -> BaseException:
                await aio.initialize_pool(settings=settings, configure=aconfigure)
                try:
                    with pytest.raises(ConfigurationError) as info:
                        async with aio.get_cursor() as cur:
                            await cur.execute("CREATE TABLE written_after_configure (x int)")
                    return info.value
                finally:
                    await aio.close_pool()

            error = asyncio.run(run())
        message = str(error)
        assert "configure= callback turned default_transaction_read_only off" in message, message
        assert not isinstance(error, DatabaseUnavailableError) and "DB_HOST" not in message
        assert not table_exists(pg_server, own_db, "written_after_configure")

    @pytest.mark.timeout(90)
    @pytest.mark.parametrize("layer", LAYERS)
    def test_every_new_pooled_connection_checks_the_stamp(self, layer: str, pg_server: Server, own_db: str) -> None:
        """Re-stamped dev after the pool opened: the new connections after drain() are refused, and said so."""
        settings = pg_server.settings(
            own_db, env=Environment.TEST, pool_min=1, pool_max=1, pool_timeout=LONG_POOL_TIMEOUT
        )
        stamp_database(settings=settings)
        if layer == "sync":
            pool = initialize_pool(settings=settings)
            pool.wait(timeout=30)
            stamp_database(settings=pg_server.settings(own_db, env=Environment.DEV), force=True)
            pool.drain()  # every connection is replaced by a new one, which reads the stamp
            with pytest.raises(EnvironmentMismatchError) as info, get_cursor(commit=True) as cur:
                cur.execute("INSERT INTO accounts VALUES (1, 1)")
            error: BaseException = info.value
        else:

            async def run() -> BaseException:
                apool = await aio.initialize_pool(settings=settings)
                try:
                    await apool.wait(timeout=30)
                    stamp_database(settings=pg_server.settings(own_db, env=Environment.DEV), force=True)
                    await apool.drain()
                    with pytest.raises(EnvironmentMismatchError) as info:
                        async with aio.get_cursor(commit=True) as cur:
                            await cur.execute("INSERT INTO accounts VALUES (1, 1)")
                    return info.value
                finally:
                    await aio.close_pool()

            error = asyncio.run(run())
        message = str(error)
        assert "stamped dev" in message and "precog-test" in message, message
        assert not isinstance(error, DatabaseUnavailableError) and "DB_HOST" not in message
        with pg_server.connect(own_db) as conn:
            assert conn.execute("SELECT count(*) FROM accounts").fetchone() == (0,)
