"""The sync pool under threads (the scenarios both layers share: tests/test_pool_common_async.py).

Opening, idempotence, the production guard, dead connections, exhaustion, pool
arguments and statistics run over both layers from one source in
tests/test_pool_common_async.py (generating tests/test_pool_common.py).
"""

from __future__ import annotations

import threading

from precog_db import initialize_pool
from precog_db.settings import DatabaseSettings


class TestOpening:
    def test_thread_safe_initialization(self, test_settings: DatabaseSettings) -> None:
        """Concurrent initializations produce exactly one pool."""
        pools = []
        barrier = threading.Barrier(8)

        def init() -> None:
            barrier.wait()
            pools.append(initialize_pool(settings=test_settings))

        threads = [threading.Thread(target=init) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(pools) == 8 and len({id(p) for p in pools}) == 1
