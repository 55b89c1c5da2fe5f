"""Keeping secrets out of text: the one place that masks passwords for logs, messages and the audit log.

Two kinds of input, two methods:

* **A command line** (`scrub_argv`, `scrub_arg`): each argument that is, or
  ends in, a PostgreSQL URL (``postgres://``, ``postgresql://``) or starts
  like a ``key=value`` connection string is *parsed* with libpq's own parser
  (`psycopg.conninfo.conninfo_to_dict`) and re-emitted with the password
  masked. A URL is re-emitted as written, with only its password (in the user
  info or the query string) replaced; a ``key=value`` string is re-emitted
  from the parsed pairs. Anything that looks like a connection string but
  does not parse, or whose parsed password would still show, is masked
  wholesale: a lost detail in the audit log is better than a leaked password.
  ``--option=value`` is scrubbed as its value.
* **Free text** (`scrub_text`): error messages, details. Known secrets (the
  settings' password) are replaced wherever they appear, each
  ``postgres[ql]://`` token is masked as above, and `redact` masks the
  remaining ``password=…`` pairs and ``user:secret@`` URL credentials by
  pattern, as a backstop.

This module imports nothing from precog_db, so every layer (settings, pool,
backup, audit, CLI) can use it.
"""

from __future__ import annotations

import functools
import getpass
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any
from urllib.parse import unquote, urlsplit

__all__ = [
    "MASK",
    "SECRET_KEY",
    "current_os_user",
    "is_secret_key",
    "looks_like_conninfo",
    "mask_conninfo",
    "mask_url",
    "redact",
    "scrub_arg",
    "scrub_argv",
    "scrub_text",
    "scrub_value",
]

MASK = "***"

#: Mapping keys whose value is masked whatever it holds (logs, audit details).
SECRET_KEY = re.compile(r"pass(word|wd)?|pwd|secret|token|api[_-]?key|credential", re.IGNORECASE)

#: libpq connection parameters that hold a secret (libpq also flags its own with display char ``*``).
_SECRET_PARAMS = frozenset({"password", "sslpassword", "oauth_client_secret", "scram_client_key", "scram_server_key"})

# password=... in free text (also DB_PASSWORD=, PGPASSWORD=, sslpassword= …): single-quoted (an
# unterminated quote runs to the end), or unquoted with backslash escapes (libpq reads ``ab\ cd`` as "ab cd").
_KV_SECRET = re.compile(
    r"(?i)(\b(?:\w*?_|pg)?(?:(?:ssl)?password|passwd|pwd|oauth_client_secret|scram_(?:client|server)_key))\s*=\s*"
    r"('(?:[^'\\]|\\.)*(?:'|\\?$)|(?:\\.|\\$|[^\s\\])+)"
)
# scheme://user:secret@host, the user name possibly empty.
_URL_SECRET = re.compile(r"(?i)([a-z][a-z0-9+.-]*://[^:/@\s]*:)([^@\s]+)(@)")
# Where a PostgreSQL URL starts (libpq's prefixes are case-sensitive; a
# different case does not parse and is masked wholesale).
_PG_URL = re.compile(r"(?i)postgres(?:ql)?://")
_PG_URL_TOKEN = re.compile(r"(?i)postgres(?:ql)?://\S*")
_MAY_HOLD_SECRET = re.compile(r"[@?]")
# "keyword =" at the start: a key=value connection string.
_CONNINFO_START = re.compile(r"\s*[A-Za-z_][A-Za-z0-9_]*\s*=")
# --option=value (a joined option and its value).
_JOINED_OPTION = re.compile(r"(--?[A-Za-z0-9][A-Za-z0-9_-]*=)(.*)", re.DOTALL)
_KEYWORD = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*=")
_NEEDS_QUOTES = re.compile(r"[\s'\\]")


def current_os_user() -> str:
    """The OS user running this process, for logs and the audit trail."""
    try:
        return getpass.getuser()
    except Exception:  # no login name and no passwd entry (some containers)
        return f"uid:{os.getuid()}" if hasattr(os, "getuid") else "unknown"


def is_secret_key(key: str) -> bool:
    """True for a mapping key whose value must be masked (``password``, ``token``, ``api_key`` …)."""
    return bool(SECRET_KEY.search(key))


def redact(text: str) -> str:
    """Mask ``password=...`` pairs and ``user:password@`` in URLs inside ``text``, by pattern.

    The backstop for free text; connection strings given whole are parsed
    instead (`scrub_arg`).
    """
    text = _KV_SECRET.sub(lambda m: f"{m.group(1)}={MASK}", text)
    return _URL_SECRET.sub(lambda m: f"{m.group(1)}{MASK}{m.group(3)}", text)


@functools.cache
def _libpq_keywords() -> tuple[frozenset[str], frozenset[str]]:
    """Every connection parameter this libpq knows, and the secret ones."""
    from psycopg import pq

    options = pq.Conninfo.get_defaults()
    known = frozenset(o.keyword.decode() for o in options)
    secret = frozenset(o.keyword.decode() for o in options if o.dispchar == b"*")
    return known | _SECRET_PARAMS, secret | _SECRET_PARAMS


def _secret_params() -> frozenset[str]:
    return _libpq_keywords()[1]


def looks_like_conninfo(text: str) -> bool:
    """True for text that starts ``keyword=`` and names a libpq connection parameter (``host=``, ``password=`` …)."""
    if not _CONNINFO_START.match(text):
        return False
    known = _libpq_keywords()[0]
    return any(m.group(1) in known for m in _KEYWORD.finditer(text))


def _parse(conninfo: str) -> dict[str, Any] | None:
    """libpq's reading of ``conninfo``, or None when libpq rejects it."""
    import psycopg
    from psycopg.conninfo import conninfo_to_dict

    try:
        return conninfo_to_dict(conninfo)
    except (psycopg.Error, ValueError, TypeError):
        return None


def _still_shows(params: Mapping[str, Any], text: str) -> bool:
    """True when a parsed secret value still appears in ``text``."""
    for key in _secret_params():
        value = params.get(key)
        if value and str(value) != MASK and str(value) in text:
            return True
    return False


def mask_url(url: str) -> str:
    """``url`` (a ``postgres[ql]://`` URL) with its password masked, else masked wholesale.

    The user info password and ``password=``/``sslpassword=`` in the query
    string are replaced; everything else is kept as written. A URL that libpq
    or `urllib.parse` cannot parse, or with an ``@`` after the host part
    (libpq and `urllib` would disagree on where the password ends), becomes
    ``<scheme>://***``.
    """
    match = _PG_URL.match(url)
    wholesale = f"{match.group(0) if match else ''}{MASK}"
    params = _parse(url)
    if params is None:
        return wholesale
    try:
        parts = urlsplit(url)
    except ValueError:  # e.g. an unbalanced IPv6 bracket
        return wholesale
    if "@" in parts.path or "@" in parts.query or "@" in parts.fragment:
        return wholesale
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, hosts = netloc.rpartition("@")
        user, colon, _password = userinfo.partition(":")
        netloc = f"{user}{':' + MASK if colon else ''}@{hosts}"
    pieces = []
    for piece in parts.query.split("&") if parts.query else []:
        key, equals, _value = piece.partition("=")
        pieces.append(f"{key}={MASK}" if equals and unquote(key).strip() in _secret_params() else piece)
    masked = f"{url[: len(parts.scheme)]}://{netloc}{parts.path}"
    if "?" in url:
        masked += "?" + "&".join(pieces)
    if parts.fragment:
        masked += "#" + parts.fragment
    return wholesale if _still_shows(params, masked) else masked


def _quote(value: str) -> str:
    if value and not _NEEDS_QUOTES.search(value):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def mask_conninfo(conninfo: str) -> str:
    """A ``key=value`` connection string re-emitted from libpq's parse with its password masked.

    One that libpq rejects (an unterminated quote, a missing ``=``) is masked
    wholesale as ``***``.
    """
    params = _parse(conninfo)
    if params is None:
        return MASK
    # In the order written (libpq returns its own order).
    written: dict[str, int] = {}
    for match in _KEYWORD.finditer(conninfo):
        written.setdefault(match.group(1), match.start())
    keys = sorted(params, key=lambda k: written.get(k, len(conninfo)))
    masked = " ".join(f"{k}={MASK if k in _secret_params() else _quote(str(params[k]))}" for k in keys)
    return MASK if _still_shows(params, masked) else masked


#: ``user:password@host…``: a URL pasted without its scheme (no ``://``, so not parsed as one).
_SCHEMELESS_USERINFO = re.compile(r"^([^\s:/@=]*):([^\s@]+)@(?=\S)")


def _scrub_value(value: str) -> str:
    url = _PG_URL.search(value)
    if url is not None:
        return redact(value[: url.start()]) + mask_url(value[url.start() :])
    if looks_like_conninfo(value):
        return mask_conninfo(value)
    return redact(_SCHEMELESS_USERINFO.sub(lambda m: f"{m.group(1)}:{MASK}@", value))


def scrub_arg(arg: str) -> str:
    """One command-line argument with any connection-string password masked (parsed, not pattern-matched).

    ``--database=<dsn>`` (any ``--option=value``) is scrubbed as its value.
    """
    joined = _JOINED_OPTION.fullmatch(arg)
    if joined is not None:
        return joined.group(1) + _scrub_value(joined.group(2))
    return _scrub_value(arg)


def scrub_argv(argv: Iterable[str]) -> list[str]:
    """`scrub_arg` applied to each argument."""
    return [scrub_arg(str(arg)) for arg in argv]


def scrub_text(text: str, secrets: Sequence[str] = ()) -> str:
    """Free text with the given ``secrets`` (e.g. the settings' password) and connection-string passwords masked.

    Text that is a whole ``key=value`` connection string is parsed
    (`mask_conninfo`), URL tokens are parsed (`mask_url`), and `redact`
    masks what is left by pattern.
    """
    for secret in secrets:
        if secret:
            text = text.replace(secret, MASK)
    if looks_like_conninfo(text):
        return mask_conninfo(text)
    # A URL token can hold a password only in its user info or query string.
    text = _PG_URL_TOKEN.sub(
        lambda m: mask_url(m.group(0)) if _MAY_HOLD_SECRET.search(m.group(0)) else m.group(0), text
    )
    return redact(text)


def scrub_value(value: Any, secrets: Sequence[str] = ()) -> Any:
    """A JSON-like value with every string scrubbed (`scrub_text`) and secret-looking keys masked."""
    if isinstance(value, str):
        return scrub_text(value, secrets)
    if isinstance(value, Mapping):
        return {str(k): (MASK if is_secret_key(str(k)) else scrub_value(v, secrets)) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [scrub_value(v, secrets) for v in value]
    if value is None or isinstance(value, bool | int | float):
        return value
    return scrub_text(str(value), secrets)
