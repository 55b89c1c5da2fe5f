"""``precog-db env``, ``check`` and ``stamp``: what the configured database is, and its identity."""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Sequence
from typing import Any

from precog_db import audit
from precog_db._secrets import MASK
from precog_db.cli._context import EXIT_FAILED, EXIT_OK, Context, add_command
from precog_db.environment import environment_named_by
from precog_db.settings import FIELD_VARS, resolve_config_dir

__all__ = ["cmd_check", "cmd_env", "cmd_stamp", "register"]


def register(commands: Any, parents: Sequence[argparse.ArgumentParser]) -> None:
    """Add this group's commands to ``commands``."""
    parents = list(parents)
    p = add_command(
        commands,
        "env",
        "show the resolved settings, where each value came from, and the precedence",
        parents=parents,
        description="Show the resolved environment and settings without connecting. The password is masked.",
    )
    p.set_defaults(handler=cmd_env)

    p = add_command(
        commands,
        "check",
        "connect and report server version, latency, stamp, pool settings and environment match",
        parents=parents,
    )
    p.set_defaults(handler=cmd_check)

    p = add_command(
        commands,
        "stamp",
        "write the identity stamp: record in the database which environment it belongs to",
        parents=parents,
        description="Stamp the configured database as belonging to --env. Re-stamping a database stamped "
        "with another environment needs --force. On prod this needs PRECOG_PROD_CONFIRMED=yes and the "
        "typed database name.",
    )
    p.add_argument("--force", action="store_true", help="replace a stamp that names another environment")
    p.set_defaults(handler=cmd_stamp)


def _origin(origin: str) -> str:
    return {"argument": "--database", "environment": "process environment", "default": "built-in default"}.get(
        origin, origin
    )


def cmd_env(ctx: Context) -> int:
    settings = ctx.settings()
    config_dir = resolve_config_dir(ctx.args.config_dir)
    files = [str(f) for f in settings.files]
    rows = []
    for field, var in FIELD_VARS.items():
        value: Any = getattr(settings, field)
        if field == "password":
            value = MASK if value else ""
        rows.append({"variable": var, "field": field, "value": value, "source": _origin(settings.origins[field])})
    precedence = [
        "--database",
        "process environment (DB_*, then DATABASE_URL)",
        str(config_dir / f".env.{settings.env.value}"),
        str(config_dir / ".env"),
        "built-in defaults",
    ]
    from precog_db.backup import backup_dir

    extra = {
        "PRECOG_PROD_CONFIRMED": "yes" if os.environ.get("PRECOG_PROD_CONFIRMED") == "yes" else "(not set)",
        "PRECOG_AUDIT_LOG": str(audit.audit_log_path()),
        "PRECOG_BACKUP_DIR": str(backup_dir()),
    }
    data = {
        "environment": settings.env.value,
        "environment_source": ctx.env_source,
        "config_dir": str(config_dir),
        "config_dir_exists": config_dir.is_dir(),
        "files": files,
        "precedence": precedence,
        "settings": rows,
        "other": extra,
        "describe": settings.describe(),
    }
    width = max(len(r["variable"]) for r in rows)
    vwidth = max(len(str(r["value"])) for r in rows)
    lines = [
        f"environment  {settings.env.value} ({ctx.env_source})",
        f"config dir   {config_dir}{'' if config_dir.is_dir() else ' (does not exist)'}",
        f"files read   {', '.join(files) if files else '(none)'}",
        f"precedence   {' > '.join(precedence)}",
        "",
    ]
    for r in rows:
        shown = str(r["value"]) if r["value"] != "" else "(empty)"
        lines.append(f"{r['variable']:<{width}}  {shown:<{vwidth}}  {r['source']}")
    lines.append("")
    lines.extend(f"{k:<{width}}  {v}" for k, v in extra.items())
    ctx.emit(data, lines)
    return EXIT_OK


# --- check -------------------------------------------------------------------------------------------


def cmd_check(ctx: Context) -> int:
    from precog_db.guard import production_confirmed
    from precog_db.pool import create_pool
    from precog_db.stamp import read_stamp, stamp_command

    settings = ctx.settings()
    ctx.show_banner(settings, "check")
    pool = create_pool(settings, prod_confirmed=production_confirmed(), min_size=1, max_size=1)
    try:
        with pool.connection() as conn:
            row = conn.execute("SHOW server_version").fetchone()
            version = str(row[0]) if row else "unknown"
            timings = []
            for _ in range(5):
                started = time.perf_counter()
                conn.execute("SELECT 1").fetchone()
                timings.append((time.perf_counter() - started) * 1000)
    finally:
        pool.close()
    latency = sorted(timings)[len(timings) // 2]  # the median of five
    stamp = read_stamp(settings)
    named = environment_named_by(settings.dbname)
    mismatches = []
    if stamp is not None and stamp.env is not settings.env:
        mismatches.append(f"the stamp says {stamp.env.value}")
    if named is not None and named is not settings.env:
        mismatches.append(f"the database name says {named.value}")
    matches = not mismatches
    if stamp is None:
        stamp_text = f"unstamped (stamp it with `{stamp_command(settings.env)}`)"
    else:
        stamp_text = stamp.describe() + (f"; a restored copy: {stamp.copy_reason}" if stamp.is_copy else "")
    evidence = [f"stamp: {stamp.env.value if stamp else 'none'}", f"name: {named.value if named else 'neutral'}"]
    match_text = (
        f"{settings.env.value}: matches ({', '.join(evidence)})"
        if matches
        else f"{settings.env.value}: MISMATCH ({'; '.join(mismatches)})"
    )
    data = {
        "environment": settings.env.value,
        "database": {"host": settings.host, "port": settings.port, "name": settings.dbname, "user": settings.user},
        "server_version": version,
        "latency_ms": round(latency, 3),
        "stamp": None
        if stamp is None
        else {
            "env": stamp.env.value,
            "stamped_by": stamp.stamped_by,
            "stamped_at": stamp.stamped_at.isoformat(),
            "is_copy": stamp.is_copy,
        },
        "pool": {
            "min": settings.pool_min,
            "max": settings.pool_max,
            "timeout_s": settings.pool_timeout,
            "connect_timeout_s": settings.connect_timeout,
            "statement_timeout_ms": settings.statement_timeout_ms,
        },
        "environment_matches": matches,
    }
    lines = [
        f"database     {settings.describe()}",
        f"server       PostgreSQL {version}",
        f"latency      {latency:.2f} ms (median of 5 round trips)",
        f"stamp        {stamp_text}",
        f"pool         min {settings.pool_min}, max {settings.pool_max}, checkout timeout {settings.pool_timeout:g}s, "
        f"connect timeout {settings.connect_timeout}s, statement timeout "
        f"{settings.statement_timeout_ms or 'none'}{' ms' if settings.statement_timeout_ms else ''}",
        f"environment  {match_text}",
    ]
    ctx.emit(data, lines)
    return EXIT_OK if matches else EXIT_FAILED


def cmd_stamp(ctx: Context) -> int:
    from precog_db.stamp import stamp_database

    settings = ctx.settings()
    ctx.show_banner(settings, "stamp")
    with audit.operation("stamp", settings, force=bool(ctx.args.force)) as info:
        info["confirmation"] = ctx.confirm(settings, f"stamp the database as {settings.env.value}")
        stamp = stamp_database(settings.env, force=bool(ctx.args.force), settings=settings)
    ctx.emit(
        {"environment": settings.env.value, "database": settings.dbname, "stamp": stamp.describe()},
        [f"stamped the {settings.describe()}: {stamp.describe()}"],
    )
    return EXIT_OK
