"""Settings: the one place that reads configuration.

Precedence, highest first (written down once, here and in the README):

1. keyword overrides passed to `load_settings`;
2. the process environment: ``DB_HOST`` …, then ``DATABASE_URL``;
3. ``<config_dir>/.env.<env>``: its ``DB_*``, then its ``DATABASE_URL``;
4. ``<config_dir>/.env``: its ``DB_*``, then its ``DATABASE_URL``;
5. built-in defaults for the environment.

``DATABASE_URL`` (``postgresql://user:password@host:port/dbname?sslmode=…``,
``postgres://`` too) fills host, port, dbname, user, password, sslmode,
connect_timeout and application_name at the level of the source it was found
in, just below the ``DB_*`` variables of that same source: ``DB_NAME=x`` next
to a ``DATABASE_URL`` overrides the URL's database name, and a ``DATABASE_URL``
in the process environment overrides every ``.env`` file. Any other URL
parameter (``options``, ``target_session_attrs`` …) is refused, naming the
parameter; so is anything that is not a PostgreSQL URL. Its database name takes
part in the environment inference (`resolve_environment`) where ``DB_NAME``
would, below a ``DB_NAME`` of the same or a higher source. It gets every check
``DB_*`` gets: the naming rule, the production guard at connection time, and
the password is a `Secret` that no message, log or ``repr`` shows.

Files are parsed once, with python-dotenv's public `dotenv_values`, from text
this module reads itself (the lines it cannot parse are the ones it reports
on the ``dotenv.main`` logger; `_first_bad_line` turns them into errors), so
that ``os.environ`` is never mutated, a BOM or CRLF line endings are
harmless, and a malformed line is an error rather than a warning.
No message ever contains a configured value.
"""

from __future__ import annotations

import difflib
import io
import logging
import os
import stat
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from dotenv import dotenv_values

from precog_db.environment import (
    Environment,
    Resolution,
    environment_named_by,
    parse_environment,
    resolve_environment,
)
from precog_db.errors import ConfigurationError, EnvironmentMismatchError
from precog_db.log import get_logger

__all__ = [
    "DATABASE_URL",
    "ENV_VARS",
    "FIELD_VARS",
    "DatabaseSettings",
    "check_name_matches",
    "environment_resolution",
    "load_settings",
    "replica_endpoint",
    "resolve_config_dir",
    "settings_for",
]

log = get_logger()  # stderr, or the application's structlog: see precog_db.log

_SSLMODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
_STRONG_SSL = ("require", "verify-ca", "verify-full")
_INT32_MAX = 2_147_483_647
#: A settings file larger than this is not a settings file (and is not read into memory).
_MAX_ENV_FILE_BYTES = 1 << 20

#: Pool sizes per environment: (min, max).
_POOL_SIZES: dict[Environment, tuple[int, int]] = {
    Environment.DEV: (2, 10),
    Environment.TEST: (2, 25),
    Environment.STAGING: (5, 25),
    Environment.PROD: (10, 50),
}


class _Unset:
    """The default of every `DatabaseSettings` field: replaced by the environment's default on construction."""

    def __repr__(self) -> str:
        return "<default>"


_UNSET: Any = _Unset()
#: Fields whose default names the environment; an empty string also means "the default" for them.
_NAMED_BY_ENV = frozenset({"dbname", "user", "application_name"})


#: The settings that can supply the password, and how a message names each one.
_SOURCE_NAMES = {
    "password": "DB_PASSWORD",
    "password_file": "DB_PASSWORD_FILE",
    "passfile": "DB_PASSFILE",
    "password_provider": "password_provider",
}


def password_sources(settings: DatabaseSettings) -> list[str]:
    """Which of ``password``, ``password_file``, ``passfile`` and ``password_provider`` supply the password."""
    return [name for name in _SOURCE_NAMES if getattr(settings, name)]


def _origin_text(origin: str) -> str:
    return {"argument": "the arguments", "environment": "the process environment", "default": "the defaults"}.get(
        origin, origin
    )


def check_name_matches(settings: DatabaseSettings) -> None:
    """Refuse settings whose database name names another environment (`environment_named_by`).

    Runs when any `DatabaseSettings` is built (by `load_settings`, by hand, by
    `replace`) and again in `precog_db.connection` before every connection.
    """
    named = environment_named_by(settings.dbname)
    if named is not None and named is not settings.env:
        origin = _origin_text(settings.origins.get("dbname", "argument"))
        raise EnvironmentMismatchError(
            f"environment is {settings.env.value} but database {settings.dbname!r} (from {origin}) belongs to "
            f"{named.value} by its name; fix DB_NAME or PRECOG_ENV (a stale shell export is the usual cause). "
            "A name containing 'prod' or 'stag' anywhere names production or staging"
        )


@dataclass(frozen=True, repr=False)
class DatabaseSettings:
    """Everything needed to open a pool for one environment.

    Frozen, validated on construction, and safe to print: the password never
    appears in `repr` or `str`.
    """

    env: Environment
    host: str = _UNSET
    #: One port, or (with several DB_HOST entries) a comma-separated list such as ``"5432,5433"``.
    port: int | str = _UNSET
    dbname: str = _UNSET
    user: str = _UNSET
    password: str = field(default=_UNSET, repr=False)
    pool_min: int = _UNSET
    pool_max: int = _UNSET
    pool_timeout: float = _UNSET
    sslmode: str = _UNSET
    connect_timeout: int = _UNSET
    statement_timeout_ms: int = _UNSET
    tcp_user_timeout_ms: int = _UNSET
    application_name: str = _UNSET
    #: A file whose content is the password, re-read for every new connection (docs/OPERATIONS.md).
    password_file: str = _UNSET
    #: libpq's password file (``.pgpass`` format), used instead of a password.
    passfile: str = _UNSET
    #: Called for every connection attempt; returns the password (e.g. an IAM token). Never in `repr`.
    password_provider: Callable[[], str] | None = field(default=None, repr=False)
    #: ``none``, ``session`` or ``transaction``: the PgBouncer pool mode between the app and the database.
    pooler: str = _UNSET
    #: Where migrations, backups, restores and the stamp connect behind a transaction pooler ("" = unset).
    direct_host: str = _UNSET
    direct_port: int = _UNSET
    #: libpq ``target_session_attrs`` of the writer pool and its direct connections.
    target_session_attrs: str = _UNSET
    #: Read replicas: ``host[:port]``, ``[IPv6]:port`` or a bare IPv6 address (the port defaults to the first DB_PORT).
    replica_hosts: tuple[str, ...] = _UNSET
    #: A replica whose replay lags more than this many ms is skipped.
    replica_max_lag_ms: int = _UNSET
    #: The `.env` files that were read, lowest precedence first.
    files: tuple[Path, ...] = ()
    #: Where each field's value came from ("default", a file, "environment", "argument").
    origins: Mapping[str, str] = field(default_factory=dict, compare=False, hash=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "env", parse_environment(self.env, source="DatabaseSettings(env=...)"))
        # Fields left out take the environment's defaults from the one table
        # (`_defaults`), exactly as `load_settings` does: a hand-built
        # DatabaseSettings(env="prod") gets sslmode=require and pool 10/50 too.
        defaults = _defaults(self.env)
        origins = dict(self.origins)
        for name, default in defaults.items():
            value = getattr(self, name)
            if value is _UNSET or (name in _NAMED_BY_ENV and value == ""):
                object.__setattr__(self, name, default)
                origins.setdefault(name, "default")
            else:
                origins.setdefault(name, "argument")
        object.__setattr__(self, "origins", origins)
        if isinstance(self.host, str) and "," in self.host:
            object.__setattr__(self, "host", ",".join(h.strip() for h in self.host.split(",")))
        if isinstance(self.replica_hosts, str):
            object.__setattr__(self, "replica_hosts", _replicas(self.replica_hosts))
        if isinstance(self.port, str) and _port_list(self.port) is None:
            object.__setattr__(self, "port", _ports(self.port))
        if isinstance(self.password, str) and not isinstance(self.password, Secret):
            object.__setattr__(self, "password", Secret(self.password))
        for spec in _SPECS:
            if spec.check is not None:
                problem = spec.check(getattr(self, spec.field))
                if problem:
                    raise ConfigurationError(f"setting {spec.field} ({spec.var}) {problem}")
        if self.password_provider is not None and not callable(self.password_provider):
            raise ConfigurationError(
                "password_provider must be a callable that takes no argument and returns the password"
            )
        sources = password_sources(self)
        if len(sources) > 1:
            named = " and ".join(
                f"{_SOURCE_NAMES[s]} (from {_origin_text(origins.get(s, 'argument'))})" for s in sources
            )
            raise ConfigurationError(
                f"the password is given twice, by {named}; set only one of DB_PASSWORD, DB_PASSWORD_FILE, "
                "DB_PASSFILE and password_provider"
            )
        if self.pool_min > self.pool_max:
            raise ConfigurationError(
                f"DB_POOL_MIN_CONN (from {_origin_text(origins['pool_min'])}) is larger than DB_POOL_MAX_CONN "
                f"(from {_origin_text(origins['pool_max'])}); lower the minimum or raise the maximum"
            )
        _check_topology(self)
        check_name_matches(self)

    @property
    def pool_name(self) -> str:
        """The pool's name, ``precog-<env>``; it is all `repr` of a pool shows."""
        return f"precog-{self.env.value}"

    def describe(self) -> str:
        """A one-line description for messages and logs: no password, ever."""
        return self._masked(f"{self.env.value} database {self.dbname!r} on {self.where()} as {self.user!r}")

    def __repr__(self) -> str:
        shown = ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in fields(self) if f.repr)
        return self._masked(f"{type(self).__name__}({shown})")

    def _masked(self, text: str) -> str:
        """``text`` with the password masked wherever another field repeats it (a password pasted as a name)."""
        secret = str(self.password)
        if not secret:
            return text
        if len(secret) >= 4:
            return text.replace(secret, "***")
        # Too short to mask as a substring without mangling names: mask only fields equal to it.
        for f in fields(self):
            value = getattr(self, f.name)
            if f.repr and isinstance(value, str) and value == secret:
                text = text.replace(repr(value), "'***'")
        return text

    def where(self) -> str:
        """``host:port``, or ``a:5432, b:5433`` for several hosts (libpq multi-host), plus the pooler mode."""
        place = ", ".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in self.endpoints())
        return place if self.pooler == "none" else f"{place} (PgBouncer, {self.pooler} mode)"

    def endpoints(self) -> list[tuple[str, int]]:
        """The (host, port) pairs libpq tries in order: one port for every host, or one port per host."""
        hosts = [h.strip() for h in self.host.split(",")]
        ports = [int(p) for p in str(self.port).split(",")]
        if len(ports) == 1:
            ports = ports * len(hosts)
        return list(zip(hosts, ports, strict=True))

    def __str__(self) -> str:
        return self.describe()

    def connect_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `psycopg.connect` (they include the password).

        Keep this dict out of logs and messages: it is what reaches libpq.
        """
        options = []
        # Behind PgBouncer startup options never reach the server (it refuses them, or drops them when told
        # to ignore them): in session mode the pool sets them with SET (precog_db.topology), and
        # DB_STATEMENT_TIMEOUT is refused in transaction mode on construction (`_check_topology`).
        if self.statement_timeout_ms and self.pooler == "none":
            options.append(f"-c statement_timeout={self.statement_timeout_ms}")
        kwargs: dict[str, Any] = {
            "host": self.host,
            "port": self.port,
            "dbname": self.dbname,
            "user": self.user,
            "sslmode": self.sslmode,
            "connect_timeout": self.connect_timeout,
            "application_name": self.application_name,
            "keepalives": 1,
            "keepalives_idle": 30,
            "keepalives_interval": 10,
            "keepalives_count": 3,
        }
        if self.tcp_user_timeout_ms:
            kwargs["tcp_user_timeout"] = self.tcp_user_timeout_ms
        if self.pooler == "none":
            kwargs["target_session_attrs"] = _libpq_target(self.target_session_attrs)
        if options:
            kwargs["options"] = " ".join(options)
        if self.password:
            kwargs["password"] = self.password
        return kwargs

    def replace(self, **changes: Any) -> DatabaseSettings:
        """Return a validated copy with ``changes`` applied (field names as keys)."""
        unknown = sorted(set(changes) - _FIELD_NAMES - {"env", "password_provider"})
        if unknown:
            raise ConfigurationError(
                f"unknown setting(s) {', '.join(unknown)}; valid names are {', '.join(sorted(_FIELD_NAMES))}"
            )
        if isinstance(changes.get("password"), str):
            changes["password"] = Secret(changes["password"])  # masked in this frame's locals
        try:
            env = changes.pop("env", None)
            parsed = {k: v if k == "password_provider" else _parse_field(k, v, "argument") for k, v in changes.items()}
            origins = {k: v for k, v in self.origins.items() if k not in changes}
            origins.update(dict.fromkeys(changes, "argument"))
            if env is not None:
                parsed["env"] = parse_environment(env, source="replace(env=...)")
                # Fields that held the old environment's defaults take the new one's.
                for name in _defaults(parsed["env"]):
                    if origins.get(name) == "default":
                        parsed.setdefault(name, _UNSET)
                        origins.pop(name)
            return replace(self, origins=origins, **parsed)
        except (ConfigurationError, EnvironmentMismatchError) as exc:
            error = exc
        # As in load_settings: re-raised from here with a fresh traceback and the raw values dropped,
        # so tracebacks that render frame locals show none of them (a password pasted into port=).
        changes.clear()
        parsed = {}
        error.__traceback__ = None
        raise error


# --- field specifications -------------------------------------------------------


@dataclass(frozen=True)
class _Spec:
    field: str
    var: str
    parse: Callable[[str], Any]
    check: Callable[[Any], str | None] | None
    help: str


def _text(value: str) -> str:
    return value.strip()


class Secret(str):
    """A password: a plain `str` to every consumer (libpq included) whose `repr` is masked.

    Tracebacks that render frame locals (structlog's ``dict_tracebacks``, its
    default JSON exception format; rich; better-exceptions) print each local
    with `repr`, so a password held in a dict or a variable on its way to
    libpq would be logged with any exception passing through that frame.
    """

    __slots__ = ()

    def __repr__(self) -> str:
        return "'***'"


def _secret(value: str) -> str:
    return value if isinstance(value, Secret) else Secret(value)


def _integer(value: str) -> int:
    return int(value.strip())


def _number(value: str) -> float:
    result = float(value.strip())
    if result != result:  # NaN
        raise ValueError("not a number")
    return result


def _encodable(value: str) -> bool:
    # A value read from an environment holding invalid UTF-8 carries lone
    # surrogates (surrogateescape); libpq would fail on it much later.
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _nonempty(value: Any) -> str | None:
    if not isinstance(value, str) or not value.strip():
        return "must not be empty"
    return _no_nul(value)


def _no_nul(value: Any) -> str | None:
    if not isinstance(value, str):
        return "must be text"
    if "\x00" in value:
        return "must not contain a NUL character"
    if not _encodable(value):
        return "must be valid UTF-8 text (it contains undecodable bytes)"
    return None


def _int_range(lo: int, hi: int, unit: str = "") -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        if isinstance(value, bool) or not isinstance(value, int):
            return f"must be a whole number from {lo} to {hi}{unit}"
        if not lo <= value <= hi:
            return f"must be from {lo} to {hi}{unit}"
        return None

    return check


def _float_range(lo: float, hi: float, unit: str) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        if isinstance(value, bool) or not isinstance(value, int | float):
            return f"must be a number from {lo:g} to {hi:g}{unit}"
        if not lo < value <= hi:
            return f"must be more than {lo:g} and at most {hi:g}{unit}"
        return None

    return check


def _sslmode(value: Any) -> str | None:
    if value not in _SSLMODES:
        return f"must be one of {', '.join(_SSLMODES)}"
    return None


_POOLERS = ("none", "session", "transaction")
_TARGETS = ("read-write", "primary", "any", "standby", "prefer-standby")


def _libpq_target(value: str) -> str:
    """libpq's ``target_session_attrs`` for the setting: ``read-write`` is libpq's ``primary``.

    libpq's own ``read-write`` also rejects a server whose session default is
    read-only, which every pooled connection's is (its startup options set
    ``default_transaction_read_only=on``); "can write" is exactly "not a hot
    standby", which the server reports at no round-trip cost (PostgreSQL 14+).
    """
    return "primary" if value == "read-write" else value


def _hosts(value: Any) -> str | None:
    problem = _nonempty(value)
    if problem:
        return problem
    parts = [h.strip() for h in str(value).split(",")]
    if any(not h for h in parts):
        return "has an empty entry in its comma-separated list (e.g. 'db1,,db2' or a trailing comma); remove it"
    if any(" " in h or "=" in h for h in parts):
        return "entries must be host names, IP addresses or socket directories separated by commas, without spaces"
    return None


def _ports(value: str) -> int | str:
    parts = [p.strip() for p in value.split(",")]
    if len(parts) == 1:
        return int(parts[0])
    return ",".join(str(int(p)) for p in parts)


def _port_list(value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int | str):
        return "must be a port from 1 to 65535, or a comma-separated list of them"
    try:
        ports = [int(p) for p in str(value).split(",")]
    except ValueError:
        return "must be a port from 1 to 65535, or a comma-separated list of them"
    if not all(1 <= p <= 65535 for p in ports):
        return "must be from 1 to 65535 (each entry of a comma-separated list)"
    return None


def _replicas(value: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in value.split(",") if p.strip())


_REPLICA_FORMS = "host, host:port, an IPv6 address, [IPv6] or [IPv6]:port, the port from 1 to 65535"


def _ipv6(text: str) -> bool:
    import ipaddress

    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True


def _valid_port(text: str) -> bool:
    return text.isascii() and text.isdigit() and 1 <= int(text) <= 65535


def _replica_endpoint(entry: str) -> tuple[str, int | None] | str:
    """``entry`` of DB_REPLICA_HOSTS as (host, port or None), or the sentence saying what is wrong with it.

    ``host``, ``host:port``, ``[IPv6]``, ``[IPv6]:port`` and a bare IPv6
    address (no port: its colons are the address's). A bare address whose last
    group could be a port (``::1:5433``: the address ``::1`` and port 5433, or
    the address ``::1:5433``?) is ambiguous and refused. No message quotes the entry.
    """
    if entry.startswith("["):
        close = entry.find("]")
        address, rest = (entry[1:close], entry[close + 1 :]) if close > 0 else ("", "")
        if not _ipv6(address):
            return "has a [bracketed] entry that is not [IPv6 address] or [IPv6 address]:port"
        if not rest:
            return address, None
        if rest.startswith(":") and _valid_port(rest[1:]):
            return address, int(rest[1:])
        return "has a [bracketed] IPv6 entry followed by something other than :port (a port from 1 to 65535)"
    if "[" in entry or "]" in entry or any(c.isspace() for c in entry) or _no_nul(entry):
        return f"has an entry that is none of {_REPLICA_FORMS}"
    if entry.count(":") > 1:
        if not _ipv6(entry):
            return f"has an entry with several ':' that is not an IPv6 address; write [IPv6]:port ({_REPLICA_FORMS})"
        head, _, last = entry.rpartition(":")
        if _valid_port(last) and _ipv6(head):
            return (
                "has a bare IPv6 entry whose last group could be a port (is it an address, or an address and a "
                "port?); write [address] or [address]:port"
            )
        return entry, None
    host, sep, port = entry.partition(":")
    if not host:
        return f"has an entry with no host ({_REPLICA_FORMS})"
    if sep and not _valid_port(port):
        return f"has an entry whose port is not a number from 1 to 65535 ({_REPLICA_FORMS})"
    return host, int(port) if sep else None


def replica_endpoint(entry: str) -> tuple[str, int | None]:
    """One DB_REPLICA_HOSTS entry as (host, port or None); `ConfigurationError` when it is none of the forms."""
    parsed = _replica_endpoint(entry)
    if isinstance(parsed, str):
        raise ConfigurationError(f"setting replica_hosts (DB_REPLICA_HOSTS) {parsed}")
    return parsed


def _replica_list(value: Any) -> str | None:
    if not isinstance(value, tuple) or not all(isinstance(v, str) for v in value):
        return "must be a comma-separated list of host[:port]"
    for number, entry in enumerate(value, 1):
        parsed = _replica_endpoint(entry)
        if isinstance(parsed, str):
            return f"{parsed} (entry {number}); fix DB_REPLICA_HOSTS"
    return None


def _one_of(choices: tuple[str, ...]) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        return None if value in choices else f"must be one of {', '.join(choices)}"

    return check


def _check_topology(s: DatabaseSettings) -> None:
    """Settings that only make sense together: host/port lists, the transaction pooler's limits."""
    hosts = s.host.split(",")
    ports = str(s.port).split(",")
    if len(ports) > 1 and len(ports) != len(hosts):
        raise ConfigurationError(
            f"DB_PORT lists {len(ports)} ports but DB_HOST lists {len(hosts)} hosts; give one port for all "
            "hosts or exactly one port per host, in the same order (libpq multi-host)"
        )
    if s.pooler == "transaction" and s.statement_timeout_ms:
        raise ConfigurationError(
            "DB_STATEMENT_TIMEOUT cannot be applied behind a transaction-mode pooler (DB_POOLER=transaction): "
            "it travels as a startup option, which PgBouncer refuses or drops. Set it on the role instead "
            "(ALTER ROLE ... SET statement_timeout = ...) and leave DB_STATEMENT_TIMEOUT at 0, or use "
            "DB_POOLER=session"
        )
    if s.pooler != "none" and "," in s.host:
        raise ConfigurationError(
            "DB_HOST lists several hosts but DB_POOLER is set: with a pooler, DB_HOST names the PgBouncer "
            "and PgBouncer's own configuration names the database servers; use one DB_HOST"
        )


_SPECS: tuple[_Spec, ...] = (
    _Spec(
        "host",
        "DB_HOST",
        _text,
        _hosts,
        "server host name, IP address or socket directory; a comma-separated list for libpq multi-host",
    ),
    _Spec("port", "DB_PORT", _ports, _port_list, "server port; a comma-separated list gives one per DB_HOST entry"),
    _Spec("dbname", "DB_NAME", _text, _nonempty, "database name"),
    _Spec("user", "DB_USER", _text, _nonempty, "role to connect as"),
    _Spec("password", "DB_PASSWORD", _secret, _no_nul, "password (never logged or printed)"),
    _Spec("pool_min", "DB_POOL_MIN_CONN", _integer, _int_range(0, 10_000), "connections kept open"),
    _Spec("pool_max", "DB_POOL_MAX_CONN", _integer, _int_range(1, 10_000), "most connections the pool opens"),
    _Spec(
        "pool_timeout",
        "DB_POOL_TIMEOUT",
        _number,
        _float_range(0, 86_400, " seconds"),
        "seconds a caller waits for a free connection",
    ),
    _Spec("sslmode", "DB_SSLMODE", _text, _sslmode, "libpq sslmode"),
    _Spec(
        "connect_timeout",
        "DB_CONNECT_TIMEOUT",
        _integer,
        _int_range(1, 3600, " seconds"),
        "seconds to wait for a new connection",
    ),
    _Spec(
        "statement_timeout_ms",
        "DB_STATEMENT_TIMEOUT",
        _integer,
        _int_range(0, _INT32_MAX, " milliseconds"),
        "server-side statement timeout in ms (0 = none)",
    ),
    _Spec(
        "tcp_user_timeout_ms",
        "DB_TCP_USER_TIMEOUT",
        _integer,
        _int_range(0, _INT32_MAX, " milliseconds"),
        "ms unacknowledged data may wait before the socket is dropped (0 = OS default)",
    ),
    _Spec("application_name", "DB_APPLICATION_NAME", _text, _nonempty, "name shown in pg_stat_activity"),
    _Spec(
        "password_file",
        "DB_PASSWORD_FILE",
        _text,
        _no_nul,
        "file holding the password, re-read for every new connection (rotation)",
    ),
    _Spec("passfile", "DB_PASSFILE", _text, _no_nul, "libpq password file (.pgpass format), instead of a password"),
    _Spec("pooler", "DB_POOLER", _text, _one_of(_POOLERS), "PgBouncer pool mode in front: none, session, transaction"),
    _Spec(
        "direct_host",
        "DB_DIRECT_HOST",
        _text,
        _no_nul,
        "the database server itself, behind a pooler: migrations, backups, restores and the stamp connect here",
    ),
    _Spec("direct_port", "DB_DIRECT_PORT", _integer, _int_range(1, 65535), "port of DB_DIRECT_HOST"),
    _Spec(
        "target_session_attrs",
        "DB_TARGET_SESSION_ATTRS",
        _text,
        _one_of(_TARGETS),
        "which of the DB_HOST servers the writer pool accepts (libpq target_session_attrs)",
    ),
    _Spec(
        "replica_hosts",
        "DB_REPLICA_HOSTS",
        _replicas,
        _replica_list,
        "read replicas, host[:port] or [IPv6]:port each",
    ),
    _Spec(
        "replica_max_lag_ms",
        "DB_REPLICA_MAX_LAG_MS",
        _integer,
        _int_range(0, _INT32_MAX, " milliseconds"),
        "a replica lagging more than this is skipped",
    ),
)

_BY_VAR = {s.var: s for s in _SPECS}
_BY_FIELD = {s.field: s for s in _SPECS}
_FIELD_NAMES = frozenset(_BY_FIELD)
#: Variable name -> one-line description, for documentation and ``precog-db env``.
ENV_VARS: dict[str, str] = {s.var: s.help for s in _SPECS}
#: Field name -> the variable that sets it (``host`` -> ``DB_HOST``), for ``precog-db env``.
FIELD_VARS: dict[str, str] = {s.field: s.var for s in _SPECS}
#: PRECOG_* variables read only from the process environment: a file must not be able to set them.
_PROCESS_ONLY = frozenset(
    {"PRECOG_PROD_CONFIRMED", "PRECOG_CONFIG_DIR", "PRECOG_AUDIT_LOG", "PRECOG_AUDIT_MAX_BYTES", "PRECOG_AUDIT_BACKUPS"}
)
_OTHER_KNOWN = {"PRECOG_ENV", *_PROCESS_ONLY}

#: The twelve-factor variable: a PostgreSQL URL that fills several fields at once.
DATABASE_URL = "DATABASE_URL"
#: URL parameters (libpq's names) DATABASE_URL may set, and the field each one fills.
_URL_KEYS = {
    "host": "host",
    "port": "port",
    "dbname": "dbname",
    "user": "user",
    "password": "password",
    "sslmode": "sslmode",
    "connect_timeout": "connect_timeout",
    "application_name": "application_name",
}


_UNPARSABLE = object()


def _parse_field(name: str, raw: Any, where: str) -> Any:
    spec = _BY_FIELD[name]
    if not isinstance(raw, str):
        return raw
    try:
        value = spec.parse(raw)
    except (ValueError, OverflowError):
        value = _UNPARSABLE
    if value is _UNPARSABLE:
        # Raised outside the except block: int()'s own message quotes the raw
        # value, and it would stay reachable as __context__ (a password pasted
        # on the wrong line must not leak through a traceback).
        raise ConfigurationError(
            f"{spec.var} in {where} is not valid: {spec.check(None) if spec.check else 'bad value'}"
        )
    if spec.check is not None:
        problem = spec.check(value)
        if problem:
            raise ConfigurationError(f"{spec.var} in {where} {problem}")
    return value


def _defaults(env: Environment) -> dict[str, Any]:
    pool_min, pool_max = _POOL_SIZES[env]
    return {
        "host": "localhost",
        "port": 5432,
        "dbname": f"precog_{env.value}",
        "user": f"precog_{env.value}",
        "password": "",
        "pool_min": pool_min,
        "pool_max": pool_max,
        "pool_timeout": 30.0,
        "sslmode": "require" if env is Environment.PROD else "prefer",
        "connect_timeout": 5,
        "statement_timeout_ms": 0,
        "tcp_user_timeout_ms": 30_000,
        "application_name": f"precog-{env.value}",
        "password_file": "",
        "passfile": "",
        "pooler": "none",
        "direct_host": "",
        "direct_port": 5432,
        "target_session_attrs": "read-write",
        "replica_hosts": (),
        "replica_max_lag_ms": 1000,
    }


# --- files -----------------------------------------------------------------------


def resolve_config_dir(
    config_dir: str | os.PathLike[str] | None = None, environ: Mapping[str, str] | None = None
) -> Path:
    """The directory `.env` files are read from: argument, ``PRECOG_CONFIG_DIR``, else ``./config``."""
    env = os.environ if environ is None else environ
    if config_dir is not None:
        return Path(config_dir)
    from_env = env.get("PRECOG_CONFIG_DIR", "").strip()
    return Path(from_env) if from_env else Path("config")


class _InvalidLines(logging.Filter):
    """Collects the lines python-dotenv reports as unparseable while `dotenv_values` runs, and keeps them quiet.

    `dotenv_values` skips a malformed statement with the warning "could not
    parse statement starting at line N" on the ``dotenv.main`` logger; its
    argument is the line number, which is all a message may show.
    """

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[int] = []

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args if isinstance(record.args, tuple) else ()
        if args and isinstance(args[0], int):
            self.lines.append(args[0])
            return False
        return True


_DOTENV_LOGGER = logging.getLogger("dotenv.main")


def _parse_env_text(text: str) -> tuple[dict[str, str | None], list[int]]:
    """`dotenv_values` over ``text`` (parsed once), and the numbers of the lines it could not parse."""
    catcher = _InvalidLines()
    _DOTENV_LOGGER.addFilter(catcher)
    try:
        values = dotenv_values(stream=io.StringIO(text), interpolate=False)
    finally:
        _DOTENV_LOGGER.removeFilter(catcher)
    return dict(values), catcher.lines


def _line_of(text: str, key: str) -> int:
    """The number of the first line that starts with ``key`` (after ``export`` and an opening quote)."""
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if stripped.startswith("export "):
            stripped = stripped[len("export ") :].lstrip()
        if stripped.lstrip("'\"").startswith(key):
            return number
    return 1


def _first_bad_line(text: str, values: Mapping[str, str | None], unparseable: list[int]) -> tuple[int, bool] | None:
    """The first broken line, and whether the problem is a malformed DB_/PRECOG_ name; None when all are fine.

    A key without '=' (python-dotenv accepts it as "no value") is almost
    always a broken line, e.g. the second line of a wrapped password or
    DB_PASSWORDsecret with the '=' lost; its "key" may be a secret, so it is
    reported by line number only, like any malformed line.
    """
    problems = [(line, False) for line in unparseable]
    for key, value in values.items():
        if value is None:
            problems.append((_line_of(text, key), False))
        elif key.startswith(("DB_", "PRECOG_")) and not key.isidentifier():
            problems.append((_line_of(text, key), True))
    return min(problems) if problems else None


def _read_env_file(path: Path) -> dict[str, str | None] | None:
    """Read one `.env` file; None when it does not exist."""
    try:
        info = path.stat()
        if stat.S_ISREG(info.st_mode) and info.st_size > _MAX_ENV_FILE_BYTES:
            raise ConfigurationError(
                f"{path} is larger than {_MAX_ENV_FILE_BYTES // 1024} KiB, which no settings file is; "
                "point PRECOG_CONFIG_DIR at the right directory or replace the file"
            )
        if not stat.S_ISREG(info.st_mode) and not stat.S_ISDIR(info.st_mode):
            # A FIFO would block the service at startup and a device like
            # /dev/zero would be read forever: refuse before opening.
            raise ConfigurationError(
                f"{path} is not a regular file (a pipe, socket or device); replace it with a text file"
            )
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except IsADirectoryError:
        raise ConfigurationError(f"{path} is a directory, not a .env file; remove it or rename it") from None
    except PermissionError:
        raise ConfigurationError(
            f"{path} cannot be read (permission denied); give the service user read access, "
            f"e.g. chmod 600 {path} and chown it to that user"
        ) from None
    except OSError as exc:
        raise ConfigurationError(f"{path} cannot be read ({exc.strerror}); check the file") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ConfigurationError(f"{path} line {line} is not valid UTF-8; save the file as UTF-8") from None
    if "\x00" in text:
        line = text[: text.index("\x00")].count("\n") + 1
        raise ConfigurationError(f"{path} line {line} contains a NUL byte; this is not a text file")
    values, unparseable = _parse_env_text(text)
    problem = _first_bad_line(text, values, unparseable)
    if problem is not None:
        line, malformed_name = problem
        if malformed_name:
            raise ConfigurationError(
                f"{path} line {line} has a malformed variable name (letters, digits and _ only); fix the line"
            )
        raise ConfigurationError(
            f"{path} line {line} is not a valid KEY=VALUE line; "
            "fix or remove it (quote values that contain spaces or #)"
        )
    _warn_unknown_keys(path, values)
    return values


def _warn_unknown_keys(path: Path, values: Mapping[str, str | None]) -> None:
    known = set(_BY_VAR) | _OTHER_KNOWN
    for key in values:
        if (key.startswith("DB_") or key.startswith("PRECOG_")) and key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            log.warning(
                "unknown_setting",
                file=str(path),
                key=key,
                did_you_mean=close[0] if close else None,
            )


def _url_has_password(raw: str | None) -> bool:
    try:
        return bool(_url_values(raw, "a .env file").get("password"))
    except ConfigurationError:
        return False  # reported, with the file's name, when the URL is applied


def _check_file_permissions(path: Path, values: Mapping[str, str | None]) -> None:
    if not values.get("DB_PASSWORD") and not _url_has_password(values.get(DATABASE_URL)):
        return
    check_secret_file_mode(path, path.stat().st_mode)


def secret_file_rule_applies(env: Environment) -> bool:
    """Whether files holding a password must be private to their owner (staging and production)."""
    return env in (Environment.STAGING, Environment.PROD)


def check_secret_file_mode(path: Path | str, mode: int) -> None:
    """The rule for a file holding a password: no access for group or others (POSIX; not on Windows).

    Applies to a staging/prod ``.env`` file with a ``DB_PASSWORD`` and to ``DB_PASSWORD_FILE``
    (`precog_db._credentials`); `secret_file_rule_applies` says when.
    """
    if sys.platform == "win32":
        return
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigurationError(f"{path} holds a password and is readable by group/others; run `chmod 600 {path}`")


def _url_values(raw: str | None, where: str) -> dict[str, Any]:
    """The fields a ``DATABASE_URL`` found in ``where`` sets (parsed by libpq's own parser), or {} when unset.

    Never quotes the URL: it holds the password.
    """
    text = (raw or "").strip()
    if not text:
        return {}
    if not text.startswith(("postgresql://", "postgres://")):
        raise ConfigurationError(
            f"DATABASE_URL in {where} is not a PostgreSQL URL; it must start with postgresql:// or postgres:// "
            "(e.g. postgresql://user:password@host:5432/dbname?sslmode=require), or be removed"
        )
    import psycopg  # only when a URL is set: `precog-db env` without one stays light
    from psycopg.conninfo import conninfo_to_dict

    params: dict[str, Any] | None
    try:
        params = conninfo_to_dict(text)
    except psycopg.Error:
        params = None
    if params is None:  # raised outside the except block: libpq's message may quote the URL
        raise ConfigurationError(
            f"DATABASE_URL in {where} is not a valid PostgreSQL URL (libpq cannot parse it); check its "
            "percent-encoding (a password with @, : or / must be percent-encoded) and its ?key=value parameters"
        )
    unknown = sorted(set(params) - set(_URL_KEYS))
    if unknown:
        raise ConfigurationError(
            f"DATABASE_URL in {where} sets {', '.join(unknown)}, which precog-db does not take from a URL; it "
            f"accepts {', '.join(sorted(_URL_KEYS))}. Remove the parameter and use the DB_* setting instead "
            "(e.g. DB_STATEMENT_TIMEOUT rather than options=-c statement_timeout=...)"
        )
    out: dict[str, Any] = {}
    for key, value in params.items():
        if value is None or str(value) == "":
            continue
        name = _URL_KEYS[key]
        if name in ("host", "port") and "," in str(value):
            raise ConfigurationError(
                f"DATABASE_URL in {where} names several hosts or ports; precog-db connects to one server. "
                "Give one host (a pooler or a load balancer in front of the others)"
            )
        out[name] = _parse_field(
            name, _secret(str(value)) if name == "password" else str(value), f"DATABASE_URL in {where}"
        )
    return out


def _url_dbname(raw: str | None, where: str) -> str | None:
    dbname = _url_values(raw, where).get("dbname")
    return dbname if isinstance(dbname, str) else None


# --- loading ----------------------------------------------------------------------


def load_settings(
    env: str | Environment | None = None,
    *,
    config_dir: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
    **overrides: Any,
) -> DatabaseSettings:
    """Resolve the environment and load its settings.

    ``overrides`` use field names (``host``, ``port``, ``dbname``, ``pool_max``
    …). ``environ`` defaults to `os.environ`; it is read, never written.
    Raises `ConfigurationError` for invalid input and `EnvironmentMismatchError`
    when the database name belongs to another environment.
    """
    if isinstance(overrides.get("password"), str):
        overrides["password"] = Secret(overrides["password"])
    try:
        return _load_settings(env, config_dir, environ, overrides)
    except (ConfigurationError, EnvironmentMismatchError) as exc:
        error = exc
    # Re-raised from here with a fresh traceback: the frames below hold every
    # raw value read (file contents, a password pasted on the wrong line) as
    # locals, and tracebacks that render locals would log them. The message
    # already names the file, line or variable. This frame's own overrides go too.
    overrides.clear()
    error.__traceback__ = None
    raise error


def _load_settings(
    env: str | Environment | None,
    config_dir: str | os.PathLike[str] | None,
    environ: Mapping[str, str] | None,
    overrides: dict[str, Any],
) -> DatabaseSettings:
    process_env = os.environ if environ is None else environ
    provider = overrides.pop("password_provider", None)
    directory = resolve_config_dir(config_dir, process_env)
    explicit_dir = config_dir is not None or bool(process_env.get("PRECOG_CONFIG_DIR", "").strip())
    if directory.exists() and not directory.is_dir():
        raise ConfigurationError(f"config directory {directory} is a file; point PRECOG_CONFIG_DIR at a directory")
    if explicit_dir and not directory.exists():
        raise ConfigurationError(
            f"config directory {directory} does not exist; create it or fix PRECOG_CONFIG_DIR / --config-dir"
        )
    unknown = sorted(set(overrides) - _FIELD_NAMES)
    if unknown:
        raise ConfigurationError(
            f"unknown setting(s) {', '.join(unknown)}; valid names are {', '.join(sorted(_FIELD_NAMES))}"
        )

    # The shared file is read first: its PRECOG_ENV and DB_NAME take part in
    # resolving the environment (resolve_environment), which picks the second file.
    shared_path = directory / ".env"
    shared = _read_env_file(shared_path)
    dbname_override = overrides.get("dbname")
    resolution = _resolve(env, dbname_override, process_env, shared_path, shared)
    process_url = _url_values(process_env.get(DATABASE_URL), "the process environment")
    resolved = resolution.env

    values: dict[str, Any] = _defaults(resolved)
    origins = dict.fromkeys(values, "default")
    files: list[Path] = []
    #: Per password source, the precedence of the layer that set it (see `_one_password_source`): from
    #: lowest, each file's DATABASE_URL then its DB_* lines, the process DATABASE_URL then its DB_*, the arguments.
    source_rank: dict[str, int] = {}

    own_path = directory / f".env.{resolved.value}"
    for layer, (path, content) in enumerate(((shared_path, shared), (own_path, _read_env_file(own_path)))):
        url_rank, rank = 2 * layer + 1, 2 * layer + 2
        if content is None:
            continue
        if resolved in (Environment.STAGING, Environment.PROD) or path.name in (".env.staging", ".env.prod"):
            _check_file_permissions(path, content)
        _check_process_only_keys(path, content, resolved, shared=path is shared_path)
        files.append(path)
        for name, value in _url_values(content.get(DATABASE_URL), str(path)).items():
            values[name] = value
            origins[name] = f"DATABASE_URL in {path}"
            source_rank[name] = url_rank
        for var, raw in content.items():
            spec = _BY_VAR.get(var)
            if spec is None or raw is None or raw == "":
                continue
            values[spec.field] = _parse_field(spec.field, raw, str(path))
            origins[spec.field] = str(path)
            source_rank[spec.field] = rank

    for name, value in process_url.items():
        values[name] = value
        origins[name] = "DATABASE_URL in the process environment"
        source_rank[name] = 5
    for spec in _SPECS:
        raw = process_env.get(spec.var)
        if raw is None or raw == "":
            continue
        values[spec.field] = _parse_field(spec.field, raw, "the process environment")
        origins[spec.field] = "environment"
        source_rank[spec.field] = 6

    for name, raw in overrides.items():
        if raw is None:
            continue
        values[name] = _parse_field(name, raw, "the arguments")
        origins[name] = "argument"
        source_rank[name] = 7
    if provider is not None:
        values["password_provider"] = provider
        origins["password_provider"] = "argument"  # noqa: S105  # an origin, not a password
        source_rank["password_provider"] = 7
    _one_password_source(values, origins, source_rank)

    if resolved is Environment.PROD and values["sslmode"] not in _STRONG_SSL:
        log.warning(
            "weak_sslmode_in_production",
            sslmode=values["sslmode"],
            source=origins["sslmode"],
            env=resolved.value,
        )
    origins["env"] = resolution.source
    # DatabaseSettings checks the rest: pool_min <= pool_max, and that the
    # database name does not name another environment (check_name_matches).
    return DatabaseSettings(env=resolved, files=tuple(files), origins=origins, **values)


def _one_password_source(values: dict[str, Any], origins: dict[str, str], rank: Mapping[str, int]) -> None:
    """Keep only the password source(s) set by the highest-precedence layer.

    ``DB_PASSWORD_FILE`` exported in the process environment replaces a
    ``DB_PASSWORD`` from a ``.env`` file, and the password of a process
    ``DATABASE_URL`` replaces a ``.env`` file's ``DB_PASSWORD_FILE`` or
    ``DB_PASSFILE``, as any higher layer replaces a lower one (a source's
    ``DATABASE_URL`` sits just below its ``DB_*``). Two sources set in the same
    layer stay, and `DatabaseSettings` refuses them as ambiguous.
    """
    present = {name: rank.get(name, 0) for name in _SOURCE_NAMES if values.get(name)}
    if not present:
        return
    top = max(present.values())
    for name, level in present.items():
        if level < top:
            values[name] = None if name == "password_provider" else ""
            origins[name] = "default"


def _check_process_only_keys(
    path: Path, content: Mapping[str, str | None], resolved: Environment, *, shared: bool
) -> None:
    """PRECOG_ENV in an environment's own file must agree; process-only variables in a file are reported as ignored."""
    declared = (content.get("PRECOG_ENV") or "").strip()
    own = declared and not shared and parse_environment(declared, source=f"PRECOG_ENV in {path}", show_value=False)
    if own and own is not resolved:
        raise ConfigurationError(
            f"{path} sets PRECOG_ENV to another environment than {resolved.value}, the one that chose this file; "
            f"an environment's own file cannot change the environment. Remove PRECOG_ENV from {path} "
            f"(set it in the process environment or in {path.parent / '.env'})"
        )
    for key in content:
        if key == "PRECOG_PROD_CONFIRMED":
            log.warning(
                "prod_confirmation_in_file_ignored",
                file=str(path),
                reason="PRECOG_PROD_CONFIRMED is deliberately never read from a .env file: a file copied from a "
                "server must not confirm production on another machine",
                fix="remove the line; confirm in the process itself, e.g. PRECOG_PROD_CONFIRMED=yes precog-db ...",
            )
        elif key in _PROCESS_ONLY:
            log.warning(
                "setting_ignored",
                file=str(path),
                key=key,
                reason=f"{key} is read only from the process environment",
                fix=f"remove it from {path} and export it in the process environment instead",
            )


def _resolve(
    env: str | Environment | None,
    dbname: object,
    environ: Mapping[str, str],
    shared_path: Path,
    shared: Mapping[str, str | None] | None,
) -> Resolution:
    """`resolve_environment`, with a DATABASE_URL's database name where its precedence puts it.

    The inference reads, first match wins: the dbname argument, ``DB_NAME``
    in the process, ``DATABASE_URL`` in the process, ``DB_NAME`` in
    ``config/.env``, ``DATABASE_URL`` in ``config/.env``.
    """
    source = "the dbname argument"
    name = dbname if isinstance(dbname, str) and dbname.strip() else None
    files = shared or {}
    if name is None and not (environ.get("DB_NAME") or "").strip():
        name = _url_dbname(environ.get(DATABASE_URL), "the process environment")
        source = "the database name in DATABASE_URL"
        if name is None and not (files.get("DB_NAME") or "").strip():
            name = _url_dbname(files.get(DATABASE_URL), str(shared_path))
            source = f"the database name in DATABASE_URL in {shared_path}"
    return resolve_environment(
        env,
        dbname=name,
        dbname_source=source,
        environ=environ,
        file_values=shared,
        file_name=str(shared_path),
    )


def environment_resolution(
    env: str | Environment | None = None,
    *,
    config_dir: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
    dbname: str | None = None,
) -> Resolution:
    """Which environment `load_settings` would resolve, and where it came from, without loading the rest.

    Reads ``config/.env`` (its PRECOG_ENV and DB_NAME count, see
    `precog_db.environment.resolve_environment`); for commands that do not connect.
    """
    process_env = os.environ if environ is None else environ
    shared_path = resolve_config_dir(config_dir, process_env) / ".env"
    try:
        shared = _read_env_file(shared_path)
    except ConfigurationError as exc:
        error = exc
    else:
        return _resolve(env, dbname, process_env, shared_path, shared)
    error.__traceback__ = None  # the frames below hold the file's raw values
    raise error


def setting_fields() -> tuple[str, ...]:
    """The names of the configurable fields, in documentation order."""
    return tuple(f.name for f in fields(DatabaseSettings) if f.name in _FIELD_NAMES)


def settings_for(env: str | Environment | None, settings: DatabaseSettings | None, *, caller: str) -> DatabaseSettings:
    """The settings an API call acts on: ``settings`` if given, else `load_settings(env)`.

    Passing both with different environments is a `ConfigurationError`
    naming ``caller``, because it is ambiguous which one was meant.
    """
    if settings is None:
        return load_settings(env)
    if env is not None and parse_environment(env) is not settings.env:
        raise ConfigurationError(
            f"{caller} got env={parse_environment(env).value} but settings for "
            f"{settings.env.value}; pass one or the other"
        )
    return settings
