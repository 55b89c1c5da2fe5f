"""precog_db's per-connection state is one typed object (`precog_db._conn_state.ConnState`), read from the source.

Every field a module reads or writes (``conn._precog.<field>``, or through a
local bound to the state: ``st = conn._precog``, ``st = state(conn)``,
``st: ConnState``) is one of ``ConnState.__slots__``, and every slot is used:
a new piece of per-connection state is added there, typed and documented, not
as a loose attribute on the connection. The pooled connections of both layers
carrying one, and nothing else under a ``_precog_`` name, is checked on a real
server in tests/test_pool_common_async.py (``TestConnState``).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import precog_db
from precog_db._conn_state import ConnState, state

PACKAGE = Path(precog_db.__file__).parent

#: Attributes named ``_precog_<x>`` that are not per-connection state: the replica set a pool keeps.
NOT_CONNECTION_STATE = {"_precog_replicas"}


def _is_state(node: ast.expr) -> bool:
    """``x._precog``, ``state(x)`` or ``getattr(x, "_precog", ...)``: an expression that is a `ConnState`."""
    if isinstance(node, ast.Attribute):
        return node.attr == "_precog"
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
        if node.func.id == "state":
            return True
        if node.func.id == "getattr" and len(node.args) >= 2:
            name = node.args[1]
            return isinstance(name, ast.Constant) and name.value == "_precog"
    return False


def _annotated_state(annotation: ast.expr | None) -> bool:
    return annotation is not None and "ConnState" in ast.unparse(annotation)


def _state_locals(function: ast.AST) -> set[str]:
    """The names a function binds to a `ConnState`."""
    names: set[str] = set()
    for node in ast.walk(function):
        if isinstance(node, ast.Assign) and _is_state(node.value):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and (_annotated_state(node.annotation) or (node.value is not None and _is_state(node.value)))
        ):
            names.add(node.target.id)
    return names


def fields_used() -> dict[str, set[str]]:
    """Every `ConnState` field read or written in precog_db, with the modules that use it."""
    used: dict[str, set[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "_conn_state.py":
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        functions = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]
        for function in functions:
            local = _state_locals(function)
            for node in ast.walk(function):
                if not isinstance(node, ast.Attribute):
                    continue
                value = node.value
                if _is_state(value) or (isinstance(value, ast.Name) and value.id in local):
                    used.setdefault(node.attr, set()).add(path.name)
    return used


def loose_attributes() -> dict[str, set[str]]:
    """Attributes named ``_precog_<x>`` precog_db reads or writes (``x._precog_y``, ``getattr(x, "_precog_y")``)."""
    found: dict[str, set[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            name = None
            if isinstance(node, ast.Attribute):
                name = node.attr
            elif (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id in ("getattr", "setattr", "hasattr", "delattr")
                and node.args[1:]
            ):
                arg = node.args[1]
                name = arg.value if isinstance(arg, ast.Constant) and isinstance(arg.value, str) else None
            if name is not None and name.startswith("_precog_"):
                found.setdefault(name, set()).add(path.name)
    return found


def test_the_slots_are_the_fields_the_modules_use() -> None:
    """ConnState declares exactly the per-connection fields precog_db uses: none loose, none left over."""
    used = fields_used()
    slots = set(ConnState.__slots__)
    undeclared = {name: sorted(modules) for name, modules in used.items() if name not in slots}
    assert not undeclared, f"fields used on a ConnState that its __slots__ do not declare (add them): {undeclared}"
    unused = sorted(slots - set(used))
    assert not unused, f"ConnState slots no module uses (remove them from precog_db/_conn_state.py): {unused}"


def test_no_loose_precog_attribute_on_a_connection() -> None:
    """No module keeps per-connection state as its own ``_precog_<x>`` attribute: it is a ConnState field."""
    loose = {name: sorted(modules) for name, modules in loose_attributes().items() if name not in NOT_CONNECTION_STATE}
    assert loose == {}, f"put these in precog_db._conn_state.ConnState instead: {loose}"


def test_state_is_created_once_with_the_documented_defaults() -> None:
    """`state` creates the object on first use and returns the same one after; a slot rejects a stray field."""

    class Foreign:  # stands for a connection precog_db did not open
        pass

    conn = Foreign()
    first = state(conn)
    assert state(conn) is first and vars(conn) == {"_precog": first}
    assert (first.dirty, first.busy, first.own, first.shared, first.setup) == (False, False, False, False, False)
    assert (first.pending_begin, first.lent, first.poller, first.factories) == (None, None, None, None)
    assert first.writer is True and first.reported == () and first.handlers == (0, 0)
    with pytest.raises(AttributeError):
        first.stray = True  # type: ignore[attr-defined]
