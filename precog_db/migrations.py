"""SQL migrations: numbered files, a ledger in the database, and a promotion check.

* Files live in ``migrations/`` (or a directory given explicitly) and are
  named ``<version>_<name>.sql``, e.g. ``0001_create_markets.sql``. Versions
  are positive integers; other ``.sql`` names are an error, not ignored.
* The ledger is ``precog_meta.schema_migrations``: version, name, checksum
  (SHA-256 of the file with line endings normalised), kind (``applied`` or
  ``baseline``), who applied it (OS user and machine), the database role,
  when, and how long it took.
* Each file runs in its own transaction together with its ledger row, so a
  file is either applied and recorded, or neither. A file with a top-level
  ``BEGIN``, ``COMMIT``, ``ROLLBACK``, ``END``, ``ABORT``, ``START
  TRANSACTION``, ``PREPARE TRANSACTION`` … is refused before anything runs
  (`find_transaction_control`, a lexer that skips comments, literals,
  quoted identifiers and dollar-quoted bodies), and after a file runs its
  ledger row is written only inside the same transaction it started in.
  A server error names the line and column of the file.
* A file whose first line is ``-- precog:no-transaction`` runs in
  autocommit, statement by statement (`run_without_transaction`), for
  ``CREATE INDEX CONCURRENTLY`` and the like; it is recorded only after every
  statement succeeded, and a failure lists what ran and any index it left
  ``INVALID``.
* Everything after a ``-- precog:down`` line is the file's down section
  (`sections`): ``up`` never runs it, `downgrade` (``migrate down``) does,
  newest file first, each with the removal of its ledger row. The checksum
  covers the whole file, down section included.
* A marker counts only as a line of its own spelled exactly so (blanks
  around it and case ignored). Any other comment that reads like one
  (``--precog:down``, ``-- precog: down``, ``/* precog:down */``, trailing
  text, an unknown ``-- precog:up``) is refused wherever files are read
  (``up``, ``down``, ``validate``, ``status``), naming the line and the
  accepted spelling (`marker_problem`).
* A leading UTF-8 byte order mark is dropped from the SQL (`text_of`); the
  checksum stays that of the file's bytes (BOM included, CRLF as LF).
* A ``.sql`` entry that is not a regular file (a dangling symbolic link, a
  directory) is an error, not skipped.
* A session-level advisory lock serializes runs on one database. A second
  run waits for it, saying who holds it, up to a timeout, then fails
  clearly. It re-reads the ledger after getting the lock, so each
  migration is applied exactly once.
* Promotion: staging may only apply what test has applied with the same
  checksum, prod only what staging has (`check_promotion`).

The building blocks (`discover`, `pending`, `apply_migration`,
`migration_lock` …) work on connections and paths they are given. The
workflows `upgrade`, `inspect` and `mark_baseline` are what ``precog-db
migrate`` runs, callable from Python: they connect through the chokepoint
(`precog_db.connection.connect`), confirm and audit.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import os
import re
import socket
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
from psycopg import Connection
from psycopg.pq import TransactionStatus
from psycopg.rows import tuple_row

from precog_db import audit
from precog_db._progress import NoProgress, ProgressDisplay
from precog_db._secrets import current_os_user, scrub_text
from precog_db.backup import backup_database
from precog_db.confirm import confirmation
from precog_db.connection import PrecogConnection, connect
from precog_db.environment import Environment
from precog_db.errors import (
    ConfigurationError,
    MigrationError,
    MigrationLockError,
    MigrationValidationError,
    PrecogDBError,
    PromotionError,
)
from precog_db.settings import DatabaseSettings, load_settings
from precog_db.stamp import SCHEMA

__all__ = [
    "DOWN_MARKER",
    "LEDGER",
    "MARKERS",
    "NO_TRANSACTION_MARKER",
    "PREDECESSOR",
    "AppliedMigration",
    "Inspection",
    "MigrationFile",
    "Problem",
    "RevertResult",
    "Sections",
    "Statement",
    "TransactionControl",
    "UpgradeResult",
    "apply_migration",
    "baseline",
    "check_promotion",
    "discover",
    "downgrade",
    "ensure_ledger",
    "find_transaction_control",
    "inspect",
    "mark_baseline",
    "marker_problem",
    "migration_lock",
    "new_migration",
    "pending",
    "plan_downgrade",
    "predecessor_ledger",
    "read_ledger",
    "revert",
    "revert_migration",
    "run_without_transaction",
    "sections",
    "split_statements",
    "text_of",
    "upgrade",
    "validate",
]

LEDGER = f"{SCHEMA}.schema_migrations"

#: The environment whose ledger must already hold a migration before it may run here.
PREDECESSOR: dict[Environment, Environment] = {
    Environment.STAGING: Environment.TEST,
    Environment.PROD: Environment.STAGING,
}

#: Advisory lock key shared by every migration run ("precogmg" in ASCII).
LOCK_KEY = 0x707265636F676D67

_FILENAME = re.compile(r"^(?P<version>\d+)_(?P<name>[A-Za-z0-9][A-Za-z0-9_-]*)\.sql$")
_SLUG = re.compile(r"[^a-z0-9]+")

_DDL = f"""
CREATE SCHEMA IF NOT EXISTS {SCHEMA};
CREATE TABLE IF NOT EXISTS {LEDGER} (
    version integer PRIMARY KEY CHECK (version > 0),
    name text NOT NULL,
    checksum text NOT NULL,
    kind text NOT NULL DEFAULT 'applied' CHECK (kind IN ('applied', 'baseline')),
    applied_by text NOT NULL,
    applied_role text NOT NULL DEFAULT current_user,
    applied_at timestamptz NOT NULL DEFAULT now(),
    duration_ms integer NOT NULL DEFAULT 0
);
COMMENT ON TABLE {LEDGER} IS
    'Migrations applied to this database by precog-db migrate (one row per file). Do not edit by hand.';
"""


@dataclass(frozen=True)
class MigrationFile:
    """One ``<version>_<name>.sql`` file."""

    version: int
    name: str
    path: Path
    checksum: str

    @property
    def filename(self) -> str:
        return self.path.name

    def sql(self) -> str:
        return text_of(self.path.read_bytes())


@dataclass(frozen=True)
class AppliedMigration:
    """One row of the ledger."""

    version: int
    name: str
    checksum: str
    kind: str
    applied_by: str
    applied_role: str
    applied_at: datetime
    duration_ms: int


@dataclass(frozen=True)
class Problem:
    """A disagreement between files and ledger found by `validate`."""

    kind: str  # edited | missing | gap | out_of_order | transaction_control | marker
    version: int
    message: str


# --- files ------------------------------------------------------------------------------


def _normalised(raw: bytes) -> bytes:
    return raw.replace(b"\r\n", b"\n")


def checksum_of(raw: bytes) -> str:
    """SHA-256 of a file's bytes with CRLF turned into LF (a checkout on Windows is not an edit).

    A leading UTF-8 byte order mark is part of the bytes hashed: every
    checksum ever recorded stays what it was (a file with a BOM could be
    baselined before `text_of` learned to drop it), and adding or removing
    one after the file was applied is reported as an edit.
    """
    return hashlib.sha256(_normalised(raw)).hexdigest()


_BOM = "\ufeff"


def text_of(raw: bytes) -> str:
    """A migration file's SQL: UTF-8, CRLF turned into LF, a leading byte order mark dropped (editors add one)."""
    return _normalised(raw).decode("utf-8").removeprefix(_BOM)


def discover(directory: Path) -> list[MigrationFile]:
    """The migration files in ``directory``, by version. Raises `ConfigurationError` on a bad directory or name."""
    if not directory.exists():
        raise ConfigurationError(
            f"migrations directory {directory} does not exist; create it with `precog-db migrate new NAME` "
            "or pass --migrations-dir"
        )
    if not directory.is_dir():
        raise ConfigurationError(f"migrations directory {directory} is a file; pass a directory with --migrations-dir")
    found: dict[int, MigrationFile] = {}
    for path in sorted(directory.iterdir()):
        if path.suffix.lower() != ".sql":
            continue
        if not path.is_file():
            if path.is_symlink() and not path.exists():
                raise ConfigurationError(
                    f"{path} is a symbolic link to {_link_target(path)}, which does not exist; restore the file it "
                    "points to, or remove the link"
                )
            raise ConfigurationError(
                f"{path} is not a regular file (a directory or a special file); a migration is a .sql file, so "
                "remove it or rename it"
            )
        match = _FILENAME.match(path.name)
        if match is None:
            raise ConfigurationError(
                f"{path} is not named <version>_<name>.sql (e.g. 0001_create_markets.sql); rename it, "
                "or move it out of the migrations directory"
            )
        version = int(match["version"])
        if version <= 0:
            raise ConfigurationError(f"{path} has version 0; versions start at 1")
        if version in found:
            raise ConfigurationError(
                f"{path} and {found[version].path} both have version {version}; renumber one of them"
            )
        raw = path.read_bytes()
        try:
            _normalised(raw).decode("utf-8")
        except UnicodeDecodeError:
            raise ConfigurationError(f"{path} is not valid UTF-8; save it as UTF-8") from None
        found[version] = MigrationFile(version, match["name"], path, checksum_of(raw))
    return [found[v] for v in sorted(found)]


def _link_target(path: Path) -> str:
    try:
        return str(path.readlink())
    except OSError:
        return "a path that cannot be read"


def new_migration(directory: Path, name: str) -> Path:
    """Create the next ``<version>_<name>.sql`` in ``directory`` (created if missing); return its path."""
    slug = _SLUG.sub("_", name.strip().lower()).strip("_")
    if not slug:
        raise ConfigurationError(
            "a migration name needs at least one letter or digit, e.g. `precog-db migrate new create_markets`"
        )
    directory.mkdir(parents=True, exist_ok=True)
    existing = discover(directory)
    version = existing[-1].version + 1 if existing else 1
    width = max(4, len(str(version)))
    path = directory / f"{version:0{width}d}_{slug}.sql"
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    path.write_text(
        f"-- {version:0{width}d} {slug}, written {stamp}\n"
        "-- Runs in one transaction together with its ledger row: do not add BEGIN or COMMIT.\n"
        "-- (First line '-- precog:no-transaction': runs statement by statement, for CREATE INDEX CONCURRENTLY.)\n"
        "-- After a line '-- precog:down': the SQL that reverts it (precog-db migrate down).\n"
        "-- Once applied anywhere, never edit this file: write a new migration instead.\n\n",
        encoding="utf-8",
    )
    return path


# --- transaction control ------------------------------------------------------------------

_WORD = re.compile(r"[A-Za-z_\u0080-\U0010ffff][A-Za-z0-9_$\u0080-\U0010ffff]*")
_DOLLAR = re.compile(r"\$(?:[A-Za-z_\u0080-\U0010ffff][A-Za-z0-9_\u0080-\U0010ffff]*)?\$")
_NUMBER = re.compile(r"[0-9][0-9A-Za-z_.]*")
_ROUTINE_HEADS = (("CREATE", "FUNCTION"), ("CREATE", "PROCEDURE"))


@dataclass(frozen=True)
class TransactionControl:
    """A top-level statement of a migration file that would end (or start) the migration's transaction."""

    line: int
    column: int
    statement: str  # its leading keywords, e.g. "COMMIT" or "START TRANSACTION"

    def describe(self) -> str:
        return f"line {self.line}: {self.statement}"


def line_and_column(text: str, offset: int) -> tuple[int, int]:
    """The 1-based line and column of the 0-based character ``offset`` in ``text``."""
    offset = max(0, min(offset, len(text)))
    line_start = text.rfind("\n", 0, offset) + 1
    return text.count("\n", 0, offset) + 1, offset - line_start + 1


def _skip_block_comment(sql: str, i: int) -> int:
    depth, n = 0, len(sql)
    while i < n:
        if sql.startswith("/*", i):
            depth, i = depth + 1, i + 2
        elif sql.startswith("*/", i):
            depth, i = depth - 1, i + 2
            if depth == 0:
                return i
        else:
            i += 1
    return n


def _skip_quoted(sql: str, i: int, quote: str, *, backslash: bool = False) -> int:
    """Past the literal or identifier opening at ``i`` (doubled quotes inside; backslash escapes in E'')."""
    i, n = i + 1, len(sql)
    while i < n:
        ch = sql[i]
        if backslash and ch == "\\":
            i += 2
        elif ch == quote:
            if i + 1 < n and sql[i + 1] == quote:
                i += 2
            else:
                return i + 1
        else:
            i += 1
    return n


def _transaction_control(words: Sequence[str]) -> str | None:
    """The statement's leading keywords when they end or start a transaction, else None."""
    if not words:
        return None
    head = words[0]
    if head in ("BEGIN", "COMMIT", "END", "ABORT"):
        return " ".join(words[:2]) if head == "COMMIT" and words[1:2] == ["PREPARED"] else head
    if head == "START" and words[1:2] == ["TRANSACTION"]:
        return "START TRANSACTION"
    if head == "PREPARE" and words[1:2] == ["TRANSACTION"]:
        return "PREPARE TRANSACTION"
    if head == "ROLLBACK":
        rest = words[1:]
        if rest[:1] in (["WORK"], ["TRANSACTION"]):
            rest = rest[1:]
        if rest[:1] == ["TO"]:
            return None  # ROLLBACK TO SAVEPOINT stays inside the transaction
        return "ROLLBACK PREPARED" if rest[:1] == ["PREPARED"] else "ROLLBACK"
    return None


def find_transaction_control(sql: str) -> list[TransactionControl]:
    """Every top-level statement of ``sql`` that ends or starts a transaction (``COMMIT``, ``BEGIN`` …).

    A small lexer, not a parser (`split_statements`): it skips ``--`` and nested ``/* */``
    comments, '…' and E'…' literals, "quoted identifiers" and $tag$ dollar
    quotes (so plpgsql ``BEGIN … END`` bodies and the words inside strings
    or identifiers never count), splits statements at top-level semicolons,
    and keeps the semicolons of a ``CREATE FUNCTION|PROCEDURE … BEGIN ATOMIC
    … END`` body inside that statement (as psql does). ``SAVEPOINT``,
    ``RELEASE`` and ``ROLLBACK TO`` stay inside the transaction and pass.
    """
    found: list[TransactionControl] = []
    for statement in split_statements(sql):
        control = _transaction_control(list(statement.words))
        if control is not None:
            line, column = line_and_column(sql, statement.start)
            found.append(TransactionControl(line, column, control))
    return found


@dataclass(frozen=True)
class Statement:
    """One top-level statement of a migration: ``sql[start:end]``, its semicolon included."""

    start: int
    end: int
    #: Its first (up to four) keywords, upper-cased.
    words: tuple[str, ...]

    def text(self, sql: str) -> str:
        return sql[self.start : self.end]

    def summary(self, sql: str, width: int = 60) -> str:
        """``line N: CREATE INDEX CONCURRENTLY …``: where it starts, and its text on one line."""
        flat = " ".join(self.text(sql).split())
        if len(flat) > width:
            flat = flat[: width - 1] + "…"
        return f"line {line_and_column(sql, self.start)[0]}: {flat}"


def split_statements(sql: str, *, comments: list[tuple[int, int]] | None = None) -> list[Statement]:
    """The top-level statements of ``sql``, in order (the lexer `find_transaction_control` describes).

    Comments between statements belong to none; a statement without a final
    semicolon runs to the end of the text. ``comments``, when given, receives
    the ``(start, end)`` of every comment the lexer skipped (outside literals,
    quoted identifiers and dollar-quoted bodies).
    """
    out: list[Statement] = []
    words: list[str] = []
    start = -1
    parens = begins = 0
    i, n = 0, len(sql)

    def finish(end: int) -> None:
        out.append(Statement(start, end, tuple(words)))

    while i < n:
        ch = sql[i]
        if ch.isspace():
            i += 1
            continue
        if sql.startswith("--", i):
            # PostgreSQL ends a line comment at a newline or a bare carriage return.
            ends = [e for e in (sql.find("\n", i), sql.find("\r", i)) if e >= 0]
            end = min(ends) if ends else n
            if comments is not None:
                comments.append((i, end))
            i = end + 1
            continue
        if sql.startswith("/*", i):
            end = _skip_block_comment(sql, i)
            if comments is not None:
                comments.append((i, end))
            i = end
            continue
        if start < 0:
            start = i
        if ch == ";":
            if parens == 0 and begins == 0:
                finish(i + 1)
                words, start = [], -1
            i += 1
        elif ch in "'\"":
            i = _skip_quoted(sql, i, ch)
        elif ch == "$":
            dollar = _DOLLAR.match(sql, i)
            if dollar is None:
                i += 1  # $1 and the like
            else:
                close = sql.find(dollar.group(), dollar.end())
                i = n if close < 0 else close + len(dollar.group())
        elif ch == "(":
            parens, i = parens + 1, i + 1
        elif ch == ")":
            parens, i = max(0, parens - 1), i + 1
        elif (number := _NUMBER.match(sql, i)) is not None:
            i = number.end()
        elif (word := _WORD.match(sql, i)) is not None:
            i = word.end()
            text = word.group()
            if text in ("E", "e") and i < n and sql[i] == "'":
                i = _skip_quoted(sql, i, "'", backslash=True)
                continue
            upper = text.upper()
            if len(words) < 4:
                words.append(upper)
            heads = [w for w in words[:4] if w not in ("OR", "REPLACE")][:2]
            if tuple(heads) in _ROUTINE_HEADS and parens == 0:
                if upper == "BEGIN" or (upper == "CASE" and begins > 0):
                    begins += 1
                elif upper == "END" and begins > 0:
                    begins -= 1
        else:
            i += 1
    if start >= 0:
        finish(n)
    return out


def transaction_control_problem(migration: MigrationFile, sql: str) -> str | None:
    """The sentence refusing ``migration`` when ``sql`` (its text) ends its own transaction, else None."""
    found = find_transaction_control(sql)
    if not found:
        return None
    where = "; ".join(f.describe() for f in found)
    return (
        f"{migration.path} controls its own transaction ({where}); a migration runs in one transaction "
        "together with its ledger row, so it must not BEGIN, COMMIT, ROLLBACK, END, ABORT or PREPARE "
        "TRANSACTION. Remove those statements (split the file into several migrations if it needs several "
        "transactions)"
    )


# --- the ledger ---------------------------------------------------------------------------


def ensure_ledger(conn: Connection[Any]) -> None:
    """Create ``precog_meta.schema_migrations`` if it does not exist (call it holding the lock)."""
    with conn.transaction(), conn.cursor() as cur:
        cur.execute("SELECT to_regclass(%s) IS NOT NULL", (LEDGER,))
        row = cur.fetchone()
        if not (row and row[0]):
            cur.execute(_DDL)


def read_ledger(conn: Connection[Any]) -> dict[int, AppliedMigration]:
    """The ledger by version; empty when the database has none yet."""
    with conn.cursor(row_factory=tuple_row) as cur:
        cur.execute("SELECT to_regclass(%s) IS NOT NULL", (LEDGER,))
        row = cur.fetchone()
        if not (row and row[0]):
            return {}
        cur.execute(
            "SELECT version, name, checksum, kind, applied_by, applied_role, applied_at, duration_ms "
            f"FROM {LEDGER} ORDER BY version"
        )
        return {int(r[0]): _applied(r) for r in cur.fetchall()}


def _applied(row: Sequence[Any]) -> AppliedMigration:
    return AppliedMigration(
        version=int(row[0]),
        name=str(row[1]),
        checksum=str(row[2]),
        kind=str(row[3]),
        applied_by=str(row[4]),
        applied_role=str(row[5]),
        applied_at=row[6],
        duration_ms=int(row[7]),
    )


def applied_by() -> str:
    """``user@machine`` for the ledger."""
    return f"{current_os_user()}@{socket.gethostname()}"


# --- checks -----------------------------------------------------------------------------


def validate(files: Sequence[MigrationFile], ledger: Mapping[int, AppliedMigration]) -> list[Problem]:
    """Every disagreement between the files and the ledger, by version.

    * ``edited``: an applied file's checksum differs from the ledger's;
    * ``missing``: the ledger has a version with no file;
    * ``gap``: a version between the lowest and the highest is neither a file nor in the ledger;
    * ``out_of_order``: a file is pending but a later version is already applied;
    * ``transaction_control``: a pending file ends or starts its own transaction
      (a top-level ``COMMIT``, ``ROLLBACK``, ``BEGIN`` …, see `find_transaction_control`);
    * ``marker``: a pending file's ``-- precog:no-transaction`` or ``-- precog:down`` line is misplaced
      (`marker_problem`).
    """
    problems: list[Problem] = []
    by_version = {f.version: f for f in files}
    for version, row in sorted(ledger.items()):
        file = by_version.get(version)
        if file is None:
            problems.append(
                Problem(
                    "missing",
                    version,
                    f"version {version} ({row.name}) is in the ledger but its file is missing; restore the file "
                    "from version control",
                )
            )
        elif file.checksum != row.checksum:
            problems.append(
                Problem(
                    "edited",
                    version,
                    f"{file.filename} was edited after it was applied (checksum {file.checksum[:12]} now, "
                    f"{row.checksum[:12]} when applied {row.applied_at:%Y-%m-%d %H:%M}); revert the edit and "
                    "put the change in a new migration",
                )
            )
    known = sorted(set(by_version) | set(ledger))
    for low, high in itertools.pairwise(known):
        for missing in range(low + 1, high):
            problems.append(
                Problem(
                    "gap",
                    missing,
                    f"version {missing} is missing between {low} and {high}; renumber the files so that "
                    "versions are consecutive",
                )
            )
    for file in files:
        if file.version in ledger:
            continue
        try:
            refusal = transaction_control_problem(file, file.sql())
        except (OSError, UnicodeDecodeError):
            continue  # apply_migration reports an unreadable file when it gets there
        if refusal is not None:
            problems.append(Problem("transaction_control", file.version, refusal))
        misplaced = marker_problem(file, file.sql())
        if misplaced is not None:
            problems.append(Problem("marker", file.version, misplaced))
    latest = max(ledger, default=0)
    for file in files:
        if file.version not in ledger and file.version < latest:
            problems.append(
                Problem(
                    "out_of_order",
                    file.version,
                    f"{file.filename} is not applied but version {latest} already is; give it a version after {latest}",
                )
            )
    return sorted(problems, key=lambda p: (p.version, p.kind))


def pending(
    files: Sequence[MigrationFile], ledger: Mapping[int, AppliedMigration], target: int | None = None
) -> list[MigrationFile]:
    """The files to apply, in order, up to ``target``; raises `MigrationValidationError` on any problem."""
    problems = validate(files, ledger)
    if problems:
        raise MigrationValidationError(
            (
                "the migrations do not match the ledger, so nothing was applied: "
                if any(p.kind not in ("transaction_control", "marker") for p in problems)
                else "nothing was applied: "
            )
            + "; ".join(p.message for p in problems)
            + ". Run `precog-db migrate validate` for the list"
        )
    if target is not None and target not in {f.version for f in files}:
        raise ConfigurationError(f"--target {target} is not the version of any migration file")
    return [f for f in files if f.version not in ledger and (target is None or f.version <= target)]


def check_promotion(
    plan: Sequence[MigrationFile],
    predecessor_ledger: Mapping[int, AppliedMigration],
    *,
    env: Environment,
    predecessor: Environment,
) -> None:
    """Raise `PromotionError` unless ``predecessor`` applied every planned file with the same checksum."""
    absent = [m for m in plan if m.version not in predecessor_ledger]
    changed = [
        m for m in plan if m.version in predecessor_ledger and predecessor_ledger[m.version].checksum != m.checksum
    ]
    if not absent and not changed:
        return
    parts = []
    if absent:
        parts.append(f"not applied to {predecessor.value}: " + ", ".join(m.filename for m in absent))
    if changed:
        parts.append(
            f"applied to {predecessor.value} with a different checksum (the file was edited since): "
            + ", ".join(m.filename for m in changed)
        )
    raise PromotionError(
        f"refusing to migrate {env.value}: migrations reach {env.value} only after {predecessor.value}, and "
        + "; ".join(parts)
        + f". Run `precog-db --env {predecessor.value} migrate up` first (and test it); nothing was applied"
    )


# --- locking and applying ----------------------------------------------------------------


def _lock_holder(conn: Connection[Any]) -> str:
    classid, objid = (LOCK_KEY >> 32) & 0xFFFFFFFF, LOCK_KEY & 0xFFFFFFFF
    with conn.cursor(row_factory=tuple_row) as cur:
        cur.execute(
            """
            SELECT a.pid, a.usename, a.application_name, a.client_addr::text, a.backend_start
            FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
            WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
              AND l.classid::bigint = %s AND l.objid::bigint = %s
              AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
            """,
            (classid, objid),
        )
        row = cur.fetchone()
    if row is None:
        return "another run"
    started = row[4].strftime("%H:%M:%S %Z") if row[4] is not None else "?"
    return (
        f"another run (server pid {row[0]}, role {row[1]}, {row[2] or 'no application name'} from "
        f"{row[3] or 'a local socket'}, connected at {started})"
    )


def _to_signed(key: int) -> int:
    return key - (1 << 64) if key >= 1 << 63 else key


def _try_lock(conn: Connection[Any]) -> bool:
    with conn.cursor(row_factory=tuple_row) as cur:
        cur.execute("SELECT pg_try_advisory_lock(%s)", (_to_signed(LOCK_KEY),))
        row = cur.fetchone()
    return bool(row and row[0])


def _wait_for_lock(conn: Connection[Any], timeout: float) -> bool:
    """Block in ``pg_advisory_lock`` for at most ``timeout`` s (``lock_timeout``); False when it expired (55P03).

    The session-level lock outlives the short transaction that scopes ``SET LOCAL``.
    The connection's reply bound (`precog_db.connection.PrecogConnection`) is
    widened by ``timeout`` meanwhile: waiting for a lock is not a silent server.
    """
    bound = conn.reply_timeout if isinstance(conn, PrecogConnection) else None
    if isinstance(conn, PrecogConnection) and bound is not None:
        conn.reply_timeout = bound + timeout
    try:
        with conn.transaction(), conn.cursor() as cur:
            cur.execute("SELECT set_config('lock_timeout', %s, true)", (f"{max(1, round(timeout * 1000))}ms",))
            cur.execute("SELECT set_config('statement_timeout', '0', true)")
            cur.execute("SELECT pg_advisory_lock(%s)", (_to_signed(LOCK_KEY),))
    except psycopg.errors.LockNotAvailable:
        return False
    finally:
        if isinstance(conn, PrecogConnection):
            conn.reply_timeout = bound
    return True


@contextmanager
def migration_lock(
    conn: Connection[Any],
    *,
    timeout: float,
    on_wait: Callable[[str], None] | None = None,
) -> Iterator[None]:
    """Hold the migration advisory lock of this database for the block.

    When another session holds it, ``on_wait`` is called once with a
    sentence naming the holder, and the session blocks in
    ``pg_advisory_lock`` under ``SET LOCAL lock_timeout`` (the server ends the
    wait with SQLSTATE 55P03 after ``timeout``); then `MigrationLockError`.
    ``conn`` must be in autocommit mode (the lock is session-level and
    survives the per-file transactions).
    """
    if not _try_lock(conn):
        holder = _lock_holder(conn)
        if on_wait is not None:
            on_wait(f"{holder} holds the migration lock on this database; waiting up to {timeout:g}s for it")
        if timeout <= 0 or not _wait_for_lock(conn, timeout):
            raise MigrationLockError(
                f"gave up after {timeout:g}s waiting for the migration lock held by {holder}; nothing was "
                "applied. Wait for that run to finish and try again, or raise --lock-timeout"
            )
    try:
        yield
    finally:
        if not conn.closed and not conn.broken:
            with conn.cursor() as cur:
                cur.execute("SELECT pg_advisory_unlock(%s)", (_to_signed(LOCK_KEY),))


# --- sections: up, down, no-transaction ----------------------------------------------------

#: First line of a file that runs outside a transaction, statement by statement.
NO_TRANSACTION_MARKER = "-- precog:no-transaction"
#: The line that starts a file's down section (what `migrate down` runs to revert it).
DOWN_MARKER = "-- precog:down"


@dataclass(frozen=True)
class Sections:
    """A migration's text split at its ``-- precog:down`` line."""

    body: str
    #: ``body[:up_end]`` is what ``migrate up`` runs.
    up_end: int
    #: ``body[down_start:]`` is what ``migrate down`` runs; None when the file has no down section.
    down_start: int | None
    #: The first line is ``-- precog:no-transaction``.
    no_transaction: bool

    @property
    def up(self) -> str:
        return self.body[: self.up_end]

    @property
    def down(self) -> str | None:
        return None if self.down_start is None else self.body[self.down_start :]


def sections(body: str) -> Sections:
    """Split a migration's text: the up part, the down part after a ``-- precog:down`` line, the no-transaction flag.

    Markers are whole lines (surrounding blanks and case ignored). Both are
    SQL comments, so the checksum (`checksum_of`, over the whole file, down
    section included) and the transaction-control check see the file as it is.
    """
    first = body.split("\n", 1)[0].strip().lower()
    offset = 0
    for line in body.splitlines(keepends=True):
        if line.strip().lower() == DOWN_MARKER:
            return Sections(body, offset, offset + len(line), first == NO_TRANSACTION_MARKER)
        offset += len(line)
    return Sections(body, len(body), None, first == NO_TRANSACTION_MARKER)


#: Every marker there is; a comment that reads like one of them but is not exactly it is refused.
MARKERS = (DOWN_MARKER, NO_TRANSACTION_MARKER)
_MARKER_COLON = re.compile(r"precog\s*:", re.IGNORECASE)
_NOT_LETTERS = re.compile(r"[^a-z]+")
#: What a marker reduces to without its spacing and punctuation (``-- precog down``, ``/* PRECOG-DOWN */``).
_MARKER_LETTERS = frozenset(_NOT_LETTERS.sub("", m) for m in MARKERS)


def _reads_like_marker(comment: str) -> bool:
    """True for a comment a person may have meant as a marker: ``precog:`` anywhere, or a marker's letters alone."""
    return bool(_MARKER_COLON.search(comment)) or _NOT_LETTERS.sub("", comment.lower()) in _MARKER_LETTERS


def _misspelled_marker(migration: MigrationFile, body: str) -> str | None:
    """The sentence refusing a comment that reads like a marker but is not exactly one, else None.

    A marker counts only as a whole line spelled exactly as in `MARKERS`
    (surrounding blanks and case ignored); anything else would be a plain
    comment, and a misspelled ``-- precog:down`` would make ``migrate up`` run
    the down section. Looked at: every ``--`` and ``/* */`` comment the lexer
    sees (also after a statement, or inside one), and every line that starts
    with ``--`` or ``/*`` (also inside a function body).
    """
    spans: list[tuple[int, int]] = []
    split_statements(body, comments=spans)
    offset = 0
    for line in body.splitlines(keepends=True):
        stripped = line.strip()
        if stripped.startswith(("--", "/*")):
            spans.append((offset, offset + len(line)))
        offset += len(line)
    for start, end in sorted(spans):
        comment = body[start:end]
        if not _reads_like_marker(comment):
            continue
        number = line_and_column(body, start)[0]
        whole_line = body.splitlines()[number - 1].strip()
        if whole_line.lower() in MARKERS and comment.strip() == whole_line:
            continue
        shown = " ".join(comment.split())
        shown = shown if len(shown) <= 60 else shown[:59] + "…"
        return (
            f"{migration.path}, line {number}: the comment {shown!r} reads like a precog marker but is not one, so "
            f"it would be a plain comment (a misspelled '{DOWN_MARKER}' makes `migrate up` run the down section). "
            f"A marker is a line of its own spelled exactly '{DOWN_MARKER}' (starts the down section) or "
            f"'{NO_TRANSACTION_MARKER}' (the first line of the file); write it so, or reword the comment"
        )
    return None


def marker_problem(migration: MigrationFile, body: str) -> str | None:
    """The sentence refusing ``migration`` when a marker line is where it does nothing or is ambiguous, else None.

    A comment that reads like a marker but is not exactly one
    (`_misspelled_marker`: ``--precog:down``, ``-- precog: down``,
    ``/* precog:down */``, trailing text …); ``-- precog:no-transaction``
    anywhere but the first line (it would be a plain comment and the file
    would run in a transaction); two ``-- precog:down`` lines; a
    ``-- precog:down`` line inside a statement (before its semicolon, or in a
    function body), where it cannot split the file.
    """
    misspelled = _misspelled_marker(migration, body)
    if misspelled is not None:
        return misspelled
    downs: list[int] = []
    offset = 0
    for number, line in enumerate(body.splitlines(keepends=True), 1):
        text = line.strip().lower()
        if text == NO_TRANSACTION_MARKER and number != 1:
            return (
                f"{migration.path} has '{NO_TRANSACTION_MARKER}' on line {number}; it only counts as the first "
                "line of the file (move it above the header comments), otherwise the file runs in a transaction"
            )
        if text == DOWN_MARKER:
            downs.append(offset)
        offset += len(line)
    if len(downs) > 1:
        lines = " and ".join(str(line_and_column(body, o)[0]) for o in downs)
        return f"{migration.path} has several '{DOWN_MARKER}' lines (lines {lines}); keep one"
    if downs:
        for statement in split_statements(body):
            if statement.start < downs[0] < statement.end:
                return (
                    f"{migration.path}: the '{DOWN_MARKER}' line (line {line_and_column(body, downs[0])[0]}) is "
                    f"inside the statement that starts on line {line_and_column(body, statement.start)[0]}; end "
                    "that statement with a semicolon before the marker"
                )
    return None


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


_RETURNING = "RETURNING version, name, checksum, kind, applied_by, applied_role, applied_at, duration_ms"


def apply_migration(conn: Connection[Any], migration: MigrationFile, *, who: str | None = None) -> AppliedMigration:
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
    """
    body = _read_checked(migration, "applied")
    parts = sections(body)
    started = time.monotonic()

    def record(cur: psycopg.Cursor[Any]) -> Any:
        duration_ms = int((time.monotonic() - started) * 1000)
        cur.execute(
            f"INSERT INTO {LEDGER} (version, name, checksum, kind, applied_by, duration_ms) "
            f"VALUES (%s, %s, %s, 'applied', %s, %s) {_RETURNING}",
            (migration.version, migration.name, migration.checksum, who or applied_by(), duration_ms),
        )
        return cur.fetchone()

    if parts.no_transaction:
        row = run_without_transaction(conn, migration, body, 0, parts.up_end, record=record, verb="applied")
    else:
        row = _run_in_transaction(conn, migration, body, 0, parts.up_end, record=record, verb="applied")
    assert row is not None
    return _applied(row)


def _run_in_transaction(
    conn: Connection[Any],
    migration: MigrationFile,
    body: str,
    start: int,
    end: int,
    *,
    record: Callable[[psycopg.Cursor[Any]], Any],
    verb: str,
) -> Any:
    """Run ``body[start:end]`` and then ``record`` in one transaction; ``record``'s result."""
    text = body[start:end]
    try:
        with conn.transaction(), conn.cursor(row_factory=tuple_row) as cur:
            before = _transaction_id(cur)
            if text.strip():
                cur.execute(text.encode("utf-8"))  # no parameters: simple protocol, several statements allowed
            status = conn.info.transaction_status
            if status != TransactionStatus.INTRANS or _transaction_id(cur) != before:
                raise MigrationError(
                    f"{migration.path} ended the migration's transaction itself, so it was NOT recorded as "
                    f"{verb}: the statements before that point were committed or rolled back by the file, and "
                    "any after it may have been committed on their own. Check the database by hand, remove the "
                    "transaction control from the file, and run the command again"
                )
            row = record(cur)
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


# --- down migrations -----------------------------------------------------------------------


def plan_downgrade(
    files: Sequence[MigrationFile], ledger: Mapping[int, AppliedMigration], target: int | None = None
) -> list[MigrationFile]:
    """The applied files to revert, newest first: the newest one, or every one after ``target`` (0: all).

    Raises `MigrationValidationError`, before anything runs, when the files
    and the ledger disagree (`validate`) or when a file to revert has no
    ``-- precog:down`` section; `ConfigurationError` for a ``target`` that is
    not an applied version.
    """
    problems = validate(files, ledger)
    if problems:
        raise MigrationValidationError(
            "the migrations do not match the ledger, so nothing was reverted: "
            + "; ".join(p.message for p in problems)
            + ". Run `precog-db migrate validate` for the list"
        )
    applied = sorted(ledger, reverse=True)
    if target is None:
        versions = applied[:1]
    else:
        if target != 0 and target not in ledger:
            raise ConfigurationError(
                f"--target {target} is not an applied version; give the version to go back to (it stays applied), "
                "or 0 to revert every migration"
            )
        versions = [v for v in applied if v > target]
    by_version = {f.version: f for f in files}
    plan = [by_version[v] for v in versions]
    misplaced = [m for m in (marker_problem(f, f.sql()) for f in plan) if m is not None]
    if misplaced:
        raise MigrationValidationError("; ".join(misplaced) + "; nothing was reverted")
    lacking = [f.filename for f in plan if sections(f.sql()).down_start is None]
    if lacking:
        raise MigrationValidationError(
            f"cannot revert {', '.join(lacking)}: no '{DOWN_MARKER}' section, so nothing was reverted. A file's "
            "checksum covers its down section, so one cannot be added once the file is applied: write a new "
            "migration that undoes the change and apply it with migrate up"
        )
    return plan


def revert_migration(conn: Connection[Any], migration: MigrationFile) -> None:
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

    runner = run_without_transaction if parts.no_transaction else _run_in_transaction
    runner(conn, migration, body, parts.down_start, len(body), record=record, verb="reverted")


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
) -> list[dict[str, Any]]:
    """Revert applied migrations newest first (``precog-db migrate down``); one dict per reverted file.

    Takes the migration lock (waiting up to ``lock_timeout`` s), re-reads the
    files and the ledger under it and plans again (`plan_downgrade`): when
    ``planned`` (the file names the caller confirmed) differs from that plan,
    `MigrationValidationError` and nothing is reverted. Each file's down
    section runs in its own transaction with the removal of its ledger row
    (`revert_migration`). Confirmation, the prod backup and the audit entry
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
            revert_migration(conn, migration)
            done = {
                "version": migration.version,
                "file": migration.filename,
                "duration_ms": int((time.monotonic() - started) * 1000),
            }
            reverted.append(done)
            if on_reverted is not None:
                on_reverted(done)
    return reverted


def baseline(conn: Connection[Any], files: Sequence[MigrationFile], version: int) -> list[AppliedMigration]:
    """Record every file up to ``version`` as already applied (kind ``baseline``) in an empty ledger.

    For a database that existed before the ledger: write its current schema
    as migration files, then baseline at the last of them. Hold the lock.
    """
    upto = [f for f in files if f.version <= version]
    if not any(f.version == version for f in files):
        raise ConfigurationError(
            f"there is no migration file with version {version}; baseline marks existing files as applied, "
            "so write the file that describes the current schema first"
        )
    ensure_ledger(conn)
    ledger = read_ledger(conn)
    if ledger:
        raise MigrationValidationError(
            f"the ledger already records {len(ledger)} migration(s) (latest {max(ledger)}); baseline is only "
            "for a database that has none. Nothing was changed"
        )
    who = applied_by()
    out: list[AppliedMigration] = []
    with conn.transaction(), conn.cursor(row_factory=tuple_row) as cur:
        for f in upto:
            cur.execute(
                f"INSERT INTO {LEDGER} (version, name, checksum, kind, applied_by, duration_ms) "
                "VALUES (%s, %s, %s, 'baseline', %s, 0) "
                "RETURNING version, name, checksum, kind, applied_by, applied_role, applied_at, duration_ms",
                (f.version, f.name, f.checksum, who),
            )
            row = cur.fetchone()
            assert row is not None
            out.append(_applied(row))
    return out


# --- the workflows (what `precog-db migrate` runs; a Python caller can too) ---------------------------


@dataclass(frozen=True)
class Inspection:
    """The migration files, the ledger of one database, and every problem between them."""

    files: list[MigrationFile]
    ledger: dict[int, AppliedMigration]
    problems: list[Problem]


def inspect(settings: DatabaseSettings, directory: Path, *, operation: str = "read the migration ledger") -> Inspection:
    """Read the files in ``directory`` and the ledger of ``settings``' database (through the chokepoint); validate."""
    files = discover(directory)
    conn = connect(settings, operation=operation, direct=True)
    try:
        ledger = read_ledger(conn)
    finally:
        conn.close()
    return Inspection(files, ledger, validate(files, ledger))


def predecessor_ledger(
    settings: DatabaseSettings,
    predecessor: Environment,
    *,
    config_dir: str | os.PathLike[str] | None = None,
) -> dict[int, AppliedMigration]:
    """The ledger of the previous environment, read through its own settings (files, not DB_* of this process)."""
    # DB_* variables in this process describe the database being migrated, not its predecessor.
    environ = {
        k: v for k, v in os.environ.items() if not k.startswith("DB_") and k not in ("PRECOG_ENV", "DATABASE_URL")
    }
    other = load_settings(predecessor, config_dir=config_dir, environ=environ)
    if (other.host, other.port, other.dbname) == (settings.host, settings.port, settings.dbname):
        raise ConfigurationError(
            f"the {predecessor.value} settings point at the same database as {settings.env.value} "
            f"({settings.dbname} on {settings.host}:{settings.port}); fix config/.env.{predecessor.value}"
        )
    conn = connect(other, operation=f"read the {predecessor.value} migration ledger", direct=True)
    try:
        return read_ledger(conn)
    finally:
        conn.close()


def _confirm(
    settings: DatabaseSettings, action: str, confirm: Callable[[str], str] | None, confirm_database: str | None
) -> str:
    """How ``action`` was confirmed: by the caller's ``confirm``, else by `precog_db.confirm.confirmation`."""
    if confirm is not None:
        return confirm(action)
    return confirmation(settings, action, confirm_database=confirm_database)


@dataclass(frozen=True)
class UpgradeResult:
    """What `upgrade` planned and did."""

    dry_run: bool
    #: The pending files when the run started (what was confirmed).
    plan: list[MigrationFile]
    #: ``not needed``, ``passed: …`` or ``skipped (…)``.
    promotion: str
    #: One dict per applied file: version, file, checksum, duration_ms.
    applied: list[dict[str, Any]] = field(default_factory=list)
    #: The prod pre-migration backup: its path, ``skipped (--no-backup)``, or None.
    backup: str | None = None


def upgrade(
    settings: DatabaseSettings,
    *,
    directory: Path = Path("migrations"),
    target: int | None = None,
    dry_run: bool = False,
    lock_timeout: float = 300.0,
    skip_promotion_check: bool = False,
    take_backup: bool = True,
    reason: str | None = None,
    config_dir: str | os.PathLike[str] | None = None,
    backup_root: Path | None = None,
    keep: int | None = None,
    confirm: Callable[[str], str] | None = None,
    confirm_database: str | None = None,
    notify: Callable[[str], None] | None = None,
    on_lock_wait: Callable[[str], None] | None = None,
    progress: ProgressDisplay | None = None,
) -> UpgradeResult:
    """Apply the pending migrations in ``directory`` to ``settings``' database (``precog-db migrate up``).

    One audited operation (``migrate up``, or ``migrate up (dry run)``), in
    this order: plan the pending files; on staging and prod, check that the
    previous environment (`PREDECESSOR`) applied each with the same checksum,
    reading its ledger through its own settings (when it cannot be read,
    `PromotionError`, unless ``skip_promotion_check`` with a ``reason``);
    stop here for ``dry_run`` or an empty plan; confirm (``confirm(action)``,
    by default the typed confirmation of `precog_db.confirm` with
    ``confirm_database``); on prod take a verified backup first (unless
    ``take_backup`` is false, which needs a ``reason``); take the migration
    lock (waiting up to ``lock_timeout`` s, ``on_lock_wait`` told once), re-read
    the ledger under it and apply what is still pending, each file in its own
    transaction, refusing a file that was not part of the confirmed plan.

    ``notify`` receives sentences for people (the plan, the backup, files
    applied meanwhile by another run); ``progress`` shows the file being applied.
    """
    reason = (reason or "").strip() or None
    if skip_promotion_check and not reason:
        raise ConfigurationError("skipping the promotion check needs a reason (it goes to the audit log)")
    if not take_backup and not reason:
        raise ConfigurationError("skipping the prod backup needs a reason (it goes to the audit log)")
    env = settings.env
    tell = notify if notify is not None else (lambda _text: None)
    display = NoProgress() if progress is None else progress
    name = "migrate up (dry run)" if dry_run else "migrate up"
    with audit.operation(name, settings, migrations_dir=str(directory), reason=reason) as info:
        files = discover(directory)
        conn = connect(
            settings.replace(application_name=f"precog-db migrate {env.value}"), operation="migrate", direct=True
        )
        try:
            plan = pending(files, read_ledger(conn), target)
            info["planned"] = [m.filename for m in plan]
            promotion = "not needed"
            predecessor = PREDECESSOR.get(env)
            if predecessor is not None and plan:
                try:
                    before = predecessor_ledger(settings, predecessor, config_dir=config_dir)
                except (PrecogDBError, OSError) as exc:
                    problem = scrub_text(str(exc), [settings.password])
                    if not skip_promotion_check:
                        raise PromotionError(
                            f"cannot check that {predecessor.value} has these migrations, because its database is "
                            f"unavailable: {problem}. Fix config/.env.{predecessor.value}, or, if you must migrate "
                            f'{env.value} anyway, pass --skip-promotion-check --reason "..." (recorded in the '
                            "audit log); nothing was applied"
                        ) from None
                    promotion = f"skipped ({predecessor.value} unavailable: {problem})"
                else:
                    check_promotion(plan, before, env=env, predecessor=predecessor)
                    promotion = f"passed: {predecessor.value} has applied all {len(plan)} with the same checksums"
            info["promotion"] = promotion
            if dry_run or not plan:
                return UpgradeResult(dry_run, plan, promotion)
            tell(
                f"plan: {len(plan)} migration(s) for the {settings.describe()}: " + ", ".join(m.filename for m in plan)
            )
            _confirm_and_back_up(
                info,
                settings,
                conn,
                action=f"apply {len(plan)} migration(s)",
                purpose="before migrate up",
                confirm=confirm if confirm is not None else _typed(settings, confirm_database),
                take_backup=take_backup,
                backup_root=backup_root,
                keep=keep,
                display=display,
                tell=tell,
            )
            applied: list[dict[str, Any]] = []
            info["applied"] = applied
            with migration_lock(conn, timeout=lock_timeout, on_wait=on_lock_wait):
                ensure_ledger(conn)
                todo = pending(discover(directory), read_ledger(conn), target)
                skipped = len(plan) - len(todo)
                if skipped:
                    tell(f"{skipped} of the planned migration(s) were applied by another run meanwhile")
                try:
                    for index, migration in enumerate(todo, 1):
                        if migration.filename not in info["planned"]:
                            raise PromotionError(
                                f"{migration.filename} appeared while waiting for the lock and was not part of "
                                "the confirmed plan; run migrate up again"
                            )
                        display.update(f"[{index}/{len(todo)}] applying {migration.filename} ...")
                        row = apply_migration(conn, migration)
                        applied.append(
                            {
                                "version": row.version,
                                "file": migration.filename,
                                "checksum": row.checksum,
                                "duration_ms": row.duration_ms,
                            }
                        )
                finally:
                    display.done()
        finally:
            conn.close()
    return UpgradeResult(dry_run, plan, promotion, applied, info.get("backup"))


def mark_baseline(
    settings: DatabaseSettings,
    version: int,
    *,
    directory: Path = Path("migrations"),
    confirm: Callable[[str], str] | None = None,
    confirm_database: str | None = None,
    on_lock_wait: Callable[[str], None] | None = None,
) -> list[AppliedMigration]:
    """`baseline` ``settings``' database at ``version`` under the lock, confirmed and audited (``migrate baseline``)."""
    with audit.operation("migrate baseline", settings, version=version) as info:
        files = discover(directory)
        conn = connect(settings, operation="baseline the migration ledger", direct=True)
        try:
            action = f"record migrations up to {version} as applied"
            info["confirmation"] = (
                confirm(action)
                if confirm is not None
                else confirmation(settings, action, confirm_database=confirm_database)
            )
            with migration_lock(conn, timeout=60, on_wait=on_lock_wait):
                rows = baseline(conn, files, version)
        finally:
            conn.close()
        info["baselined"] = [r.version for r in rows]
    return rows


def _typed(settings: DatabaseSettings, confirm_database: str | None) -> Callable[[str], str]:
    """The default confirmation: `precog_db.confirm`'s typed one (staging and prod), with ``confirm_database``."""
    return lambda action: confirmation(settings, action, confirm_database=confirm_database)


def _confirm_and_back_up(
    info: dict[str, Any],
    settings: DatabaseSettings,
    conn: Connection[Any],
    *,
    action: str,
    purpose: str,
    confirm: Callable[[str], str],
    take_backup: bool,
    backup_root: Path | None,
    keep: int | None,
    display: ProgressDisplay,
    tell: Callable[[str], None],
) -> str | None:
    """What `upgrade` and `revert` do before changing the schema: confirm, then on prod a verified backup.

    Records both in the audit ``info``; returns the backup's path, ``skipped (--no-backup)`` or None.
    """
    info["confirmation"] = confirm(action)
    if settings.env is not Environment.PROD:
        return None
    if not take_backup:
        info["backup"] = "skipped (--no-backup)"
    else:
        made = backup_database(
            settings,
            server_major=conn.info.server_version // 10000,
            purpose=purpose,
            root=backup_root,
            keep=keep,
            progress=display,
        )
        info["backup"] = str(made.path)
        tell(made.summary())
    return str(info["backup"])


@dataclass
class RevertResult:
    """What `revert` planned and did."""

    dry_run: bool
    #: The applied files to revert, newest first, when the run started (what was confirmed).
    plan: list[MigrationFile]
    #: One dict per reverted file: version, file, duration_ms.
    reverted: list[dict[str, Any]] = field(default_factory=list)
    #: The prod backup taken first: its path, ``skipped (--no-backup)``, or None.
    backup: str | None = None


def revert(
    settings: DatabaseSettings,
    *,
    directory: Path = Path("migrations"),
    target: int | None = None,
    dry_run: bool = False,
    lock_timeout: float = 300.0,
    take_backup: bool = True,
    reason: str | None = None,
    backup_root: Path | None = None,
    keep: int | None = None,
    confirm: Callable[[str], str] | None = None,
    confirm_database: str | None = None,
    notify: Callable[[str], None] | None = None,
    on_lock_wait: Callable[[str], None] | None = None,
    progress: ProgressDisplay | None = None,
) -> RevertResult:
    """Revert applied migrations newest first (``precog-db migrate down``), as one audited operation.

    The mirror of `upgrade`: plan (`plan_downgrade`: a file without a down
    section stops everything before it runs); stop for ``dry_run`` or an empty
    plan; confirm (the typed confirmation on staging and prod); on prod a
    verified backup first (unless ``take_backup`` is false, which needs a
    ``reason``); then `downgrade` under the migration lock, re-planning there
    and refusing a plan that changed since it was confirmed.
    """
    reason = (reason or "").strip() or None
    if not take_backup and not reason:
        raise ConfigurationError("skipping the prod backup needs a reason (it goes to the audit log)")
    env = settings.env
    tell = notify if notify is not None else (lambda _text: None)
    display = NoProgress() if progress is None else progress
    name = "migrate down (dry run)" if dry_run else "migrate down"
    with audit.operation(name, settings, migrations_dir=str(directory), reason=reason, target=target) as info:
        files = discover(directory)
        conn = connect(
            settings.replace(application_name=f"precog-db migrate {env.value}"), operation="migrate", direct=True
        )
        try:
            plan = plan_downgrade(files, read_ledger(conn), target)
            info["planned"] = [m.filename for m in plan]
            if dry_run or not plan:
                return RevertResult(dry_run, plan)
            tell(f"plan: revert {len(plan)} migration(s) of the {settings.describe()}: " + ", ".join(info["planned"]))
            result = RevertResult(dry_run, plan)
            result.backup = _confirm_and_back_up(
                info,
                settings,
                conn,
                action=f"revert {len(plan)} migration(s)",
                purpose="before migrate down",
                confirm=confirm if confirm is not None else _typed(settings, confirm_database),
                take_backup=take_backup,
                backup_root=backup_root,
                keep=keep,
                display=display,
                tell=tell,
            )
            info["reverted"] = result.reverted
            try:
                downgrade(
                    conn,
                    directory,
                    target=target,
                    planned=info["planned"],
                    lock_timeout=lock_timeout,
                    on_lock_wait=on_lock_wait,
                    on_progress=display.update,
                    on_reverted=result.reverted.append,
                )
            finally:
                display.done()
            return result
        finally:
            conn.close()
