"""pytest plugin: database fixtures that can only ever touch a test database.

Installed with precog_db through the ``pytest11`` entry point named
``precog_db``, so a project gets it without a ``conftest.py``; ``-p no:precog_db``
disables it.

Fixtures: ``db_pool`` (session), ``db_cursor`` (rolled back after each test),
``clean_test_data`` (truncates the tables of the ``precog_clean_tables`` ini
option, children first) and ``unique_test_id``; for asyncio tests ``adb_pool``
(`precog_db.aio`'s pool, per test loop) and ``adb_cursor`` (rolled back after
each test), guarded like the others, run by pytest-asyncio or anyio's plugin.

The session guard runs once collection is done, before any test, and only
when a collected test uses ``db_pool``, ``db_cursor`` or ``clean_test_data``
(directly or through other fixtures); a session that never touches the
database, such as precog_db's own suite, is left alone. The guard exits the
session unless the resolved environment is ``test``, the database name names
``test``, and the database is not stamped as another environment. Staging and
prod are refused whatever the flags: no option or variable turns the guard off.
When neither ``PRECOG_ENV`` nor ``DB_NAME`` is set, a test run resolves to
``test`` (not the library's usual ``dev``) and the plugin sets
``PRECOG_ENV=test`` for the session so that code under test agrees.

Under pytest-xdist each worker gets its own database, cloned from a template
database that the first worker to need it builds from the configured test
database, once per run. See docs/TESTING.md.

Loading the plugin is cheap: this module imports only pytest. Everything that needs the
driver (the guard, the xdist databases, the fixtures' bodies) lives in
`precog_db._plugin_impl` and is imported when a collected test first uses a database
fixture, so a pytest run without database tests imports neither psycopg nor the pool.
"""

from __future__ import annotations

import importlib
import sys
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from types import ModuleType
from typing import TYPE_CHECKING, Any, TypeVar, cast

import pytest

if TYPE_CHECKING:
    from psycopg import AsyncCursor, Cursor

    from precog_db._plugin_impl import derived_name, resolve_test_target
    from precog_db.apool import AsyncPrecogPool
    from precog_db.pool import PrecogPool
    from precog_db.settings import DatabaseSettings


__all__ = ["DB_FIXTURES", "derived_name", "resolve_test_target"]

#: Fixtures that touch the database; a session that uses one of them is guarded.
DB_FIXTURES = frozenset({"db_pool", "db_cursor", "clean_test_data", "adb_pool", "adb_cursor"})

_IMPL = "precog_db._plugin_impl"
# Shared with the heavy half (which imports them from here): set there, read by the hooks below.
_TARGET: pytest.StashKey[DatabaseSettings] = pytest.StashKey()
_SUMMARY = pytest.StashKey[list[str]]()
_TEMPLATES = pytest.StashKey[dict[str, str]]()
_PATCH = pytest.StashKey[pytest.MonkeyPatch]()


def _reuse(config: pytest.Config) -> bool:
    return bool(config.getoption("precog_reuse_db") or config.getini("precog_reuse_db"))


def _workerinput(config: pytest.Config) -> Mapping[str, Any] | None:
    value = getattr(config, "workerinput", None)
    return value if isinstance(value, Mapping) else None


def _impl() -> ModuleType:
    """The heavy half, imported on first need (psycopg, the pool, the settings)."""
    return importlib.import_module(_IMPL)


def __getattr__(name: str) -> Any:
    # `from precog_db.plugin import resolve_test_target` still works; it loads the heavy half.
    if name in ("derived_name", "resolve_test_target"):
        return getattr(_impl(), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# --- options ---------------------------------------------------------------------------


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("precog_db", "precog_db test databases")
    group.addoption(
        "--precog-reuse-db",
        action="store_true",
        default=False,
        help="under xdist: keep the template and per-worker test databases after the run and reuse them "
        "next time instead of cloning them again (ini: precog_reuse_db)",
    )
    group.addoption(
        "--precog-create-db",
        action="store_true",
        default=False,
        help="under xdist: rebuild the template and per-worker databases at the start of this run even "
        "with --precog-reuse-db (use it after a schema change); with precog_migrations_dir, also drop and "
        "rebuild the test database itself and apply every migration",
    )
    parser.addini(
        "precog_clean_tables",
        type="linelist",
        default=[],
        help="tables the clean_test_data fixture truncates, one per line, in any order",
    )
    parser.addini(
        "precog_reuse_db",
        type="bool",
        default=False,
        help="same as --precog-reuse-db",
    )
    parser.addini(
        "precog_migrations_dir",
        default="",
        help="migrations directory (relative to the rootdir) applied to the test database once at the start of "
        "a session that uses the database fixtures; with --precog-create-db the database is rebuilt from scratch",
    )
    parser.addini(
        "precog_maintenance_db",
        default="postgres",
        help="database the plugin connects to while it creates and drops xdist databases (default: postgres)",
    )


# --- hooks -----------------------------------------------------------------------------


def pytest_unconfigure(config: pytest.Config) -> None:
    patch = config.stash.get(_PATCH, None)
    if patch is not None:
        patch.undo()


@pytest.hookimpl(tryfirst=True)
def pytest_collection_finish(session: pytest.Session) -> None:
    """Guard the session before any test runs, when a collected test uses a database fixture."""
    if session.config.option.collectonly:
        return
    for item in session.items:
        if DB_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            _impl().guarded_settings(session)
            return


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: object | None) -> None:
    """Controller side: remember the template a worker used, to drop it at the end of the run."""
    output = getattr(node, "workeroutput", None) or {}
    template, marker = output.get("precog_template"), output.get("precog_template_marker")
    if template and marker:
        node.config.stash.setdefault(_TEMPLATES, {})[str(template)] = str(marker)
    for line in output.get("precog_summary", ()):
        node.config.stash.setdefault(_SUMMARY, []).append(f"[{output.get('workerid', '?')}] {line}")


def pytest_sessionfinish(session: pytest.Session) -> None:
    config = session.config
    workeroutput = getattr(config, "workeroutput", None)
    if isinstance(workeroutput, dict):
        summary: list[str] = config.stash.get(_SUMMARY, [])
        workeroutput["precog_summary"] = list(summary)
        workeroutput["workerid"] = (_workerinput(config) or {}).get("workerid", "?")
        return
    templates: dict[str, str] = config.stash.get(_TEMPLATES, {})
    if templates and not _reuse(config):
        _impl().drop_templates(config, templates)


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    lines: list[str] = config.stash.get(_SUMMARY, [])
    if lines:
        terminalreporter.section("precog_db")
        for line in lines:
            terminalreporter.write_line(line)


# --- fixtures: thin, their bodies are in the heavy half ---------------------------------


@pytest.fixture(scope="session")
def db_pool(request: pytest.FixtureRequest) -> Iterator[PrecogPool]:
    """The process-wide pool, opened on the (guarded) test database; under xdist, this worker's own database."""
    with _impl().db_pool(request) as pool:
        yield pool


@pytest.fixture
def db_cursor(db_pool: PrecogPool) -> Iterator[Cursor[dict[str, Any]]]:
    """A dict-row cursor inside a read-write transaction that is rolled back after the test."""
    with _impl().db_cursor(db_pool) as cur:
        yield cur


@pytest.fixture
def clean_test_data(db_pool: PrecogPool, request: pytest.FixtureRequest) -> Iterator[list[str]]:
    """Truncate the ``precog_clean_tables`` tables, children first, before and after the test; yield them in that order.

    One ``TRUNCATE … RESTART IDENTITY`` statement, so foreign keys between the
    listed tables never get in the way. Cleaning after the test as well means a
    row the last test of a run committed does not survive into the next run.
    Refuses outside the test environment.
    """
    impl = _impl()
    tables = cast(list[str], impl.clean_test_data(db_pool, request))
    yield tables
    impl.clean_test_data(db_pool, request)


@pytest.fixture
def unique_test_id() -> str:
    """A short string unique to this test, for names and keys of test data (``t`` + 12 hex digits)."""
    return f"t{uuid.uuid4().hex[:12]}"


# --- asyncio fixtures --------------------------------------------------------------------
# Async generator fixtures run by whichever async plugin the project uses: decorated
# with pytest_asyncio.fixture when pytest-asyncio is installed (its strict mode needs
# that; anyio's plugin runs them too, on the test's loop), a plain pytest.fixture
# otherwise (anyio's plugin). Neither is a dependency of precog_db.

_F = TypeVar("_F", bound=Callable[..., Any])


def _async_fixture_decorator() -> Callable[[_F], _F]:
    if "pytest_asyncio" not in sys.modules:
        try:
            importlib.import_module("pytest_asyncio")
        except ImportError:  # pragma: no cover - depends on the project's plugins
            return cast(Callable[[_F], _F], pytest.fixture)
    return cast(Callable[[_F], _F], sys.modules["pytest_asyncio"].fixture)


_async_fixture = _async_fixture_decorator()


@_async_fixture
async def adb_pool(db_pool: PrecogPool) -> AsyncIterator[AsyncPrecogPool]:
    """The asyncio pool (`precog_db.aio`) on the same guarded test database as ``db_pool``, for one test's loop."""
    async with _impl().adb_pool(db_pool) as pool:
        yield pool


@_async_fixture
async def adb_cursor(adb_pool: AsyncPrecogPool) -> AsyncIterator[AsyncCursor[dict[str, Any]]]:
    """An asyncio dict-row cursor inside a read-write transaction that is rolled back after the test."""
    async with _impl().adb_cursor(adb_pool) as cur:
        yield cur
