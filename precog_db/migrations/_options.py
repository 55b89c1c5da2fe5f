"""The options of the migration workflows: one frozen `MigrationOptions` instead of a keyword argument each.

`upgrade`, `revert` and `mark_baseline` take ``(settings, options)``; the
keyword arguments they also accept (the documented call form
``upgrade(settings, directory=…, confirm_database=…)``) are turned into an
options object by `resolve`, so both forms run one code path. Each workflow
accepts as keywords only the fields it uses (a ``TypedDict`` per workflow,
checked by mypy and at run time); an options object may carry more, and a
workflow ignores the fields it has no use for.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict, cast

from precog_db._progress import ProgressDisplay
from precog_db.errors import ConfigurationError

__all__ = ["BaselineKeywords", "MigrationOptions", "RevertKeywords", "UpgradeKeywords", "resolve"]

#: How long ``migrate up`` and ``migrate down`` wait for another run's lock by default (``--lock-timeout``).
UP_DOWN_LOCK_TIMEOUT = 300.0
#: How long ``migrate baseline`` waits for it by default.
BASELINE_LOCK_TIMEOUT = 60.0


@dataclass(frozen=True, kw_only=True)
class MigrationOptions:
    """How to run a migration workflow (`upgrade`, `revert`, `mark_baseline`): what ``precog-db migrate`` parses.

    Every field has the default ``precog-db migrate`` has; ``dataclasses.replace``
    makes a variant. A workflow ignores the fields it has no use for
    (``revert`` has no promotion check, ``mark_baseline`` no plan, dry run or backup).
    """

    #: Where the ``<version>_<name>.sql`` files are (``--migrations-dir``).
    directory: Path = Path("migrations")
    #: ``up``: apply up to and including this version; ``down``: revert every one after it (0: all).
    target: int | None = None
    #: Plan (and for ``up`` run the promotion check), then stop: change nothing.
    dry_run: bool = False
    #: Seconds to wait for another run's migration lock; None: 300 for up and down, 60 for baseline.
    lock_timeout: float | None = None
    #: ``up``: retries of a file that hit ``DB_MIGRATION_LOCK_TIMEOUT``, with backoff (``--lock-retries``).
    lock_retries: int = 0
    #: On prod, take a verified backup before changing the schema; False needs a ``reason`` (``--no-backup``).
    take_backup: bool = True
    #: Why the backup or the promotion check is skipped; recorded in the audit log (``--reason``).
    reason: str | None = None
    #: ``up`` on staging and prod: go on when the predecessor's ledger cannot be read; needs a ``reason``.
    #: Never skips a migration the predecessor is known not to have.
    skip_promotion_check: bool = False
    #: Where the predecessor's settings files are (``--config-dir``), for the promotion check.
    config_dir: str | os.PathLike[str] | None = None
    #: Where the prod backup goes (``--backup-dir``) and how many to keep (``--keep``).
    backup_root: Path | None = None
    keep: int | None = None
    #: How the change is confirmed: ``confirm(action)`` returns how; None: the typed confirmation of
    #: `precog_db.confirm` (staging and prod) with ``confirm_database``.
    confirm: Callable[[str], str] | None = None
    confirm_database: str | None = None
    #: Receives sentences for people: the plan, the backup, files applied meanwhile by another run.
    notify: Callable[[str], None] | None = None
    #: Told once, with the holder, when another run holds the migration lock.
    on_lock_wait: Callable[[str], None] | None = None
    #: Shows the file being applied or reverted, and the backup's progress.
    progress: ProgressDisplay | None = None

    def lock_wait(self, default: float) -> float:
        """``lock_timeout``, or the workflow's ``default`` when it is None."""
        return default if self.lock_timeout is None else self.lock_timeout

    def checked_reason(self, *, promotion: bool) -> str | None:
        """The stripped ``reason`` (None when blank); `ConfigurationError` when a skip needs one and has none."""
        reason = (self.reason or "").strip() or None
        if promotion and self.skip_promotion_check and not reason:
            raise ConfigurationError("skipping the promotion check needs a reason (it goes to the audit log)")
        if not self.take_backup and not reason:
            raise ConfigurationError("skipping the prod backup needs a reason (it goes to the audit log)")
        return reason


class BaselineKeywords(TypedDict, total=False):
    """The keyword arguments `mark_baseline` accepts (fields of `MigrationOptions`)."""

    directory: Path
    confirm: Callable[[str], str] | None
    confirm_database: str | None
    on_lock_wait: Callable[[str], None] | None


class RevertKeywords(BaselineKeywords, total=False):
    """The keyword arguments `revert` accepts (fields of `MigrationOptions`)."""

    target: int | None
    dry_run: bool
    lock_timeout: float | None
    take_backup: bool
    reason: str | None
    backup_root: Path | None
    keep: int | None
    notify: Callable[[str], None] | None
    progress: ProgressDisplay | None


class UpgradeKeywords(RevertKeywords, total=False):
    """The keyword arguments `upgrade` accepts: every field of `MigrationOptions`."""

    skip_promotion_check: bool
    config_dir: str | os.PathLike[str] | None
    lock_retries: int


def _keys(accepted: type[BaselineKeywords]) -> frozenset[str]:
    """The keys of a ``TypedDict`` class (all optional: ``total=False``)."""
    keys: frozenset[str] = cast(Any, accepted).__optional_keys__
    return keys


def resolve(
    workflow: str,
    options: MigrationOptions | None,
    keywords: Mapping[str, Any],
    accepted: type[BaselineKeywords],
) -> MigrationOptions:
    """``options`` (default `MigrationOptions()`) with ``keywords`` applied; a keyword ``accepted`` lacks: TypeError.

    The one place a workflow's keyword arguments become its options, so
    ``upgrade(settings, directory=d)`` and ``upgrade(settings, MigrationOptions(directory=d))`` are the same call.
    """
    unknown = sorted(set(keywords) - _keys(accepted))
    if unknown:
        raise TypeError(f"{workflow}() got an unexpected keyword argument {unknown[0]!r}")
    base = MigrationOptions() if options is None else options
    if not isinstance(base, MigrationOptions):
        raise TypeError(f"{workflow}() takes a MigrationOptions as options, not {type(base).__name__}")
    return dataclasses.replace(base, **cast(dict[str, Any], keywords)) if keywords else base
