"""The audit log: one JSON line per operation on a database, and never a password.

Entries are appended through a `logging.handlers.RotatingFileHandler` to
``PRECOG_AUDIT_LOG`` (default ``logs/audit.log``, relative to the current
directory). Each entry records who (OS user), the machine, the pid, the
command line, the environment, the database (host, port, name, role), the
operation, the confirmation given, the outcome (``ok``, ``refused`` or
``failed``) and the duration, plus operation-specific details.

Who writes entries: the pool (every staging or prod pool open, and every
refusal to open one), the gates (every gated destructive call and refusal)
and the ``precog-db`` command line (every migration, backup, restore, stamp
and refusal). Callers pass what they know explicitly; this module reads only
``PRECOG_AUDIT_LOG``, so the pool and the gates can call it without an import
loop.

Secrets: every string is passed through `precog_db.log.redact` (which masks
``password=…`` and ``user:secret@`` in connection strings), keys that look
secret are masked, and the password of the settings given is replaced
wherever it appears.
"""

from __future__ import annotations

import contextlib
import json
import logging
import logging.handlers
import os
import socket
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextvars import ContextVar
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from precog_db.environment import Environment
from precog_db.errors import (
    EnvironmentMismatchError,
    EnvironmentNotAllowedError,
    PrecogDBError,
    ProductionAccessError,
    UnstampedDatabaseError,
)
from precog_db.guard import current_os_user
from precog_db.log import MASK, get_logger, mask_secrets, redact
from precog_db.settings import DatabaseSettings

__all__ = [
    "AUDIT_LOG_VAR",
    "AuditLogError",
    "audit_log_path",
    "command_line",
    "ensure_writable",
    "outcome_of",
    "record",
    "record_safely",
    "tail",
]

log = get_logger()  # stderr, or the application's structlog: see precog_db.log

AUDIT_LOG_VAR = "PRECOG_AUDIT_LOG"
DEFAULT_PATH = Path("logs") / "audit.log"
#: Rotate at 10 MiB, keep five old files (audit.log.1 … audit.log.5).
MAX_BYTES = 10 * 1024 * 1024
BACKUP_COUNT = 5

OK = "ok"
REFUSED = "refused"
FAILED = "failed"

_ARGV: ContextVar[tuple[str, ...] | None] = ContextVar("precog_audit_argv", default=None)
_RECORDED = "_precog_audited"


class AuditLogError(PrecogDBError, OSError):
    """The audit log could not be written."""


def audit_log_path(environ: Mapping[str, str] | None = None) -> Path:
    """Where entries go: ``PRECOG_AUDIT_LOG``, else ``logs/audit.log`` under the current directory."""
    env = os.environ if environ is None else environ
    configured = env.get(AUDIT_LOG_VAR, "").strip()
    return Path(configured) if configured else DEFAULT_PATH


@contextlib.contextmanager
def command_line(argv: Sequence[str]) -> Iterator[None]:
    """Within the block, entries record ``argv`` as the command line (the CLI sets this)."""
    token = _ARGV.set(tuple(argv))
    try:
        yield
    finally:
        _ARGV.reset(token)


_REFUSALS: tuple[type[BaseException], ...] = (
    EnvironmentMismatchError,
    EnvironmentNotAllowedError,
    ProductionAccessError,
    UnstampedDatabaseError,
)


def outcome_of(exc: BaseException) -> str:
    """``refused`` for a safety refusal, ``failed`` for anything else.

    A refusal is one of the environment/production errors, or any error class
    with a true ``refusal`` attribute (confirmation, promotion, validation).
    """
    if isinstance(exc, _REFUSALS) or getattr(type(exc), "refusal", False):
        return REFUSED
    return FAILED


def mark_recorded(exc: BaseException) -> None:
    """Note that ``exc`` already has its audit entry, so callers higher up do not write another."""
    with contextlib.suppress(AttributeError, TypeError):
        setattr(exc, _RECORDED, True)


def was_recorded(exc: BaseException) -> bool:
    """True when an audit entry was already written for ``exc``."""
    return bool(getattr(exc, _RECORDED, False))


def _scrub(value: Any, secrets: Sequence[str]) -> Any:
    if isinstance(value, str):
        for secret in secrets:
            value = value.replace(secret, MASK)
        return redact(value)
    if isinstance(value, Mapping):
        return {str(k): _scrub(v, secrets) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_scrub(v, secrets) for v in value]
    if value is None or isinstance(value, bool | int | float):
        return value
    return _scrub(str(value), secrets)


def _database(settings: DatabaseSettings | None) -> dict[str, Any] | None:
    if settings is None:
        return None
    return {"name": settings.dbname, "host": settings.host, "port": settings.port, "user": settings.user}


def _entry(
    operation: str,
    *,
    outcome: str,
    settings: DatabaseSettings | None,
    environment: Environment | str | None,
    confirmation: str | None,
    duration_s: float | None,
    argv: Sequence[str] | None,
    error: BaseException | str | None,
    details: Mapping[str, Any],
) -> dict[str, Any]:
    env = environment if environment is not None else (settings.env if settings is not None else None)
    command = argv if argv is not None else (_ARGV.get() or tuple(sys.argv))
    entry: dict[str, Any] = {
        "ts": datetime.now(UTC).isoformat(timespec="milliseconds"),
        "who": current_os_user(),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "argv": list(command),
        "environment": str(env.value if isinstance(env, Environment) else env) if env is not None else None,
        "database": _database(settings),
        "operation": operation,
        "confirmation": confirmation,
        "outcome": outcome,
        "duration_ms": None if duration_s is None else round(duration_s * 1000, 1),
    }
    if error is not None:
        entry["error"] = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
    entry.update(details)
    secrets = [s for s in ((settings.password if settings is not None else ""),) if s]
    scrubbed = _scrub(entry, secrets)
    # Keys that look secret (password, token …) are masked whatever they hold.
    return dict(mask_secrets(None, "", scrubbed))


class _AuditHandler(logging.handlers.RotatingFileHandler):
    """A rotating handler whose write errors reach the caller instead of stderr."""

    def handleError(self, record: logging.LogRecord) -> None:
        raise  # called by emit() inside its except block: re-raise what failed


def _open_handler(path: Path) -> _AuditHandler:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
        os.close(fd)
    handler = _AuditHandler(path, maxBytes=MAX_BYTES, backupCount=BACKUP_COUNT, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(message)s"))
    return handler


def ensure_writable(path: Path | None = None) -> Path:
    """Raise `AuditLogError` unless the audit log can be appended to; return its path."""
    target = audit_log_path() if path is None else path
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
        os.close(fd)
    except OSError as exc:
        raise _unwritable(target, exc) from None
    return target


def _unwritable(path: Path, exc: OSError) -> AuditLogError:
    return AuditLogError(
        f"cannot write the audit log {path} ({exc.strerror or type(exc).__name__}); make its directory "
        f"writable or set {AUDIT_LOG_VAR} to a file this user may append to"
    )


def record(
    operation: str,
    *,
    outcome: str,
    settings: DatabaseSettings | None = None,
    environment: Environment | str | None = None,
    confirmation: str | None = None,
    duration_s: float | None = None,
    argv: Sequence[str] | None = None,
    error: BaseException | str | None = None,
    log_file: Path | None = None,
    **details: Any,
) -> dict[str, Any]:
    """Append one entry; return it as written. Raises `AuditLogError` when the file cannot be written.

    ``settings`` gives the environment and database (its password is scrubbed
    from every value); ``environment`` overrides the environment when there
    are no settings. ``argv`` defaults to the command line set by
    `command_line`, else ``sys.argv``. ``details`` are added as extra keys.
    ``log_file`` overrides ``PRECOG_AUDIT_LOG``.
    """
    entry = _entry(
        operation,
        outcome=outcome,
        settings=settings,
        environment=environment,
        confirmation=confirmation,
        duration_s=duration_s,
        argv=argv,
        error=error,
        details=details,
    )
    target = audit_log_path() if log_file is None else log_file
    line = json.dumps(entry, ensure_ascii=False, default=str)
    try:
        handler = _open_handler(target)
    except OSError as exc:
        raise _unwritable(target, exc) from None
    try:
        handler.handle(logging.makeLogRecord({"msg": line, "levelno": logging.INFO, "levelname": "INFO"}))
    except OSError as exc:
        raise _unwritable(target, exc) from None
    finally:
        handler.close()
    return entry


def record_safely(operation: str, **kwargs: Any) -> dict[str, Any] | None:
    """`record`, but an unwritable audit log is logged as ``audit_log_unwritable`` instead of raised.

    For the library's own hooks (pool open, gates): a service on a read-only
    filesystem keeps working, and says loudly that it could not audit.
    """
    try:
        return record(operation, **kwargs)
    except AuditLogError as exc:
        log.warning("audit_log_unwritable", operation=operation, reason=str(exc))
        return None


def tail(count: int = 20, path: Path | None = None) -> list[dict[str, Any]]:
    """The last ``count`` entries, oldest first, reading the rotated file too when needed.

    A line that is not valid JSON (a partial write) is returned as
    ``{"unreadable": <line>}`` rather than dropped.
    """
    target = audit_log_path() if path is None else path
    lines: list[str] = []
    for candidate in (target, target.with_name(target.name + ".1")):
        try:
            text = candidate.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            continue
        lines = text.splitlines() + lines  # the rotated file holds the older entries
        if len(lines) >= count:
            break
    entries: list[dict[str, Any]] = []
    for line in lines[-count:] if count > 0 else []:
        if not line.strip():
            continue
        try:
            parsed = json.loads(line)
        except ValueError:
            entries.append({"unreadable": line})
            continue
        entries.append(parsed if isinstance(parsed, dict) else {"unreadable": line})
    return entries
