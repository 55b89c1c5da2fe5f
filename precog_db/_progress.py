"""What a long-running workflow (backup, migrate up) needs from a progress display.

The CLI passes a one-line terminal display (`precog_db.cli.Progress`);
a Python caller may pass its own object or nothing.
"""

from __future__ import annotations

from typing import Protocol

__all__ = ["NoProgress", "ProgressDisplay"]


class ProgressDisplay(Protocol):
    """Shows one changing line of progress, then clears it."""

    def update(self, text: str) -> None:
        """Replace the line with ``text``."""

    def done(self) -> None:
        """Clear the line (called before anything else is printed)."""


class NoProgress:
    """A display that shows nothing."""

    def update(self, text: str) -> None:
        """Show nothing."""

    def done(self) -> None:
        """Nothing to clear."""
