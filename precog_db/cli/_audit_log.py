"""``precog-db audit tail``: the latest audit-log entries."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from precog_db import audit
from precog_db.cli._context import EXIT_OK, Context, add_actions, add_command
from precog_db.errors import UsageError

__all__ = ["register"]


def register(commands: Any, parents: Sequence[argparse.ArgumentParser]) -> None:
    """Add this group's commands to ``commands``."""
    parents = list(parents)
    p = add_command(commands, "audit", "read the audit log", parents=parents)
    audit_cmds = add_actions(p, "audit_command")
    q = add_command(audit_cmds, "tail", "print the most recent audit-log entries", parents=parents)
    q.add_argument("-n", "--lines", type=int, default=20, metavar="N", help="how many entries (default 20)")
    q.set_defaults(handler=cmd_audit_tail)


def _entry_line(entry: dict[str, Any]) -> str:
    if "unreadable" in entry:
        return f"(unreadable line) {entry['unreadable'][:200]}"
    db = entry.get("database") or {}
    where = f"{db.get('name')}@{db.get('host')}:{db.get('port')}" if db else "-"
    parts = [
        str(entry.get("ts", "?")),
        f"{entry.get('who', '?')}@{entry.get('host', '?')}",
        str(entry.get("environment") or "-"),
        where,
        str(entry.get("operation", "?")),
        str(entry.get("outcome", "?")).upper(),
    ]
    if entry.get("confirmation"):
        parts.append(f"[{entry['confirmation']}]")
    if entry.get("duration_ms") is not None:
        parts.append(f"{entry['duration_ms']} ms")
    if entry.get("error"):
        parts.append(f"- {entry['error']}")
    return "  ".join(parts)


def cmd_audit_tail(ctx: Context) -> int:
    if ctx.args.lines < 1:
        raise UsageError("-n must be at least 1")
    path = audit.audit_log_path()
    entries = audit.tail(ctx.args.lines, path)
    lines = [_entry_line(e) for e in entries] if entries else [f"no audit entries in {path}"]
    ctx.emit(entries, lines)
    return EXIT_OK
