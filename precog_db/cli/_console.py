"""``precog-db sql`` and ``precog-db shell``: thin commands over `precog_db.console`."""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from typing import Any

from precog_db import audit
from precog_db.cli._context import EXIT_FAILED, EXIT_OK, Context, add_command
from precog_db.confirm import use_colour
from precog_db.environment import STRICT

__all__ = ["register"]


def register(commands: Any, parents: Sequence[argparse.ArgumentParser]) -> None:
    """Add this group's commands to ``commands``."""
    parents = list(parents)
    p = add_command(
        commands,
        "sql",
        "run one SQL statement through the library (read-only unless --write) and print the rows",
        parents=parents,
        description="Run one statement with get_cursor() (get_cursor(commit=True) with --write) and print the "
        "rows as a table, or as JSON rows with --json. Without --write a write is refused and nothing is written. "
        "On staging and prod --write needs the typed confirmation (the database name at a terminal, or "
        "--confirm-database NAME).",
    )
    p.add_argument("statement", help="the SQL statement")
    p.add_argument(
        "--write",
        action="store_true",
        help="run it in a read-write transaction, committed at the end (default: read-only)",
    )
    p.set_defaults(handler=cmd_sql)

    p = add_command(
        commands,
        "shell",
        "open psql on the environment's database, read-only unless --write, after the usual checks",
        parents=parents,
        description="Open psql on the resolved environment's database after the checks of any precog_db "
        "connection (naming rule, PRECOG_PROD_CONFIRMED=yes on prod, identity stamp). The session is read-only "
        "unless --write; on staging and prod --write needs the typed confirmation, and DB_SHELL_STATEMENT_TIMEOUT "
        "applies. The password reaches psql through a temporary 0600 passfile, removed afterwards. Arguments "
        "after -- go to psql unchanged: precog-db shell -- -At -c 'select 1'.",
    )
    p.add_argument("--write", action="store_true", help="a read-write session (default: read-only)")
    p.add_argument("psql_args", nargs=argparse.REMAINDER, help="-- then arguments for psql")
    p.set_defaults(handler=cmd_shell)


def _confirmation(ctx: Context, write: bool, action: str) -> str:
    settings = ctx.settings()
    if not write:
        return "not required (read-only)"
    return ctx.confirm(settings, action, typed_only=True) if settings.env in STRICT else "not required"


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, dict | list):
        return json.dumps(value, default=str, ensure_ascii=False)
    return str(value)


def _table(columns: Sequence[str], rows: Sequence[dict[str, Any]]) -> list[str]:
    cells = [[_cell(row[c]).replace("\n", "\\n") for c in columns] for row in rows]
    widths = [max([len(c), *(len(r[i]) for r in cells)]) for i, c in enumerate(columns)]
    lines = [" | ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip()]
    lines.append("-+-".join("-" * w for w in widths))
    lines += [" | ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    lines.append(f"({len(rows)} row{'' if len(rows) == 1 else 's'})")
    return lines


def cmd_sql(ctx: Context) -> int:
    from precog_db.console import run_statement

    settings = ctx.settings()
    write = bool(ctx.args.write)
    ctx.show_banner(settings, "sql --write" if write else "sql")
    with audit.operation("sql", settings, mode="write" if write else "read-only") as info:
        info["confirmation"] = _confirmation(ctx, write, "run a writing SQL statement")
        result = run_statement(settings, ctx.args.statement, write=write)
        info["status"] = result.status
        info["rowcount"] = result.rowcount
    if ctx.json:
        ctx.emit(list(result.rows), [])
    elif result.columns:
        ctx.emit(None, _table(result.columns, result.rows))
    else:
        ctx.emit(None, [result.status])
    return EXIT_OK


def cmd_shell(ctx: Context) -> int:
    from precog_db.console import find_psql, prepare_shell, run_shell, shell_environment_summary, signal_names

    psql_args = list(ctx.args.psql_args)
    if psql_args[:1] == ["--"]:
        psql_args = psql_args[1:]
    settings = ctx.settings()
    write = bool(ctx.args.write)
    find_psql()  # before anything else: no psql, nothing connects
    ctx.show_banner(settings, "shell --write" if write else "shell")
    with audit.operation("shell start", settings, mode="write" if write else "read-only") as info:
        info["confirmation"] = _confirmation(ctx, write, "open a writable psql session")
        plan = prepare_shell(settings, write=write, psql_args=psql_args, colour=use_colour(ctx.stdout))
        info.update(shell_environment_summary(plan))
        confirmation = info["confirmation"]
    started = time.monotonic()
    code = EXIT_FAILED
    try:
        code = run_shell(plan)
    finally:
        audit.record(
            "shell end",
            outcome=audit.OK if code == 0 else audit.FAILED,
            settings=settings,
            confirmation=confirmation,
            duration_s=time.monotonic() - started,
            exit_code=code,
            signals=signal_names(plan),
            **shell_environment_summary(plan),
        )
    return code
