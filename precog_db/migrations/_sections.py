"""The markers of a migration file: ``-- precog:no-transaction``, ``-- precog:down``, and the sections they make.

`sections` splits a file into what ``up`` runs and what ``down`` runs;
`marker_problem` refuses a marker that is misspelled, misplaced or
ambiguous (it reads the file through the scanner, `_scanner`).
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

from precog_db.migrations._files import MigrationFile
from precog_db.migrations._scanner import line_and_column, split_statements

__all__ = [
    "ALLOW_MARKER",
    "DOWN_MARKER",
    "MARKERS",
    "NO_TRANSACTION_MARKER",
    "Acknowledgement",
    "Sections",
    "acknowledgements",
    "marker_problem",
    "sections",
]

#: First line of a file that runs outside a transaction, statement by statement.
NO_TRANSACTION_MARKER = "-- precog:no-transaction"
#: The line that starts a file's down section (what `migrate down` runs to revert it).
DOWN_MARKER = "-- precog:down"
#: A line ``-- precog:allow <rule>: <reason>`` acknowledges a lint rule for the file (`acknowledgements`).
ALLOW_MARKER = "-- precog:allow"
_ALLOW = re.compile(r"--\s*precog:allow(?:\s+(?P<rule>[A-Za-z0-9_-]+))?\s*(?::\s*(?P<reason>.*?))?\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class Acknowledgement:
    """A ``-- precog:allow <rule>: <reason>`` line: the file knowingly does what ``rule`` warns about."""

    line: int
    rule: str
    #: Empty when the line has none (refused by `marker_problem`).
    reason: str


def acknowledgements(body: str) -> list[Acknowledgement]:
    """Every ``-- precog:allow`` line of ``body``, in order (a whole line, blanks around it and case ignored)."""
    found: list[Acknowledgement] = []
    for number, line in enumerate(split_lines(body), 1):
        stripped = line.strip()
        if not stripped.lower().startswith(ALLOW_MARKER):
            continue
        match = _ALLOW.fullmatch(stripped)
        rule = (match.group("rule") or "") if match else ""
        reason = (match.group("reason") or "") if match else ""
        found.append(Acknowledgement(number, rule.lower(), reason.strip()))
    return found


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
    for line in split_lines(body):
        if line.strip().lower() == DOWN_MARKER:
            return Sections(body, offset, offset + len(line), first == NO_TRANSACTION_MARKER)
        offset += len(line)
    return Sections(body, len(body), None, first == NO_TRANSACTION_MARKER)


def split_lines(body: str) -> list[str]:
    """``body``'s lines, each with its ``\\n``: split on ``\\n`` only, as lines are counted (`line_and_column`).

    `str.splitlines` also splits on form feeds, vertical tabs and other
    separators, which would make a marker check and a line number disagree;
    `precog_db.migrations._files.text_of` has already turned CRLF and bare CR
    into ``\\n``.
    """
    parts = body.split("\n")
    return [p + "\n" for p in parts[:-1]] + ([parts[-1]] if parts[-1] else [])


#: Every marker there is; a comment that reads like one of them but is not exactly it is refused.
MARKERS = (DOWN_MARKER, NO_TRANSACTION_MARKER)
_MARKER_COLON = re.compile(r"precog\s*:", re.IGNORECASE)
_NOT_LETTERS = re.compile(r"[^a-z]+")
_WORDS = re.compile(r"[a-z]+")
#: What a marker reduces to without its spacing and punctuation (``-- precog down``, ``/* PRECOG-DOWN */``).
_MARKER_LETTERS = frozenset(_NOT_LETTERS.sub("", m) for m in MARKERS)
#: The words that follow ``precog`` in a marker; ``precog`` next to one of them reads like a marker.
_MARKER_WORDS = (("down",), ("no", "transaction"), ("notransaction",))

#: Letters of other scripts that look like the Latin ones of the markers (after NFKC), folded to those.
_CONFUSABLES = str.maketrans(
    # the look-alike letters (Cyrillic, Greek, Latin small capitals and others, Armenian), written escaped ...
    (
        "\u0430\u0441\u0501\u0435\u0451\u04bb\u0456\u0457\u0458\u043a\u043c\u043f"
        "\u043e\u0440\u0433\u0455\u0442\u0446\u0475\u051d\u0445\u0443\u051b\u050d"
        "\u0410\u0412\u0421\u0415\u041d\u0406\u0408\u041a\u041c\u041e\u0420\u0405"
        "\u0422\u0425\u0423\u0500\u051c\u050c"
        "\u03b1\u03b2\u03b3\u03b5\u03b7\u03b9\u03ba\u03bd\u03bf\u03c1\u03c3\u03c2"
        "\u03c4\u03c5\u03c7\u03c9\u03f2\u03f1\u0391\u0392\u0395\u0397\u0399\u039a"
        "\u039c\u039d\u039f\u03a1\u03a4\u03a5\u03a7\u0396\u03f9"
        "\u0261\u0131\u0237\u0251\u0252\u0254\u025b\u0269\u026a\u0274\u0280\u028f"
        "\u1d05\u1d07\u1d0f\u1d18\u1d1b\u1d21\u1d04\u1d00\u0262\u0578\u0585\u0581"
        "\u057d\u0570\u0584"
    ),
    # ... and the Latin letter each looks like, in the same order
    (
        "acdeehiijkmn"
        "oprstuvwxyqg"
        "abcehijkmops"
        "txydwg"
        "abyenikvopoc"
        "tuxwcpabehik"
        "mnoptyxzcgi"
        "jaaceiinryde"
        "optwcagnoguh"
        "p"
    ),
)  # fmt: skip


def fold(text: str) -> str:
    """``text`` as the Latin letters it looks like: NFKC (full-width, ligatures), accents and invisible
    characters dropped (a soft hyphen, a zero-width space), look-alike Cyrillic / Greek letters mapped, lower case.
    """
    text = unicodedata.normalize("NFKC", text)
    text = "".join(c for c in unicodedata.normalize("NFD", text) if unicodedata.category(c) not in ("Mn", "Cf"))
    return text.translate(_CONFUSABLES).lower()


def _words_read_like_marker(words: list[str]) -> bool:
    """``precog`` next to (before or after) ``down`` or ``no transaction`` / ``no-transaction``."""
    for i, word in enumerate(words):
        if word != "precog":
            continue
        for tail in _MARKER_WORDS:
            if tuple(words[i + 1 : i + 1 + len(tail)]) == tail or tuple(words[max(0, i - len(tail)) : i]) == tail:
                return True
    return False


def _reads_like_marker(comment: str) -> bool:
    """True for a comment a person may have meant as a marker.

    After `fold` (so ``-- prec\\u043eg:down`` with a Cyrillic o, or full-width
    letters, count): ``precog:`` anywhere; a marker's letters alone
    (``-- p r e c o g : d o w n``); or ``precog`` next to ``down`` or ``no
    transaction`` among its words (``-- precog down section``). Prose that
    merely mentions precog reads like none of these.
    """
    folded = fold(comment)
    if _MARKER_COLON.search(folded) or _NOT_LETTERS.sub("", folded) in _MARKER_LETTERS:
        return True
    return _words_read_like_marker(_WORDS.findall(folded))


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
    for line in split_lines(body):
        stripped = line.strip()
        if stripped.startswith(("--", "/*")):
            spans.append((offset, offset + len(line)))
        offset += len(line)
    for start, end in sorted(spans):
        comment = body[start:end]
        if not _reads_like_marker(comment):
            continue
        number = line_and_column(body, start)[0]
        whole_line = body.split("\n")[number - 1].strip()
        if whole_line.lower() in MARKERS and comment.strip() == whole_line:
            continue
        if whole_line.lower().startswith(ALLOW_MARKER + " ") and comment.strip() == whole_line:
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
    for ack in acknowledgements(body):
        if not ack.rule or not ack.reason:
            return (
                f"{migration.path}, line {ack.line}: an acknowledgement names squawk's rule and says why, "
                f"'{ALLOW_MARKER} <rule>: <reason>' (e.g. '{ALLOW_MARKER} require-concurrent-index-creation: "
                "orders has 200 rows'); " + ("the reason is missing" if ack.rule else "write it so")
            )
    downs: list[int] = []
    offset = 0
    for number, line in enumerate(split_lines(body), 1):
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
