"""The embedded PostgreSQL of the optional ``local`` extra (``pip install 'precog-db[local]'``).

This is the only module that knows about the ``pgserver`` package, so it can be
replaced without touching anything else (see docs/EMBEDDED.md). It supplies one
thing: a directory holding ``initdb``, ``pg_ctl`` and ``postgres``, which
:class:`precog_db.local.cluster.LocalCluster` then drives exactly like binaries
installed on the machine.

pgserver is located with ``importlib`` and never imported. Its own start-up
path is not used either: when run as root it creates a ``pgserver`` system user
and makes every ancestor of the virtualenv and of the data directory
world-readable (``/root`` included), it listens on a Unix socket only, and it
stops the server when the Python process that started it exits. None of that
suits ``precog-db local up``, whose server outlives the command.

When this process is root the server runs as the ``postgres`` user, which must
be able to read and execute the binaries. A virtualenv under ``/root`` is out of
its reach, so the bundled installation is then copied once into a root-owned,
world-readable cache directory in the system temporary directory.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import importlib.util
import os
import shutil
import stat
import tempfile
from pathlib import Path

from precog_db.errors import EmbeddedPostgresError

__all__ = [
    "EXTRA",
    "INSTALL_HINT",
    "PACKAGE",
    "embedded_bindir",
    "embedded_package_dir",
    "package_version",
]

PACKAGE = "pgserver"
EXTRA = "precog-db[local]"
INSTALL_HINT = (
    f"install the embedded PostgreSQL with `pip install '{EXTRA}'` "
    "(wheels exist for CPython 3.11 and 3.12 on Linux x86-64 and macOS)"
)
_EXECUTABLES = ("initdb", "pg_ctl", "postgres")
_COMPLETE = ".precog-complete"


def embedded_package_dir() -> Path | None:
    """The installed pgserver package directory, or None when the extra is not installed."""
    try:
        spec = importlib.util.find_spec(PACKAGE)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _has_server(bindir: Path) -> bool:
    return all((bindir / name).is_file() for name in _EXECUTABLES)


def package_version() -> str:
    """The installed pgserver version, ``unknown`` when it is not installed."""
    try:
        return importlib.metadata.version(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _parts(package_dir: Path) -> list[tuple[Path, Path]]:
    """What the binaries need, as (source, path relative to the site directory).

    ``pginstall/`` holds bin/, lib/ and share/ (PostgreSQL finds lib/ and share/
    relative to bin/); auditwheel puts shared libraries in ``pgserver.libs/``
    next to the package (the binaries' RPATH is ``$ORIGIN/../../../pgserver.libs``),
    delocate in ``pgserver/.dylibs/``.
    """
    site = package_dir.parent
    parts = [(package_dir / "pginstall", Path(package_dir.name) / "pginstall")]
    for extra in (site / f"{package_dir.name}.libs", package_dir / ".dylibs"):
        if extra.is_dir():
            parts.append((extra, extra.relative_to(site)))
    return parts


def _open_to_everyone(package_dir: Path) -> bool:
    """Can any user traverse to, read and execute the bundled installation?"""
    for parent in [package_dir, *package_dir.parents]:
        with contextlib.suppress(OSError):
            if not parent.stat().st_mode & stat.S_IXOTH:
                return False
    for source, _ in _parts(package_dir):
        for dirpath, _dirnames, filenames in os.walk(source):
            if (os.stat(dirpath).st_mode & (stat.S_IROTH | stat.S_IXOTH)) != (stat.S_IROTH | stat.S_IXOTH):
                return False
            for name in filenames:
                st = os.stat(os.path.join(dirpath, name))
                if not st.st_mode & stat.S_IROTH:
                    return False
                if st.st_mode & stat.S_IXUSR and not st.st_mode & stat.S_IXOTH:
                    return False
    return True


def _open_up(root: Path) -> None:
    """chmod a copied tree so everyone may read it, and execute what its owner may execute."""
    for dirpath, _dirnames, filenames in os.walk(root):
        os.chmod(dirpath, 0o755)  # noqa: S103 - the postgres user must traverse it; only we may write
        for name in filenames:
            path = os.path.join(dirpath, name)
            if os.path.islink(path):
                continue
            mode = os.stat(path).st_mode
            os.chmod(path, 0o755 if mode & stat.S_IXUSR else 0o644)


def _safe_cache(path: Path) -> bool:
    """Is ``path`` a real directory that only we could have written (not a trap in a shared /tmp)?"""
    st = path.lstat()
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid() and not st.st_mode & 0o022


def _shared_copy(package_dir: Path, cache_parent: Path) -> Path:
    """Copy the bundled installation to a world-readable cache (once); return the copy's bin directory."""
    fingerprint = f"{package_dir}:{(package_dir / 'pginstall' / 'bin' / 'postgres').stat().st_mtime_ns}"
    digest = hashlib.sha256(fingerprint.encode()).hexdigest()[:12]
    target = cache_parent / f"precog-embedded-pg-{package_version()}-{digest}"
    bindir = target / package_dir.name / "pginstall" / "bin"
    if target.exists() or target.is_symlink():
        if not _safe_cache(target):
            raise EmbeddedPostgresError(
                f"{target} exists but is not a directory owned by this user and closed to others, so the "
                f"embedded PostgreSQL will not be run from it; remove it (rm -rf {target}) and try again"
            )
        if (target / _COMPLETE).is_file() and _has_server(bindir):
            return bindir
        shutil.rmtree(target)
    cache_parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f"{target.name}.partial-", dir=cache_parent))
    try:
        for source, relative in _parts(package_dir):
            shutil.copytree(source, partial / relative, symlinks=True)
        _open_up(partial)
        (partial / _COMPLETE).write_text(f"copied from {package_dir}\n")
        os.chmod(partial / _COMPLETE, 0o644)
        try:
            partial.rename(target)
        except OSError:
            # Another process finished the same copy first: use theirs.
            if not (_safe_cache(target) and (target / _COMPLETE).is_file()):
                raise
    except OSError as exc:
        raise EmbeddedPostgresError(
            f"could not copy the embedded PostgreSQL to {target} ({exc.strerror or exc}); free some space in "
            f"{cache_parent} or set PRECOG_PG_BINDIR to PostgreSQL binaries the postgres user can run"
        ) from None
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return bindir


def embedded_bindir(*, shared: bool, package_dir: Path | None = None, cache_parent: Path | None = None) -> Path | None:
    """The directory of the embedded ``initdb``/``pg_ctl``/``postgres``, or None without the extra.

    ``shared=True`` means another user (``postgres``, when we are root) runs the
    binaries: if the installation is not open to everyone, it is copied once to
    ``cache_parent`` (default: the system temporary directory) and the copy is
    returned. ``package_dir`` defaults to the installed pgserver package.
    """
    package_dir = package_dir or embedded_package_dir()
    if package_dir is None:
        return None
    bindir = package_dir / "pginstall" / "bin"
    if not _has_server(bindir):
        return None
    if not shared or _open_to_everyone(package_dir):
        return bindir
    return _shared_copy(package_dir, cache_parent or Path(tempfile.gettempdir()))
