"""The SQL scanner: a small lexer that splits a migration into top-level statements.

It skips ``--`` and nested ``/* */`` comments, literals, quoted identifiers
and dollar-quoted bodies, and keeps a ``BEGIN ATOMIC`` body inside its
statement (`split_statements`). On it: the refusal of a file that ends or
starts its own transaction (`find_transaction_control`,
`transaction_control_problem`) and `line_and_column`, which turns an offset
into the place a person looks for.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from precog_db.migrations._files import MigrationFile

__all__ = [
    "Statement",
    "TransactionControl",
    "find_transaction_control",
    "line_and_column",
    "split_statements",
    "transaction_control_problem",
]

_WORD = re.compile(r"[A-Za-z_\u0080-\U0010ffff][A-Za-z0-9_$\u0080-\U0010ffff]*")
_DOLLAR = re.compile(r"\$(?:[A-Za-z_\u0080-\U0010ffff][A-Za-z0-9_\u0080-\U0010ffff]*)?\$")
_NUMBER = re.compile(r"[0-9][0-9A-Za-z_.]*")
_ROUTINE_HEADS = (("CREATE", "FUNCTION"), ("CREATE", "PROCEDURE"))


@dataclass(frozen=True)
class TransactionControl:
    """A top-level statement of a migration file that would end (or start) the migration's transaction."""

    line: int
    column: int
    statement: str  # its leading keywords, e.g. "COMMIT" or "START TRANSACTION"

    def describe(self) -> str:
        return f"line {self.line}: {self.statement}"


def line_and_column(text: str, offset: int) -> tuple[int, int]:
    """The 1-based line and column of the 0-based character ``offset`` in ``text``."""
    offset = max(0, min(offset, len(text)))
    line_start = text.rfind("\n", 0, offset) + 1
    return text.count("\n", 0, offset) + 1, offset - line_start + 1


def _skip_block_comment(sql: str, i: int) -> int:
    depth, n = 0, len(sql)
    while i < n:
        if sql.startswith("/*", i):
            depth, i = depth + 1, i + 2
        elif sql.startswith("*/", i):
            depth, i = depth - 1, i + 2
            if depth == 0:
                return i
        else:
            i += 1
    return n


def _skip_quoted(sql: str, i: int, quote: str, *, backslash: bool = False) -> int:
    """Past the literal or identifier opening at ``i`` (doubled quotes inside; backslash escapes in E'')."""
    i, n = i + 1, len(sql)
    while i < n:
        ch = sql[i]
        if backslash and ch == "\\":
            i += 2
        elif ch == quote:
            if i + 1 < n and sql[i + 1] == quote:
                i += 2
            else:
                return i + 1
        else:
            i += 1
    return n


def _transaction_control(words: Sequence[str]) -> str | None:
    """The statement's leading keywords when they end or start a transaction, else None."""
    if not words:
        return None
    head = words[0]
    if head in ("BEGIN", "COMMIT", "END", "ABORT"):
        return " ".join(words[:2]) if head == "COMMIT" and words[1:2] == ["PREPARED"] else head
    if head == "START" and words[1:2] == ["TRANSACTION"]:
        return "START TRANSACTION"
    if head == "PREPARE" and words[1:2] == ["TRANSACTION"]:
        return "PREPARE TRANSACTION"
    if head == "ROLLBACK":
        rest = words[1:]
        if rest[:1] in (["WORK"], ["TRANSACTION"]):
            rest = rest[1:]
        if rest[:1] == ["TO"]:
            return None  # ROLLBACK TO SAVEPOINT stays inside the transaction
        return "ROLLBACK PREPARED" if rest[:1] == ["PREPARED"] else "ROLLBACK"
    return None


def find_transaction_control(sql: str) -> list[TransactionControl]:
    """Every top-level statement of ``sql`` that ends or starts a transaction (``COMMIT``, ``BEGIN`` …).

    A small lexer, not a parser (`split_statements`): it skips ``--`` and nested ``/* */``
    comments, '…' and E'…' literals, "quoted identifiers" and $tag$ dollar
    quotes (so plpgsql ``BEGIN … END`` bodies and the words inside strings
    or identifiers never count), splits statements at top-level semicolons,
    and keeps the semicolons of a ``CREATE FUNCTION|PROCEDURE … BEGIN ATOMIC
    … END`` body inside that statement (as psql does). ``SAVEPOINT``,
    ``RELEASE`` and ``ROLLBACK TO`` stay inside the transaction and pass.
    """
    found: list[TransactionControl] = []
    for statement in split_statements(sql):
        control = _transaction_control(list(statement.words))
        if control is not None:
            line, column = line_and_column(sql, statement.start)
            found.append(TransactionControl(line, column, control))
    return found


@dataclass(frozen=True)
class Statement:
    """One top-level statement of a migration: ``sql[start:end]``, its semicolon included."""

    start: int
    end: int
    #: Its first (up to four) keywords, upper-cased.
    words: tuple[str, ...]

    def text(self, sql: str) -> str:
        return sql[self.start : self.end]

    def summary(self, sql: str, width: int = 60) -> str:
        """``line N: CREATE INDEX CONCURRENTLY …``: where it starts, and its text on one line."""
        flat = " ".join(self.text(sql).split())
        if len(flat) > width:
            flat = flat[: width - 1] + "…"
        return f"line {line_and_column(sql, self.start)[0]}: {flat}"


def split_statements(sql: str, *, comments: list[tuple[int, int]] | None = None) -> list[Statement]:
    """The top-level statements of ``sql``, in order (the lexer `find_transaction_control` describes).

    Comments between statements belong to none; a statement without a final
    semicolon runs to the end of the text. ``comments``, when given, receives
    the ``(start, end)`` of every comment the lexer skipped (outside literals,
    quoted identifiers and dollar-quoted bodies).
    """
    out: list[Statement] = []
    words: list[str] = []
    start = -1
    parens = begins = 0
    i, n = 0, len(sql)

    def finish(end: int) -> None:
        out.append(Statement(start, end, tuple(words)))

    while i < n:
        ch = sql[i]
        if ch.isspace():
            i += 1
            continue
        if sql.startswith("--", i):
            # PostgreSQL ends a line comment at a newline or a bare carriage return.
            ends = [e for e in (sql.find("\n", i), sql.find("\r", i)) if e >= 0]
            end = min(ends) if ends else n
            if comments is not None:
                comments.append((i, end))
            i = end + 1
            continue
        if sql.startswith("/*", i):
            end = _skip_block_comment(sql, i)
            if comments is not None:
                comments.append((i, end))
            i = end
            continue
        if start < 0:
            start = i
        if ch == ";":
            if parens == 0 and begins == 0:
                finish(i + 1)
                words, start = [], -1
            i += 1
        elif ch in "'\"":
            i = _skip_quoted(sql, i, ch)
        elif ch == "$":
            dollar = _DOLLAR.match(sql, i)
            if dollar is None:
                i += 1  # $1 and the like
            else:
                close = sql.find(dollar.group(), dollar.end())
                i = n if close < 0 else close + len(dollar.group())
        elif ch == "(":
            parens, i = parens + 1, i + 1
        elif ch == ")":
            parens, i = max(0, parens - 1), i + 1
        elif (number := _NUMBER.match(sql, i)) is not None:
            i = number.end()
        elif (word := _WORD.match(sql, i)) is not None:
            i = word.end()
            text = word.group()
            if text in ("E", "e") and i < n and sql[i] == "'":
                i = _skip_quoted(sql, i, "'", backslash=True)
                continue
            upper = text.upper()
            if len(words) < 4:
                words.append(upper)
            heads = [w for w in words[:4] if w not in ("OR", "REPLACE")][:2]
            if tuple(heads) in _ROUTINE_HEADS and parens == 0:
                if upper == "BEGIN" or (upper == "CASE" and begins > 0):
                    begins += 1
                elif upper == "END" and begins > 0:
                    begins -= 1
        else:
            i += 1
    if start >= 0:
        finish(n)
    return out


def transaction_control_problem(migration: MigrationFile, sql: str) -> str | None:
    """The sentence refusing ``migration`` when ``sql`` (its text) ends its own transaction, else None."""
    found = find_transaction_control(sql)
    if not found:
        return None
    where = "; ".join(f.describe() for f in found)
    return (
        f"{migration.path} controls its own transaction ({where}); a migration runs in one transaction "
        "together with its ledger row, so it must not BEGIN, COMMIT, ROLLBACK, END, ABORT or PREPARE "
        "TRANSACTION. Remove those statements (split the file into several migrations if it needs several "
        "transactions)"
    )
