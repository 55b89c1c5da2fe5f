"""``precog-db``: the command line for environments, local databases, migrations, backups and the audit log.

Usage: ``precog-db [global options] COMMAND [options]``; global options are
accepted after the command too. Exit codes: 0 ok, 1 refused or failed, 2
usage. Every `PrecogDBError` and `OSError` becomes one line on stderr and
exit code 1, never a traceback. The README's "Command line" section and
docs/CLI.md describe each command.

The CLI is thin, and its modules are private: `_app` (parser, `main`, exit
codes), `_context` (the `Context` every command gets: arguments, output,
settings, banner, confirmation) and one module per command group
(`_database`: env, check, stamp; `_local`; `_migrate`; `_backups`: backup,
restore; `_console`: sql, shell; `_audit_log`). The
workflows are library functions a Python caller can use too
(`precog_db.migrations.upgrade`, `precog_db.backup.restore_database` …).

Startup stays fast (``precog-db env`` and ``--help`` never import psycopg):
the commands that connect import the driver-side modules when they run.
"""

from __future__ import annotations

from precog_db.cli._app import EXIT_FAILED, EXIT_OK, EXIT_USAGE, build_parser, main
from precog_db.cli._context import Context, Progress

__all__ = ["EXIT_FAILED", "EXIT_OK", "EXIT_USAGE", "Context", "Progress", "build_parser", "main"]
