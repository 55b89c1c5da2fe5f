"""The production guard: production is refused unless the operator confirmed it.

Confirmation is ``PRECOG_PROD_CONFIRMED=yes`` in the *process* environment,
exactly ``yes``. It is deliberately not read from `.env` files: a file copied
from a server must not be able to confirm production on a laptop.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from precog_db._secrets import current_os_user  # re-exported: it lived here
from precog_db.environment import Environment
from precog_db.errors import ProductionAccessError
from precog_db.log import get_logger
from precog_db.settings import DatabaseSettings

__all__ = ["current_os_user", "production_confirmed", "require_production_confirmation"]

log = get_logger()  # stderr, or the application's structlog: see precog_db.log

CONFIRM_VAR = "PRECOG_PROD_CONFIRMED"


def production_confirmed(environ: Mapping[str, str] | None = None) -> bool:
    """True when ``PRECOG_PROD_CONFIRMED`` is exactly ``yes``."""
    env = os.environ if environ is None else environ
    return env.get(CONFIRM_VAR) == "yes"


def require_production_confirmation(
    settings: DatabaseSettings, *, confirmed: bool | None = None, operation: str = "open a pool", quiet: bool = False
) -> None:
    """Refuse production without confirmation; log confirmed production access (unless ``quiet``).

    Does nothing for other environments. Raises `ProductionAccessError` before
    any connection is attempted.
    """
    if settings.env is not Environment.PROD:
        return
    ok = production_confirmed() if confirmed is None else confirmed
    if not ok:
        raise ProductionAccessError(
            f"refusing to {operation} on production ({settings.describe()}): "
            f"set {CONFIRM_VAR}=yes in the environment of this process to confirm "
            "that you mean to touch real money"
        )
    if quiet:
        return
    log.warning(
        "production_access",
        operation=operation,
        os_user=current_os_user(),
        host=settings.host,
        port=settings.port,
        dbname=settings.dbname,
        user=settings.user,
        pid=os.getpid(),
        env=settings.env.value,
    )
