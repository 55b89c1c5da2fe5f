"""Read replicas: where `get_cursor(replica=True)` reads, in both layers (docs/TOPOLOGY.md).

``DB_REPLICA_HOSTS`` lists streaming standbys, ``host[:port]`` each. Each gets
its own pool (a `PrecogPool`, or an `AsyncPrecogPool` for `precog_db.aio`),
opened on first use and closed with the writer pool; its connections pass the
same chokepoint (naming rule, gate, production guard, reply bound, identity
stamp: a physical standby carries the primary's stamp).

A read goes to the first replica that is

* **fresh enough**: its replay lag, checked at most every `CHECK_INTERVAL`
  seconds with one query on the replica, is at most ``DB_REPLICA_MAX_LAG_MS``
  (a replica that has replayed everything it received lags 0, however long
  ago the last write was);
* **caught up with this thread's or task's own writes**: after a
  ``get_cursor(commit=True)`` block commits, the next replica read in the same
  thread or asyncio task (a `contextvars.ContextVar`) first asks the primary
  for its WAL insert position (one round trip) and uses a replica only once
  it has replayed that far (known from the last check, or one more query);
  otherwise it reads from the primary. No sleep, no waiting: the primary is
  always a correct answer. Other threads and tasks are not held back.

A replica that is not in recovery (promoted while in use) is left alone like
one that cannot be reached: its data is no longer the primary's.
A replica with no WAL receiver (cut off from its primary) counts the age of
its last replayed transaction as its lag: it cannot know what it is missing.

Never a replica: ``commit=True`` blocks (refused), anything inside a
`dangerous_operation` gate, migrations, backups, restores and the stamp (they
open their own direct connections and never look at the replicas).

Written once for both layers: the decisions in `precog_db._replica_state`,
the I/O in `precog_db._replicas_async`, from which `precog_db._replicas_sync`
(the `choose` below) is generated. `precog_db.aio` uses the asyncio `choose`.
"""

from __future__ import annotations

from precog_db._replica_state import CHECK_INTERVAL as CHECK_INTERVAL
from precog_db._replica_state import RETRY_AFTER as RETRY_AFTER
from precog_db._replica_state import note_commit as note_commit
from precog_db._replica_state import replica_settings as replica_settings
from precog_db._replicas_sync import Replica as Replica
from precog_db._replicas_sync import choose as choose

__all__ = ["CHECK_INTERVAL", "RETRY_AFTER", "choose", "note_commit", "replica_settings"]
