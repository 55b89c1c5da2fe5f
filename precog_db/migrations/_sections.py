"""The markers of a migration file: ``-- precog:no-transaction``, ``-- precog:down``, and the sections they make.

`sections` splits a file into what ``up`` runs and what ``down`` runs;
`marker_problem` refuses a marker that is misspelled, misplaced or
ambiguous (it reads the file through the scanner, `_scanner`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from precog_db.migrations._files import MigrationFile
from precog_db.migrations._scanner import line_and_column, split_statements

__all__ = ["DOWN_MARKER", "MARKERS", "NO_TRANSACTION_MARKER", "Sections", "marker_problem", "sections"]

#: First line of a file that runs outside a transaction, statement by statement.
NO_TRANSACTION_MARKER = "-- precog:no-transaction"
#: The line that starts a file's down section (what `migrate down` runs to revert it).
DOWN_MARKER = "-- precog:down"


@dataclass(frozen=True)
class Sections:
    """A migration's text split at its ``-- precog:down`` line."""

    body: str
    #: ``body[:up_end]`` is what ``migrate up`` runs.
    up_end: int
    #: ``body[down_start:]`` is what ``migrate down`` runs; None when the file has no down section.
    down_start: int | None
    #: The first line is ``-- precog:no-transaction``.
    no_transaction: bool

    @property
    def up(self) -> str:
        return self.body[: self.up_end]

    @property
    def down(self) -> str | None:
        return None if self.down_start is None else self.body[self.down_start :]


def sections(body: str) -> Sections:
    """Split a migration's text: the up part, the down part after a ``-- precog:down`` line, the no-transaction flag.

    Markers are whole lines (surrounding blanks and case ignored). Both are
    SQL comments, so the checksum (`checksum_of`, over the whole file, down
    section included) and the transaction-control check see the file as it is.
    """
    first = body.split("\n", 1)[0].strip().lower()
    offset = 0
    for line in body.splitlines(keepends=True):
        if line.strip().lower() == DOWN_MARKER:
            return Sections(body, offset, offset + len(line), first == NO_TRANSACTION_MARKER)
        offset += len(line)
    return Sections(body, len(body), None, first == NO_TRANSACTION_MARKER)


#: Every marker there is; a comment that reads like one of them but is not exactly it is refused.
MARKERS = (DOWN_MARKER, NO_TRANSACTION_MARKER)
_MARKER_COLON = re.compile(r"precog\s*:", re.IGNORECASE)
_NOT_LETTERS = re.compile(r"[^a-z]+")
#: What a marker reduces to without its spacing and punctuation (``-- precog down``, ``/* PRECOG-DOWN */``).
_MARKER_LETTERS = frozenset(_NOT_LETTERS.sub("", m) for m in MARKERS)


def _reads_like_marker(comment: str) -> bool:
    """True for a comment a person may have meant as a marker: ``precog:`` anywhere, or a marker's letters alone."""
    return bool(_MARKER_COLON.search(comment)) or _NOT_LETTERS.sub("", comment.lower()) in _MARKER_LETTERS


def _misspelled_marker(migration: MigrationFile, body: str) -> str | None:
    """The sentence refusing a comment that reads like a marker but is not exactly one, else None.

    A marker counts only as a whole line spelled exactly as in `MARKERS`
    (surrounding blanks and case ignored); anything else would be a plain
    comment, and a misspelled ``-- precog:down`` would make ``migrate up`` run
    the down section. Looked at: every ``--`` and ``/* */`` comment the lexer
    sees (also after a statement, or inside one), and every line that starts
    with ``--`` or ``/*`` (also inside a function body).
    """
    spans: list[tuple[int, int]] = []
    split_statements(body, comments=spans)
    offset = 0
    for line in body.splitlines(keepends=True):
        stripped = line.strip()
        if stripped.startswith(("--", "/*")):
            spans.append((offset, offset + len(line)))
        offset += len(line)
    for start, end in sorted(spans):
        comment = body[start:end]
        if not _reads_like_marker(comment):
            continue
        number = line_and_column(body, start)[0]
        whole_line = body.splitlines()[number - 1].strip()
        if whole_line.lower() in MARKERS and comment.strip() == whole_line:
            continue
        shown = " ".join(comment.split())
        shown = shown if len(shown) <= 60 else shown[:59] + "…"
        return (
            f"{migration.path}, line {number}: the comment {shown!r} reads like a precog marker but is not one, so "
            f"it would be a plain comment (a misspelled '{DOWN_MARKER}' makes `migrate up` run the down section). "
            f"A marker is a line of its own spelled exactly '{DOWN_MARKER}' (starts the down section) or "
            f"'{NO_TRANSACTION_MARKER}' (the first line of the file); write it so, or reword the comment"
        )
    return None


def marker_problem(migration: MigrationFile, body: str) -> str | None:
    """The sentence refusing ``migration`` when a marker line is where it does nothing or is ambiguous, else None.

    A comment that reads like a marker but is not exactly one
    (`_misspelled_marker`: ``--precog:down``, ``-- precog: down``,
    ``/* precog:down */``, trailing text …); ``-- precog:no-transaction``
    anywhere but the first line (it would be a plain comment and the file
    would run in a transaction); two ``-- precog:down`` lines; a
    ``-- precog:down`` line inside a statement (before its semicolon, or in a
    function body), where it cannot split the file.
    """
    misspelled = _misspelled_marker(migration, body)
    if misspelled is not None:
        return misspelled
    downs: list[int] = []
    offset = 0
    for number, line in enumerate(body.splitlines(keepends=True), 1):
        text = line.strip().lower()
        if text == NO_TRANSACTION_MARKER and number != 1:
            return (
                f"{migration.path} has '{NO_TRANSACTION_MARKER}' on line {number}; it only counts as the first "
                "line of the file (move it above the header comments), otherwise the file runs in a transaction"
            )
        if text == DOWN_MARKER:
            downs.append(offset)
        offset += len(line)
    if len(downs) > 1:
        lines = " and ".join(str(line_and_column(body, o)[0]) for o in downs)
        return f"{migration.path} has several '{DOWN_MARKER}' lines (lines {lines}); keep one"
    if downs:
        for statement in split_statements(body):
            if statement.start < downs[0] < statement.end:
                return (
                    f"{migration.path}: the '{DOWN_MARKER}' line (line {line_and_column(body, downs[0])[0]}) is "
                    f"inside the statement that starts on line {line_and_column(body, statement.start)[0]}; end "
                    "that statement with a semicolon before the marker"
                )
    return None
