"""Fewer round trips for ``get_cursor(commit=True)``: libpq pipeline mode, used inside the block.

Two mechanisms (docs/DESIGN.md "Committed writes in fewer round trips"), in
both layers (`precog_db.cursors`, `precog_db.aio`):

* **BEGIN with the first statement** (every ``commit=True`` block): the block
  sends no ``BEGIN`` when it is entered. The cursor it hands out is a
  `FirstStatementCursor` (`AsyncFirstStatementCursor`); its first ``execute`` /
  ``executemany`` enters pipeline mode, queues ``BEGIN READ WRITE`` and the
  statement, and syncs once, so both cost one round trip. The call waits for
  both replies before it returns: an error is raised by the ``execute`` that
  caused it, and the results are there for ``fetch*`` exactly as before. Later
  statements and the ``COMMIT`` run as before. Anything that cannot be
  pipelined safely (a statement string holding several statements, ``COPY``,
  ``stream``, a server cursor, anything run through ``cur.connection``) first
  gets a plain ``BEGIN`` of its own, as before this change: the block marks
  its connection (``_precog.pending_begin``), the cursor's first statement
  takes the mark, and any other I/O meets it in the connection's ``wait``
  (`PrecogConnection` / `AsyncPrecogConnection`), which sends the ``BEGIN``
  first. One design in both layers.
* **pipeline=True** (opt-in): `PipelinedBlock` (`AsyncPipelinedBlock`) queues
  ``BEGIN``, every statement and the ``COMMIT`` and syncs once at the end of the
  block; a ``fetch*`` waits for the results queued so far (a flush, no sync).
  Errors surface late: see the ``get_cursor`` docstring and docs/DESIGN.md.

The code is written once (docs/DESIGN.md, "Sync and async from one source"):
the decisions and psycopg generators in `precog_db._pipeline_base` (no I/O),
the I/O in the asyncio source `precog_db._pipeline_async`, from which
`precog_db._pipeline_sync` is generated. This module re-exports both layers'
names.

The pipeline is psycopg's, with its I/O moved to one place (`QueueingPipeline`):
psycopg writes and polls once per queued message, this one buffers every
message in libpq and writes them all at the sync, then waits once. That is
what makes the saved round trip cheaper than the one it saves
(docs/PERFORMANCE.md).

Safety: while a pipeline is being synced the connection's ``_precog.busy`` flag
is set (`precog_db.session`), so an interrupt raised by a signal handler (or a
cancellation) in the middle leaves the connection marked and the pool closes it
instead of lending it again; a connection still in pipeline mode (``_pipeline``
set) is never lent either. The waits go through ``Connection.wait``, so the
reply bound of `precog_db.connection.PrecogConnection` covers them.

The psycopg internals used here (the pipelines' generators, the cursors' ``_execute_gen``, the
connection's ``_pipeline`` ...) are declared in `precog_db._compat` (checked by tests/test_compat.py).
A ``Transaction`` is entered directly (not through ``conn.transaction()``,
which would sync the pipeline at ``BEGIN``).
"""

from __future__ import annotations

from precog_db._pipeline_async import AsyncFirstStatementCursor, AsyncPipelinedBlock, AsyncQueueingPipeline
from precog_db._pipeline_base import SUPPORTED
from precog_db._pipeline_base import Queueing as _Queueing
from precog_db._pipeline_base import exit_mode as _exit_mode
from precog_db._pipeline_sync import FirstStatementCursor, PipelinedBlock, QueueingPipeline

__all__ = [
    "SUPPORTED",
    "AsyncFirstStatementCursor",
    "AsyncPipelinedBlock",
    "AsyncQueueingPipeline",
    "FirstStatementCursor",
    "PipelinedBlock",
    "QueueingPipeline",
    "_Queueing",
    "_exit_mode",
]
