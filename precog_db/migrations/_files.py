"""Migration files and their names: ``<version>_<name>.sql``, the checksum, reading, creating the next one.

A file's identity is its version, its name and the SHA-256 of its bytes
(`checksum_of`); its SQL is `text_of` those bytes. Nothing here opens a
connection.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from precog_db.errors import ConfigurationError

__all__ = ["MigrationFile", "checksum_of", "discover", "new_migration", "text_of"]

_FILENAME = re.compile(r"^(?P<version>\d+)_(?P<name>[A-Za-z0-9][A-Za-z0-9_-]*)\.sql$")
_SLUG = re.compile(r"[^a-z0-9]+")


@dataclass(frozen=True)
class MigrationFile:
    """One ``<version>_<name>.sql`` file."""

    version: int
    name: str
    path: Path
    checksum: str

    @property
    def filename(self) -> str:
        return self.path.name

    def sql(self) -> str:
        return text_of(self.path.read_bytes())


def _normalised(raw: bytes) -> bytes:
    return raw.replace(b"\r\n", b"\n")


def checksum_of(raw: bytes) -> str:
    """SHA-256 of a file's bytes with CRLF turned into LF (a checkout on Windows is not an edit).

    A leading UTF-8 byte order mark is part of the bytes hashed: every
    checksum ever recorded stays what it was (a file with a BOM could be
    baselined before `text_of` learned to drop it), and adding or removing
    one after the file was applied is reported as an edit.
    """
    return hashlib.sha256(_normalised(raw)).hexdigest()


_BOM = "\ufeff"


def text_of(raw: bytes) -> str:
    """A migration file's SQL: UTF-8, a leading byte order mark dropped (editors add one), every line break LF.

    CRLF and a bare CR (classic Mac OS line endings) both become LF, once,
    here, before anything reads the text: the marker checks, the sections and
    the line numbers in messages all split on LF alone
    (`precog_db.migrations._sections.lines`), so they always agree.
    """
    return _normalised(raw).replace(b"\r", b"\n").decode("utf-8").removeprefix(_BOM)


def discover(directory: Path) -> list[MigrationFile]:
    """The migration files in ``directory``, by version. Raises `ConfigurationError` on a bad directory or name."""
    if not directory.exists():
        raise ConfigurationError(
            f"migrations directory {directory} does not exist; create it with `precog-db migrate new NAME` "
            "or pass --migrations-dir"
        )
    if not directory.is_dir():
        raise ConfigurationError(f"migrations directory {directory} is a file; pass a directory with --migrations-dir")
    found: dict[int, MigrationFile] = {}
    for path in sorted(directory.iterdir()):
        if path.suffix.lower() != ".sql":
            continue
        if not path.is_file():
            if path.is_symlink() and not path.exists():
                raise ConfigurationError(
                    f"{path} is a symbolic link to {_link_target(path)}, which does not exist; restore the file it "
                    "points to, or remove the link"
                )
            raise ConfigurationError(
                f"{path} is not a regular file (a directory or a special file); a migration is a .sql file, so "
                "remove it or rename it"
            )
        match = _FILENAME.match(path.name)
        if match is None:
            raise ConfigurationError(
                f"{path} is not named <version>_<name>.sql (e.g. 0001_create_markets.sql); rename it, "
                "or move it out of the migrations directory"
            )
        version = int(match["version"])
        if version <= 0:
            raise ConfigurationError(f"{path} has version 0; versions start at 1")
        if version in found:
            raise ConfigurationError(
                f"{path} and {found[version].path} both have version {version}; renumber one of them"
            )
        raw = path.read_bytes()
        try:
            _normalised(raw).decode("utf-8")
        except UnicodeDecodeError:
            raise ConfigurationError(f"{path} is not valid UTF-8; save it as UTF-8") from None
        found[version] = MigrationFile(version, match["name"], path, checksum_of(raw))
    return [found[v] for v in sorted(found)]


def _link_target(path: Path) -> str:
    try:
        return str(path.readlink())
    except OSError:
        return "a path that cannot be read"


def new_migration(directory: Path, name: str) -> Path:
    """Create the next ``<version>_<name>.sql`` in ``directory`` (created if missing); return its path."""
    slug = _SLUG.sub("_", name.strip().lower()).strip("_")
    if not slug:
        raise ConfigurationError(
            "a migration name needs at least one letter or digit, e.g. `precog-db migrate new create_markets`"
        )
    directory.mkdir(parents=True, exist_ok=True)
    existing = discover(directory)
    version = existing[-1].version + 1 if existing else 1
    width = max(4, len(str(version)))
    path = directory / f"{version:0{width}d}_{slug}.sql"
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    path.write_text(
        f"-- {version:0{width}d} {slug}, written {stamp}\n"
        "-- Runs in one transaction together with its ledger row: do not add BEGIN or COMMIT.\n"
        "-- (First line '-- precog:no-transaction': runs statement by statement, for CREATE INDEX CONCURRENTLY.)\n"
        "-- After a line '-- precog:down': the SQL that reverts it (precog-db migrate down).\n"
        "-- Once applied anywhere, never edit this file: write a new migration instead.\n\n",
        encoding="utf-8",
    )
    return path
