"""Banners and typed confirmations for commands that act on a database.

Rules (the README's "Safety on staging and prod" section says the same):

* Every command that acts on staging or prod prints a banner first:
  environment, host, port, database and role, in colour when the terminal
  supports it (``NO_COLOR`` and ``TERM=dumb`` turn colour off).
* A destructive or schema-changing command on **prod** needs
  ``PRECOG_PROD_CONFIRMED=yes`` *and* the database name typed exactly: at the
  terminal prompt, or with ``--confirm-database NAME`` when there is no
  terminal. ``--yes`` never confirms production: yes/no prompts are where
  people answer on autopilot.
* On **staging** and for destructive commands on dev and test (restore), the
  name typed at the prompt, ``--confirm-database NAME`` or ``--yes`` confirms.
* A wrong name is a refusal; nothing has been changed when it is raised.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from typing import TextIO

from precog_db.environment import STRICT, Environment
from precog_db.errors import ConfirmationError
from precog_db.guard import CONFIRM_VAR, require_production_confirmation
from precog_db.settings import DatabaseSettings

__all__ = ["banner", "confirmation", "require_confirmation", "use_colour"]

_COLOURS = {Environment.PROD: "\033[1;97;41m", Environment.STAGING: "\033[1;30;43m"}
_RESET = "\033[0m"


def use_colour(stream: TextIO, environ: Mapping[str, str] | None = None) -> bool:
    """Colour only on a terminal, and never with ``NO_COLOR`` set or ``TERM=dumb``."""
    env = os.environ if environ is None else environ
    if "NO_COLOR" in env or env.get("TERM") == "dumb":
        return False
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def banner(settings: DatabaseSettings, action: str, *, colour: bool = False) -> str:
    """The banner text for ``action`` on ``settings`` (no trailing newline)."""
    env = settings.env
    title = {Environment.PROD: "PRODUCTION", Environment.STAGING: "STAGING"}.get(env, env.value.upper())
    line = (
        f"  {title}  {action}: database {settings.dbname!r} on {settings.host}:{settings.port} "
        f"as {settings.user!r} (environment {env.value})  "
    )
    if colour and env in _COLOURS:
        return f"{_COLOURS[env]}{line}{_RESET}"
    rule = "=" * len(line)
    return f"{rule}\n{line}\n{rule}"


def _is_tty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def require_confirmation(
    settings: DatabaseSettings,
    action: str,
    *,
    yes: bool = False,
    confirm_database: str | None = None,
    stdin: TextIO | None = None,
    prompt_to: TextIO | None = None,
    environ: Mapping[str, str] | None = None,
    typed_only: bool = False,
) -> str:
    """Demand the confirmation ``action`` on ``settings`` needs; return how it was given (for the audit log).

    ``typed_only``: ``yes`` (``--yes``) is not enough on staging either, as on prod
    (the guarded console's ``--write``). Call this only for destructive or schema-changing actions. Raises
    `ConfirmationError` (or `ProductionAccessError` without
    ``PRECOG_PROD_CONFIRMED=yes``) when the confirmation is missing or wrong.
    """
    source = sys.stdin if stdin is None else stdin
    out = sys.stderr if prompt_to is None else prompt_to
    name = settings.dbname
    given: list[str] = []
    if settings.env is Environment.PROD:
        env = os.environ if environ is None else environ
        require_production_confirmation(settings, confirmed=env.get(CONFIRM_VAR) == "yes", operation=action)
        given.append(f"{CONFIRM_VAR}=yes")

    if confirm_database is not None:
        if confirm_database != name:
            raise ConfirmationError(
                f"--confirm-database does not match: refusing to {action} on the {settings.describe()}. "
                f"Pass the exact database name, --confirm-database {name}; nothing was changed"
            )
        given.append("--confirm-database")
        return " + ".join(given)

    if settings.env is not Environment.PROD and yes and not typed_only:
        given.append("--yes")
        return " + ".join(given)

    if not _is_tty(source):
        if settings.env is Environment.PROD or typed_only:
            hint = (
                f"--yes is not enough {'for production' if settings.env is Environment.PROD else 'here'}. "
                if yes
                else ""
            )
            raise ConfirmationError(
                f"refusing to {action} on the {settings.describe()} without a typed confirmation. "
                f"{hint}There is no terminal to type the name at, so pass --confirm-database {name}; "
                "nothing was changed"
            )
        raise ConfirmationError(
            f"refusing to {action} on the {settings.describe()} without confirmation. There is no terminal "
            f"to ask at, so pass --yes or --confirm-database {name}; nothing was changed"
        )

    out.write(f"This will {action} on the {settings.describe()}.\nType the database name ({name}) to continue: ")
    out.flush()
    answer = source.readline()
    if answer.rstrip("\r\n") != name:
        raise ConfirmationError(
            f"the name typed does not match database {name!r}: refusing to {action}; nothing was changed"
        )
    given.append("typed database name")
    return " + ".join(given)


def confirmation(
    settings: DatabaseSettings,
    action: str,
    *,
    always: bool = False,
    yes: bool = False,
    confirm_database: str | None = None,
    stdin: TextIO | None = None,
    prompt_to: TextIO | None = None,
    typed_only: bool = False,
) -> str:
    """The confirmation a destructive or schema-changing ``action`` needs; how it was given (for the audit log).

    Staging and prod always need one (`require_confirmation`); dev and test
    only when ``always`` (restore), else ``"not required"``.
    """
    if settings.env not in STRICT and not always:
        return "not required"
    return require_confirmation(
        settings,
        action,
        yes=yes,
        confirm_database=confirm_database,
        stdin=stdin,
        prompt_to=prompt_to,
        typed_only=typed_only,
    )
