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
* `migrate up` lints what it is about to apply with squawk (`check_safety`):
  a warning on dev and test, refused on staging and prod unless the file
  acknowledges the rule with ``-- precog:allow <rule>: <reason>``.
* Promotion: staging may only apply what test has applied with the same
  checksum, prod only what staging has (`check_promotion`).

The building blocks (`discover`, `pending`, `apply_migration`,
`migration_lock` …) work on connections and paths they are given. The
workflows `upgrade`, `revert`, `inspect` and `mark_baseline` are what
``precog-db migrate`` runs, callable from Python: they connect through the
chokepoint (`precog_db.connection.connect`), confirm and audit. How a
workflow runs is one `MigrationOptions`: ``upgrade(settings, options)``;
its fields are also accepted as keyword arguments
(``upgrade(settings, directory=…, confirm_database=…)``).

One concept per private module, each importing only those above it:

* `_files`: ``<version>_<name>.sql`` files, checksums, `discover`, `new_migration`;
* `_scanner`: the SQL lexer, `split_statements`, `find_transaction_control`;
* `_sections`: the ``-- precog:`` markers, `sections`, `marker_problem`;
* `_ledger`: the ``precog_meta.schema_migrations`` table, `read_ledger`, `baseline`;
* `_checks`: `validate`, `pending`, `plan_downgrade`, the promotion check;
* `_lint`: squawk over each file's up section, `lint`, `lint_files`, `check_safety`, `OFF_BY_DEFAULT`;
* `_lock`: the advisory lock, `migration_lock`;
* `_lockwatch`: `LockWatch`, what a file waits for (lock, blockers) seen from a second connection;
* `_apply`: `apply_migration`, `revert_migration`, `run_without_transaction`, `downgrade`;
* `_options`: `MigrationOptions`, the keyword arguments each workflow accepts;
* `_workflows`: `upgrade`, `revert`, `mark_baseline`, `inspect`, `predecessor_ledger`;
* `_rehearse`: `rehearse`, the pending files applied to a restored copy (``migrate rehearse``).
"""

from __future__ import annotations

from precog_db.migrations._apply import apply_migration, downgrade, revert_migration, run_without_transaction
from precog_db.migrations._checks import PREDECESSOR, Problem, check_promotion, pending, plan_downgrade, validate
from precog_db.migrations._files import MigrationFile, discover, new_migration, text_of
from precog_db.migrations._files import checksum_of as checksum_of
from precog_db.migrations._ledger import LEDGER, AppliedMigration, baseline, ensure_ledger, read_ledger
from precog_db.migrations._ledger import applied_by as applied_by
from precog_db.migrations._lint import (
    OFF_BY_DEFAULT,
    Finding,
    SafetyCheck,
    check_safety,
    lint,
    lint_files,
    lint_sql,
)
from precog_db.migrations._lock import LOCK_KEY as LOCK_KEY
from precog_db.migrations._lock import migration_lock
from precog_db.migrations._options import MigrationOptions
from precog_db.migrations._rehearse import RehearsalResult, RehearsedFile, rehearse
from precog_db.migrations._scanner import Statement, TransactionControl, find_transaction_control, split_statements
from precog_db.migrations._scanner import line_and_column as line_and_column
from precog_db.migrations._scanner import transaction_control_problem as transaction_control_problem
from precog_db.migrations._sections import (
    DOWN_MARKER,
    MARKERS,
    NO_TRANSACTION_MARKER,
    Sections,
    marker_problem,
    sections,
)
from precog_db.migrations._workflows import (
    Inspection,
    RevertResult,
    UpgradeResult,
    inspect,
    mark_baseline,
    predecessor_ledger,
    revert,
    upgrade,
)

__all__ = [
    "DOWN_MARKER",
    "LEDGER",
    "MARKERS",
    "NO_TRANSACTION_MARKER",
    "OFF_BY_DEFAULT",
    "PREDECESSOR",
    "AppliedMigration",
    "Finding",
    "Inspection",
    "MigrationFile",
    "MigrationOptions",
    "Problem",
    "RehearsalResult",
    "RehearsedFile",
    "RevertResult",
    "SafetyCheck",
    "Sections",
    "Statement",
    "TransactionControl",
    "UpgradeResult",
    "apply_migration",
    "baseline",
    "check_promotion",
    "check_safety",
    "discover",
    "downgrade",
    "ensure_ledger",
    "find_transaction_control",
    "inspect",
    "lint",
    "lint_files",
    "lint_sql",
    "mark_baseline",
    "marker_problem",
    "migration_lock",
    "new_migration",
    "pending",
    "plan_downgrade",
    "predecessor_ledger",
    "read_ledger",
    "rehearse",
    "revert",
    "revert_migration",
    "run_without_transaction",
    "sections",
    "split_statements",
    "text_of",
    "upgrade",
    "validate",
]
