"""Failover against a real streaming standby: multi-host DB_HOST, promotion, commits in flight (docs/TOPOLOGY.md)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from precog_db import (
    CommitOutcomeUnknownError,
    ConfigurationError,
    DatabaseSettings,
    DatabaseUnavailableError,
    PrecogDBError,
    get_cursor,
    initialize_pool,
    read_stamp,
    stamp_database,
)
from precog_db._conn_state import state
from precog_db.environment import Environment
from precog_db.local.cluster import LocalCluster
from precog_db.pool import connection_is_usable
from tests._helpers.faults import own_server, report
from tests._helpers.server import Server
from tests._helpers.topology import crash, promote, standby_of


@pytest.fixture
def pair() -> Iterator[tuple[Server, LocalCluster]]:
    """A primary with a stamped precog_test database and its synchronous streaming standby on another port."""
    with own_server() as primary:
        assert primary.cluster is not None
        stamp_database("test", settings=primary.settings())
        standby = standby_of(primary.cluster, synchronous=True)
        try:
            yield primary, standby
        finally:
            standby.destroy()


def _both(primary: Server, standby: LocalCluster, **kw: Any) -> DatabaseSettings:
    """Writer settings listing the primary, then the standby (libpq multi-host)."""
    return primary.settings(host="127.0.0.1,127.0.0.1", port=f"{primary.port},{standby.port}", **kw)


class TestFailover:
    def test_writes_resume_after_promotion_and_no_acknowledged_commit_is_lost(
        self, pair: tuple[Server, LocalCluster]
    ) -> None:
        """Primary killed, standby promoted: commit=True writes succeed within 5 s; no acknowledged row is lost."""
        primary, standby = pair
        assert primary.cluster is not None
        initialize_pool(settings=_both(primary, standby, pool_min=2, pool_max=2, pool_timeout=0.5))
        with get_cursor(commit=True) as cur:
            cur.execute("CREATE TABLE failover_rows (id int PRIMARY KEY)")
        acknowledged: list[int] = []
        outcomes: list[str] = []
        stop = threading.Event()

        def writer() -> None:
            n = 0
            deadline = time.monotonic() + 60
            while not stop.is_set() and time.monotonic() < deadline:
                n += 1
                try:
                    with get_cursor(commit=True) as cur:
                        cur.execute("INSERT INTO failover_rows VALUES (%s) ON CONFLICT DO NOTHING", (n,))
                except (psycopg.Error, PrecogDBError) as exc:
                    outcomes.append(type(exc).__name__)
                    time.sleep(0.02)
                else:
                    acknowledged.append(n)

        thread = threading.Thread(target=writer)
        thread.start()
        try:
            deadline = time.monotonic() + 10
            while len(acknowledged) < 20 and time.monotonic() < deadline:
                time.sleep(0.02)
            crash(primary.cluster)
            before = len(acknowledged)
            promoted = promote(standby)
            resumed = None
            deadline = promoted + 5
            while time.monotonic() < deadline:
                if len(acknowledged) > before:
                    resumed = time.monotonic() - promoted
                    break
                time.sleep(0.01)
        finally:
            stop.set()
            thread.join(30)
        report("failover_write_resumed", seconds_after_promotion=resumed, errors=sorted(set(outcomes)))
        assert resumed is not None, f"no commit succeeded within 5 s of the promotion: {sorted(set(outcomes))}"
        with psycopg.connect(standby.conninfo("precog_test"), autocommit=True) as conn:
            present = {row[0] for row in conn.execute("SELECT id FROM failover_rows")}
            assert conn.info.parameter_status("in_hot_standby") == "off"
        assert set(acknowledged) <= present  # synchronous replication: no acknowledged commit lost

    def test_stamp_survives_the_failover(self, pair: tuple[Server, LocalCluster]) -> None:
        """The promoted standby has the primary's stamp and system_identifier: it verifies as the same database."""
        primary, standby = pair
        assert primary.cluster is not None
        before = read_stamp(settings=primary.settings())
        crash(primary.cluster)
        promote(standby)
        after = read_stamp(settings=_both(primary, standby))
        assert after is not None and before is not None
        assert after.system_identifier == before.system_identifier is not None
        initialize_pool(settings=_both(primary, standby, pool_timeout=5.0))
        with get_cursor(commit=True) as cur:  # the pool's stamp check passes on the new primary
            cur.execute("SELECT 1")

    def test_commit_in_flight_at_the_crash_is_outcome_unknown(self) -> None:
        """A COMMIT waiting for a synchronous standby when the primary dies is CommitOutcomeUnknownError."""
        with own_server() as server:
            assert server.cluster is not None
            with server.connect() as admin:
                admin.execute("ALTER SYSTEM SET synchronous_standby_names = 'nobody'")
                admin.execute("SELECT pg_reload_conf()")
            initialize_pool(settings=server.settings(pool_min=1, pool_max=1))
            with get_cursor(commit=True) as cur:
                cur.execute("SET LOCAL synchronous_commit = off")
                cur.execute("CREATE TABLE in_flight (x int)")
            caught: list[BaseException] = []

            def commit() -> None:
                try:
                    with get_cursor(commit=True) as cur:
                        cur.execute("INSERT INTO in_flight VALUES (1)")
                except BaseException as exc:  # recorded and checked below
                    caught.append(exc)

            thread = threading.Thread(target=commit)
            thread.start()
            with server.connect("precog_test") as watcher:
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline:
                    row = watcher.execute(
                        "SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'SyncRep'"
                    ).fetchone()
                    if row and row[0]:
                        break
                    time.sleep(0.02)
            crash(server.cluster)
            thread.join(30)
            assert len(caught) == 1 and isinstance(caught[0], CommitOutcomeUnknownError), caught

    def test_writer_never_uses_a_hot_standby(self, pair: tuple[Server, LocalCluster]) -> None:
        """A writer pool whose only host is a hot standby refuses to open; a writer connection on one is not lent."""
        primary, standby = pair
        with pytest.raises(DatabaseUnavailableError, match="hot standby"):
            initialize_pool(settings=primary.settings(host="127.0.0.1", port=standby.port))
        with psycopg.connect(standby.conninfo("precog_test"), autocommit=True) as on_standby:
            assert not connection_is_usable(on_standby)  # in_hot_standby=on, read from the parameters: no round trip
            state(on_standby).writer = False  # a pool that only reads keeps it (a plain psycopg connection: created)
            assert connection_is_usable(on_standby)
        with psycopg.connect(primary.conninfo("precog_test"), autocommit=True) as on_primary:
            assert connection_is_usable(on_primary)


class TestMultiHostSettings:
    def test_port_list_must_match_hosts(self) -> None:
        """DB_PORT with another number of entries than DB_HOST is refused with the rule."""
        with pytest.raises(ConfigurationError, match="one port per host"):
            DatabaseSettings(env=Environment.TEST, host="a,b,c", port="5432,5433")

    def test_lists_reach_libpq(self) -> None:
        """Hosts and ports go to libpq as lists, with target_session_attrs=primary for the default read-write."""
        kwargs = DatabaseSettings(env=Environment.TEST, host="db1, db2", port="5432,6432").connect_kwargs()
        assert (kwargs["host"], kwargs["port"], kwargs["target_session_attrs"]) == ("db1,db2", "5432,6432", "primary")

    def test_host_list_entries_are_checked(self) -> None:
        """An empty DB_HOST entry, a host list behind a pooler, a bad DB_REPLICA_HOSTS entry: refused with the rule."""
        with pytest.raises(ConfigurationError, match="empty entry"):
            DatabaseSettings(env=Environment.TEST, host="db1,,db2")
        with pytest.raises(ConfigurationError, match="PgBouncer's own configuration"):
            DatabaseSettings(env=Environment.TEST, host="db1,db2", pooler="transaction")
        with pytest.raises(ConfigurationError, match=r"not a number from 1 to 65535 \(host, host:port, .*\]:port"):
            DatabaseSettings(env=Environment.TEST, replica_hosts="replica:99999")  # type: ignore[arg-type]
