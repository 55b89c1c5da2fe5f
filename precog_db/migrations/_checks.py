"""The checks between files and a ledger: `validate`, the plans (`pending`, `plan_downgrade`), the promotion check.

Pure functions over the files and a ledger already read: nothing here opens
a connection. Promotion: staging may only apply what test has applied with
the same checksum, prod only what staging has (`PREDECESSOR`,
`check_promotion`).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from precog_db.environment import Environment
from precog_db.errors import ConfigurationError, MigrationValidationError, PromotionError
from precog_db.migrations._files import MigrationFile
from precog_db.migrations._ledger import AppliedMigration
from precog_db.migrations._scanner import transaction_control_problem
from precog_db.migrations._sections import DOWN_MARKER, marker_problem, sections

__all__ = ["PREDECESSOR", "Problem", "check_promotion", "pending", "plan_downgrade", "validate"]

#: The environment whose ledger must already hold a migration before it may run here.
PREDECESSOR: dict[Environment, Environment] = {
    Environment.STAGING: Environment.TEST,
    Environment.PROD: Environment.STAGING,
}


@dataclass(frozen=True)
class Problem:
    """A disagreement between files and ledger found by `validate`."""

    kind: str  # edited | missing | gap | out_of_order | transaction_control | marker
    version: int
    message: str


def validate(files: Sequence[MigrationFile], ledger: Mapping[int, AppliedMigration]) -> list[Problem]:
    """Every disagreement between the files and the ledger, by version.

    * ``edited``: an applied file's checksum differs from the ledger's;
    * ``missing``: the ledger has a version with no file;
    * ``gap``: a version between the lowest and the highest is neither a file nor in the ledger;
    * ``out_of_order``: a file is pending but a later version is already applied;
    * ``transaction_control``: a pending file ends or starts its own transaction
      (a top-level ``COMMIT``, ``ROLLBACK``, ``BEGIN`` …, see `find_transaction_control`);
    * ``marker``: a pending file's ``-- precog:no-transaction`` or ``-- precog:down`` line is misplaced
      (`marker_problem`).
    """
    problems: list[Problem] = []
    by_version = {f.version: f for f in files}
    for version, row in sorted(ledger.items()):
        file = by_version.get(version)
        if file is None:
            problems.append(
                Problem(
                    "missing",
                    version,
                    f"version {version} ({row.name}) is in the ledger but its file is missing; restore the file "
                    "from version control",
                )
            )
        elif file.checksum != row.checksum:
            problems.append(
                Problem(
                    "edited",
                    version,
                    f"{file.filename} was edited after it was applied (checksum {file.checksum[:12]} now, "
                    f"{row.checksum[:12]} when applied {row.applied_at:%Y-%m-%d %H:%M}); revert the edit and "
                    "put the change in a new migration",
                )
            )
    known = sorted(set(by_version) | set(ledger))
    for low, high in itertools.pairwise(known):
        for missing in range(low + 1, high):
            problems.append(
                Problem(
                    "gap",
                    missing,
                    f"version {missing} is missing between {low} and {high}; renumber the files so that "
                    "versions are consecutive",
                )
            )
    for file in files:
        if file.version in ledger:
            continue
        try:
            refusal = transaction_control_problem(file, file.sql())
        except (OSError, UnicodeDecodeError):
            continue  # apply_migration reports an unreadable file when it gets there
        if refusal is not None:
            problems.append(Problem("transaction_control", file.version, refusal))
        misplaced = marker_problem(file, file.sql())
        if misplaced is not None:
            problems.append(Problem("marker", file.version, misplaced))
    latest = max(ledger, default=0)
    for file in files:
        if file.version not in ledger and file.version < latest:
            problems.append(
                Problem(
                    "out_of_order",
                    file.version,
                    f"{file.filename} is not applied but version {latest} already is; give it a version after {latest}",
                )
            )
    return sorted(problems, key=lambda p: (p.version, p.kind))


def pending(
    files: Sequence[MigrationFile], ledger: Mapping[int, AppliedMigration], target: int | None = None
) -> list[MigrationFile]:
    """The files to apply, in order, up to ``target``; raises `MigrationValidationError` on any problem."""
    problems = validate(files, ledger)
    if problems:
        raise MigrationValidationError(
            (
                "the migrations do not match the ledger, so nothing was applied: "
                if any(p.kind not in ("transaction_control", "marker") for p in problems)
                else "nothing was applied: "
            )
            + "; ".join(p.message for p in problems)
            + ". Run `precog-db migrate validate` for the list"
        )
    if target is not None and target not in {f.version for f in files}:
        raise ConfigurationError(f"--target {target} is not the version of any migration file")
    return [f for f in files if f.version not in ledger and (target is None or f.version <= target)]


def check_promotion(
    plan: Sequence[MigrationFile],
    predecessor_ledger: Mapping[int, AppliedMigration],
    *,
    env: Environment,
    predecessor: Environment,
) -> None:
    """Raise `PromotionError` unless ``predecessor`` applied every planned file with the same checksum."""
    absent = [m for m in plan if m.version not in predecessor_ledger]
    changed = [
        m for m in plan if m.version in predecessor_ledger and predecessor_ledger[m.version].checksum != m.checksum
    ]
    if not absent and not changed:
        return
    parts = []
    if absent:
        parts.append(f"not applied to {predecessor.value}: " + ", ".join(m.filename for m in absent))
    if changed:
        parts.append(
            f"applied to {predecessor.value} with a different checksum (the file was edited since): "
            + ", ".join(m.filename for m in changed)
        )
    raise PromotionError(
        f"refusing to migrate {env.value}: migrations reach {env.value} only after {predecessor.value}, and "
        + "; ".join(parts)
        + f". Run `precog-db --env {predecessor.value} migrate up` first (and test it); nothing was applied"
    )


def plan_downgrade(
    files: Sequence[MigrationFile], ledger: Mapping[int, AppliedMigration], target: int | None = None
) -> list[MigrationFile]:
    """The applied files to revert, newest first: the newest one, or every one after ``target`` (0: all).

    Raises `MigrationValidationError`, before anything runs, when the files
    and the ledger disagree (`validate`) or when a file to revert has no
    ``-- precog:down`` section; `ConfigurationError` for a ``target`` that is
    not an applied version.
    """
    problems = validate(files, ledger)
    if problems:
        raise MigrationValidationError(
            "the migrations do not match the ledger, so nothing was reverted: "
            + "; ".join(p.message for p in problems)
            + ". Run `precog-db migrate validate` for the list"
        )
    applied = sorted(ledger, reverse=True)
    if target is None:
        versions = applied[:1]
    else:
        if target != 0 and target not in ledger:
            raise ConfigurationError(
                f"--target {target} is not an applied version; give the version to go back to (it stays applied), "
                "or 0 to revert every migration"
            )
        versions = [v for v in applied if v > target]
    by_version = {f.version: f for f in files}
    plan = [by_version[v] for v in versions]
    misplaced = [m for m in (marker_problem(f, f.sql()) for f in plan) if m is not None]
    if misplaced:
        raise MigrationValidationError("; ".join(misplaced) + "; nothing was reverted")
    lacking = [f.filename for f in plan if sections(f.sql()).down_start is None]
    if lacking:
        raise MigrationValidationError(
            f"cannot revert {', '.join(lacking)}: no '{DOWN_MARKER}' section, so nothing was reverted. A file's "
            "checksum covers its down section, so one cannot be added once the file is applied: write a new "
            "migration that undoes the change and apply it with migrate up"
        )
    return plan
