"""`PrecogDBError`, the root every exception of precog_db derives from; import it from `precog_db.errors`.

It has a module of its own because both halves of the hierarchy build on it:
`precog_db.errors` (the exceptions that need no driver, and the public home of
all of them) and `precog_db._driver_errors` (those that also inherit a psycopg
class, which `precog_db.errors` loads on first use). With the root here,
neither of the two imports the other back.
"""

from __future__ import annotations

__all__ = ["PrecogDBError"]


class PrecogDBError(Exception):
    """Base class of every error raised by precog_db."""

    __module__ = "precog_db.errors"  # its public home, as tracebacks and pickles name it
