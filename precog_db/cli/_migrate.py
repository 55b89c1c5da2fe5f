"""``precog-db migrate new|up|down|status|validate|baseline|lint|rehearse``: thin commands over `migrations`."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from precog_db.cli._context import EXIT_FAILED, EXIT_OK, Context, Progress, add_actions, add_backup_options, add_command
from precog_db.errors import UsageError

if TYPE_CHECKING:
    from precog_db.migrations import MigrationFile
    from precog_db.settings import DatabaseSettings

__all__ = ["register"]


def register(commands: Any, parents: Sequence[argparse.ArgumentParser]) -> None:
    """Add this group's commands to ``commands``."""
    parents = list(parents)
    p = add_command(commands, "migrate", "SQL migrations in migrations/ with a ledger in precog_meta", parents=parents)
    _add_migrations_dir(p, top=True)
    migrate = add_actions(p, "migrate_command")
    mig_parents = [*parents, _migrations_dir_option()]
    q = add_command(migrate, "new", "create the next numbered migration file", parents=mig_parents)
    q.add_argument("name", help="what the migration does, e.g. create_markets")
    q.set_defaults(handler=cmd_migrate_new)
    q = add_command(
        migrate,
        "up",
        "apply pending migrations, each in its own transaction",
        parents=mig_parents,
        description="Apply pending migrations in order, each file in its own transaction with its ledger "
        "row. An advisory lock serializes runs: a second run waits (up to --lock-timeout) and then applies "
        "only what is still pending. On staging every migration must first be applied to test with the same "
        "checksum, on prod to staging. On prod a verified backup is taken first.",
    )
    q.add_argument("--dry-run", action="store_true", help="print the plan and the promotion check; change nothing")
    q.add_argument("--target", type=int, metavar="VERSION", help="apply up to and including this version")
    q.add_argument(
        "--lock-timeout",
        type=float,
        default=300.0,
        metavar="SECONDS",
        help="how long to wait for another run's migration lock (default 300)",
    )
    q.add_argument(
        "--skip-promotion-check",
        action="store_true",
        help="migrate even though the previous environment's ledger cannot be read (needs --reason); "
        "never skips a migration the previous environment is known not to have",
    )
    q.add_argument(
        "--lock-retries",
        type=int,
        default=0,
        metavar="N",
        help="retry a file that hit DB_MIGRATION_LOCK_TIMEOUT up to N times, with backoff (default 0)",
    )
    q.add_argument("--no-backup", action="store_true", help="prod: do not take the backup first (needs --reason)")
    q.add_argument("--reason", help="why a check or the backup is skipped; recorded in the audit log")
    add_backup_options(q)
    q.set_defaults(handler=cmd_migrate_up)
    q = add_command(
        migrate,
        "down",
        "revert applied migrations newest first, using each file's -- precog:down section",
        parents=mig_parents,
        description="Revert the newest applied migration, or with --target N every one after N (0: all), "
        "newest first, each file's down section in its own transaction with the removal of its ledger row. "
        "A file without a down section stops the command before anything runs. On prod: the typed "
        "confirmation and a verified backup first, as for migrate up.",
    )
    q.add_argument("--target", type=int, metavar="VERSION", help="revert every migration after this version")
    q.add_argument("--dry-run", action="store_true", help="print what would be reverted; change nothing")
    q.add_argument("--lock-timeout", type=float, default=300.0, metavar="SECONDS", help="default 300")
    q.add_argument("--no-backup", action="store_true", help="prod: do not take the backup first (needs --reason)")
    q.add_argument("--reason", help="why the backup is skipped; recorded in the audit log")
    add_backup_options(q)
    q.set_defaults(handler=cmd_migrate_down)
    q = add_command(
        migrate, "status", "list each migration: applied (when, by whom), pending or problem", parents=mig_parents
    )
    q.set_defaults(handler=cmd_migrate_status)
    q = add_command(
        migrate,
        "validate",
        "fail when an applied file was edited, a file is missing, versions have gaps or are out of order",
        parents=mig_parents,
    )
    q.set_defaults(handler=cmd_migrate_validate)
    q = add_command(
        migrate,
        "baseline",
        "mark an existing database as being at VERSION (files up to it recorded as applied)",
        parents=mig_parents,
    )
    q.add_argument("version", type=int, help="the version the database's current schema corresponds to")
    q.set_defaults(handler=cmd_migrate_baseline)
    q = add_command(
        migrate,
        "lint",
        "check migration files with squawk: statements that lock or break a live database",
        parents=mig_parents,
        description="Run squawk (the `lint` extra: pip install 'precog-db[lint]') over the up section of each "
        "pending migration file (--all: every file, without connecting) and print, for each finding, the file, "
        "the line, squawk's rule and what to do instead. Exit 1 when anything is found. Style-only rules are "
        "off (docs/CLI.md, 'Safe migrations').",
    )
    q.add_argument("--all", action="store_true", help="lint every migration file, not only the pending ones")
    q.set_defaults(handler=cmd_migrate_lint)
    q = add_command(
        migrate,
        "rehearse",
        "apply the pending migrations to a restored copy of the newest verified backup; the target is not changed",
        parents=mig_parents,
        description="Restore the newest verified backup of the target (the dumps `precog-db backup` writes, "
        "in --backup-dir) into a throwaway database <db>_rehearse_<random> on the same server, apply the "
        "pending migrations there as migrate up would (lint, DB_MIGRATION_LOCK_TIMEOUT), and report per file: "
        "applied or failed, the time taken and the strongest lock it took on which table. The throwaway "
        "database is always dropped. With --local the copy lives in a throwaway local cluster instead (its own "
        "temporary directory and port, the dump's PostgreSQL major version), stopped and deleted afterwards. "
        "Exit 1 when a file fails.",
    )
    q.add_argument("--target", type=int, metavar="VERSION", help="rehearse up to and including this version")
    q.add_argument(
        "--local",
        action="store_true",
        help="restore into a throwaway local cluster (initdb in a temporary directory) instead of the target's server",
    )
    q.add_argument(
        "--backup-dir",
        default=None,
        metavar="DIR",
        help="where the dumps are (default: PRECOG_BACKUP_DIR or ./backups)",
    )
    q.set_defaults(handler=cmd_migrate_rehearse)


def _add_migrations_dir(parser: argparse.ArgumentParser, *, top: bool) -> None:
    parser.add_argument(
        "--migrations-dir",
        type=Path,
        default=None if top else argparse.SUPPRESS,
        metavar="DIR",
        help="where the NNNN_name.sql files are (default: ./migrations)",
    )


def _migrations_dir_option() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    _add_migrations_dir(p, top=False)
    return p


def _migrations_dir(ctx: Context) -> Path:
    configured = getattr(ctx.args, "migrations_dir", None)
    return Path(configured) if configured is not None else Path("migrations")


def cmd_migrate_new(ctx: Context) -> int:
    from precog_db.migrations import new_migration

    path = new_migration(_migrations_dir(ctx), ctx.args.name)
    ctx.emit({"path": str(path)}, [f"created {path}"])
    return EXIT_OK


def _status_rows(
    files: Sequence[MigrationFile], ledger: dict[int, Any], problems: Sequence[Any]
) -> list[dict[str, Any]]:
    by_version: dict[int, list[str]] = {}
    for p in problems:
        by_version.setdefault(p.version, []).append(p.kind)
    rows = []
    names = {f.version: f.name for f in files} | {v: r.name for v, r in ledger.items()}
    for version in sorted(set(names) | set(by_version)):
        row = ledger.get(version)
        kinds = by_version.get(version, [])
        if "missing" in kinds:
            state = "FILE MISSING"
        elif "edited" in kinds:
            state = "EDITED"
        elif "gap" in kinds:
            state = "GAP"
        elif "out_of_order" in kinds:
            state = "OUT OF ORDER"
        elif "transaction_control" in kinds:
            state = "ENDS ITS TRANSACTION"
        elif "marker" in kinds:
            state = "MISPLACED MARKER"
        elif row is not None:
            state = row.kind
        else:
            state = "pending"
        rows.append(
            {
                "version": version,
                "name": names.get(version, ""),
                "state": state,
                "applied_at": row.applied_at.isoformat(timespec="seconds") if row is not None else None,
                "applied_by": row.applied_by if row is not None else None,
                "duration_ms": row.duration_ms if row is not None else None,
            }
        )
    return rows


def _inspected(
    ctx: Context, action: str
) -> tuple[DatabaseSettings, tuple[list[MigrationFile], dict[int, Any], list[Any]]]:
    """The banner for ``action``, then the files, the ledger and the problems of the target database."""
    from precog_db.migrations import inspect

    settings = ctx.settings()
    ctx.show_banner(settings, action)
    found = inspect(settings, _migrations_dir(ctx))
    return settings, (found.files, found.ledger, found.problems)


def cmd_migrate_status(ctx: Context) -> int:
    settings, (files, ledger, problems) = _inspected(ctx, "migrate status")
    rows = _status_rows(files, ledger, problems)
    applied = sum(1 for r in rows if r["state"] in ("applied", "baseline"))
    pending_count = sum(1 for r in rows if r["state"] == "pending")
    summary = (
        f"{len(files)} file(s) in {_migrations_dir(ctx)}: {applied} applied, {pending_count} pending, "
        f"{len(problems)} problem(s)"
    )
    lines = [f"migrations of the {settings.describe()}"]
    for r in rows:
        when = f"  {r['applied_at']} by {r['applied_by']} ({r['duration_ms']} ms)" if r["applied_at"] else ""
        lines.append(f"  {r['version']:>4}  {r['name']:<32} {r['state']:<12}{when}")
    lines.append(summary)
    lines.extend(f"  problem: {p.message}" for p in problems)
    ctx.emit(
        {
            "environment": settings.env.value,
            "database": settings.dbname,
            "migrations": rows,
            "problems": [p.__dict__ for p in problems],
        },
        lines,
    )
    return EXIT_OK


def cmd_migrate_validate(ctx: Context) -> int:
    settings, (files, ledger, problems) = _inspected(ctx, "migrate validate")
    lines = [f"{len(files)} file(s), {len(ledger)} ledger row(s) in the {settings.describe()}"]
    if problems:
        lines.extend(f"  {p.kind}: {p.message}" for p in problems)
        lines.append(f"INVALID: {len(problems)} problem(s)")
    else:
        lines.append("valid: every applied file is unchanged, none is missing, versions have no gaps")
    ctx.emit({"valid": not problems, "problems": [p.__dict__ for p in problems]}, lines)
    return EXIT_FAILED if problems else EXIT_OK


def cmd_migrate_up(ctx: Context) -> int:
    from precog_db.environment import Environment
    from precog_db.migrations import MigrationOptions, upgrade

    args = ctx.args
    reason = (args.reason or "").strip() or None
    if args.skip_promotion_check and not reason:
        raise UsageError('--skip-promotion-check needs --reason "..." (it goes to the audit log)')
    if args.no_backup and not reason:
        raise UsageError('--no-backup needs --reason "..." (it goes to the audit log)')
    if args.lock_timeout < 0:
        raise UsageError("--lock-timeout must be zero or more seconds")
    if not 0 <= args.lock_retries <= 20:
        raise UsageError("--lock-retries must be between 0 and 20")
    settings = ctx.settings()
    ctx.show_banner(settings, "migrate up" + (" --dry-run" if args.dry_run else ""))
    options = MigrationOptions(
        directory=_migrations_dir(ctx),
        target=args.target,
        dry_run=bool(args.dry_run),
        lock_timeout=args.lock_timeout,
        skip_promotion_check=bool(args.skip_promotion_check),
        lock_retries=args.lock_retries,
        take_backup=not args.no_backup,
        reason=reason,
        config_dir=args.config_dir,
        backup_root=getattr(args, "backup_dir", None),
        keep=getattr(args, "keep", None),
        confirm=ctx.confirmer(settings),
        notify=ctx.notify,
        on_lock_wait=ctx.note,
        progress=Progress(ctx.stderr),
    )
    result = upgrade(settings, options)
    plan, promotion = result.plan, result.promotion
    if result.dry_run or not plan:
        head = "would apply" if result.dry_run else "nothing to apply"
        lines = [
            f"{head} {len(plan)} migration(s) to the {settings.describe()}"
            if plan
            else f"{settings.describe()} is up to date; nothing to apply",
            *(f"  {m.filename}" for m in plan),
        ]
        if plan:
            lines.append(f"promotion check: {promotion}")
            if settings.env is Environment.PROD:
                lines.append(
                    "a verified backup would be taken first"
                    if not args.no_backup
                    else "no backup would be taken (--no-backup)"
                )
        ctx.emit({"dry_run": result.dry_run, "plan": [m.filename for m in plan], "promotion": promotion}, lines)
        return EXIT_OK
    applied = result.applied
    lines = [f"applied {a['file']} ({a['duration_ms']} ms)" for a in applied]
    lines.append(f"{len(applied)} migration(s) applied to the {settings.describe()}")
    ctx.emit({"applied": applied, "promotion": promotion, "backup": result.backup}, lines)
    return EXIT_OK


def cmd_migrate_down(ctx: Context) -> int:
    """``migrate down``: the thin shell over `precog_db.migrations.revert`."""
    from precog_db.migrations import MigrationOptions, revert

    args = ctx.args
    reason = (args.reason or "").strip() or None
    if args.no_backup and not reason:
        raise UsageError('--no-backup needs --reason "..." (it goes to the audit log)')
    if args.lock_timeout < 0:
        raise UsageError("--lock-timeout must be zero or more seconds")
    settings = ctx.settings()
    ctx.show_banner(settings, "migrate down" + (" --dry-run" if args.dry_run else ""))
    options = MigrationOptions(
        directory=_migrations_dir(ctx),
        target=args.target,
        dry_run=bool(args.dry_run),
        lock_timeout=args.lock_timeout,
        take_backup=not args.no_backup,
        reason=reason,
        backup_root=getattr(args, "backup_dir", None),
        keep=getattr(args, "keep", None),
        confirm=ctx.confirmer(settings),
        notify=ctx.notify,
        on_lock_wait=ctx.note,
        progress=Progress(ctx.stderr),
    )
    result = revert(settings, options)
    planned = [m.filename for m in result.plan]
    if result.dry_run or not planned:
        head = f"would revert {len(planned)} migration(s) of the {settings.describe()}, newest first"
        lines = [head if planned else f"{settings.describe()} has nothing to revert", *(f"  {f}" for f in planned)]
        ctx.emit({"dry_run": result.dry_run, "plan": planned}, lines)
        return EXIT_OK
    lines = [f"reverted {r['file']} ({r['duration_ms']} ms)" for r in result.reverted]
    lines.append(f"{len(result.reverted)} migration(s) reverted in the {settings.describe()}")
    ctx.emit({"reverted": result.reverted, "backup": result.backup}, lines)
    return EXIT_OK


def cmd_migrate_baseline(ctx: Context) -> int:
    from precog_db.migrations import MigrationOptions, mark_baseline

    settings = ctx.settings()
    version = ctx.args.version
    ctx.show_banner(settings, f"migrate baseline {version}")
    options = MigrationOptions(directory=_migrations_dir(ctx), confirm=ctx.confirmer(settings), on_lock_wait=ctx.note)
    rows = mark_baseline(settings, version, options)
    ctx.emit(
        {"baselined": [r.version for r in rows]},
        [f"recorded {len(rows)} migration(s) up to {version} as applied (baseline) in the {settings.describe()}"],
    )
    return EXIT_OK


def cmd_migrate_lint(ctx: Context) -> int:
    """``migrate lint``: the thin shell over `precog_db.migrations.lint`."""
    from precog_db.migrations import lint

    directory = _migrations_dir(ctx)
    if ctx.args.all:
        files, findings = lint(None, directory, all_files=True)
        scope = f"{len(files)} file(s) in {directory}"
    else:
        settings = ctx.settings()
        ctx.show_banner(settings, "migrate lint")
        files, findings = lint(settings, directory)
        scope = f"{len(files)} pending file(s) of the {settings.describe()}"
    lines = [f"{f.path}:{f.line}: {f.rule}: {f.message}\n    instead: {f.advice}" for f in findings]
    lines.append(f"{len(findings)} finding(s) in {scope}" if findings else f"no findings in {scope}")
    ctx.emit(
        {
            "files": [f.filename for f in files],
            "findings": [
                {"file": str(f.path), "line": f.line, "rule": f.rule, "message": f.message, "instead": f.advice}
                for f in findings
            ],
        },
        lines,
    )
    return EXIT_FAILED if findings else EXIT_OK


def cmd_migrate_rehearse(ctx: Context) -> int:
    """``migrate rehearse``: the thin shell over `precog_db.migrations.rehearse`."""
    from precog_db.migrations import rehearse

    settings = ctx.settings()
    ctx.show_banner(settings, "migrate rehearse")
    root = ctx.args.backup_dir
    result = rehearse(
        settings,
        _migrations_dir(ctx),
        backup_root=Path(root) if root else None,
        target=ctx.args.target,
        notify=ctx.notify,
        local=ctx.args.local,
    )
    where = "in a throwaway local cluster, removed" if result.cluster is not None else "dropped"
    lines = [f"rehearsal on a copy of {result.backup.name} (database {result.database}, {where})"]
    for f in result.files:
        took = f" ({f.duration_ms} ms)" if f.duration_ms is not None else ""
        lock = f"; strongest lock: {f.lock} on {f.table}" if f.lock else ""
        lines.append(f"  {f.status:<8} {f.file}{took}{lock}")
        if f.error:
            lines.append(f"    error: {f.error}")
    failed = [f.file for f in result.failed]
    if failed:
        lines.append(f"FAILED: {', '.join(failed)}; the target database was not changed")
    elif result.files:
        lines.append(f"passed: {len(result.files)} migration(s) applied to the copy; the target was not changed")
    else:
        lines.append("nothing pending on the copy; the target was not changed")
    ctx.emit(
        {
            "backup": str(result.backup),
            "database": result.database,
            "cluster": str(result.cluster) if result.cluster is not None else None,
            "files": [f.as_dict() for f in result.files],
            "failed": failed,
        },
        lines,
    )
    return EXIT_FAILED if failed else EXIT_OK
