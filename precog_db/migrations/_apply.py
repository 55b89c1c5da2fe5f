"""Apply and revert: run one file's up or down section and write or delete its ledger row with it.

A normal file runs in one transaction together with its ledger row
(`apply_migration`, `revert_migration`); a ``-- precog:no-transaction``
file runs in autocommit, statement by statement (`run_without_transaction`).
`downgrade` reverts newest first under the migration lock. Server errors are
reported with the line and column of the file.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import psycopg
from psycopg import Connection
from psycopg.pq import TransactionStatus
from psycopg.rows import tuple_row

from precog_db.errors import MigrationError, MigrationLockTimeoutError, MigrationValidationError
from precog_db.migrations._checks import plan_downgrade
from precog_db.migrations._files import MigrationFile, checksum_of, discover, text_of
from precog_db.migrations._ledger import LEDGER, RETURNING, AppliedMigration, applied_by, applied_from_row, read_ledger
from precog_db.migrations._lock import migration_lock
from precog_db.migrations._lockwatch import LockWatch
from precog_db.migrations._scanner import Statement, line_and_column, split_statements, transaction_control_problem
from precog_db.migrations._sections import DOWN_MARKER, marker_problem, sections

__all__ = ["apply_migration", "downgrade", "revert_migration", "run_without_transaction"]


def _read_checked(migration: MigrationFile, verb: str) -> str:
    """The file's text, after checking it is the file that was planned (same checksum) and controls no transaction."""
    try:
        raw = migration.path.read_bytes()
    except OSError as exc:
        raise MigrationError(f"{migration.path} cannot be read ({exc.strerror}); nothing of it was {verb}") from None
    if checksum_of(raw) != migration.checksum:
        raise MigrationError(
            f"{migration.path} changed while migrating; nothing of it was {verb}, run the command again"
        )
    body = text_of(raw)
    refusal = transaction_control_problem(migration, body) or marker_problem(migration, body)
    if refusal is not None:
        raise MigrationValidationError(f"{refusal}; nothing of it was {verb}")
    return body


def apply_migration(
    conn: Connection[Any],
    migration: MigrationFile,
    *,
    who: str | None = None,
    lock_timeout_ms: int = 0,
    observe: Callable[[psycopg.Cursor[Any]], None] | None = None,
    watch: Callable[[], Connection[Any]] | None = None,
) -> AppliedMigration:
    """Run one file's up part and record it. Raises `MigrationError` naming the file on failure.

    A normal file runs in one transaction together with its ledger row. A
    file that ends or starts its own transaction is refused before it runs
    (`find_transaction_control`); and whatever the file did, the ledger row
    is written only if the connection is still inside the very transaction
    the file started in (same transaction id, still in a transaction block),
    so a file is never recorded as applied when part of it was rolled back
    or committed on its own.

    A file whose first line is ``-- precog:no-transaction`` runs in
    autocommit, statement by statement (`run_without_transaction`), and is
    recorded only after every statement succeeded.

    ``lock_timeout_ms`` (``DB_MIGRATION_LOCK_TIMEOUT``; 0 = none) bounds each
    statement's wait for a lock; a statement that cannot get its lock in
    time raises `MigrationLockTimeoutError` naming the sessions that hold
    locks, after the rollback (nothing recorded).

    ``observe(cursor)`` (a normal file only) runs inside the file's
    transaction after its statements and before its ledger row, while the
    file's locks are still held (`precog_db.migrations.rehearse` reads them).

    ``watch`` (with ``lock_timeout_ms``) opens a second connection to the same
    database (through the chokepoint) from which a `LockWatch` observes what
    the file waits for; a lock timeout then names that lock and its blockers.
    """
    body = _read_checked(migration, "applied")
    parts = sections(body)
    started = time.monotonic()

    def record(cur: psycopg.Cursor[Any]) -> Any:
        duration_ms = int((time.monotonic() - started) * 1000)
        cur.execute(
            f"INSERT INTO {LEDGER} (version, name, checksum, kind, applied_by, duration_ms) "
            f"VALUES (%s, %s, %s, 'applied', %s, %s) {RETURNING}",
            (migration.version, migration.name, migration.checksum, who or applied_by(), duration_ms),
        )
        return cur.fetchone()

    if parts.no_transaction:
        if lock_timeout_ms:
            _set_lock_timeout(conn, lock_timeout_ms, local=False)  # undone by RESET ALL after the file
        row = run_without_transaction(conn, migration, body, 0, parts.up_end, record=record, verb="applied")
    else:
        row = _run_in_transaction(
            conn,
            migration,
            body,
            0,
            parts.up_end,
            record=record,
            verb="applied",
            lock_timeout_ms=lock_timeout_ms,
            observe=observe,
            watch=watch,
        )
    assert row is not None
    return applied_from_row(row)


def _run_in_transaction(
    conn: Connection[Any],
    migration: MigrationFile,
    body: str,
    start: int,
    end: int,
    *,
    record: Callable[[psycopg.Cursor[Any]], Any],
    verb: str,
    lock_timeout_ms: int = 0,
    observe: Callable[[psycopg.Cursor[Any]], None] | None = None,
    watch: Callable[[], Connection[Any]] | None = None,
) -> Any:
    """Run ``body[start:end]``, ``observe`` and then ``record`` in one transaction; ``record``'s result."""
    text = body[start:end]
    watcher = None
    if watch is not None and lock_timeout_ms:
        # First look after a quarter of the timeout (at most 0.2 s): a file that gets its locks at once costs nothing.
        watcher = LockWatch(watch, conn.info.backend_pid, delay=min(0.2, lock_timeout_ms / 4000))
    try:
        with contextlib.ExitStack() as stack:
            if watcher is not None:
                stack.enter_context(watcher)
            with conn.transaction(), conn.cursor(row_factory=tuple_row) as cur:
                if lock_timeout_ms:
                    _set_lock_timeout(conn, lock_timeout_ms, local=True)
                before = _transaction_id(cur)
                if text.strip():
                    cur.execute(text.encode("utf-8"))  # no parameters: simple protocol, several statements allowed
                status = conn.info.transaction_status
                if status != TransactionStatus.INTRANS or _transaction_id(cur) != before:
                    raise MigrationError(
                        f"{migration.path} ended the migration's transaction itself, so it was NOT recorded as "
                        f"{verb}: the statements before that point were committed or rolled back by the file, and "
                        "any after it may have been committed on their own. Check the database by hand, remove "
                        "the transaction control from the file, and run the command again"
                    )
                if observe is not None:
                    observe(cur)
                row = record(cur)
    except psycopg.errors.LockNotAvailable as exc:
        seen = watcher.last if watcher is not None else None
        blockers = seen.describe() if seen is not None else _lock_holders(conn)
        raise MigrationLockTimeoutError(
            f"{migration.filename} could not get its lock within lock_timeout {lock_timeout_ms} ms "
            f"(DB_MIGRATION_LOCK_TIMEOUT) and was rolled back, nothing recorded: {_describe(exc, body, start)}. "
            f"{blockers}. Wait for them to finish (or end them), or retry with --lock-retries N"
        ) from None
    except psycopg.Error as exc:
        if conn.broken:
            raise MigrationError(
                f"{migration.filename}: the connection was lost while it ran; PostgreSQL rolled the file "
                "back, so run the command again"
            ) from None
        raise MigrationError(
            f"{migration.filename} failed and was rolled back: {_describe(exc, body, start)}"
        ) from None
    return row


_INVALID_INDEXES = """
SELECT format('%I.%I', n.nspname, c.relname)
FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE NOT i.indisvalid ORDER BY 1
"""


def _invalid_indexes(conn: Connection[Any]) -> set[str]:
    with conn.cursor(row_factory=tuple_row) as cur:
        cur.execute(_INVALID_INDEXES)
        return {str(r[0]) for r in cur.fetchall()}


def run_without_transaction(
    conn: Connection[Any],
    migration: MigrationFile,
    body: str,
    start: int,
    end: int,
    *,
    record: Callable[[psycopg.Cursor[Any]], Any],
    verb: str = "applied",
) -> Any:
    """Run the statements of ``body[start:end]`` one by one in autocommit, then ``record``; ``record``'s result.

    For ``-- precog:no-transaction`` files (``CREATE INDEX CONCURRENTLY``,
    ``ALTER TYPE … ADD VALUE`` on old servers, ``VACUUM``). Each statement
    commits on its own, so nothing can be rolled back: when one fails, the
    `MigrationError` lists the statements that ran (committed), the one that
    failed and those that did not run, and ``record`` is not called (the file
    stays pending, or applied for a down section). An index a failed
    ``CREATE INDEX CONCURRENTLY`` left ``INVALID`` is named, with the
    ``DROP INDEX CONCURRENTLY`` that removes it. Session settings the file
    changed (``SET statement_timeout = 0`` for a long build) are undone
    afterwards (``RESET ALL``), so they do not leak into the next file. Each
    statement is bounded by ``DB_STATEMENT_TIMEOUT`` and the reply bound like
    any other. ``conn`` must be in autocommit mode and idle; the caller holds
    the migration lock (session-level, so it spans these transactions).
    """
    if not conn.autocommit or conn.info.transaction_status != TransactionStatus.IDLE:
        raise MigrationError(
            f"{migration.filename} runs outside a transaction (-- precog:no-transaction), which needs an idle "
            "autocommit connection; nothing of it was run"
        )
    statements = [Statement(st.start + start, st.end + start, st.words) for st in split_statements(body[start:end])]
    invalid_before = _invalid_indexes(conn)
    ran: list[Statement] = []
    failure: psycopg.Error | None = None
    failed: Statement | None = None
    with conn.cursor(row_factory=tuple_row) as cur:
        try:
            for statement in statements:
                failed = statement
                try:
                    cur.execute(statement.text(body).encode("utf-8"))
                except psycopg.Error as exc:
                    failure = exc
                    break
                ran.append(statement)
            if failure is None:
                try:
                    return record(cur)
                except psycopg.Error as exc:
                    detail = _describe(exc)
                raise MigrationError(
                    f"{migration.filename}: all {len(statements)} statement(s) ran and were committed, but "
                    f"recording it in the ledger failed ({detail}); record it by hand or run the command again "
                    "once the statements are idempotent"
                ) from None
        finally:
            if not conn.broken and not conn.closed:
                with contextlib.suppress(psycopg.Error):
                    cur.execute("RESET ALL")
    assert failed is not None and failure is not None
    index = statements.index(failed) + 1
    ran_text = (
        "statements that ran and stay committed: " + "; ".join(st.summary(body) for st in ran)
        if ran
        else "no statement before it ran"
    )
    rest = statements[index:]
    not_run = f"; not run: {len(rest)} statement(s) from {rest[0].summary(body)}" if rest else ""
    if conn.broken:
        cause = (
            f"the connection was lost during statement {index} of {len(statements)} ({failed.summary(body)}), "
            "which may or may not have completed"
        )
        invalid = ""
    else:
        cause = (
            f"statement {index} of {len(statements)} ({failed.summary(body)}) failed: "
            f"{_describe(failure, body, failed.start)}"
        )
        left = sorted(_invalid_indexes(conn) - invalid_before)
        invalid = "".join(
            f". Index {name} was left INVALID by the failed statement; remove it with: "
            f"DROP INDEX CONCURRENTLY IF EXISTS {name};"
            for name in left
        )
    state = "stays pending" if verb == "applied" else "stays applied"
    raise MigrationError(
        f"{migration.filename} (no-transaction) {cause}; {ran_text}{not_run}{invalid}. It was NOT recorded as "
        f"{verb} and {state}: undo or keep what ran (make those statements idempotent, e.g. IF NOT EXISTS), "
        "fix the cause, and run the command again"
    )


def _set_lock_timeout(conn: Connection[Any], ms: int, *, local: bool) -> None:
    with conn.cursor() as cur:
        cur.execute("SELECT set_config('lock_timeout', %s, %s)", (f"{ms}ms", local))


_LOCK_HOLDERS = """
SELECT a.pid, coalesce(nullif(a.application_name, ''), '(no application_name)'), a.state,
       string_agg(DISTINCT format('%s on %s', l.mode, l.relation::regclass), ', ')
FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
WHERE l.granted AND l.locktype = 'relation'
  AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
  AND a.pid <> pg_backend_pid() AND a.xact_start IS NOT NULL
  AND l.relation NOT IN (SELECT oid FROM pg_class WHERE relnamespace = 'pg_catalog'::regnamespace)
GROUP BY a.pid, a.application_name, a.state ORDER BY a.pid
"""


def _lock_holders(conn: Connection[Any]) -> str:
    """The sessions of this database holding table locks in an open transaction: pid, application_name, locks."""
    if conn.broken or conn.closed:
        return "the sessions holding locks could not be read (the connection is gone)"
    try:
        with conn.cursor(row_factory=tuple_row) as cur:
            cur.execute(_LOCK_HOLDERS)
            rows = cur.fetchall()
    except psycopg.Error as exc:
        return f"the sessions holding locks could not be read ({_describe(exc)})"
    if not rows:
        return "no session holds a table lock any more (the blocker has finished)"
    return "sessions holding table locks in an open transaction: " + "; ".join(
        f"pid {pid} (application_name {name!r}, {state}) holds {locks}" for pid, name, state, locks in rows
    )


def _transaction_id(cur: psycopg.Cursor[Any]) -> int:
    """The current top-level transaction id (assigning one: the file is about to write the ledger anyway)."""
    cur.execute("SELECT txid_current()")
    row = cur.fetchone()
    assert row is not None
    return int(row[0])


def _describe(exc: psycopg.Error, body: str | None = None, start: int = 0) -> str:
    """The server's message, with its error position as a line and column of the file when it has one.

    ``start`` is where the text that was sent begins in ``body`` (a statement or a section of the file).
    """
    diag = exc.diag
    message = diag.message_primary or str(exc).strip().splitlines()[0]
    where = f" (SQLSTATE {diag.sqlstate})" if diag.sqlstate else ""
    hint = f"; hint: {diag.message_hint}" if diag.message_hint else ""
    position = ""
    if diag.statement_position:
        try:
            offset = int(diag.statement_position) - 1 + start  # 1-based characters into the text sent
        except ValueError:
            offset = -1
        if body is not None and start <= offset <= len(body):
            line, column = line_and_column(body, offset)
            position = f" at line {line}, column {column}"
        else:
            position = f" at character {diag.statement_position}"
    return f"{message}{position}{where}{hint}"


def revert_migration(
    conn: Connection[Any],
    migration: MigrationFile,
    *,
    lock_timeout_ms: int = 0,
    watch: Callable[[], Connection[Any]] | None = None,
) -> None:
    """Run one file's down section and delete its ledger row, in one transaction (autocommit and statement by
    statement for a ``-- precog:no-transaction`` file, the row deleted only after every statement succeeded)."""
    body = _read_checked(migration, "reverted")
    parts = sections(body)
    if parts.down_start is None:
        raise MigrationValidationError(f"{migration.filename} has no '{DOWN_MARKER}' section; nothing was reverted")

    def record(cur: psycopg.Cursor[Any]) -> Any:
        cur.execute(
            f"DELETE FROM {LEDGER} WHERE version = %s AND checksum = %s RETURNING version",
            (migration.version, migration.checksum),
        )
        row = cur.fetchone()
        if row is None:
            raise MigrationError(
                f"{migration.filename}: its ledger row changed or disappeared while it was reverted; run "
                "`precog-db migrate status` and check the database by hand"
            )
        return row

    if parts.no_transaction:
        if lock_timeout_ms:
            _set_lock_timeout(conn, lock_timeout_ms, local=False)  # undone by RESET ALL after the file
        run_without_transaction(conn, migration, body, parts.down_start, len(body), record=record, verb="reverted")
    else:
        _run_in_transaction(
            conn,
            migration,
            body,
            parts.down_start,
            len(body),
            record=record,
            verb="reverted",
            lock_timeout_ms=lock_timeout_ms,
            watch=watch,
        )


def downgrade(
    conn: Connection[Any],
    directory: Path,
    *,
    target: int | None = None,
    planned: Sequence[str] | None = None,
    lock_timeout: float = 300.0,
    on_lock_wait: Callable[[str], None] | None = None,
    on_progress: Callable[[str], None] | None = None,
    on_reverted: Callable[[dict[str, Any]], None] | None = None,
    lock_timeout_ms: int = 0,
    watch: Callable[[], Connection[Any]] | None = None,
) -> list[dict[str, Any]]:
    """Revert applied migrations newest first (``precog-db migrate down``); one dict per reverted file.

    Takes the migration lock (waiting up to ``lock_timeout`` s), re-reads the
    files and the ledger under it and plans again (`plan_downgrade`): when
    ``planned`` (the file names the caller confirmed) differs from that plan,
    `MigrationValidationError` and nothing is reverted. Each file's down
    section runs in its own transaction with the removal of its ledger row
    (`revert_migration`), each statement under ``lock_timeout_ms``
    (0 = none). Confirmation, the prod backup and the audit entry
    are the caller's, in the same order as ``migrate up``. ``conn`` is an
    autocommit connection from `precog_db.connection.connect`.
    """
    reverted: list[dict[str, Any]] = []
    with migration_lock(conn, timeout=lock_timeout, on_wait=on_lock_wait):
        todo = plan_downgrade(discover(directory), read_ledger(conn), target)
        if planned is not None and [m.filename for m in todo] != list(planned):
            raise MigrationValidationError(
                "the migrations to revert changed while waiting for the lock (now: "
                + (", ".join(m.filename for m in todo) or "none")
                + "), so nothing was reverted; run migrate down again"
            )
        for index, migration in enumerate(todo, 1):
            if on_progress is not None:
                on_progress(f"[{index}/{len(todo)}] reverting {migration.filename} ...")
            started = time.monotonic()
            revert_migration(conn, migration, lock_timeout_ms=lock_timeout_ms, watch=watch)
            done = {
                "version": migration.version,
                "file": migration.filename,
                "duration_ms": int((time.monotonic() - started) * 1000),
            }
            reverted.append(done)
            if on_reverted is not None:
                on_reverted(done)
    return reverted
