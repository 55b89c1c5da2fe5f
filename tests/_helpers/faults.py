"""Helpers for the fault-injection tests (test helper, not shipped).

* `own_server` starts a throwaway cluster that one test may stop, restart or
  reconfigure, with a ``precog_test`` database, and destroys it afterwards;
* `Workload` runs a bounded multi-thread loop of `get_cursor` calls and
  records every call's start, end and outcome;
* `report` prints a measured result and, when ``RELIABILITY_REPORT`` names a
  file, appends it there as a JSON line (docs/RELIABILITY.md quotes them).
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from precog_db import get_pool
from tests._helpers.server import Server, start_throwaway_cluster

APP = "precog-test"


@contextlib.contextmanager
def own_server(**server_options: str) -> Iterator[Server]:
    """A throwaway cluster with a ``precog_test`` database, for one test."""
    cluster = start_throwaway_cluster(**server_options)
    try:
        server = Server(
            host=cluster.host, port=cluster.port, user="postgres", password="", admin_db="postgres", cluster=cluster
        )
        server.fresh_database("precog_test")
        yield server
    finally:
        cluster.destroy()


def report(scenario: str, **values: Any) -> None:
    """Print a measured result (visible with -s) and append it to $RELIABILITY_REPORT if set."""
    line = json.dumps({"scenario": scenario, **values}, sort_keys=True, default=str)
    print(f"\nRELIABILITY {line}")
    target = os.environ.get("RELIABILITY_REPORT", "").strip()
    if target:
        with open(target, "a", encoding="utf-8") as fh:
            fh.write(line + "\n")


@dataclass
class Call:
    """One call made by a workload thread."""

    thread: int
    started: float
    ended: float
    outcome: str  # "ok" or the exception class name
    error: BaseException | None = None
    payload: Any = None

    @property
    def duration(self) -> float:
        return self.ended - self.started


@dataclass
class Workload:
    """Run ``body(thread_index, sequence)`` in a loop on several threads until stopped (bounded)."""

    body: Callable[[int, int], Any]
    threads: int = 4
    max_seconds: float = 60.0
    pause: float = 0.0
    calls: list[Call] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _workers: list[threading.Thread] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> Workload:
        deadline = time.monotonic() + self.max_seconds
        for index in range(self.threads):
            worker = threading.Thread(target=self._run, args=(index, deadline), daemon=True, name=f"load-{index}")
            self._workers.append(worker)
            worker.start()
        return self

    def _run(self, index: int, deadline: float) -> None:
        sequence = 0
        while not self._stop.is_set() and time.monotonic() < deadline:
            sequence += 1
            started = time.monotonic()
            try:
                payload = self.body(index, sequence)
            except Exception as exc:
                call = Call(index, started, time.monotonic(), type(exc).__name__, exc)
            else:
                call = Call(index, started, time.monotonic(), "ok", payload=payload)
            with self._lock:
                self.calls.append(call)
            if self.pause:
                time.sleep(self.pause)

    def stop(self, join_timeout: float = 30.0) -> list[str]:
        """Stop the threads; return the names of those that did not finish within ``join_timeout`` (hung)."""
        self._stop.set()
        hung = []
        for worker in self._workers:
            worker.join(join_timeout)
            if worker.is_alive():
                hung.append(worker.name)
        return hung

    def wait_for_successes(self, after: float, per_thread: int, timeout: float) -> bool:
        """Wait until every thread has ``per_thread`` successful calls that started after ``after``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                counts = Counter(c.thread for c in self.calls if c.outcome == "ok" and c.started >= after)
            if all(counts[i] >= per_thread for i in range(self.threads)):
                return True
            time.sleep(0.05)
        return False

    def outcomes(self, since: float = 0.0) -> Counter[str]:
        with self._lock:
            return Counter(c.outcome for c in self.calls if c.started >= since)

    def failures(self) -> list[Call]:
        with self._lock:
            return [c for c in self.calls if c.outcome != "ok"]


def pool_sessions(server: Server, dbname: str = "precog_test") -> list[tuple[int, str]]:
    """(pid, state) of every server session the pool has open on ``dbname``."""
    with server.connect() as admin:
        rows = admin.execute(
            "SELECT pid, state FROM pg_stat_activity WHERE datname = %s AND application_name = %s",
            (dbname, APP),
        ).fetchall()
    return [(int(r[0]), str(r[1])) for r in rows]


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    """Poll ``predicate`` until it is true or ``timeout`` seconds passed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def settled_pool_stats(timeout: float = 10.0) -> dict[str, int]:
    """Pool stats once the background workers have refilled it (pool_available == pool_size)."""
    pool = get_pool()
    wait_until(lambda: pool.get_stats().get("pool_available", 0) >= pool.min_size, timeout)
    return dict(pool.get_stats())
