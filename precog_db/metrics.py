"""Pool metrics under the OpenTelemetry database-client names, and an optional Prometheus collector.

Each pool owns a `PoolRecorder`. The pool tells it what happened (a
connection created or refused, a caller that waited or timed out, a
connection given back after some use) and hands it a function that reads
the pool's current state (idle, used, pending, min, max) when a snapshot is
taken. The recorder knows nothing of the pool's class, so the async pool
reports through the same code and names.

`pool_metrics()` returns one `PoolSnapshot` per open pool of the process.
`PoolSnapshot.points()` gives each value under its OpenTelemetry name
(``db.client.connection.count`` with ``db.client.connection.state`` ``idle`` /
``used``, ``db.client.connection.pending_requests``,
``db.client.connection.timeouts``, ``db.client.connection.wait_time``,
``db.client.connection.use_time``, ``db.client.connection.create_time``,
``db.client.connection.idle.min``, ``db.client.connection.max``, and
``precog_db.connection.errors``, which the conventions do not define), with the
pool name and the environment as attributes.

`register_prometheus` (the ``precog-db[prometheus]`` extra) exposes the same
snapshot to ``prometheus_client`` under the OpenTelemetry-to-Prometheus names:
dots become underscores, histograms in seconds end in ``_seconds``, counters in
``_total`` (``db_client_connection_count{state="idle"}``,
``db_client_connection_timeouts_total``,
``db_client_connection_wait_time_seconds_bucket`` …). docs/OPERATIONS.md lists
them with what to alert on.

Cost: the read path adds one clock read and one attribute store at checkout
and one short lock-protected histogram update at checkin (bench/ measures it:
docs/PERFORMANCE.md). Connections counted as used are read at snapshot time,
not counted on the hot path.
"""

from __future__ import annotations

import threading
import weakref
from bisect import bisect_left
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from time import monotonic
from typing import Any, NamedTuple

__all__ = [
    "BUCKETS",
    "FOLD_AT",
    "HistogramSnapshot",
    "MetricPoint",
    "PoolRecorder",
    "PoolSnapshot",
    "PoolState",
    "pool_metrics",
    "register_prometheus",
]

#: Upper bounds, in seconds, of the histogram buckets (one more bucket counts everything above).
BUCKETS: tuple[float, ...] = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip

#: Returned-connection samples kept before the recorder folds them into its histograms.
FOLD_AT = 4096

#: OpenTelemetry attribute names.
POOL_NAME = "db.client.connection.pool.name"
STATE = "db.client.connection.state"
ENVIRONMENT = "deployment.environment.name"


class PoolState(NamedTuple):
    """What a pool reports about itself when a snapshot is taken."""

    idle: int
    used: int
    pending_requests: int
    min: int
    max: int


@dataclass(frozen=True)
class HistogramSnapshot:
    """A histogram in seconds: per-bucket counts (not cumulative; the last one is above `BUCKETS`), count, sum."""

    bounds: tuple[float, ...]
    counts: tuple[int, ...]
    count: int
    sum: float

    def cumulative(self) -> list[tuple[float, int]]:
        """(upper bound, observations at or below it) for every bound and ``inf``, as Prometheus buckets are."""
        out: list[tuple[float, int]] = []
        total = 0
        for bound, n in zip((*self.bounds, float("inf")), self.counts, strict=True):
            total += n
            out.append((bound, total))
        return out


class MetricPoint(NamedTuple):
    """One value under its OpenTelemetry name."""

    name: str
    kind: str  # "gauge" (an UpDownCounter's current value), "counter" or "histogram"
    unit: str
    description: str
    attributes: dict[str, str]
    value: int | float | HistogramSnapshot


@dataclass(frozen=True)
class PoolSnapshot:
    """One pool's metrics at one moment (`pool_metrics`)."""

    pool_name: str
    environment: str
    idle: int
    used: int
    pending_requests: int
    min: int
    max: int
    timeouts: int
    connection_errors: int
    wait_time: HistogramSnapshot
    use_time: HistogramSnapshot
    create_time: HistogramSnapshot

    @property
    def attributes(self) -> dict[str, str]:
        """The attributes every point of this pool carries."""
        return {POOL_NAME: self.pool_name, ENVIRONMENT: self.environment}

    def points(self) -> list[MetricPoint]:
        """Every value of the snapshot under its OpenTelemetry semantic-convention name."""
        a = self.attributes
        conn = "{connection}"
        return [
            MetricPoint(
                "db.client.connection.count", "gauge", conn, _DOC["count"], {**a, STATE: "idle"}, self.idle
            ),
            MetricPoint(
                "db.client.connection.count", "gauge", conn, _DOC["count"], {**a, STATE: "used"}, self.used
            ),
            MetricPoint("db.client.connection.idle.min", "gauge", conn, _DOC["min"], a, self.min),
            MetricPoint("db.client.connection.max", "gauge", conn, _DOC["max"], a, self.max),
            MetricPoint(
                "db.client.connection.pending_requests", "gauge", "{request}", _DOC["pending"], a,
                self.pending_requests,
            ),
            MetricPoint("db.client.connection.timeouts", "counter", "{timeout}", _DOC["timeouts"], a, self.timeouts),
            MetricPoint(
                "precog_db.connection.errors", "counter", "{error}", _DOC["errors"], a, self.connection_errors
            ),
            MetricPoint("db.client.connection.wait_time", "histogram", "s", _DOC["wait"], a, self.wait_time),
            MetricPoint("db.client.connection.use_time", "histogram", "s", _DOC["use"], a, self.use_time),
            MetricPoint("db.client.connection.create_time", "histogram", "s", _DOC["create"], a, self.create_time),
        ]  # fmt: skip


_DOC = {
    "count": "The number of connections that are currently in the state described by the state attribute",
    "min": "The minimum number of idle open connections the pool keeps",
    "max": "The maximum number of open connections allowed",
    "pending": "The number of callers waiting for an open connection",
    "timeouts": "The number of callers that timed out waiting for a connection",
    "errors": "The number of failed attempts to open a connection (unreachable server, refused credentials, ...)",
    "wait": "The time it took to obtain an open connection from the pool",
    "use": "The time between borrowing a connection and returning it to the pool",
    "create": "The time it took to create a new connection",
}


class _Histogram:
    """Bucket counts and a sum; updated under the recorder's lock."""

    __slots__ = ("counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)
        self.sum = 0.0

    def snapshot(self) -> HistogramSnapshot:
        return HistogramSnapshot(BUCKETS, tuple(self.counts), sum(self.counts), self.sum)


class PoolRecorder:
    """What one pool records for `pool_metrics`; the pool calls it, it never calls the pool except through ``state``.

    ``state`` returns the pool's `PoolState`, or None once the pool is closed
    (a closed pool is left out of `pool_metrics`). Every method is thread-safe.

    The read path only appends to `returns` (one atomic ``deque.append`` of
    ``(lent_at, returned_at)``, monotonic seconds; ``lent_at`` negative when the
    caller queued, whose wait `waited` already recorded, positive when it was
    lent at once, which counts as a wait of 0). `fold` turns the samples into
    histogram counts: at every snapshot, and when `FOLD_AT` are pending
    (``fold_soon``, e.g. in a pool worker; without one, right away).
    """

    def __init__(
        self,
        pool_name: str,
        environment: str,
        state: Callable[[], PoolState | None],
        *,
        fold_soon: Callable[[], None] | None = None,
    ) -> None:
        self.pool_name = pool_name
        self.environment = environment
        self._state = state
        self._fold_soon = fold_soon
        self._fold_requested = False
        self.returns: deque[tuple[float, float]] = deque()
        self._lock = threading.Lock()
        self._wait = _Histogram()
        self._use = _Histogram()
        self._create = _Histogram()
        self._timeouts = 0
        self._errors = 0
        with _REGISTRY_LOCK:
            _RECORDERS[next(_ORDER)] = self

    def returned(self, lent_at: float, waited: bool) -> None:
        """A connection lent at ``lent_at`` (monotonic) came back now; ``waited`` False: it was lent at once."""
        self.returns.append((-lent_at if waited else lent_at, monotonic()))
        if len(self.returns) >= FOLD_AT:
            self.fold_soon()

    def fold_soon(self) -> None:
        """Ask for a `fold` (once until it ran): through ``fold_soon`` if given, else now.

        Asked again past twice `FOLD_AT` pending samples, in case a request was
        lost (an interrupt between setting the flag and queueing the task).
        """
        if self._fold_requested and len(self.returns) < 2 * FOLD_AT:
            return
        self._fold_requested = True
        if self._fold_soon is None:
            self.fold()
        else:
            self._fold_soon()

    def fold(self) -> None:
        """Move the pending `returns` samples into the use-time (and zero wait-time) histograms."""
        returns = self.returns
        with self._lock:
            self._fold_requested = False
            use = self._use
            counts = use.counts
            zero_waits = 0
            total = 0.0
            for _ in range(len(returns)):
                try:
                    lent_at, back = returns.popleft()
                except IndexError:
                    break
                if lent_at >= 0:
                    zero_waits += 1
                    used = back - lent_at
                else:
                    used = back + lent_at
                counts[bisect_left(BUCKETS, used)] += 1
                total += used
            use.sum += total
            self._wait.counts[0] += zero_waits

    def waited(self, seconds: float) -> None:
        """A caller obtained a connection after queueing (or through a ``check`` callback) for ``seconds``."""
        with self._lock:
            wait = self._wait
            wait.counts[bisect_left(BUCKETS, seconds)] += 1
            wait.sum += seconds

    def timed_out(self) -> None:
        """A caller gave up waiting for a connection."""
        with self._lock:
            self._timeouts += 1

    def created(self, seconds: float) -> None:
        """A new connection was opened (and set up) in ``seconds``."""
        with self._lock:
            create = self._create
            create.counts[bisect_left(BUCKETS, seconds)] += 1
            create.sum += seconds

    def connection_failed(self) -> None:
        """An attempt to open a connection failed."""
        with self._lock:
            self._errors += 1

    def snapshot(self) -> PoolSnapshot | None:
        """The current metrics, or None if the pool is closed."""
        state = self._state()
        if state is None:
            return None
        self.fold()
        with self._lock:
            return PoolSnapshot(
                pool_name=self.pool_name,
                environment=self.environment,
                idle=state.idle,
                used=state.used,
                pending_requests=state.pending_requests,
                min=state.min,
                max=state.max,
                timeouts=self._timeouts,
                connection_errors=self._errors,
                wait_time=self._wait.snapshot(),
                use_time=self._use.snapshot(),
                create_time=self._create.snapshot(),
            )


_REGISTRY_LOCK = threading.Lock()
#: Every recorder alive, in creation order; a pool that is gone takes its recorder with it.
_RECORDERS: weakref.WeakValueDictionary[int, PoolRecorder] = weakref.WeakValueDictionary()
_ORDER = iter(range(1 << 62))


def pool_metrics() -> tuple[PoolSnapshot, ...]:
    """A snapshot of every open precog_db pool in this process (usually one: the process-wide pool).

    Empty when no pool is open. `PoolSnapshot.points` lists the values under
    their OpenTelemetry names; `register_prometheus` exposes them to Prometheus.
    """
    with _REGISTRY_LOCK:
        recorders = [r for _, r in sorted(_RECORDERS.items())]
    snapshots = (r.snapshot() for r in recorders)
    return tuple(s for s in snapshots if s is not None)


# --- Prometheus ----------------------------------------------------------------------------------

#: OpenTelemetry name -> Prometheus name (dots to underscores; seconds histograms ``_seconds``;
#: prometheus_client appends ``_total`` to counters and ``_bucket``/``_sum``/``_count`` to histograms).
PROMETHEUS_NAMES = {
    "db.client.connection.count": "db_client_connection_count",
    "db.client.connection.idle.min": "db_client_connection_idle_min",
    "db.client.connection.max": "db_client_connection_max",
    "db.client.connection.pending_requests": "db_client_connection_pending_requests",
    "db.client.connection.timeouts": "db_client_connection_timeouts",
    "precog_db.connection.errors": "precog_db_connection_errors",
    "db.client.connection.wait_time": "db_client_connection_wait_time_seconds",
    "db.client.connection.use_time": "db_client_connection_use_time_seconds",
    "db.client.connection.create_time": "db_client_connection_create_time_seconds",
}
#: OpenTelemetry attribute -> Prometheus label.
PROMETHEUS_LABELS = {POOL_NAME: "pool_name", ENVIRONMENT: "environment", STATE: "state"}

_REGISTERED: dict[int, Any] = {}


class _Collector:
    """A ``prometheus_client`` custom collector reading `pool_metrics()` at each scrape."""

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        families: dict[str, Any] = {}
        for snapshot in pool_metrics():
            for point in snapshot.points():
                name = PROMETHEUS_NAMES[point.name]
                labels = [PROMETHEUS_LABELS[k] for k in point.attributes]
                family = families.get(name)
                if family is None:
                    kind = {"gauge": GaugeMetricFamily, "counter": CounterMetricFamily}.get(
                        point.kind, HistogramMetricFamily
                    )
                    family = families[name] = kind(name, point.description, labels=labels)
                values = list(point.attributes.values())
                if isinstance(point.value, HistogramSnapshot):
                    buckets = [(_le(bound), float(n)) for bound, n in point.value.cumulative()]
                    family.add_metric(values, buckets, point.value.sum)
                else:
                    family.add_metric(values, point.value)
        yield from families.values()

    def describe(self) -> list[Any]:
        # No description up front: the registry then does not call collect() at registration.
        return []


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(bound)


def register_prometheus(registry: Any = None) -> Any:
    """Expose `pool_metrics()` to Prometheus through ``registry`` (default: ``prometheus_client.REGISTRY``).

    Needs the ``precog-db[prometheus]`` extra. Idempotent per registry; returns
    the collector (``registry.unregister(collector)`` removes it). Serve it as
    usual, e.g. ``prometheus_client.start_http_server(9102)``.
    """
    try:
        import prometheus_client
    except ImportError:
        from precog_db.errors import ConfigurationError

        raise ConfigurationError(
            "register_prometheus needs prometheus_client; install the extra: pip install 'precog-db[prometheus]'"
        ) from None
    target = prometheus_client.REGISTRY if registry is None else registry
    with _REGISTRY_LOCK:
        existing = _REGISTERED.get(id(target))
        if existing is not None and existing[0] is target:
            return existing[1]
        collector = _Collector()
        target.register(collector)
        _REGISTERED[id(target)] = (target, collector)
        return collector
