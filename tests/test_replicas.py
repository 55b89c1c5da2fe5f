"""Read replicas: the DB_REPLICA_HOSTS entries and the replica settings built from them (docs/TOPOLOGY.md).

The reads themselves, against a real streaming standby in both layers, are in
tests/test_replicas_async.py and tests/test_replicas_sync.py (generated from it).
"""

from __future__ import annotations

import pytest

from precog_db import ConfigurationError
from precog_db.local.cluster import free_port
from tests._helpers.server import Server


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
