"""``precog-db backup`` and ``restore``: thin commands over `precog_db.backup`'s workflows."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from precog_db.cli._context import EXIT_OK, Context, Progress, add_backup_options, add_command

__all__ = ["register"]


def register(commands: Any, parents: Sequence[argparse.ArgumentParser]) -> None:
    """Add this group's commands to ``commands``."""
    parents = list(parents)
    p = add_command(
        commands,
        "backup",
        "pg_dump in custom format to backups/<env>/, verified with pg_restore --list, old dumps pruned",
        parents=parents,
    )
    add_backup_options(p)
    p.set_defaults(handler=cmd_backup)

    p = add_command(
        commands,
        "restore",
        "restore a pg_dump archive into the dev or test database (replaces the objects it contains)",
        parents=parents,
        description="Restore a custom-format dump into the dev or test database in one transaction "
        "(--clean --if-exists --no-owner --no-privileges). Never into staging or prod. Asks for the database "
        "name at a terminal; use --yes or --confirm-database without one. The restored database is re-stamped "
        "with the target environment.",
    )
    p.add_argument("file", type=Path, help="the .dump file")
    p.set_defaults(handler=cmd_restore)


def cmd_backup(ctx: Context) -> int:
    from precog_db.backup import backup_database

    settings = ctx.settings()
    ctx.show_banner(settings, "backup")
    conn = ctx.connect(settings, "back up")
    try:
        made = backup_database(
            settings,
            server_major=conn.info.server_version // 10000,
            purpose="backup command",
            root=getattr(ctx.args, "backup_dir", None),
            keep=getattr(ctx.args, "keep", None),
            progress=Progress(ctx.stderr),
        )
    finally:
        conn.close()
    ctx.emit(
        {
            "path": str(made.path),
            "size": made.size,
            "entries": made.entries,
            "verified": True,
            "pruned": [str(p) for p in made.pruned],
            "tool": str(made.tool),
        },
        [made.summary()],
    )
    return EXIT_OK


def cmd_restore(ctx: Context) -> int:
    from precog_db.backup import restore_database

    settings = ctx.settings()
    path = Path(ctx.args.file)
    ctx.show_banner(settings, "restore")
    done = restore_database(settings, path, confirm=ctx.confirmer(settings, always=True))
    lines = [f"restored {path} into the {settings.describe()} ({done.entries} archive entries)"]
    if done.restamped is not None:
        lines.append(f"re-stamped it as {settings.env.value} (the dump carried the {done.restamped.split()[0]} stamp)")
    ctx.emit({"restored": str(path), "entries": done.entries, "restamped": done.restamped}, lines)
    return EXIT_OK
