"""The workflows ``precog-db migrate`` runs, callable from Python: `upgrade`, `revert`, `mark_baseline`, `inspect`.

Each connects through the chokepoint (`precog_db.connection.connect`),
confirms and writes one audit entry, then uses the building blocks of the
other modules of the package. How a workflow runs is one `MigrationOptions`
(`_options`); keyword arguments are accepted and turned into one.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Unpack

from psycopg import Connection

from precog_db import audit
from precog_db._progress import NoProgress, ProgressDisplay
from precog_db._secrets import scrub_text
from precog_db.backup import backup_database
from precog_db.confirm import confirmation
from precog_db.connection import connect
from precog_db.environment import Environment
from precog_db.errors import ConfigurationError, MigrationLockTimeoutError, PrecogDBError, PromotionError
from precog_db.migrations._apply import apply_migration, downgrade
from precog_db.migrations._checks import PREDECESSOR, Problem, check_promotion, pending, plan_downgrade, validate
from precog_db.migrations._files import MigrationFile, discover
from precog_db.migrations._ledger import AppliedMigration, baseline, ensure_ledger, read_ledger
from precog_db.migrations._lint import check_safety
from precog_db.migrations._lock import migration_lock
from precog_db.migrations._options import (
    BASELINE_LOCK_TIMEOUT,
    UP_DOWN_LOCK_TIMEOUT,
    BaselineKeywords,
    MigrationOptions,
    RevertKeywords,
    UpgradeKeywords,
    resolve,
)
from precog_db.settings import DatabaseSettings, load_settings

__all__ = [
    "Inspection",
    "RevertResult",
    "UpgradeResult",
    "inspect",
    "mark_baseline",
    "predecessor_ledger",
    "revert",
    "upgrade",
]


@dataclass(frozen=True)
class Inspection:
    """The migration files, the ledger of one database, and every problem between them."""

    files: list[MigrationFile]
    ledger: dict[int, AppliedMigration]
    problems: list[Problem]


def inspect(
    settings: DatabaseSettings,
    directory: Path | MigrationOptions = Path("migrations"),
    *,
    operation: str = "read the migration ledger",
) -> Inspection:
    """Read the files in ``directory`` and the ledger of ``settings``' database (through the chokepoint); validate.

    ``directory`` may be the `MigrationOptions` of the other workflows (its ``directory`` is used).
    """
    files = discover(directory.directory if isinstance(directory, MigrationOptions) else directory)
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
    settings: DatabaseSettings, options: MigrationOptions | None = None, **keywords: Unpack[UpgradeKeywords]
) -> UpgradeResult:
    """Apply the pending migrations in ``directory`` to ``settings``' database (``precog-db migrate up``).

    ``options`` (a `MigrationOptions`) says how; any field of it may also be
    given as a keyword (``upgrade(settings, directory=…, confirm_database=…)``),
    which replaces that field of ``options``. ``lock_timeout`` defaults to 300 s.

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
    o = resolve("upgrade", options, keywords, UpgradeKeywords)
    reason = o.checked_reason(promotion=True)
    env = settings.env
    tell = o.notify if o.notify is not None else (lambda _text: None)
    display = NoProgress() if o.progress is None else o.progress
    name = "migrate up (dry run)" if o.dry_run else "migrate up"
    with audit.operation(name, settings, migrations_dir=str(o.directory), reason=reason) as info:
        files = discover(o.directory)
        conn = connect(
            settings.replace(application_name=f"precog-db migrate {env.value}"), operation="migrate", direct=True
        )
        try:
            plan = pending(files, read_ledger(conn), o.target)
            info["planned"] = [m.filename for m in plan]
            promotion = "not needed"
            predecessor = PREDECESSOR.get(env)
            if predecessor is not None and plan:
                try:
                    before = predecessor_ledger(settings, predecessor, config_dir=o.config_dir)
                except (PrecogDBError, OSError) as exc:
                    problem = scrub_text(str(exc), [settings.password])
                    if not o.skip_promotion_check:
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
            if plan:
                _lint_plan(plan, env, info, tell, down=False)
            if o.dry_run or not plan:
                return UpgradeResult(o.dry_run, plan, promotion)
            tell(
                f"plan: {len(plan)} migration(s) for the {settings.describe()}: " + ", ".join(m.filename for m in plan)
            )
            _confirm_and_back_up(
                info,
                settings,
                conn,
                o,
                action=f"apply {len(plan)} migration(s)",
                purpose="before migrate up",
                display=display,
                tell=tell,
            )
            applied: list[dict[str, Any]] = []
            info["applied"] = applied
            with migration_lock(conn, timeout=o.lock_wait(UP_DOWN_LOCK_TIMEOUT), on_wait=o.on_lock_wait):
                ensure_ledger(conn)
                todo = pending(discover(o.directory), read_ledger(conn), o.target)
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
                        row = _apply_with_retries(conn, migration, settings, o, tell)
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
    return UpgradeResult(o.dry_run, plan, promotion, applied, info.get("backup"))


def _lint_plan(
    plan: list[MigrationFile], env: Environment, info: dict[str, Any], tell: Callable[[str], None], *, down: bool
) -> None:
    """`check_safety` of what is about to run: up refused on staging and prod, otherwise warnings (and audit)."""
    # A down section undoes its file (dropping what up created is its nature): warned about, never refused.
    safety = check_safety(plan, enforce=not down and env in (Environment.STAGING, Environment.PROD), down=down)
    if safety.acknowledged:
        info["acknowledged"] = safety.acknowledged
    if safety.not_linted is not None:
        tell(f"warning: the migrations were not linted: {safety.not_linted}")
    for f in safety.unacknowledged:
        tell(f"warning: {f.path.name}, line {f.line}: {f.rule}: {f.message} Instead: {f.advice}")
    if safety.unacknowledged:
        info["lint_warnings"] = [f"{f.path.name}:{f.line}: {f.rule}" for f in safety.unacknowledged]


#: Seconds before the first retry of a file that hit its lock timeout; doubled each time, capped.
_RETRY_BACKOFF, _RETRY_BACKOFF_CAP = 1.0, 30.0


def _apply_with_retries(
    conn: Connection[Any],
    migration: MigrationFile,
    settings: DatabaseSettings,
    o: MigrationOptions,
    tell: Callable[[str], None],
) -> AppliedMigration:
    """`apply_migration` under ``DB_MIGRATION_LOCK_TIMEOUT``; a lock timeout is retried ``o.lock_retries`` times
    with backoff. The wait is watched from a second connection (`watcher`), so a timeout names its lock."""
    if o.lock_retries < 0:
        raise ConfigurationError("lock_retries must be zero or more")
    for attempt in range(o.lock_retries + 1):
        try:
            return apply_migration(
                conn, migration, lock_timeout_ms=settings.migration_lock_timeout_ms, watch=watcher(settings)
            )
        except MigrationLockTimeoutError as exc:
            if attempt == o.lock_retries:
                if o.lock_retries:
                    raise MigrationLockTimeoutError(f"{exc} (gave up after {o.lock_retries} retries)") from None
                raise
            pause = min(_RETRY_BACKOFF * 2**attempt, _RETRY_BACKOFF_CAP)
            tell(f"{exc}; retry {attempt + 1} of {o.lock_retries} in {pause:.0f} s")
            time.sleep(pause)
    raise AssertionError("unreachable")


def watcher(settings: DatabaseSettings) -> Callable[[], Connection[Any]]:
    """The factory of the second connection a `LockWatch` observes a migration's lock wait from (the chokepoint)."""
    watching = settings.replace(application_name=f"precog-db migrate {settings.env.value} (lock watch)")
    return lambda: connect(watching, operation="watch the migration's lock wait", direct=True)


def mark_baseline(
    settings: DatabaseSettings,
    version: int,
    options: MigrationOptions | None = None,
    **keywords: Unpack[BaselineKeywords],
) -> list[AppliedMigration]:
    """`baseline` ``settings``' database at ``version`` under the lock, confirmed and audited (``migrate baseline``).

    Of ``options`` (or the keywords ``directory``, ``confirm``, ``confirm_database``, ``on_lock_wait``) it uses
    those and ``lock_timeout`` (default 60 s).
    """
    o = resolve("mark_baseline", options, keywords, BaselineKeywords)
    with audit.operation("migrate baseline", settings, version=version) as info:
        files = discover(o.directory)
        conn = connect(settings, operation="baseline the migration ledger", direct=True)
        try:
            action = f"record migrations up to {version} as applied"
            info["confirmation"] = _confirmer(settings, o)(action)
            with migration_lock(conn, timeout=o.lock_wait(BASELINE_LOCK_TIMEOUT), on_wait=o.on_lock_wait):
                rows = baseline(conn, files, version)
        finally:
            conn.close()
        info["baselined"] = [r.version for r in rows]
    return rows


def _confirmer(settings: DatabaseSettings, o: MigrationOptions) -> Callable[[str], str]:
    """``o.confirm``, else `precog_db.confirm`'s typed confirmation (staging and prod) with ``o.confirm_database``."""
    if o.confirm is not None:
        return o.confirm
    return lambda action: confirmation(settings, action, confirm_database=o.confirm_database)


def _confirm_and_back_up(
    info: dict[str, Any],
    settings: DatabaseSettings,
    conn: Connection[Any],
    o: MigrationOptions,
    *,
    action: str,
    purpose: str,
    display: ProgressDisplay,
    tell: Callable[[str], None],
) -> str | None:
    """What `upgrade` and `revert` do before changing the schema: confirm, then on prod a verified backup.

    Records both in the audit ``info``; returns the backup's path, ``skipped (--no-backup)`` or None.
    """
    info["confirmation"] = _confirmer(settings, o)(action)
    if settings.env is not Environment.PROD:
        return None
    if not o.take_backup:
        info["backup"] = "skipped (--no-backup)"
    else:
        made = backup_database(
            settings,
            server_major=conn.info.server_version // 10000,
            purpose=purpose,
            root=o.backup_root,
            keep=o.keep,
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
    settings: DatabaseSettings, options: MigrationOptions | None = None, **keywords: Unpack[RevertKeywords]
) -> RevertResult:
    """Revert applied migrations newest first (``precog-db migrate down``), as one audited operation.

    The mirror of `upgrade`: plan (`plan_downgrade`: a file without a down
    section stops everything before it runs); stop for ``dry_run`` or an empty
    plan; confirm (the typed confirmation on staging and prod); on prod a
    verified backup first (unless ``take_backup`` is false, which needs a
    ``reason``); then `downgrade` under the migration lock, re-planning there
    and refusing a plan that changed since it was confirmed.

    ``options`` and the keywords as for `upgrade` (``skip_promotion_check`` and
    ``config_dir`` have no use here, and are refused as keywords).
    """
    o = resolve("revert", options, keywords, RevertKeywords)
    reason = o.checked_reason(promotion=False)
    env = settings.env
    tell = o.notify if o.notify is not None else (lambda _text: None)
    display = NoProgress() if o.progress is None else o.progress
    name = "migrate down (dry run)" if o.dry_run else "migrate down"
    with audit.operation(name, settings, migrations_dir=str(o.directory), reason=reason, target=o.target) as info:
        files = discover(o.directory)
        conn = connect(
            settings.replace(application_name=f"precog-db migrate {env.value}"), operation="migrate", direct=True
        )
        try:
            plan = plan_downgrade(files, read_ledger(conn), o.target)
            info["planned"] = [m.filename for m in plan]
            if plan:
                _lint_plan(plan, settings.env, info, tell, down=True)
            if o.dry_run or not plan:
                return RevertResult(o.dry_run, plan)
            tell(f"plan: revert {len(plan)} migration(s) of the {settings.describe()}: " + ", ".join(info["planned"]))
            result = RevertResult(o.dry_run, plan)
            result.backup = _confirm_and_back_up(
                info,
                settings,
                conn,
                o,
                action=f"revert {len(plan)} migration(s)",
                purpose="before migrate down",
                display=display,
                tell=tell,
            )
            info["reverted"] = result.reverted
            try:
                downgrade(
                    conn,
                    o.directory,
                    target=o.target,
                    planned=info["planned"],
                    lock_timeout=o.lock_wait(UP_DOWN_LOCK_TIMEOUT),
                    on_lock_wait=o.on_lock_wait,
                    on_progress=display.update,
                    on_reverted=result.reverted.append,
                    lock_timeout_ms=settings.migration_lock_timeout_ms,
                    watch=watcher(settings),
                )
            finally:
                display.done()
            return result
        finally:
            conn.close()
