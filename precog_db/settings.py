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

The work is split by job, in private modules this one re-exports (import
from here): the field table and its validators (`precog_db._fields`), reading
``.env`` files and ``DATABASE_URL`` (`precog_db._dotenv`), the settings object
and its defaults (`precog_db._database_settings`) and the layered loader
(`precog_db._loader`). The environment is resolved by
`precog_db.environment` (`environment_resolution`), which reads the shared
``.env`` through `precog_db._dotenv` too. No message ever contains a
configured value.
"""

from __future__ import annotations

# The names imported "as themselves" are importable from here outside __all__ (the library's own modules use them).
from precog_db._database_settings import DatabaseSettings, check_name_matches
from precog_db._database_settings import password_sources as password_sources
from precog_db._database_settings import setting_fields as setting_fields
from precog_db._dotenv import DATABASE_URL, resolve_config_dir
from precog_db._dotenv import check_secret_file_mode as check_secret_file_mode
from precog_db._fields import ENV_VARS, FIELD_VARS, replica_endpoint
from precog_db._fields import Secret as Secret
from precog_db._loader import load_settings, settings_for
from precog_db._loader import secret_file_rule_applies as secret_file_rule_applies
from precog_db.environment import environment_resolution

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
