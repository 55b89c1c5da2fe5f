"""Issue 16 in the sync layer only: signal interrupts in pipelined blocks, and the psycopg internals used.

The scenarios both layers share (round trips on the wire, the deferred BEGIN,
pipeline=True, the silent path) are in tests/test_pipeline_common_async.py,
from which tests/test_pipeline_common.py is generated.
"""

from __future__ import annotations

import contextlib
import gc
import random
import time
from collections import Counter

import psycopg
import pytest

from precog_db import CommitOutcomeUnknownError, get_cursor, initialize_pool
from precog_db.settings import DatabaseSettings
from tests._helpers.server import Server
from tests.test_interrupts import _Alarm, _assert_every_connection_works, _JobTimeout

INSERT = "INSERT INTO pipe_items (id, qty) VALUES (%s, %s)"


@pytest.fixture
def table(pg_server: Server, test_db: str) -> str:
    with pg_server.connect(test_db) as admin:
        admin.execute("DROP TABLE IF EXISTS pipe_items")
        admin.execute("CREATE TABLE pipe_items (id int PRIMARY KEY, qty int NOT NULL CHECK (qty >= 0))")
        admin.execute("INSERT INTO pipe_items VALUES (0, 0)")
    return "pipe_items"


class TestInterrupts:
    # An alarm that lands in a finalizer (psycopg's Connection.__del__ for a retired connection, a gc
    # callback) cannot be raised there: CPython reports it as "unraisable" instead. That is a lost
    # interrupt, not a lost connection, and no code can prevent it; what these tests assert is that no
    # connection is lost or left tainted, so that report alone does not fail them.
    @pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
    def test_random_interrupts_in_pipelined_blocks_lose_nothing(
        self, test_settings: DatabaseSettings, table: str
    ) -> None:
        """Random SIGALRM interrupts in pipelined blocks surface as themselves (or an unknown COMMIT), lose nothing."""
        initialize_pool(settings=test_settings.replace(pool_min=2, pool_max=2, pool_timeout=2.0)).wait(timeout=10)
        rng = random.Random(16)
        outcomes: Counter[str] = Counter()
        deadline = time.monotonic() + 20
        # No garbage collection in the loop: a gc callback (hypothesis installs one) hit by the
        # alarm would report the interrupt as an unraisable exception instead of raising it here.
        with _Alarm(rng) as alarm, contextlib.ExitStack() as stack:
            gc.disable()
            stack.callback(gc.enable)
            for i in range(400):
                if time.monotonic() > deadline:
                    break
                try:
                    alarm.arm(0.002)
                    if i % 2:
                        with get_cursor(commit=True, pipeline=True) as cur:
                            for j in range(3):
                                cur.execute(INSERT, (10_000 + 3 * i + j, 1))
                    else:
                        with get_cursor(commit=True) as cur:
                            cur.execute(INSERT + " RETURNING id", (10_000 + 3 * i, 1))
                            cur.fetchone()
                    outcome = "ok"
                except (_JobTimeout, KeyboardInterrupt) as exc:
                    outcome = type(exc).__name__
                except CommitOutcomeUnknownError as exc:
                    # Landed while the COMMIT was in flight (issue 21.4): chained from the interrupt itself.
                    outcome = f"CommitOutcomeUnknownError from {type(exc.__cause__).__name__}"
                except psycopg.Error as exc:
                    outcome = type(exc).__name__
                finally:
                    alarm.armed = False
                    alarm.disarm()
                outcomes[outcome] += 1
        assert sum(alarm.fired.values()) >= 50, (alarm.fired, outcomes)
        assert outcomes["ok"] > 0, outcomes
        # Only the interrupts themselves (and a connection they broke) failed: no RuntimeError, no pool error.
        interrupts = {"_JobTimeout", "KeyboardInterrupt"}
        expected = {"ok", "OperationalError", *interrupts, *(f"CommitOutcomeUnknownError from {i}" for i in interrupts)}
        assert set(outcomes) <= expected, outcomes
        _assert_every_connection_works(2)
