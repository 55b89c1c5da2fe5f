"""Where the password comes from, resolved again for every connection: the one function is `resolve_credentials`.

Four sources, at most one per settings object (`DatabaseSettings` refuses two):

* ``DB_PASSWORD``: a fixed password, read once with the settings;
* ``DB_PASSWORD_FILE``: a file whose content, without its trailing newline(s),
  is the password. Read again for every new connection, so a rotated file (a
  Kubernetes secret mount, a Vault agent template) takes effect without a
  restart. In staging and production the file must not be accessible to group
  or others, the rule for every file holding a password
  (`precog_db.settings.check_secret_file_mode`);
* ``DB_PASSFILE``: libpq's password file (``.pgpass`` format) handed to libpq as
  ``passfile``. libpq silently ignores a file that is not a regular file or that
  group or others can access, and then fails with "no password supplied"; here
  that is refused up front, with the fix, in every environment;
* ``password_provider``: a callable, called for every connection attempt, that
  returns the password (e.g. a cloud IAM token generator).

The pool (its ``kwargs`` callable), `precog_db.connection.connect` and the
``PGPASSWORD`` handed to ``pg_dump`` / ``pg_restore`` all get the password
from `resolve_credentials`, through `precog_db.connection.connection_kwargs`.
A resolved password is a `precog_db.settings.Secret` (masked in ``repr``) and no
message names it; messages name the source and the path only.
"""

from __future__ import annotations

import os
import stat
from typing import Any

from precog_db.errors import ConfigurationError, DatabaseUnavailableError
from precog_db.settings import DatabaseSettings, Secret, check_secret_file_mode, secret_file_rule_applies

__all__ = ["MAX_PASSWORD_FILE_BYTES", "resolve_credentials"]

#: A password file larger than this holds no password (a cloud IAM token is about 2 KiB).
MAX_PASSWORD_FILE_BYTES = 64 * 1024


def resolve_credentials(settings: DatabaseSettings) -> dict[str, Any]:
    """The libpq keyword arguments that authenticate one new connection: ``password``, ``passfile`` or none.

    Called for every connection attempt; reads ``DB_PASSWORD_FILE`` or calls the
    provider each time. Raises `ConfigurationError` (the file is missing, empty,
    too open, not text; the provider returned no text) or
    `DatabaseUnavailableError` (the provider raised), never naming the password.
    """
    if settings.password_provider is not None:
        return {"password": _from_provider(settings)}
    if settings.password_file:
        return {"password": _from_file(settings.password_file, check_mode=secret_file_rule_applies(settings.env))}
    if settings.passfile:
        _check_passfile(settings.passfile)
        return {"passfile": settings.passfile}
    if settings.password:
        return {"password": settings.password}
    return {}


def _problem(value: object) -> str | None:
    """What is wrong with a password value, or None."""
    if not isinstance(value, str):
        return f"returned a {type(value).__name__}, not text"
    if not value:
        return "gave an empty password"
    if "\x00" in value:
        return "gave a password containing a NUL character"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return "gave a password that is not valid UTF-8 text"
    return None


def _from_provider(settings: DatabaseSettings) -> Secret:
    provider = settings.password_provider
    assert provider is not None
    try:
        value: object = provider()
    except (Exception, SystemExit) as exc:
        # Name the failure, not its text: the provider's message may quote the very credential it
        # failed to renew (a token, a passphrase, in any shape), so no word of it is shown, and
        # nothing of it is chained (raised below, outside this block: no __cause__, no __context__,
        # no provider frame for a log to render). A provider that calls sys.exit() gets the same
        # error; KeyboardInterrupt still interrupts.
        kind = type(exc).__name__
        failed = True
    else:
        failed = False
    if failed:
        raise DatabaseUnavailableError(
            f"the password provider for the {settings.describe()} raised {kind}; its message is not shown because "
            "it may contain the secret. No connection was attempted. Check the provider's own credentials and "
            "endpoint (run it by hand to see its message); the pool retries by itself"
        ) from None
    problem = _problem(value)
    if problem is None:
        return Secret(value)  # _problem checked that it is a str
    del value  # never a local of the frame the error is raised from
    raise ConfigurationError(
        f"the password provider for the {settings.describe()} {problem}; it must return the password as a str"
    )


def _from_file(path: str, *, check_mode: bool) -> Secret:
    """Read ``DB_PASSWORD_FILE`` now: the content minus trailing newlines, as a `Secret`."""
    raw = _read_small_file(path, "DB_PASSWORD_FILE", check_mode=check_mode)
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        text = None
    raw = b""
    if text is None:
        raise ConfigurationError(f"DB_PASSWORD_FILE {path} is not UTF-8 text; write the password as UTF-8")
    secret = Secret(text.rstrip("\r\n"))
    text = ""
    problem = _problem(secret)
    if problem is None:
        return secret
    del secret
    raise ConfigurationError(
        f"DB_PASSWORD_FILE {path} {problem}; the file must hold the password (a trailing newline is ignored)"
    )


def _read_small_file(path: str, var: str, *, check_mode: bool) -> bytes:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        error = f"{var} {path} does not exist; mount or write the password file there, or fix {var}"
    except PermissionError:
        error = f"{var} {path} cannot be read (permission denied); give the service user read access"
    except OSError as exc:
        error = f"{var} {path} cannot be opened ({exc.strerror}); fix {var}"
    else:
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                error = f"{var} {path} is not a regular file (a directory, pipe or device); point {var} at a file"
            elif info.st_size > MAX_PASSWORD_FILE_BYTES:
                error = f"{var} {path} is larger than {MAX_PASSWORD_FILE_BYTES // 1024} KiB; it holds no password"
            else:
                if check_mode:
                    check_secret_file_mode(path, info.st_mode)
                with os.fdopen(fd, "rb", closefd=False) as fh:
                    return fh.read(MAX_PASSWORD_FILE_BYTES + 1)
        finally:
            os.close(fd)
    raise ConfigurationError(error)


def _check_passfile(path: str) -> None:
    """libpq's rule for its password file, enforced with a message instead of libpq's silent skip."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise ConfigurationError(
            f"DB_PASSFILE {path} does not exist; write the .pgpass file or fix DB_PASSFILE"
        ) from None
    except OSError as exc:
        raise ConfigurationError(f"DB_PASSFILE {path} cannot be read ({exc.strerror}); fix DB_PASSFILE") from None
    if not stat.S_ISREG(info.st_mode):
        raise ConfigurationError(f"DB_PASSFILE {path} is not a regular file; libpq ignores it. Point it at a file")
    if os.name != "nt" and info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigurationError(
            f"DB_PASSFILE {path} is accessible to group or others, so libpq would ignore it and connect without "
            f"a password; run `chmod 600 {path}`"
        )
