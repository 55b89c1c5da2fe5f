"""Pool metrics on a real server: `pool_metrics()` under OpenTelemetry names, scraped over HTTP by Prometheus.

The scrape test runs a bounded load, a forced exhaustion (two holders, a third
caller that times out) and a forced connection failure (the password provider
raising while `drain()` replaces the connections), reading
``prometheus_client``'s real HTTP endpoint on a loopback port at each step.
"""

from __future__ import annotations

import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator

import pytest
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.parser import text_string_to_metric_families

from precog_db import (
    ConfigurationError,
    PoolExhaustedError,
    get_connection,
    get_cursor,
    get_pool,
    initialize_pool,
    pool_metrics,
)
from precog_db.local.cluster import free_port
from precog_db.metrics import PoolSnapshot, register_prometheus
from tests._helpers.server import Server

LABELS = {"pool_name": "precog-test", "environment": "test"}


def wait_for(condition: Callable[[], bool], timeout: float = 15.0) -> None:
    """Poll ``condition`` every 20 ms until it holds; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def snapshot() -> PoolSnapshot:
    """The process-wide pool's snapshot (the only pool open in these tests)."""
    (only,) = pool_metrics()
    return only


class Scraper:
    """Reads ``/metrics`` from a real prometheus_client HTTP server on 127.0.0.1."""

    def __init__(self, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}/metrics"

    def scrape(self) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        with urllib.request.urlopen(self.url, timeout=10) as response:  # loopback, fixed scheme
            text = response.read().decode("utf-8")
        return {
            (sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }

    def value(self, name: str, **labels: str) -> float:
        """The value of one sample of the precog-test pool (``labels`` beyond pool and environment, e.g. state)."""
        return self.scrape()[(name, frozenset({**LABELS, **labels}.items()))]


@pytest.fixture
def endpoint() -> Iterator[Scraper]:
    """A fresh registry with the precog_db collector, served over HTTP on a free loopback port."""
    registry = CollectorRegistry()
    collector = register_prometheus(registry)
    assert register_prometheus(registry) is collector, "registering twice in one registry is a no-op"
    port = free_port()
    server, thread = start_http_server(port, addr="127.0.0.1", registry=registry)
    try:
        yield Scraper(port)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


class TestPrometheusEndpoint:
    def test_scrape_during_load_exhaustion_and_connection_failures(
        self, pg_server: Server, test_db: str, endpoint: Scraper
    ) -> None:
        """Counts, pending requests, timeouts, errors and histograms read over HTTP match what the pool did."""
        failing = threading.Event()

        def provider() -> str:
            if failing.is_set():
                raise ConnectionError("token service unreachable")
            return "unused-with-trust-auth"

        initialize_pool(
            settings=pg_server.settings(
                test_db, password="", password_provider=provider, pool_min=2, pool_max=2, pool_timeout=2.0
            )
        )
        pool = get_pool()
        pool.wait(timeout=10)
        assert endpoint.value("db_client_connection_count", state="idle") == 2
        assert endpoint.value("db_client_connection_count", state="used") == 0
        assert endpoint.value("db_client_connection_idle_min") == 2
        assert endpoint.value("db_client_connection_max") == 2

        # 1. A bounded load: 2 threads x 20 reads.
        def reads() -> None:
            for _ in range(20):
                with get_cursor() as cur:
                    cur.execute("SELECT 1")

        threads = [threading.Thread(target=reads) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert endpoint.value("db_client_connection_wait_time_seconds_count") == 40
        assert endpoint.value("db_client_connection_use_time_seconds_count") == 40

        # 2. Exhaustion: both connections held, a third caller queues, then times out.
        holding = threading.Barrier(3)
        release = threading.Event()
        outcome: list[str] = []

        def hold() -> None:
            with get_connection():
                holding.wait(10)
                release.wait(20)

        def third() -> None:
            try:
                with get_cursor() as cur:
                    cur.execute("SELECT 1")
                outcome.append("served")
            except PoolExhaustedError:
                outcome.append("timed out")

        holders = [threading.Thread(target=hold) for _ in range(2)]
        for t in holders:
            t.start()
        holding.wait(10)
        waiter = threading.Thread(target=third)
        waiter.start()
        wait_for(lambda: snapshot().pending_requests == 1)
        assert endpoint.value("db_client_connection_count", state="used") == 2
        assert endpoint.value("db_client_connection_count", state="idle") == 0
        assert endpoint.value("db_client_connection_pending_requests") == 1
        waiter.join(30)
        assert outcome == ["timed out"]
        assert endpoint.value("db_client_connection_timeouts_total") == 1
        assert endpoint.value("db_client_connection_pending_requests") == 0
        release.set()
        for t in holders:
            t.join(30)

        # 3. Connection failures: drain() while the provider fails, then recovery.
        failing.set()
        pool.drain()
        wait_for(lambda: snapshot().connection_errors >= 2)
        failing.clear()
        wait_for(lambda: snapshot().idle == 2, timeout=30)

        final = endpoint.scrape()

        def at(name: str, **labels: str) -> float:
            return final[(name, frozenset({**LABELS, **labels}.items()))]

        assert at("db_client_connection_count", state="idle") == 2
        assert at("db_client_connection_count", state="used") == 0
        assert at("precog_db_connection_errors_total") >= 2
        assert at("db_client_connection_timeouts_total") == 1
        # 40 reads and the 2 holders obtained a connection; the timed-out caller did not.
        assert at("db_client_connection_wait_time_seconds_count") == 42
        assert at("db_client_connection_use_time_seconds_count") == 42
        # Two connections at open, two more after the drain.
        assert at("db_client_connection_create_time_seconds_count") == 4
        assert at("db_client_connection_create_time_seconds_sum") > 0
        # The holders kept their connections while the third caller waited: use_time shows it.
        assert at("db_client_connection_use_time_seconds_sum") >= 2 * 1.5
        for histogram in ("wait_time", "use_time", "create_time"):
            name = f"db_client_connection_{histogram}_seconds"
            buckets = sorted(
                (float(dict(labels)["le"]), value)
                for (sample, labels), value in final.items()
                if sample == f"{name}_bucket"
            )
            counts = [value for _, value in buckets]
            assert counts == sorted(counts), f"{name} buckets are cumulative"
            assert buckets[-1] == (float("inf"), at(f"{name}_count"))


class TestSnapshot:
    def test_points_use_the_opentelemetry_names_and_attributes(self, pg_server: Server, test_db: str) -> None:
        """pool_metrics() gives every OpenTelemetry db-client pool metric, labelled with pool name and environment."""
        assert pool_metrics() == ()
        initialize_pool(settings=pg_server.settings(test_db, pool_min=1, pool_max=3))
        get_pool().wait(timeout=10)
        with get_cursor() as cur:
            cur.execute("SELECT 1")
            inside = snapshot()
        points = snapshot().points()
        names = {p.name for p in points}
        assert names == {
            "db.client.connection.count",
            "db.client.connection.idle.min",
            "db.client.connection.max",
            "db.client.connection.pending_requests",
            "db.client.connection.timeouts",
            "db.client.connection.wait_time",
            "db.client.connection.use_time",
            "db.client.connection.create_time",
            "precog_db.connection.errors",
        }
        for point in points:
            assert point.attributes["db.client.connection.pool.name"] == "precog-test"
            assert point.attributes["deployment.environment.name"] == "test"
        states = {p.attributes.get("db.client.connection.state"): p.value for p in points if p.name.endswith(".count")}
        assert states == {"idle": 1, "used": 0}
        assert inside.used == 1 and inside.idle == 0
        assert (inside.min, inside.max) == (1, 3)
        assert {p.unit for p in points if p.kind == "histogram"} == {"s"}

    def test_samples_are_folded_by_a_pool_worker_without_a_snapshot(self, pg_server: Server, test_db: str) -> None:
        """Past FOLD_AT returned blocks a pool worker folds the samples, so memory stays bounded with no scraper."""
        from precog_db.metrics import FOLD_AT

        initialize_pool(settings=pg_server.settings(test_db, pool_min=1, pool_max=1))
        pool = get_pool()
        pool.wait(timeout=10)
        blocks = FOLD_AT + 10
        for _ in range(blocks):
            with get_cursor():
                pass
        wait_for(lambda: len(pool.metrics.returns) < FOLD_AT)
        assert snapshot().use_time.count == blocks
        assert snapshot().wait_time.count == blocks

    def test_a_named_pool_reports_under_its_name(self, pg_server: Server, test_db: str) -> None:
        """A pool opened with name= is labelled with that name, so two pools of one environment stay apart."""
        initialize_pool(settings=pg_server.settings(test_db, pool_min=1, pool_max=1), name="orders")
        assert snapshot().pool_name == "orders"
        assert snapshot().attributes["db.client.connection.pool.name"] == "orders"

    def test_closed_pool_is_left_out(self, pg_server: Server, test_db: str) -> None:
        """After close_pool() the pool no longer appears in pool_metrics()."""
        from precog_db import close_pool

        initialize_pool(settings=pg_server.settings(test_db, pool_min=1, pool_max=1))
        assert len(pool_metrics()) == 1
        close_pool()
        assert pool_metrics() == ()

    def test_register_without_prometheus_client_says_which_extra(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Without prometheus_client installed, register_prometheus names the extra to install."""
        monkeypatch.setitem(sys.modules, "prometheus_client", None)
        with pytest.raises(ConfigurationError, match=r"precog-db\[prometheus\]"):
            register_prometheus()
