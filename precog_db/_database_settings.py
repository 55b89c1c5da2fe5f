"""`DatabaseSettings`, the settings object, and the one table of each environment's defaults.

Frozen, validated on construction whoever builds it (`load_settings`, a
caller by hand, `replace`): every field's check from the field table
(`precog_db._fields`), one password source, ``pool_min <= pool_max``, the
settings that only make sense together (`_check_topology`) and the naming
rule (`check_name_matches`). Safe to print: the password never appears in
`repr` or `str`. Import it from `precog_db.settings`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from precog_db._fields import FIELD_NAMES, SPECS, Secret, check_ports, parse_field, parse_ports, parse_replicas
from precog_db.environment import Environment, environment_named_by, parse_environment
from precog_db.errors import ConfigurationError, EnvironmentMismatchError

__all__ = [
    "SOURCE_NAMES",
    "DatabaseSettings",
    "check_name_matches",
    "env_defaults",
    "password_sources",
    "setting_fields",
]

#: Pool sizes per environment: (min, max).
_POOL_SIZES: dict[Environment, tuple[int, int]] = {
    Environment.DEV: (2, 10),
    Environment.TEST: (2, 25),
    Environment.STAGING: (5, 25),
    Environment.PROD: (10, 50),
}


def env_defaults(env: Environment) -> dict[str, Any]:
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
        # Staging and prod: a console statement (precog-db shell) gives up after a minute.
        "shell_statement_timeout_ms": 60_000 if env in (Environment.STAGING, Environment.PROD) else 0,
        # Staging and prod: a migration gives up on a lock after 5 s rather than queue every reader behind it.
        "migration_lock_timeout_ms": 5000 if env in (Environment.STAGING, Environment.PROD) else 0,
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


class _Unset:
    """The default of every `DatabaseSettings` field: replaced by the environment's default on construction."""

    def __repr__(self) -> str:
        return "<default>"


_UNSET: Any = _Unset()
#: Fields whose default names the environment; an empty string also means "the default" for them.
_NAMED_BY_ENV = frozenset({"dbname", "user", "application_name"})

#: The settings that can supply the password, and how a message names each one.
SOURCE_NAMES = {
    "password": "DB_PASSWORD",
    "password_file": "DB_PASSWORD_FILE",
    "passfile": "DB_PASSFILE",
    "password_provider": "password_provider",
}


def password_sources(settings: DatabaseSettings) -> list[str]:
    """Which of ``password``, ``password_file``, ``passfile`` and ``password_provider`` supply the password."""
    return [name for name in SOURCE_NAMES if getattr(settings, name)]


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
            "Whole words of the name decide (prod/production, staging/stag, test/testing/ci, dev/development)"
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
    #: ``statement_timeout`` (ms) of a ``precog-db shell`` session; 0 = none (`precog_db.console`).
    shell_statement_timeout_ms: int = _UNSET
    #: ``lock_timeout`` (ms) for every migration statement; 0 = none (`precog_db.migrations`).
    migration_lock_timeout_ms: int = _UNSET
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
        # (`env_defaults`), exactly as `load_settings` does: a hand-built
        # DatabaseSettings(env="prod") gets sslmode=require and pool 10/50 too.
        defaults = env_defaults(self.env)
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
            object.__setattr__(self, "replica_hosts", parse_replicas(self.replica_hosts))
        if isinstance(self.port, str) and check_ports(self.port) is None:
            object.__setattr__(self, "port", parse_ports(self.port))
        if isinstance(self.password, str) and not isinstance(self.password, Secret):
            object.__setattr__(self, "password", Secret(self.password))
        for spec in SPECS:
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
                f"{SOURCE_NAMES[s]} (from {_origin_text(origins.get(s, 'argument'))})" for s in sources
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
        unknown = sorted(set(changes) - FIELD_NAMES - {"env", "password_provider"})
        if unknown:
            raise ConfigurationError(
                f"unknown setting(s) {', '.join(unknown)}; valid names are {', '.join(sorted(FIELD_NAMES))}"
            )
        if isinstance(changes.get("password"), str):
            changes["password"] = Secret(changes["password"])  # masked in this frame's locals
        try:
            env = changes.pop("env", None)
            parsed = {k: v if k == "password_provider" else parse_field(k, v, "argument") for k, v in changes.items()}
            origins = {k: v for k, v in self.origins.items() if k not in changes}
            origins.update(dict.fromkeys(changes, "argument"))
            if env is not None:
                parsed["env"] = parse_environment(env, source="replace(env=...)")
                # Fields that held the old environment's defaults take the new one's.
                for name in env_defaults(parsed["env"]):
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


def _libpq_target(value: str) -> str:
    """libpq's ``target_session_attrs`` for the setting: ``read-write`` is libpq's ``primary``.

    libpq's own ``read-write`` also rejects a server whose session default is
    read-only, which every pooled connection's is (its startup options set
    ``default_transaction_read_only=on``); "can write" is exactly "not a hot
    standby", which the server reports at no round-trip cost (PostgreSQL 14+).
    """
    return "primary" if value == "read-write" else value


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


def setting_fields() -> tuple[str, ...]:
    """The names of the configurable fields, in documentation order."""
    return tuple(f.name for f in fields(DatabaseSettings) if f.name in FIELD_NAMES)
