"""The configurable fields: one table of field, variable, parser, check and help, and its validators.

`SPECS` is the only list of settings: `precog_db._dotenv` reads files and
``DATABASE_URL`` through it, `precog_db._loader` layers the sources with it,
`DatabaseSettings` (`precog_db._database_settings`) runs every check on
construction, and ``precog-db env`` documents it (`ENV_VARS`, `FIELD_VARS`).
`parse_field` turns one raw value into a field's value, or a
`ConfigurationError` naming the variable and where it was read, never the value.
Import the public names from `precog_db.settings`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from precog_db.errors import ConfigurationError

__all__ = [
    "BY_FIELD",
    "BY_VAR",
    "ENV_VARS",
    "FIELD_NAMES",
    "FIELD_VARS",
    "SPECS",
    "Secret",
    "Spec",
    "as_secret",
    "check_ports",
    "parse_field",
    "parse_ports",
    "parse_replicas",
    "replica_endpoint",
]

_SSLMODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
_INT32_MAX = 2_147_483_647


@dataclass(frozen=True)
class Spec:
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


def as_secret(value: str) -> str:
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


def _direct_host(value: Any) -> str | None:
    """``DB_DIRECT_HOST``: unset (empty), or one host by the ``DB_HOST`` rules; never a list."""
    if isinstance(value, str) and value == "":
        return None
    problem = _nonempty(value)
    if problem:
        return problem
    if "," in str(value):
        return (
            "must name one server (the database server itself, where migrations, backups, restores and the stamp "
            "connect), not a comma-separated list"
        )
    if any(c.isspace() or c == "=" for c in str(value)):
        return "must be one host name, IP address or socket directory, without spaces or '='"
    return None


def parse_ports(value: str) -> int | str:
    parts = [p.strip() for p in value.split(",")]
    if len(parts) == 1:
        return int(parts[0])
    return ",".join(str(int(p)) for p in parts)


def check_ports(value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int | str):
        return "must be a port from 1 to 65535, or a comma-separated list of them"
    try:
        ports = [int(p) for p in str(value).split(",")]
    except ValueError:
        return "must be a port from 1 to 65535, or a comma-separated list of them"
    if not all(1 <= p <= 65535 for p in ports):
        return "must be from 1 to 65535 (each entry of a comma-separated list)"
    return None


def parse_replicas(value: str) -> tuple[str, ...]:
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


SPECS: tuple[Spec, ...] = (
    Spec(
        "host",
        "DB_HOST",
        _text,
        _hosts,
        "server host name, IP address or socket directory; a comma-separated list for libpq multi-host",
    ),
    Spec(
        "port", "DB_PORT", parse_ports, check_ports, "server port; a comma-separated list gives one per DB_HOST entry"
    ),
    Spec("dbname", "DB_NAME", _text, _nonempty, "database name"),
    Spec("user", "DB_USER", _text, _nonempty, "role to connect as"),
    Spec("password", "DB_PASSWORD", as_secret, _no_nul, "password (never logged or printed)"),
    Spec("pool_min", "DB_POOL_MIN_CONN", _integer, _int_range(0, 10_000), "connections kept open"),
    Spec("pool_max", "DB_POOL_MAX_CONN", _integer, _int_range(1, 10_000), "most connections the pool opens"),
    Spec(
        "pool_timeout",
        "DB_POOL_TIMEOUT",
        _number,
        _float_range(0, 86_400, " seconds"),
        "seconds a caller waits for a free connection",
    ),
    Spec("sslmode", "DB_SSLMODE", _text, _sslmode, "libpq sslmode"),
    Spec(
        "connect_timeout",
        "DB_CONNECT_TIMEOUT",
        _integer,
        _int_range(1, 3600, " seconds"),
        "seconds to wait for a new connection",
    ),
    Spec(
        "statement_timeout_ms",
        "DB_STATEMENT_TIMEOUT",
        _integer,
        _int_range(0, _INT32_MAX, " milliseconds"),
        "server-side statement timeout in ms (0 = none)",
    ),
    Spec(
        "shell_statement_timeout_ms",
        "DB_SHELL_STATEMENT_TIMEOUT",
        _integer,
        _int_range(0, _INT32_MAX, " milliseconds"),
        "statement_timeout in ms of a precog-db shell session (0 = none)",
    ),
    Spec(
        "migration_lock_timeout_ms",
        "DB_MIGRATION_LOCK_TIMEOUT",
        _integer,
        _int_range(0, _INT32_MAX, " milliseconds"),
        "lock_timeout in ms for every migration statement (0 = none)",
    ),
    Spec(
        "tcp_user_timeout_ms",
        "DB_TCP_USER_TIMEOUT",
        _integer,
        _int_range(0, _INT32_MAX, " milliseconds"),
        "ms unacknowledged data may wait before the socket is dropped (0 = OS default)",
    ),
    Spec("application_name", "DB_APPLICATION_NAME", _text, _nonempty, "name shown in pg_stat_activity"),
    Spec(
        "password_file",
        "DB_PASSWORD_FILE",
        _text,
        _no_nul,
        "file holding the password, re-read for every new connection (rotation)",
    ),
    Spec("passfile", "DB_PASSFILE", _text, _no_nul, "libpq password file (.pgpass format), instead of a password"),
    Spec("pooler", "DB_POOLER", _text, _one_of(_POOLERS), "PgBouncer pool mode in front: none, session, transaction"),
    Spec(
        "direct_host",
        "DB_DIRECT_HOST",
        _text,
        _direct_host,
        "the database server itself, behind a pooler: migrations, backups, restores and the stamp connect here",
    ),
    Spec("direct_port", "DB_DIRECT_PORT", _integer, _int_range(1, 65535), "port of DB_DIRECT_HOST"),
    Spec(
        "target_session_attrs",
        "DB_TARGET_SESSION_ATTRS",
        _text,
        _one_of(_TARGETS),
        "which of the DB_HOST servers the writer pool accepts (libpq target_session_attrs)",
    ),
    Spec(
        "replica_hosts",
        "DB_REPLICA_HOSTS",
        parse_replicas,
        _replica_list,
        "read replicas, host[:port] or [IPv6]:port each",
    ),
    Spec(
        "replica_max_lag_ms",
        "DB_REPLICA_MAX_LAG_MS",
        _integer,
        _int_range(0, _INT32_MAX, " milliseconds"),
        "a replica lagging more than this is skipped",
    ),
)

BY_VAR = {s.var: s for s in SPECS}
BY_FIELD = {s.field: s for s in SPECS}
FIELD_NAMES = frozenset(BY_FIELD)
#: Variable name -> one-line description, for documentation and ``precog-db env``.
ENV_VARS: dict[str, str] = {s.var: s.help for s in SPECS}
#: Field name -> the variable that sets it (``host`` -> ``DB_HOST``), for ``precog-db env``.
FIELD_VARS: dict[str, str] = {s.field: s.var for s in SPECS}

_UNPARSABLE = object()


def parse_field(name: str, raw: Any, where: str) -> Any:
    spec = BY_FIELD[name]
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
