"""Logging: where the library's events go, and a helper for scripts.

The library never configures structlog or stdlib logging on import; the
application owns logging. Every module logs through :func:`get_logger`:

* when the application has configured structlog (``structlog.is_configured()``),
  events go to ``structlog.get_logger("precog_db")``, i.e. through the
  application's processors and logger factory;
* when it has not, they are rendered by structlog's console renderer (with
  `mask_secrets`) on **stderr**, never on stdout, which may be a service's data
  stream or a CLI's JSON output. structlog's own default would print them on stdout.

psycopg_pool logs through the stdlib logger ``psycopg.pool``. When a pool is
created and the application has attached no stdlib handler that would receive
those records (none on ``psycopg.pool``, ``psycopg`` or the root logger),
:func:`route_pool_logging` attaches `PoolLogForwarder`, which turns each record
into a structured event of the library's logger (``pool_connection_failed``
with ``pool=…``, …) and turns propagation off, so nothing is printed twice and
Python's unformatted "last resort" lines do not appear. If the application
configures stdlib handlers later, the forwarder steps aside and hands the
records to them. `configure_logging` routes them through structlog too.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import MutableMapping
from typing import Any

import structlog

from precog_db._secrets import MASK, SECRET_KEY, redact, scrub_text

__all__ = [
    "LOGGER_NAME",
    "PoolLogForwarder",
    "configure_logging",
    "get_logger",
    "mask_secrets",
    "redact",
    "route_pool_logging",
    "unroute_pool_logging",
]

#: The structlog logger name (its ``logger_factory`` argument) of every library event.
LOGGER_NAME = "precog_db"
#: The stdlib logger psycopg_pool writes to.
POOL_LOGGER_NAME = "psycopg.pool"

# The masking itself lives in precog_db._secrets (one implementation for logs, messages and the audit log).
_SECRET_KEY = SECRET_KEY


def _mask(value: Any) -> Any:
    if isinstance(value, str):
        return scrub_text(value)
    if isinstance(value, dict):
        return {k: (MASK if isinstance(k, str) and _SECRET_KEY.search(k) else _mask(v)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_mask(v) for v in value)
    return value


def mask_secrets(_logger: Any, _method: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog processor: mask secret-looking keys and secrets inside strings."""
    for key in list(event_dict):
        if _SECRET_KEY.search(key):
            event_dict[key] = MASK
        else:
            event_dict[key] = _mask(event_dict[key])
    return event_dict


class LibraryLogger:
    """The library's logger: the application's structlog setup if it has one, else stderr.

    Decided on every call, so an application that configures structlog after
    importing precog_db gets every later event. Supports what the library uses:
    the level methods (``info``, ``warning`` …) and ``bind``.
    """

    __slots__ = ("_context", "_name")

    def __init__(self, name: str = LOGGER_NAME, context: dict[str, Any] | None = None) -> None:
        self._name = name
        self._context: dict[str, Any] = dict(context or {})

    def bind(self, **values: Any) -> LibraryLogger:
        return LibraryLogger(self._name, {**self._context, **values})

    def _target(self) -> Any:
        if structlog.is_configured():
            return structlog.get_logger(self._name, **self._context)
        # Looked up on each call, so a replaced sys.stderr (pytest's capture) is honoured.
        return structlog.wrap_logger(
            structlog.PrintLogger(file=sys.stderr),
            processors=_UNCONFIGURED_PROCESSORS,
            wrapper_class=structlog.make_filtering_bound_logger(logging.NOTSET),
            context_class=dict,
            cache_logger_on_first_use=False,
            **self._context,
        )

    def __getattr__(self, name: str) -> Any:
        return getattr(self._target(), name)


def get_logger() -> LibraryLogger:
    """The logger every precog_db module uses (see the module docstring for where events go)."""
    return LibraryLogger()


# structlog's default chain (what an unconfigured structlog renders), plus secret masking; no colours,
# since the destination is stderr, which is often a file or a journal.
_UNCONFIGURED_PROCESSORS: list[Any] = [
    structlog.contextvars.merge_contextvars,
    structlog.processors.add_log_level,
    structlog.processors.StackInfoRenderer(),
    structlog.dev.set_exc_info,
    structlog.processors.TimeStamper(fmt="%Y-%m-%d %H:%M:%S", utc=False),
    mask_secrets,
    structlog.dev.ConsoleRenderer(colors=False),
]

# psycopg_pool's warning templates and the event names they become; anything else is "psycopg_pool".
_POOL_EVENTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "error connecting in %r: %s": ("pool_connection_failed", ("pool", "error")),
    "reconnection attempt in pool %r failed after %s sec": ("pool_reconnection_gave_up", ("pool", "after_s")),
    "discarding broken connection: %s": ("pool_connection_discarded", ("connection",)),
    "discarding closed connection: %s": ("pool_connection_discarded", ("connection",)),
    "task run %s failed: %s: %s": ("pool_task_failed", ("task", "error_type", "error")),
}

_route_lock = threading.Lock()


class PoolLogForwarder(logging.Handler):
    """Forward psycopg_pool's stdlib records to the library's logger as structured events.

    ``error connecting in 'precog-dev': …`` becomes the event
    ``pool_connection_failed`` with ``pool="precog-dev"``, ``error=…`` and
    ``logger="psycopg.pool"``, at the record's level; a message psycopg_pool
    adds in a later version becomes ``psycopg_pool`` with its ``message``.
    When the application has since attached stdlib handlers (on ``psycopg`` or the
    root logger), the forwarder removes itself, restores propagation and hands
    the record to them: an application's own logging setup always wins. A
    forwarder installed by `configure_logging` (``yield_to_app=False``) stays.
    """

    def __init__(self, *, yield_to_app: bool = True) -> None:
        super().__init__(logging.NOTSET)
        self.yield_to_app = yield_to_app
        self._log = get_logger()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            logger = logging.getLogger(record.name)
            if self.yield_to_app and _app_has_handlers(logger, ignore=self):
                _unroute(logger, self)
                if logger.parent is not None:
                    logger.parent.handle(record)
                return
            event, fields = pool_event(record)
            method = logging.getLevelName(record.levelno).lower()
            getattr(self._log, method if method in _LEVEL_METHODS else "warning")(event, **fields)
        except Exception:
            self.handleError(record)


_LEVEL_METHODS = frozenset({"debug", "info", "warning", "error", "critical"})


def pool_event(record: logging.LogRecord) -> tuple[str, dict[str, Any]]:
    """The structured event for one psycopg_pool record: its name and fields."""
    fields: dict[str, Any] = {"logger": record.name}
    template = record.msg if isinstance(record.msg, str) else ""
    event, names = _POOL_EVENTS.get(template, ("psycopg_pool", ()))
    args = record.args if isinstance(record.args, tuple) else ()
    if names and len(args) == len(names):
        for key, value in zip(names, args, strict=True):
            fields[key] = value if isinstance(value, int | float) else redact(str(value))
        return event, fields
    fields["message"] = redact(record.getMessage())
    return "psycopg_pool", fields


def _app_has_handlers(logger: logging.Logger, *, ignore: logging.Handler | None = None) -> bool:
    """Would a record of ``logger`` reach a handler the application attached (ours excluded)?"""
    current: logging.Logger | None = logger
    while current is not None:
        if any(h is not ignore for h in current.handlers):
            return True
        if not current.propagate and current is not logger:
            return False
        current = current.parent
    return False


def _unroute(logger: logging.Logger, handler: logging.Handler) -> None:
    with _route_lock:
        if handler in logger.handlers:
            logger.removeHandler(handler)
            logger.propagate = True


def _forwarder(logger: logging.Logger) -> PoolLogForwarder | None:
    return next((h for h in logger.handlers if isinstance(h, PoolLogForwarder)), None)


def route_pool_logging(*, force: bool = False) -> bool:
    """Send psycopg_pool's records to the library's logger unless the application handles them.

    Called when a pool is created. Attaches one `PoolLogForwarder` to the
    ``psycopg.pool`` logger and turns its propagation off, but only when no
    stdlib handler of the application would receive its records (``force``
    skips that check: `configure_logging` uses it). Idempotent; returns
    whether the forwarder is in place.
    """
    logger = logging.getLogger(POOL_LOGGER_NAME)
    with _route_lock:
        existing = _forwarder(logger)
        if existing is not None:
            existing.yield_to_app = existing.yield_to_app and not force
            return True
        if not force and _app_has_handlers(logger):
            return False
        logger.addHandler(PoolLogForwarder(yield_to_app=not force))
        logger.propagate = False
        return True


def unroute_pool_logging() -> None:
    """Undo `route_pool_logging`: remove the forwarder and let ``psycopg.pool`` propagate again."""
    logger = logging.getLogger(POOL_LOGGER_NAME)
    forwarder = _forwarder(logger)
    if forwarder is not None:
        _unroute(logger, forwarder)


def configure_logging(*, json: bool = False, level: str | int = "info") -> None:
    """Configure structlog (and stdlib logging) for a script: console or JSON lines on stderr.

    psycopg_pool's records are routed through the same structlog processors.
    """
    numeric = logging.getLevelName(level.upper()) if isinstance(level, str) else level
    if not isinstance(numeric, int):
        raise ValueError(f"unknown log level {level!r}; use debug, info, warning or error")
    renderer: Any = structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            mask_secrets,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    logging.basicConfig(level=numeric, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    route_pool_logging(force=True)
