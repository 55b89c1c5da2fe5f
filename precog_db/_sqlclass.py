"""What a statement can do beyond its transaction, decided by PostgreSQL's own parser (no I/O).

`classify` parses a statement text with ``pglast`` (libpg_query: the grammar of
PostgreSQL itself, so comments, ``U&""`` identifiers, dollar quotes and several
statements in one string are read as the server reads them) and walks the whole
tree, sub-selects, CTEs, function arguments and defaults included. It answers
two questions, each with a reason a person can act on:

* ``session``: may the statement leave state in the server session after its
  transaction ends? A ``SET`` without ``LOCAL``, ``RESET``, ``SET ROLE``,
  ``SET SESSION CHARACTERISTICS``, ``DISCARD``, ``PREPARE``, ``DEALLOCATE``,
  ``LISTEN``, ``UNLISTEN``, ``LOAD``, a ``WITH HOLD`` cursor, a temporary
  relation (``TEMP``, or any relation in ``pg_temp``) that is not
  ``ON COMMIT DROP``, ``set_config`` whose third argument is not a literal
  true (a bound parameter is not provably local), a session advisory lock,
  ``dblink``, the built-ins that run SQL given as text (``query_to_xml`` and
  family, ``ts_stat``, ``ts_rewrite`` with a query), ``UPDATE pg_settings``,
  ``CALL`` and ``DO`` (they may run anything), ``PREPARE TRANSACTION``, and any
  text the parser cannot read. Behind a transaction-mode pooler such a
  statement is refused; on a direct pool it marks the connection for reset.
* ``escapes``: could the statement write although the session is read-only
  by default? Transaction control that opens a read-write transaction
  (``BEGIN``/``START TRANSACTION``/``SET TRANSACTION``/``SET SESSION
  CHARACTERISTICS`` ``READ WRITE``, setting ``transaction_read_only`` or
  ``default_transaction_read_only``), transaction control of any kind inside a
  string of several statements, ``CALL`` and ``DO`` (a procedure may commit and
  go on read-write), the large-object writers (``lo_create``, ``lo_put`` …: the
  server does not hold them to read-only), and ``dblink`` (it writes through
  another connection). Refused outside a transaction, where the read-only
  default is the only guard.

Functions are matched by name in ``pg_catalog`` or unqualified; a function of
the application's own that changes the session from inside a plain ``SELECT``
is not seen (docs/DESIGN.md, known limits). Verdicts are cached per statement
text, so a statement the service repeats pays one dictionary look-up.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pglast import ast, parse_sql
from pglast.enums import OnCommitAction, TransactionStmtKind, VariableSetKind
from pglast.parser import ParseError

__all__ = ["CLEAN", "UNREADABLE", "Verdict", "classify"]

_HOLD = 0x0020  # CURSOR_OPT_HOLD in PostgreSQL's parsenodes.h

_ADVISORY_SESSION = frozenset(
    f"pg_{t}advisory_{k}{s}" for t in ("", "try_") for k in ("lock", "unlock") for s in ("", "_shared")
) | {"pg_advisory_unlock_all"}
_SQL_TEXT_RUNNERS = frozenset(
    {
        "query_to_xml",
        "query_to_xmlschema",
        "query_to_xml_and_xmlschema",
        "cursor_to_xml",
        "cursor_to_xmlschema",
        "ts_stat",
    }
)
_LARGE_OBJECT_WRITERS = frozenset(
    {
        "lo_create",
        "lo_creat",
        "lo_import",
        "lo_from_bytea",
        "lo_put",
        "lo_unlink",
        "lo_truncate",
        "lo_truncate64",
        "lowrite",
        "lo_open",
    }
)
#: Settings that change how the server reads statement text (pglast always reads it the standard way).
_LEXICAL_SETTINGS = frozenset({"standard_conforming_strings", "client_encoding", "backslash_quote"})
_SETTING_HOLDERS = (
    ast.CreateFunctionStmt,
    ast.AlterFunctionStmt,
    ast.AlterRoleSetStmt,
    ast.AlterDatabaseSetStmt,
    ast.AlterSystemStmt,
)
_TRUE_TEXT = frozenset({"t", "true", "on", "yes", "y", "1"})
_READ_ONLY_SETTINGS = frozenset({"transaction_read_only", "default_transaction_read_only"})
_ENDS_TRANSACTION = frozenset(
    {
        TransactionStmtKind.TRANS_STMT_BEGIN,
        TransactionStmtKind.TRANS_STMT_START,
        TransactionStmtKind.TRANS_STMT_COMMIT,
        TransactionStmtKind.TRANS_STMT_ROLLBACK,
        TransactionStmtKind.TRANS_STMT_PREPARE,
        TransactionStmtKind.TRANS_STMT_COMMIT_PREPARED,
        TransactionStmtKind.TRANS_STMT_ROLLBACK_PREPARED,
    }
)


@dataclass(frozen=True, slots=True)
class Verdict:
    """What one statement text may do: each field is None or the reason, in words."""

    session: str | None = None
    escapes: str | None = None
    #: The text holds a COMMIT, ROLLBACK or BEGIN (outside a string of one, the block's own business).
    ends_transaction: bool = False


CLEAN = Verdict()
_VERDICTS: dict[bytes, Verdict] = {}
_VERDICTS_MAX = 4096
#: The texts held as keys, at most: a service sending long unique texts (a client-side cursor
#: with values inlined) must not grow the cache without bound either.
_VERDICT_BYTES_MAX = 8 << 20
_held = 0


def classify(query: bytes | str) -> Verdict:
    """The `Verdict` for ``query`` (bytes as psycopg sends them, or text), cached per text."""
    key = query if isinstance(query, bytes) else query.encode()
    verdict = _VERDICTS.get(key)
    if verdict is None:
        global _held
        verdict = _judge(key)
        if len(_VERDICTS) >= _VERDICTS_MAX or _held + len(key) > _VERDICT_BYTES_MAX:
            _VERDICTS.clear()
            _held = 0
        if len(key) <= _VERDICT_BYTES_MAX:
            _VERDICTS[key] = verdict
            _held += len(key)
    return verdict


class _Findings:
    __slots__ = ("ends", "escapes", "session")

    def __init__(self) -> None:
        self.session: str | None = None
        self.escapes: str | None = None
        self.ends = False

    def leaves(self, why: str) -> None:
        if self.session is None:
            self.session = why

    def writes(self, why: str) -> None:
        if self.escapes is None:
            self.escapes = why


#: The start of a verdict's reason when the text is not SQL PostgreSQL's parser can read (a typo, say).
UNREADABLE = "PostgreSQL's parser cannot read it"


def _judge(query: bytes) -> Verdict:
    try:
        statements = parse_sql(query.decode("utf-8", "replace"))
    except ParseError as exc:
        why = f"{UNREADABLE} ({str(exc).splitlines()[0]})"
        return Verdict(session=why, escapes=why)
    found = _Findings()
    for raw in statements:
        _walk(raw.stmt, found)
    if len(statements) > 1 and found.ends:
        found.writes("it ends or begins a transaction inside a string of several statements")
    if found.session is None and found.escapes is None and not found.ends:
        return CLEAN
    return Verdict(session=found.session, escapes=found.escapes, ends_transaction=found.ends)


def _walk(node: Any, found: _Findings) -> None:
    stack = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, (tuple, list)):
            stack.extend(item)
            continue
        if not isinstance(item, ast.Node):
            continue
        if _look(item, found):
            continue  # the node was judged whole (its SET clauses are not session SETs)
        for name in type(item).__slots__:  # type: ignore[attr-defined]
            value = getattr(item, name, None)
            if isinstance(value, (ast.Node, tuple, list)):
                stack.append(value)


def _name_parts(names: Any) -> list[str]:
    return [getattr(n, "sval", "") or "" for n in names or ()]


def _func_name(names: Any) -> str | None:
    """A function's name if it is unqualified or in ``pg_catalog`` (``db.pg_catalog.f`` too: the current database)."""
    parts = _name_parts(names)
    if len(parts) == 1 or (len(parts) in (2, 3) and parts[-2] == "pg_catalog"):
        return parts[-1]
    return None


def _in_pg_temp(names: Any) -> bool:
    return any(part.lower().startswith("pg_temp") for part in _name_parts(names)[:-1])


def _is_true(arg: Any) -> bool:
    if isinstance(arg, ast.A_Const) and not arg.isnull:
        val = arg.val
        if isinstance(val, ast.Boolean):
            return bool(val.boolval)
        if isinstance(val, ast.String):
            return (val.sval or "").strip().lower() in _TRUE_TEXT
    return False


def _is_temp(rel: Any) -> bool:
    if not isinstance(rel, ast.RangeVar):
        return False
    return rel.relpersistence == "t" or (rel.schemaname or "").lower().startswith("pg_temp")


def _opens_read_write(options: Any) -> bool:
    for option in options or ():
        if isinstance(option, ast.DefElem) and option.defname in _READ_ONLY_SETTINGS:
            arg = option.arg
            if not (isinstance(arg, ast.A_Const) and isinstance(arg.val, ast.Integer) and arg.val.ival == 1):
                return True
    return False


def _look(node: ast.Node, found: _Findings) -> bool:
    """Judge one node; True when its children must not be judged on their own."""
    if isinstance(node, _SETTING_HOLDERS):
        # CREATE FUNCTION … SET x, ALTER ROLE/DATABASE … SET x: catalog entries, not this session's SET.
        if isinstance(node, ast.CreateFunctionStmt) and _in_pg_temp(node.funcname):
            found.leaves("a function in pg_temp outlives its transaction")
        if isinstance(node, ast.AlterSystemStmt):
            found.writes("ALTER SYSTEM writes the server's configuration")
        return True
    if isinstance(node, ast.VariableSetStmt):
        _look_set(node, found)
    elif isinstance(node, ast.TransactionStmt):
        if node.kind in _ENDS_TRANSACTION:
            found.ends = True
        if node.kind == TransactionStmtKind.TRANS_STMT_PREPARE:
            found.leaves("PREPARE TRANSACTION leaves a prepared transaction behind the session")
        if _opens_read_write(node.options):
            found.writes("it opens a READ WRITE transaction")
    elif isinstance(node, (ast.DiscardStmt, ast.ListenStmt, ast.UnlistenStmt, ast.LoadStmt)):
        found.leaves(f"{type(node).__name__.removesuffix('Stmt').upper()} acts on the session")
    elif isinstance(node, (ast.PrepareStmt, ast.DeallocateStmt)):
        found.leaves("a prepared statement lives in the session")
    elif isinstance(node, ast.DeclareCursorStmt):
        if (node.options or 0) & _HOLD:
            found.leaves("a WITH HOLD cursor outlives its transaction")
    elif isinstance(node, ast.CreateStmt):
        if _is_temp(node.relation) and node.oncommit != OnCommitAction.ONCOMMIT_DROP:
            found.leaves("a temporary table without ON COMMIT DROP outlives its transaction")
    elif isinstance(node, ast.IntoClause):
        if _is_temp(node.rel) and node.onCommit != OnCommitAction.ONCOMMIT_DROP:
            found.leaves("a temporary table without ON COMMIT DROP outlives its transaction")
    elif isinstance(node, ast.ViewStmt):
        if _is_temp(node.view):
            found.leaves("a temporary view outlives its transaction")
    elif isinstance(node, ast.CreateSeqStmt):
        if _is_temp(node.sequence):
            found.leaves("a temporary sequence outlives its transaction")
    elif isinstance(node, (ast.CallStmt, ast.DoStmt)):
        what = "CALL" if isinstance(node, ast.CallStmt) else "DO"
        found.leaves(f"{what} may run anything, session settings included")
        found.writes(f"{what} may commit and go on read-write")
    elif isinstance(node, ast.UpdateStmt):
        if isinstance(node.relation, ast.RangeVar) and node.relation.relname == "pg_settings":
            found.leaves("updating pg_settings changes session settings")
            found.writes("updating pg_settings may turn the read-only default off")
    elif isinstance(node, ast.FuncCall):
        _look_call(node, found)
    return False


def _look_set(node: ast.VariableSetStmt, found: _Findings) -> None:
    name = (node.name or "").lower()
    if name in _LEXICAL_SETTINGS:
        found.leaves(f"{name} changes how the server reads statement text")
        found.writes(f"{name} makes the server read statements otherwise than the parser that checks them")
    if name == "search_path" and any("pg_temp" in (_literal_text(a) or "") for a in node.args or ()):
        found.leaves("a search_path naming pg_temp creates temporary objects without the word TEMP")
    if node.kind == VariableSetKind.VAR_SET_MULTI:
        if name == "session characteristics":
            found.leaves("SET SESSION CHARACTERISTICS changes the session")
        if _opens_read_write(node.args):
            found.writes("it makes the transaction READ WRITE")
        return
    if node.kind == VariableSetKind.VAR_RESET_ALL:
        found.writes("RESET ALL may turn the read-only default off")
    elif name in _READ_ONLY_SETTINGS and not _sets_on(node):
        found.writes(f"it changes {name}")
    if not node.is_local:
        found.leaves("SET without LOCAL (or RESET) changes the session")


def _sets_on(node: ast.VariableSetStmt) -> bool:
    """``SET <read-only setting> = on`` (what the session-mode pooler setup sends): no escape."""
    args = node.args or ()
    if node.kind != VariableSetKind.VAR_SET_VALUE or len(args) != 1:
        return False
    arg = args[0]
    if isinstance(arg, ast.A_Const) and isinstance(arg.val, ast.Integer):
        return arg.val.ival == 1
    return _is_true(arg)


def _literal_text(arg: Any) -> str | None:
    if isinstance(arg, ast.A_Const) and isinstance(arg.val, ast.String):
        return (arg.val.sval or "").strip().lower()
    return None


def _look_call(node: ast.FuncCall, found: _Findings) -> None:
    last = (_name_parts(node.funcname) or [""])[-1]
    if last.startswith("dblink"):  # an extension: in whatever schema it was installed
        found.leaves("dblink opens or uses connections kept in the session")
        found.writes("dblink writes through another connection")
    name = _func_name(node.funcname)
    if name is None:
        return
    args = node.args or ()
    if name == "set_config":
        if len(args) != 3 or not _is_true(args[2]):
            found.leaves("set_config whose third argument is not a literal true changes the session")
        setting = _literal_text(args[0]) if args else None
        if setting is None or setting in _READ_ONLY_SETTINGS or setting in _LEXICAL_SETTINGS:
            found.writes("set_config may turn the read-only default off")
        value = _literal_text(args[1]) if len(args) > 1 else None
        if (
            setting is None
            or setting in _LEXICAL_SETTINGS
            or (setting == "search_path" and (value is None or "pg_temp" in value))
        ):
            found.leaves("set_config of this setting may change how later statements are read or resolved")
    elif name in _ADVISORY_SESSION:
        found.leaves("a session advisory lock outlives its transaction")
    elif name == "setseed":
        found.leaves("setseed changes the session's random sequence")
    elif name in _SQL_TEXT_RUNNERS or (name == "ts_rewrite" and len(args) == 2):
        found.leaves(f"{name} runs SQL given as text")
    if name in _LARGE_OBJECT_WRITERS:
        found.writes(f"{name} writes a large object, which the read-only default does not stop")
