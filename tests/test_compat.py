"""The one contract with psycopg's and psycopg_pool's private parts (`precog_db._compat`), checked both ways.

(i) From the code: every private attribute (``x._name``, or ``getattr(x, "_name")``)
that a precog_db module touches on a name that is not precog_db's own, and every
psycopg / psycopg_pool method a precog_db class overrides, is declared in
`precog_db._compat.PRIVATE`; every declared name is used; no module but
`precog_db._compat` imports from a private psycopg / psycopg_pool module, and
every name `_compat` imports is used.

(ii) From the installed releases: every declared name exists on its class with
its kind (a method with the listed parameters, a statistics key, an attribute of
the listed kind on a live object from the real server). ``make test`` runs this on
the newest releases pyproject.toml allows, ``make test-lowest`` on the floors of
.ci/lowest-versions.txt.

A name is precog_db's own when precog_db defines it (in a class body, as
``self._name = ...`` in a method, or in ``__slots__``) and psycopg / psycopg_pool
do not: with ``self`` in a class that does not derive from (or mix into) a
psycopg class, any name is precog_db's; on anything else, a name both sides
define counts as psycopg's and must be declared.
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import importlib
import inspect
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import psycopg_pool
import pytest
from psycopg_pool import AsyncConnectionPool, ConnectionPool

import precog_db
from precog_db import _compat
from precog_db._compat import INTERFACES, PRIVATE, Private
from precog_db.apool import AsyncPrecogPool
from precog_db.settings import DatabaseSettings
from tests._helpers.server import Server

PACKAGE = Path(precog_db.__file__).parent
SOURCES = sorted(PACKAGE.rglob("*.py"))
FIX = (
    "precog_db/_compat.py is the one list of the private parts of psycopg and psycopg_pool that precog_db uses "
    "(docs/DESIGN.md, 'Coupling to psycopg_pool')"
)
UPGRADE = (
    "The installed psycopg {psycopg} / psycopg_pool {pool} changed it: adapt the code that uses it and "
    "precog_db/_compat.py, or exclude this release from the range in pyproject.toml. " + FIX
)
_ACCESSORS = {"getattr", "setattr", "hasattr", "delattr"}


def is_private(name: str) -> bool:
    """A private member name that is not a dunder nor precog_db's own `_precog` (`ConnState`) or `_precog_*` mark."""
    return name.startswith("_") and not name.startswith("__") and not name.startswith("_precog")


def is_private_module(module: str) -> bool:
    """A psycopg / psycopg_pool module whose names only `_compat` may import."""
    return module.startswith("psycopg_pool.") or module.startswith("psycopg._") or module == "psycopg.generators"


def resolve(dotted: str) -> Any:
    """The object named ``module.Class`` (or ``module.sub.Class``)."""
    module, _, name = dotted.rpartition(".")
    return getattr(importlib.import_module(module), name)


def upstream(cls: type) -> bool:
    return cls.__module__.split(".")[0] in ("psycopg", "psycopg_pool")


# --- what psycopg and psycopg_pool define -----------------------------------------------------------


def defined_in_class(cls: type) -> set[str]:
    """The member names ``cls`` defines: in its body, as ``self.x`` in its methods, in ``__slots__``."""
    names = set(vars(cls))
    names.update(getattr(cls, "__slots__", ()))
    try:
        tree = ast.parse(inspect.getsource(cls).lstrip())  # a class nested in a block is indented
    except (OSError, TypeError, SyntaxError):
        return names
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
            if isinstance(node.ctx, ast.Store):
                names.add(node.attr)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return names


_UPSTREAM_NAMES: dict[type, frozenset[str]] = {}


def upstream_names(cls: type) -> frozenset[str]:
    """Every member name of the psycopg / psycopg_pool classes in ``cls``'s MRO (instance attributes included)."""
    if cls not in _UPSTREAM_NAMES:
        names: set[str] = set()
        for base in cls.__mro__:
            if upstream(base):
                names |= defined_in_class(base) | set(dir(base))
        _UPSTREAM_NAMES[cls] = frozenset(names)
    return _UPSTREAM_NAMES[cls]


# --- what precog_db touches ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Access:
    module: str
    line: int
    name: str
    #: The precog_db class whose method it is in (None: module level or a function).
    cls: type | None
    #: ``self.x`` / ``cls.x`` (True), anything else (False).
    on_self: bool
    #: A method definition that overrides the psycopg one of the same name.
    override: bool = False

    def __str__(self) -> str:
        return f"{self.module}:{self.line} {'def ' if self.override else ''}{self.name}"


def module_name(source: Path) -> str:
    return ".".join(("precog_db", *source.relative_to(PACKAGE).with_suffix("").parts)).removesuffix(".__init__")


def namespace(module: str) -> dict[str, Any]:
    """The module's globals (``precog_db.__main__`` is not imported: it runs the CLI)."""
    return {} if module.endswith("__main__") else vars(importlib.import_module(module))


class _Scanner(ast.NodeVisitor):
    def __init__(self, module: str) -> None:
        self.module = module
        self.namespace = namespace(module)
        self.classes: list[type | None] = []
        self.accesses: list[Access] = []
        self.own: set[str] = set()

    def current(self) -> type | None:
        return self.classes[-1] if self.classes else None

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        found = self.namespace.get(node.name) if not self.classes else None
        cls = found if isinstance(found, type) and found.__module__ == self.module else None
        for item in node.body:
            if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                self.own.add(item.name)
                if cls is not None and is_private(item.name) and item.name in mixed_upstream_names(cls):
                    self.accesses.append(Access(self.module, item.lineno, item.name, cls, True, override=True))
            elif isinstance(item, ast.Assign):
                self.own.update(t.id for t in item.targets if isinstance(t, ast.Name))
                if any(isinstance(t, ast.Name) and t.id == "__slots__" for t in item.targets):
                    self.own.update(
                        e.value
                        for e in ast.walk(item.value)
                        if isinstance(e, ast.Constant) and isinstance(e.value, str)
                    )
            elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                self.own.add(item.target.id)
        self.classes.append(cls)
        self.generic_visit(node)
        self.classes.pop()

    def record(self, node: ast.AST, name: str, receiver: ast.expr, store: bool) -> None:
        on_self = isinstance(receiver, ast.Name) and receiver.id in ("self", "cls")
        if store and on_self and self.classes:
            self.own.add(name)
        if is_private(name):
            self.accesses.append(Access(self.module, getattr(node, "lineno", 0), name, self.current(), on_self))

    def visit_Attribute(self, node: ast.Attribute) -> None:
        self.record(node, node.attr, node.value, isinstance(node.ctx, ast.Store))
        self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        if isinstance(func, ast.Name) and func.id in _ACCESSORS and len(node.args) >= 2:
            name = node.args[1]
            if isinstance(name, ast.Constant) and isinstance(name.value, str):
                self.record(node, name.value, node.args[0], func.id == "setattr")
        self.generic_visit(node)


def precog_classes() -> list[type]:
    """Every class defined in a precog_db module (module level)."""
    found: list[type] = []
    for source in SOURCES:
        name = module_name(source)
        found.extend(v for v in namespace(name).values() if isinstance(v, type) and v.__module__ == name)
    return found


_MIXED: dict[type, set[type]] = {}


def mixed_upstream_names(cls: type) -> frozenset[str]:
    """The psycopg names ``self`` can mean in ``cls``: its own psycopg bases', and those of every precog_db class
    that mixes ``cls`` in with a psycopg class (a mixin's ``self._conn`` is the cursor's)."""
    if not _MIXED:
        for klass in precog_classes():
            if any(upstream(b) for b in klass.__mro__):
                for member in klass.__mro__:
                    _MIXED.setdefault(member, set()).add(klass)
    names: set[str] = set()
    for klass in _MIXED.get(cls, ()):
        names |= upstream_names(klass)
    return frozenset(names)


@dataclass
class Scan:
    accesses: list[Access]
    #: Private names precog_db defines itself.
    own: set[str]
    #: (module, imported module, names) of every ``from x import ...``.
    imports: list[tuple[str, str, tuple[str, ...]]]


_SCAN: list[Scan] = []


def scan() -> Scan:
    if not _SCAN:
        accesses: list[Access] = []
        own: set[str] = set()
        imports: list[tuple[str, str, tuple[str, ...]]] = []
        for source in SOURCES:
            tree = ast.parse(source.read_text())
            scanner = _Scanner(module_name(source))
            scanner.visit(tree)
            accesses.extend(scanner.accesses)
            own |= scanner.own
            imports.extend(
                (scanner.module, node.module or "", tuple(a.name for a in node.names))
                for node in ast.walk(tree)
                if isinstance(node, ast.ImportFrom)
            )
        _SCAN.append(Scan(accesses, own, imports))
    return _SCAN[0]


def all_upstream_names() -> frozenset[str]:
    names: set[str] = set()
    for owner in PRIVATE:
        names |= upstream_names(resolve(owner))
    for klass in precog_classes():
        names |= upstream_names(klass)
    return frozenset(names)


def needs_declaring(access: Access, own: set[str], everything_upstream: frozenset[str]) -> bool:
    """Whether ``access`` touches psycopg's / psycopg_pool's private name rather than precog_db's own."""
    if access.override:
        return True
    if access.on_self and access.cls is not None:
        return access.name in mixed_upstream_names(access.cls)
    return access.name not in own or access.name in everything_upstream


DECLARED = {entry.name for entries in PRIVATE.values() for entry in entries}


class TestEveryPrivateAccessIsDeclared:
    """Direction (i): the code against the list."""

    def test_every_private_name_used_is_declared(self) -> None:
        found = scan()
        everything_upstream = all_upstream_names()
        undeclared = sorted(
            {
                str(a)
                for a in found.accesses
                if needs_declaring(a, found.own, everything_upstream) and a.name not in DECLARED
            }
        )
        assert not undeclared, (
            f"precog_db uses private names of psycopg / psycopg_pool that precog_db/_compat.py does not declare: "
            f"{undeclared}. Add each to PRIVATE under the class that owns it, with its kind and what it is used "
            "for (or, if precog_db defines the name itself, rename it so that it does not collide with psycopg's). "
            + FIX
        )

    def test_every_declared_name_is_used(self) -> None:
        used = {a.name for a in scan().accesses}
        unused = sorted(DECLARED - used)
        assert not unused, (
            f"precog_db/_compat.py declares {unused}, which no precog_db module uses any more: remove them from "
            "PRIVATE (and from docs/DESIGN.md if named there). " + FIX
        )

    def test_every_interface_member_is_used(self) -> None:
        """A public member of a private class listed in INTERFACES is read, called or implemented somewhere."""
        text = "\n".join(source.read_text() for source in SOURCES if source.name != "_compat.py")
        unused = sorted(
            f"{owner}.{member}"
            for owner, members in INTERFACES.items()
            for member in members
            if f".{member}" not in text and f"def {member}(" not in text
        )
        assert not unused, f"INTERFACES lists {unused}, which precog_db no longer uses: remove them. " + FIX

    def test_only_compat_imports_private_modules(self) -> None:
        exported = set(_compat.__all__) - {"INTERFACES", "PRIVATE", "Private"}
        outside = sorted(
            f"{module}: from {imported} import {', '.join(names)}"
            for module, imported, names in scan().imports
            if module != "precog_db._compat"
            and (is_private_module(imported) or (imported.startswith("psycopg") and exported & set(names)))
        )
        assert not outside, f"{outside}: import these from precog_db._compat instead (add them there if new). " + FIX

    def test_everything_compat_imports_is_used(self) -> None:
        exported = set(_compat.__all__) - {"INTERFACES", "PRIVATE", "Private"}
        imported = {name for module, source, names in scan().imports if source == "precog_db._compat" for name in names}
        unused = sorted(exported - imported)
        assert not unused, f"precog_db/_compat.py imports {unused}, which no module uses: remove them. " + FIX
        private = {
            node.module
            for node in ast.walk(ast.parse(Path(_compat.__file__).read_text()))
            if isinstance(node, ast.ImportFrom) and node.module
        }
        # psycopg.transaction is public, its OutOfOrderTransactionNesting is not
        assert all(is_private_module(m) for m in private - {"__future__", "typing", "psycopg.transaction"}), private

    def test_the_scan_sees_what_it_must(self) -> None:
        """The scan finds known accesses of each sort, so that a blind scan cannot pass the test above."""
        found = scan()
        everything_upstream = all_upstream_names()
        psycopgs = {a.name for a in found.accesses if needs_declaring(a, found.own, everything_upstream)}
        owns = {a.name for a in found.accesses if not needs_declaring(a, found.own, everything_upstream)}
        # on a connection, on a pool's self, a getattr string, an override, a psycopg class mixed in
        assert {"_pipeline", "_waiting", "_registry", "_communicate_gen", "_conn", "_closed"} <= psycopgs, psycopgs
        assert {"_graves", "_give_up", "_check_rejected", "_KIND", "_served"} <= owns, owns
        assert len(SOURCES) > 40 and found.own


# --- direction (ii): the list against the installed releases -------------------------------------------


def _is_lock(v: Any) -> bool:
    return all(hasattr(v, m) for m in ("acquire", "release", "__enter__", "__exit__"))


#: The kinds of instance attribute `Private.kind` names, checked on a live object.
KINDS: dict[str, Callable[[Any], bool]] = {
    "deque": lambda v: isinstance(v, deque),
    "lock": _is_lock,
    "counter": lambda v: type(v).__name__ == "Counter",
    "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "bool": lambda v: isinstance(v, bool),
    "optional bool": lambda v: v is None or isinstance(v, bool),
    "float": lambda v: isinstance(v, float),
    "optional callable": lambda v: v is None or callable(v),
    "optional event": lambda v: v is None or all(hasattr(v, m) for m in ("set", "wait", "is_set")),
    "pool or None": lambda v: v is None or isinstance(v, (ConnectionPool, AsyncConnectionPool)),
    "pipeline or None": lambda v: v is None or isinstance(v, (psycopg.Pipeline, psycopg.AsyncPipeline)),
    "optional isolation": lambda v: v is None or isinstance(v, psycopg.IsolationLevel),
    "list": lambda v: isinstance(v, list),
    "dict": lambda v: isinstance(v, dict),
    "ordered dict": lambda v: isinstance(v, OrderedDict),
    "prepare manager": lambda v: isinstance(v, _compat.PrepareManager),
    "adapters map": lambda v: isinstance(v, psycopg.adapt.AdaptersMap),
    "connection": lambda v: isinstance(v, (psycopg.Connection, psycopg.AsyncConnection)),
    "object": lambda v: True,
}


def broken(owner: str, entry: Private, detail: str) -> str:
    return f"{owner}.{entry.name} ({entry.use}): {detail}. " + UPGRADE.format(
        psycopg=psycopg.__version__, pool=psycopg_pool.__version__
    )


#: Owners whose declared members are all methods or class constants: checked on the class alone.
CLASS_ONLY = {owner for owner, entries in PRIVATE.items() if all(e.kind in ("method", "stats key") for e in entries)}


def check_owner(owner: str, instance: Any = None) -> list[str]:
    """What no longer holds of ``owner``'s declared members, on its class and on a live ``instance``."""
    cls = resolve(owner)
    assert owner in CLASS_ONLY or isinstance(instance, cls), (owner, instance)
    problems = []
    for entry in PRIVATE[owner]:
        if entry.kind == "method":
            method = inspect.getattr_static(cls, entry.name, None)
            if not callable(method):
                problems.append(broken(owner, entry, "the method is gone"))
            elif entry.params is not None:
                params = tuple(inspect.signature(method).parameters)[1:]
                if params != entry.params:
                    problems.append(broken(owner, entry, f"its parameters are now {params}, not {entry.params}"))
        elif entry.kind == "stats key":
            if not isinstance(getattr(cls, entry.name, None), str):
                problems.append(broken(owner, entry, "no longer a statistics key (a str class constant)"))
        elif not hasattr(instance, entry.name):
            problems.append(broken(owner, entry, "the attribute is gone"))
        elif not KINDS[entry.kind](value := getattr(instance, entry.name)):
            problems.append(broken(owner, entry, f"expected {entry.kind}, found {type(value).__name__}"))
    return problems


@pytest.fixture
def conninfo(pg_server: Server, test_db: str) -> str:
    return pg_server.conninfo(test_db)


def sync_instances(conninfo: str) -> contextlib.AbstractContextManager[dict[str, Any]]:
    @contextlib.contextmanager
    def build() -> Iterator[dict[str, Any]]:
        pool: ConnectionPool[psycopg.Connection[Any]] = ConnectionPool(
            conninfo, min_size=1, max_size=1, open=False, name="compat", check=ConnectionPool.check_connection
        )
        pool.open(wait=True, timeout=30)
        try:
            with pool.connection() as conn, conn.transaction() as tx, conn.cursor("compat") as named:
                named.execute("SELECT 1")
                with conn.pipeline() as pipeline:
                    yield {
                        "psycopg_pool.ConnectionPool": pool,
                        "psycopg.Connection": conn,
                        "psycopg.Cursor": conn.cursor(),
                        "psycopg.ServerCursor": named,
                        "psycopg.Pipeline": pipeline,
                        "psycopg.Transaction": tx,
                        "psycopg._preparing.PrepareManager": conn._prepared,
                        "psycopg.adapt.AdaptersMap": conn.adapters,
                        "psycopg.types.TypesRegistry": conn.adapters.types,
                        "psycopg.Error": psycopg.Error("compat"),
                    }
        finally:
            pool.close()

    return build()


async def async_problems(conninfo: str) -> tuple[set[str], list[str]]:
    """Check the asyncio owners on live objects; the owners checked and what no longer holds."""
    pool: AsyncConnectionPool[psycopg.AsyncConnection[Any]] = AsyncConnectionPool(
        conninfo, min_size=1, max_size=1, open=False, name="acompat", check=AsyncConnectionPool.check_connection
    )
    await pool.open(wait=True, timeout=30)
    try:
        async with pool.connection() as conn, conn.transaction() as tx, conn.cursor("acompat") as named:
            await named.execute("SELECT 1")
            async with conn.pipeline() as pipeline:
                instances = {
                    "psycopg_pool.AsyncConnectionPool": pool,
                    "psycopg.AsyncConnection": conn,
                    "psycopg.AsyncCursor": conn.cursor(),
                    "psycopg.AsyncServerCursor": named,
                    "psycopg.AsyncPipeline": pipeline,
                    "psycopg.AsyncTransaction": tx,
                }
                return set(instances), [p for owner, obj in instances.items() for p in check_owner(owner, obj)]
    finally:
        await pool.close()


class TestEveryDeclaredNameExists:
    """Direction (ii): the list against the installed psycopg and psycopg_pool."""

    def test_sync_and_shared_owners(self, conninfo: str) -> None:
        with sync_instances(conninfo) as instances:
            problems = [p for owner, obj in instances.items() for p in check_owner(owner, obj)]
            checked = set(instances)
        async_checked, async_found = asyncio.run(async_problems(conninfo))
        problems += async_found
        class_only = CLASS_ONLY - checked - async_checked
        problems += [p for owner in sorted(class_only) for p in check_owner(owner)]
        assert not problems, "\n".join(problems)
        assert checked | async_checked | class_only == set(PRIVATE), set(PRIVATE) - checked - async_checked

    def test_kinds_are_known(self) -> None:
        unknown = {e.kind for entries in PRIVATE.values() for e in entries} - set(KINDS) - {"method", "stats key"}
        assert not unknown, f"precog_db/_compat.py uses kinds {unknown}; add a check for each to KINDS here"

    @pytest.mark.parametrize(("owner", "members"), sorted(INTERFACES.items()))
    def test_interfaces(self, owner: str, members: tuple[str, ...]) -> None:
        cls = resolve(owner)
        sample = cls(timeout=10.0) if cls is _compat.AttemptWithBackoff else cls
        missing = [m for m in members if not hasattr(sample, m) and m not in upstream_names(cls)]
        assert not missing, f"{owner} no longer has {missing}. " + UPGRADE.format(
            psycopg=psycopg.__version__, pool=psycopg_pool.__version__
        )

    def test_private_classes_and_functions(self) -> None:
        """What the pools and the pipelining build on: the maintenance tasks, the back-off, psycopg's ``send``."""
        for add, task in (
            (_compat.AddConnection, _compat.MaintenanceTask),
            (_compat.AsyncAddConnection, _compat.AsyncMaintenanceTask),
        ):
            assert issubclass(add, task), broken_class(add, "no longer a MaintenanceTask")
            params = tuple(inspect.signature(add).parameters)
            assert params[:3] == ("pool", "attempt", "growing"), broken_class(add, f"now takes {params}")
        assert issubclass(_compat.AsyncStopWorker, _compat.AsyncMaintenanceTask), broken_class(
            _compat.AsyncStopWorker, ""
        )
        params = tuple(inspect.signature(_compat.AsyncReturnConnection).parameters)
        assert params == ("pool", "conn", "from_getconn"), broken_class(
            _compat.AsyncReturnConnection, f"takes {params}"
        )
        attempt = _compat.AttemptWithBackoff(timeout=10.0)
        assert isinstance(attempt.delay, float) and attempt.DELAY_BACKOFF > 1, broken_class(type(attempt), "")
        attempt.update_delay(0.0)
        assert attempt.delay > 0 and attempt.time_to_give_up(1000.0), broken_class(type(attempt), "no back-off")
        assert issubclass(_compat.OutOfOrderTransactionNesting, psycopg.ProgrammingError)
        assert callable(_compat.send) and psycopg.Pipeline.is_supported()
        for name in ("set", "fail"):
            for module in ("psycopg_pool.pool", "psycopg_pool.pool_async"):
                method = getattr(resolve(f"{module}.WaitingClient"), name)
                assert tuple(inspect.signature(method).parameters)[1:] == ({"set": ("conn",), "fail": ("error",)}[name])

    def test_asyncio_pool_worker_is_the_one_spawned(self, test_settings: DatabaseSettings) -> None:
        """`AsyncPrecogPool.worker` replaces psycopg_pool's maintenance worker (issue 21.14): what
        ``_start_workers`` spawns is ``self.worker``, which a StopWorker task ends."""
        assert "self.worker" in inspect.getsource(AsyncConnectionPool._start_workers), (
            "psycopg_pool's _start_workers no longer spawns self.worker: AsyncPrecogPool.worker would never run, "
            "and asyncio.run without close_pool() could hang again. " + FIX
        )

        async def spawned() -> list[str | None]:
            pool = AsyncPrecogPool(test_settings.replace(pool_min=1, pool_max=1), name="compat-workers")
            await pool.open(wait=True, timeout=30)
            try:
                return [getattr(t.get_coro(), "__qualname__", None) for t in pool._workers]
            finally:
                await pool.close()

        workers = asyncio.run(spawned())
        assert workers and workers == ["AsyncPrecogPool.worker"] * len(workers), workers

    def test_callable_kwargs_are_resolved_for_every_connection(self, pg_server: Server, test_db: str) -> None:
        """psycopg_pool calls a callable ``kwargs=`` for each new connection, drain() included: how the pools
        resolve a rotated password (public since 3.3, relied on with the private names above)."""
        calls: list[int] = []

        def kwargs() -> dict[str, Any]:
            calls.append(1)
            return {"application_name": f"compat-{len(calls)}"}

        pool: ConnectionPool[psycopg.Connection[Any]] = ConnectionPool(
            pg_server.conninfo(test_db), kwargs=kwargs, min_size=1, max_size=1, open=False, name="compat-kw"
        )
        pool.open(wait=True, timeout=30)
        try:
            with pool.connection() as conn:
                first = conn.execute("SELECT current_setting('application_name')").fetchone()
            pool.drain()
            with pool.connection(timeout=30) as conn:
                second = conn.execute("SELECT current_setting('application_name')").fetchone()
        finally:
            pool.close()
        version = UPGRADE.format(psycopg=psycopg.__version__, pool=psycopg_pool.__version__)
        assert first == ("compat-1",), "ConnectionPool(kwargs=callable): the callable is not used. " + version
        assert second == ("compat-2",), "ConnectionPool.drain: did not reopen with fresh kwargs. " + version


def broken_class(cls: type, detail: str) -> str:
    return f"{cls.__module__}.{cls.__qualname__}: {detail}. " + UPGRADE.format(
        psycopg=psycopg.__version__, pool=psycopg_pool.__version__
    )
