"""Read replicas against a real streaming standby: get_cursor(replica=True) (docs/TOPOLOGY.md)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest

from precog_db import ConfigurationError, dangerous_operation, get_cursor, initialize_pool, stamp_database
from precog_db.local.cluster import LocalCluster, free_port
from precog_db.replicas import CHECK_INTERVAL
from tests._helpers.faults import own_server
from tests._helpers.server import Server
from tests._helpers.topology import standby_of


@pytest.fixture(scope="module")
def pair() -> Iterator[tuple[Server, LocalCluster]]:
    """A primary with a stamped precog_test database and an asynchronous streaming standby."""
    with own_server() as primary:
        assert primary.cluster is not None
        stamp_database("test", settings=primary.settings())
        with primary.connect("precog_test") as conn:
            conn.execute("CREATE TABLE IF NOT EXISTS seen (id int)")
        standby = standby_of(primary.cluster)
        try:
            yield primary, standby
        finally:
            standby.destroy()


@pytest.fixture
def replay(pair: tuple[Server, LocalCluster]) -> Iterator[psycopg.Connection[Any]]:
    """A superuser connection to the standby that can pause its replay; replay is resumed afterwards."""
    _, standby = pair
    with psycopg.connect(standby.conninfo("precog_test"), autocommit=True) as conn:
        try:
            yield conn
        finally:
            conn.execute("SELECT pg_wal_replay_resume()")


def _in_thread(fn: Callable[[], Any]) -> Any:
    """Run ``fn`` in another thread (another context: none of this thread's writes) and return its result."""
    out: list[Any] = []
    thread = threading.Thread(target=lambda: out.append(fn()))
    thread.start()
    thread.join(30)
    return out[0]


def _read(row_id: int) -> tuple[bool, bool]:
    """(read on a standby?, row ``row_id`` seen?) through get_cursor(replica=True)."""
    with get_cursor(replica=True) as cur:
        cur.execute(
            "SELECT pg_is_in_recovery() AS standby, exists(SELECT 1 FROM seen WHERE id = %s) AS seen", (row_id,)
        )
        row = cur.fetchone()
    assert row is not None
    return row["standby"], row["seen"]


def _wait(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


class TestReplicaReads:
    def test_reads_go_to_the_replica(self, pair: tuple[Server, LocalCluster]) -> None:
        """With a fresh replica configured, replica=True reads run on the standby; without one, on the primary."""
        primary, standby = pair
        initialize_pool(settings=primary.settings(replica_hosts=(f"127.0.0.1:{standby.port}",)))
        assert _read(-1) == (True, False)
        with get_cursor() as cur:  # the default stays on the primary
            cur.execute("SELECT pg_is_in_recovery() AS standby")
            assert cur.fetchone() == {"standby": False}

    def test_unreachable_replica_reads_the_primary(self, pair: tuple[Server, LocalCluster]) -> None:
        """A replica nothing listens on is skipped: replica=True reads from the primary, and again without waiting."""
        primary, _ = pair
        initialize_pool(settings=primary.settings(replica_hosts=(f"127.0.0.1:{free_port()}",)))
        assert _read(-1) == (False, False)
        assert _read(-1) == (False, False)

    def test_no_replicas_reads_the_primary(self, pair: tuple[Server, LocalCluster]) -> None:
        """replica=True with DB_REPLICA_HOSTS empty reads from the primary."""
        primary, _ = pair
        initialize_pool(settings=primary.settings())
        assert _read(-1) == (False, False)

    def test_read_your_writes(self, pair: tuple[Server, LocalCluster], replay: psycopg.Connection[Any]) -> None:
        """Replay paused: this thread's read after its commit sees the row (primary); others read the replica."""
        primary, standby = pair
        initialize_pool(
            settings=primary.settings(replica_hosts=(f"127.0.0.1:{standby.port}",), replica_max_lag_ms=600_000)
        )
        assert _read(-1)[0] is True  # the replica is in use
        replay.execute("SELECT pg_wal_replay_pause()")
        with get_cursor(commit=True) as cur:
            cur.execute("INSERT INTO seen VALUES (1)")
        assert _read(1) == (False, True)  # never older than our own write
        assert _in_thread(lambda: _read(1)) == (True, False)  # others are not held back: the (stale) replica
        replay.execute("SELECT pg_wal_replay_resume()")
        assert _wait(lambda: _read(1) == (True, True))  # once replayed, our reads go back to the replica

    def test_read_your_writes_per_asyncio_task(
        self, pair: tuple[Server, LocalCluster], replay: psycopg.Connection[Any]
    ) -> None:
        """In one thread, the asyncio task that committed reads its row; a sibling task reads the (stale) replica."""
        primary, standby = pair
        initialize_pool(
            settings=primary.settings(replica_hosts=(f"127.0.0.1:{standby.port}",), replica_max_lag_ms=600_000)
        )
        assert _read(-1)[0] is True
        replay.execute("SELECT pg_wal_replay_pause()")
        committed = asyncio.Event()

        async def writer() -> tuple[bool, bool]:
            with get_cursor(commit=True) as cur:
                cur.execute("INSERT INTO seen VALUES (3)")
            committed.set()
            return _read(3)

        async def sibling() -> tuple[bool, bool]:
            await committed.wait()
            return _read(3)

        async def both() -> list[tuple[bool, bool]]:
            return list(await asyncio.wait_for(asyncio.gather(writer(), sibling()), 30))

        assert asyncio.run(both()) == [(False, True), (True, False)]

    def test_lagging_replica_is_skipped(
        self, pair: tuple[Server, LocalCluster], replay: psycopg.Connection[Any]
    ) -> None:
        """A replica whose replay lags more than DB_REPLICA_MAX_LAG_MS is skipped, for every thread."""
        primary, standby = pair
        initialize_pool(settings=primary.settings(replica_hosts=(f"127.0.0.1:{standby.port}",), replica_max_lag_ms=200))
        assert _in_thread(lambda: _read(-1)[0]) is True
        replay.execute("SELECT pg_wal_replay_pause()")
        with primary.connect("precog_test") as conn:
            conn.execute("INSERT INTO seen VALUES (2)")
        lag = "SELECT extract(epoch FROM now() - pg_last_xact_replay_timestamp()) * 1000 > 400"
        assert _wait(lambda: bool((row := replay.execute(lag).fetchone()) and row[0]))
        # Once the lag measured at most CHECK_INTERVAL ago exceeds the limit, reads skip the replica.
        assert _wait(lambda: _in_thread(lambda: _read(2)) == (False, True), timeout=10 * CHECK_INTERVAL + 5)


class TestNeverAReplica:
    def test_commit_with_replica_is_refused(self, pair: tuple[Server, LocalCluster]) -> None:
        """get_cursor(commit=True, replica=True) is refused before anything is borrowed."""
        primary, standby = pair
        initialize_pool(settings=primary.settings(replica_hosts=(f"127.0.0.1:{standby.port}",)))
        with pytest.raises(ConfigurationError, match="replica cannot take writes"):
            get_cursor(commit=True, replica=True)

    def test_gated_operations_read_the_primary(
        self, pair: tuple[Server, LocalCluster], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Inside a dangerous_operation gate, replica=True reads from the primary."""
        monkeypatch.setenv("PRECOG_ENV", "test")
        primary, standby = pair
        initialize_pool(settings=primary.settings(replica_hosts=(f"127.0.0.1:{standby.port}",)))

        @dangerous_operation(allowed=("test",))
        def gated() -> tuple[bool, bool]:
            return _read(-1)

        assert gated() == (False, False)


class TestReplicaAddresses:
    """21.12: IPv6 entries in DB_REPLICA_HOSTS are parsed, or refused clearly; never taken apart at the wrong colon."""

    @pytest.mark.parametrize(
        ("entry", "host", "port"),
        [
            ("[::1]:5433", "::1", 5433),
            ("[::1]", "::1", None),
            ("::1", "::1", None),
            ("[2001:db8::7]:6432", "2001:db8::7", 6432),
            ("2001:db8::10", "2001:db8::10", None),
            ("replica-1.internal:5433", "replica-1.internal", 5433),
            ("10.0.0.7", "10.0.0.7", None),
        ],
    )
    def test_accepted_forms_give_the_right_host_and_port(
        self, pg_server: Server, entry: str, host: str, port: int | None
    ) -> None:
        """Each accepted form becomes the replica settings' host and port (the writer's port by default)."""
        from precog_db.replicas import replica_settings
        from precog_db.settings import load_settings

        settings = load_settings(
            "test", environ={"DB_REPLICA_HOSTS": f"{entry}, other-replica", "DB_PORT": str(pg_server.port)}
        )
        assert settings.replica_hosts == (entry, "other-replica")
        replica = replica_settings(settings, entry)
        assert (replica.host, replica.port) == (host, port if port is not None else pg_server.port)

    @pytest.mark.parametrize(
        ("entry", "needle"),
        [
            ("::1:5433", "last group could be a port"),
            ("fe80::1:5432", "last group could be a port"),
            ("[db1]:5433", "not [IPv6 address]"),
            ("[::1]:0", "other than :port"),
            ("[::1]x", "other than :port"),
            ("[::1", "not [IPv6 address]"),
            ("::g:1", "not an IPv6 address"),
            ("db1:", "port is not a number"),
            (":5432", "no host"),
            ("db1:99999", "port is not a number"),
        ],
    )
    def test_ambiguous_or_invalid_forms_are_refused(self, entry: str, needle: str) -> None:
        """A ConfigurationError names DB_REPLICA_HOSTS, the entry's position and the forms; never the value."""
        from precog_db.environment import Environment
        from precog_db.settings import DatabaseSettings, load_settings

        with pytest.raises(ConfigurationError, match="DB_REPLICA_HOSTS") as refused:
            load_settings("test", environ={"DB_REPLICA_HOSTS": f"replica-0, {entry}"})
        assert needle in str(refused.value) and "(entry 2)" in str(refused.value)
        assert entry not in str(refused.value).replace("[IPv6]:port", "")
        with pytest.raises(ConfigurationError, match=needle.replace("[", r"\[")):
            DatabaseSettings(env=Environment.TEST, replica_hosts=(entry,))

    @pytest.mark.parametrize("entry", ["[::1]:{port}", "::1"])
    def test_libpq_is_sent_the_ipv6_address_and_port(self, pg_server: Server, entry: str) -> None:
        """The replica's connection goes to ::1 on the given (or the writer's) port: libpq's own error says so."""
        from precog_db.connection import connect
        from precog_db.errors import DatabaseUnavailableError
        from precog_db.replicas import replica_settings

        closed = free_port()  # nothing listens there, on 127.0.0.1 or on ::1
        settings = pg_server.settings(replica_hosts=(entry.format(port=closed),), port=closed)
        replica = replica_settings(settings, settings.replica_hosts[0])
        assert "[::1]:" in replica.describe()
        with pytest.raises(DatabaseUnavailableError) as failed:
            connect(replica, operation="test", verify=False)
        assert f'connection to server at "::1", port {closed} failed' in str(failed.value)
