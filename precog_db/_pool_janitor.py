"""The sync pool's janitor: maintenance asked for from the main thread, passed on from a thread of its own.

psycopg_pool queues maintenance work with queue.Queue.put and sched.scheduler.enter, which
take Python-level locks. A signal handler that raises in the main thread (KeyboardInterrupt,
a job runner's SIGALRM timeout) can fire just after such a lock was acquired inside
Condition.__enter__, before any `with` owns it: the lock then stays held forever and every
pool worker deadlocks on its next get (seen in tests/test_interrupts.py). So the main thread
never touches those queues: it puts the request on a SimpleQueue (one C call, no Python
lock) and the pool's janitor thread, where no signal handler runs, passes it on.

`Janitor` is that half of `precog_db.pool.PrecogPool`, with the maintenance
hooks that count the retries of failed connection attempts (`PoolBase._retry_scheduled`).
"""

from __future__ import annotations

import queue
import threading
import weakref
from typing import Any

from psycopg import Connection
from psycopg_pool import ConnectionPool

from precog_db._compat import AddConnection, AttemptWithBackoff, MaintenanceTask
from precog_db._pool_base import PoolBase
from precog_db.log import get_logger

log = get_logger()

_MAIN_THREAD = threading.main_thread()


def _janitor_loop(
    pool_ref: weakref.ReferenceType[Janitor],
    deferred: queue.SimpleQueue[tuple[MaintenanceTask, float | None] | None],
) -> None:
    """The janitor thread of a `PrecogPool`: pass the main thread's maintenance requests on to psycopg_pool.

    Holds the pool only while passing one request on, so that a pool dropped without close() can be collected.
    """
    while (item := deferred.get()) is not None:
        pool = pool_ref()
        if pool is None:
            return
        task, delay = item
        try:
            if delay is None:
                pool.run_task(task)
            else:
                pool.schedule_task(task, delay)
        except Exception as exc:  # never let one request stop the janitor
            log.warning("pool_maintenance_request_failed", pool=pool.name, error=type(exc).__name__)
        del pool


class _FoldMetrics(MaintenanceTask):
    """Fold the returned-connection samples into the metrics histograms (in a pool worker, off the read path)."""

    def _run(self, pool: ConnectionPool[Any]) -> None:
        assert isinstance(pool, PoolBase)
        pool.metrics.fold()


class Janitor(PoolBase, ConnectionPool[Connection[Any]]):
    """The maintenance half of `precog_db.pool.PrecogPool` (see the module docstring)."""

    def _init_janitor(self) -> None:
        """Before psycopg_pool's constructor: the request queue, no thread yet (`open` starts it)."""
        self._retries_lock = threading.Lock()
        #: Maintenance work asked for from the main thread, passed on by the janitor thread (see `run_task`).
        self._deferred: queue.SimpleQueue[tuple[MaintenanceTask, float | None] | None] = queue.SimpleQueue()
        self._janitor: threading.Thread | None = None

    def open(self, wait: bool = False, timeout: float = 30.0) -> None:
        """Open the pool (psycopg_pool's `open`), after starting the janitor thread."""
        if self._janitor is None or not self._janitor.is_alive():
            # The thread holds only a weak reference to the pool: a pool dropped without close() is
            # collected (its __del__ stops the janitor and psycopg_pool's workers), as psycopg_pool's is.
            self._janitor = threading.Thread(
                target=_janitor_loop, args=(weakref.ref(self), self._deferred), name=f"{self.name}-janitor", daemon=True
            )
            self._janitor.start()
        super().open(wait=wait, timeout=timeout)

    def __del__(self) -> None:
        # Collected without close(): stop the janitor, and let psycopg_pool's finalizer stop its workers
        # directly (the janitor that would pass its requests on is gone).
        deferred = getattr(self, "_deferred", None)
        if deferred is not None:
            self._janitor = None
            deferred.put(None)
        super().__del__()

    def close(self, timeout: float = 5.0) -> None:
        """psycopg_pool's `close`, then stop the janitor thread."""
        try:
            super().close(timeout=timeout)
        finally:
            self._deferred.put(None)

    def _deferred_from_main_thread(self, task: MaintenanceTask, delay: float | None) -> bool:
        """Queue ``task`` for the janitor when called in the main thread; False: run it here."""
        if self._janitor is None or threading.current_thread() is not _MAIN_THREAD:
            return False
        self._deferred.put((task, delay))
        return True

    def run_task(self, task: MaintenanceTask) -> None:
        """psycopg_pool's `run_task`, handed over through the janitor when called in the main thread."""
        if not self._deferred_from_main_thread(task, None):
            super().run_task(task)

    def schedule_task(self, task: MaintenanceTask, delay: float) -> None:
        if self._deferred_from_main_thread(task, delay):
            return
        # psycopg_pool schedules an AddConnection only to retry a failed attempt (after the back-off).
        if isinstance(task, AddConnection):
            self._retry_scheduled()
        super().schedule_task(task, delay)

    def _add_connection(self, attempt: AttemptWithBackoff | None, growing: bool = False) -> None:
        if attempt is not None:  # a retry scheduled by schedule_task is running
            self._retry_started(attempt)
        super()._add_connection(attempt, growing=growing)

    def _fold_metrics_soon(self) -> None:
        self.run_task(_FoldMetrics(self))
