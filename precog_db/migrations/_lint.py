"""``precog-db migrate lint``: the migration files' up sections checked by squawk, findings at the file's lines.

squawk (PyPI ``squawk-cli``, the ``lint`` extra) is a PostgreSQL migration
linter over PostgreSQL's own grammar; rule names are squawk's. Each file's
up section (everything before ``-- precog:down``, so the file's own line
numbers) is given to ``squawk --reporter json`` on standard input: with
``--assume-in-transaction`` for an ordinary file (precog wraps it in a
transaction), without it for a ``-- precog:no-transaction`` file, so
``CREATE INDEX CONCURRENTLY`` passes there and is refused in a transactional file.

Rules in `OFF_BY_DEFAULT` are about style, or about settings precog makes
itself, and are not reported; every other squawk rule is on.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from precog_db.connection import connect
from precog_db.errors import ConfigurationError, MigrationValidationError, UsageError
from precog_db.migrations._files import MigrationFile, discover
from precog_db.migrations._ledger import read_ledger
from precog_db.migrations._sections import ALLOW_MARKER, acknowledgements, sections

if TYPE_CHECKING:
    from precog_db.settings import DatabaseSettings

__all__ = [
    "OFF_BY_DEFAULT",
    "Finding",
    "SafetyCheck",
    "check_safety",
    "lint",
    "lint_files",
    "lint_sql",
    "squawk_path",
]

#: squawk rules not reported, and why: style only, or what precog sets itself.
OFF_BY_DEFAULT: dict[str, str] = {
    "prefer-robust-stmts": "style: IF NOT EXISTS for re-running a half-applied file; precog runs each file in one "
    "transaction (or records a no-transaction file only when every statement succeeded)",
    "prefer-bigint-over-int": "style: a column type choice, not a locking hazard",
    "prefer-bigint-over-smallint": "style: a column type choice, not a locking hazard",
    "prefer-identity": "style: serial versus identity, not a locking hazard",
    "prefer-text-field": "style: varchar(n) versus text; changing it later is caught by changing-column-type",
    "prefer-timestamptz": "style: a column type choice, not a locking hazard",
    "ban-char-field": "style: a column type choice, not a locking hazard",
    "require-lock-timeout": "migrate up sets lock_timeout for every statement (DB_MIGRATION_LOCK_TIMEOUT)",
    "require-statement-timeout": "a long statement is the point of some migrations; the lock hazard is "
    "covered by lock_timeout and by the rules on the statements themselves",
    "transaction-nesting": "precog refuses BEGIN/COMMIT in a migration file itself, before squawk runs",
}

_SQUAWK_TIMEOUT = 60.0


@dataclass(frozen=True)
class Finding:
    """One squawk finding, at a line of the migration file."""

    path: Path
    line: int
    rule: str
    message: str
    #: What to do instead (squawk's help, or its message when it has none).
    advice: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.rule}: {self.message} Instead: {self.advice}"


def squawk_path() -> str:
    """The squawk binary: beside this Python (a virtualenv's bin) or on PATH; refuses clearly when missing."""
    beside = Path(sys.executable).parent / "squawk"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("squawk")
    if found is None:
        raise ConfigurationError(
            "migration lint needs squawk, the PostgreSQL migration linter, and it is not installed: "
            "pip install 'precog-db[lint]' (or pip install squawk-cli) in this environment"
        )
    return found


def _run_squawk(binary: str, sql: str, *, in_transaction: bool, label: str) -> list[dict[str, object]]:
    exclude = ",".join(sorted(OFF_BY_DEFAULT))
    command = [binary, "--reporter", "json", f"--exclude={exclude}", f"--stdin-filepath={label}"]
    command.append("--assume-in-transaction" if in_transaction else "--no-assume-in-transaction")
    done = subprocess.run(command, input=sql, capture_output=True, text=True, timeout=_SQUAWK_TIMEOUT, check=False)
    out = done.stdout.strip()
    if done.returncode not in (0, 1) or not out.startswith("["):
        raise ConfigurationError(
            f"squawk failed on {label} (exit {done.returncode}): {(done.stderr or out).strip()[:500]}; "
            "run `squawk` on the file to see why"
        )
    found = json.loads(out)
    return [f for f in found if isinstance(f, dict)]


def lint_files(files: Iterable[MigrationFile], *, squawk: str | None = None, down: bool = False) -> list[Finding]:
    """squawk's findings on each file's up (``down``: down) section, in file order, at the file's own lines."""
    binary = squawk or squawk_path()
    findings: list[Finding] = []
    for migration in files:
        body = migration.sql()
        parts = sections(body)
        text = (parts.down or "") if down else parts.up
        if not text.strip():
            continue
        # Lines before the section: the down section starts after the `-- precog:down` line.
        skipped = body[: parts.down_start].count("\n") if down and parts.down_start is not None else 0
        for raw in _run_squawk(binary, text, in_transaction=not parts.no_transaction, label=str(migration.path)):
            line = raw.get("line")
            message = str(raw.get("message") or "").strip()
            advice = str(raw.get("help") or "").strip() or message
            findings.append(
                Finding(
                    path=migration.path,
                    # squawk counts lines from 0; the up section starts at the file's first line.
                    line=skipped + ((line + 1) if isinstance(line, int) else 1),
                    rule=str(raw.get("rule_name") or "unknown"),
                    message=message,
                    advice=advice,
                )
            )
    return findings


def lint_sql(sql: str, path: Path, *, squawk: str | None = None, in_transaction: bool = True) -> list[Finding]:
    """squawk's findings on ``sql`` (not a migration file: e.g. the SQL Alembic renders), lines of ``sql``."""
    findings: list[Finding] = []
    for raw in _run_squawk(squawk or squawk_path(), sql, in_transaction=in_transaction, label=str(path)):
        line = raw.get("line")
        message = str(raw.get("message") or "").strip()
        findings.append(
            Finding(
                path=path,
                line=(line + 1) if isinstance(line, int) else 1,
                rule=str(raw.get("rule_name") or "unknown"),
                message=message,
                advice=str(raw.get("help") or "").strip() or message,
            )
        )
    return findings


def lint(
    settings: DatabaseSettings | None,
    directory: Path = Path("migrations"),
    *,
    all_files: bool = False,
) -> tuple[list[MigrationFile], list[Finding]]:
    """The files linted and squawk's findings not acknowledged in their file (``precog-db migrate lint``).

    By default the files not yet in the ledger of ``settings``' database (read
    through the chokepoint); with ``all_files`` every file in ``directory``,
    without connecting (``settings`` may then be None).
    """
    files = discover(directory)
    if not all_files:
        if settings is None:
            raise UsageError("lint of the pending migrations needs the settings of the database; or lint all files")
        conn = connect(settings, operation="read the migration ledger to lint what is pending", direct=True)
        try:
            ledger = read_ledger(conn)
        finally:
            conn.close()
        files = [f for f in files if f.version not in ledger]
    binary = squawk_path()
    allowed = {f.path: {a.rule for a in acknowledgements(f.sql())} for f in files}
    return files, [f for f in lint_files(files, squawk=binary) if f.rule not in allowed[f.path]]


def _unknown_rules(binary: str, rules: Iterable[str]) -> list[str]:
    """The names in ``rules`` squawk does not know (it refuses them as ``--exclude`` values)."""
    unknown = []
    for rule in sorted(set(rules)):
        done = subprocess.run(
            [binary, f"--exclude={rule}"],
            input="",
            capture_output=True,
            text=True,
            timeout=_SQUAWK_TIMEOUT,
            check=False,
        )
        if "invalid rule name" in done.stderr:
            unknown.append(rule)
    return unknown


@dataclass(frozen=True)
class SafetyCheck:
    """What `check_safety` found: findings not acknowledged, and the acknowledgements that covered one."""

    #: Findings no ``-- precog:allow`` line of their file covers.
    unacknowledged: list[Finding]
    #: One dict per acknowledged rule of a file: file, rule, reason, line (of the allow line).
    acknowledged: list[dict[str, object]]
    #: Set when squawk is not installed and the check was not enforced (dev and test): the sentence why.
    not_linted: str | None = None


def check_safety(files: Sequence[MigrationFile], *, enforce: bool, down: bool = False) -> SafetyCheck:
    """Lint ``files`` before they run (`upgrade`, `revert`); ``enforce`` (staging, prod) refuses the unacknowledged.

    ``down``: the down sections (`revert`). A finding is acknowledged by a line
    ``-- precog:allow <rule>: <reason>`` in its file. An acknowledged
    rule squawk does not know is refused (enforced or not). With ``enforce``, any finding not acknowledged
    raises `MigrationValidationError` naming each (file, line, rule) and how to acknowledge it, and a missing
    squawk raises `ConfigurationError`; without it, a missing squawk is reported in ``not_linted``.
    """
    try:
        binary = squawk_path()
    except ConfigurationError as exc:
        if enforce:
            raise ConfigurationError(f"{exc}; staging and prod lint every migration before it runs") from None
        return SafetyCheck([], [], not_linted=str(exc))
    allowed: dict[Path, dict[str, tuple[int, str]]] = {}
    for migration in files:
        acks = acknowledgements(migration.sql())
        allowed[migration.path] = {a.rule: (a.line, a.reason) for a in acks}
        unknown = _unknown_rules(binary, (a.rule for a in acks))
        if unknown:
            raise MigrationValidationError(
                f"{migration.path} acknowledges {', '.join(repr(r) for r in unknown)}, which squawk does not know; "
                "use squawk's rule name as `precog-db migrate lint` prints it (nothing was applied)"
            )
    findings = lint_files(files, squawk=binary, down=down)
    open_findings = [f for f in findings if f.rule not in allowed[f.path]]
    acknowledged: list[dict[str, object]] = []
    for path, rules in allowed.items():
        for rule, (line, reason) in rules.items():
            if any(f.path == path and f.rule == rule for f in findings):
                acknowledged.append({"file": path.name, "rule": rule, "reason": reason, "line": line})
    if enforce and open_findings:
        listed = "; ".join(
            f"{f.path.name}, line {f.line}: {f.rule} ({f.message} Instead: {f.advice})" for f in open_findings
        )
        raise MigrationValidationError(
            f"refused before anything ran, the migration is unsafe on a live database: {listed}. Make it safe "
            f"(`precog-db migrate lint` says how), or, if it is safe here, acknowledge it in the file with a line "
            f"'{ALLOW_MARKER} <rule>: <reason>' (the reason goes to the audit log)"
        )
    return SafetyCheck(open_findings, acknowledged)
