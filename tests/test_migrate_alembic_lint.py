"""The lint over Alembic revisions: the SQL Alembic renders offline for the pending revisions, through squawk."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests._helpers.cli import Workspace
from tests.test_alembic import alembic, alembic_project

INDEX = '''\
"""index on markets.symbol"""
from alembic import op

revision = "a2"
down_revision = "a1"
branch_labels = None
depends_on = None
{ack}

def upgrade():
    op.create_index("markets_symbol", "markets", ["symbol"])


def downgrade():
    op.drop_index("markets_symbol")
'''

NOTE = '''\
"""a nullable column"""
import sqlalchemy as sa
from alembic import op

revision = "a3"
down_revision = "a2"
branch_labels = None
depends_on = None


def upgrade():
    op.add_column("markets", sa.Column("note", sa.Text))


def downgrade():
    op.drop_column("markets", "note")
'''


@pytest.fixture
def ws(ws: Workspace, tmp_path: Path) -> Workspace:
    """The shared workspace (tests/conftest.py), with an Alembic project in it."""
    alembic_project(tmp_path)
    return ws


def write(ws: Workspace, name: str, body: str) -> None:
    (ws.root / "migrations" / "versions" / name).write_text(body)


def index_exists(ws: Workspace, env: str) -> bool:
    return ws.query(env, "SELECT count(*) FROM pg_indexes WHERE indexname = 'markets_symbol'") == [(1,)]


def test_test_applies_with_a_warning_naming_the_revision_and_rule(ws: Workspace) -> None:
    """On test the blocking CREATE INDEX revision runs, with a warning naming its file and squawk's rule."""
    ws.add("test")
    write(ws, "a2_index.py", INDEX.format(ack=""))
    result = alembic(ws, "-x", "env=test", "upgrade", "head")
    assert result.code == 0, result.err
    assert "warning: a2_index.py (revision a2, line" in result.err
    assert "require-concurrent-index-creation" in result.err
    assert index_exists(ws, "test")
    entry = ws.audit_entries()[-1]
    assert entry["outcome"] == "ok" and entry["lint_warnings"] == ["a2_index.py: require-concurrent-index-creation"]


def test_only_pending_revisions_are_linted(ws: Workspace) -> None:
    """From the database's current revision: a2, already applied, is not linted again when a3 is applied."""
    ws.add("test")
    write(ws, "a2_index.py", INDEX.format(ack=""))
    assert alembic(ws, "-x", "env=test", "upgrade", "head").code == 0
    write(ws, "a3_note.py", NOTE)
    result = alembic(ws, "-x", "env=test", "upgrade", "head")
    assert result.code == 0, result.err
    assert "a2_index.py" not in result.err and "warning" not in result.err
    assert ws.query("test", "SELECT version_num FROM alembic_version") == [("a3",)]


def test_staging_refuses_before_any_revision_runs_until_acknowledged(ws: Workspace) -> None:
    """staging: refused (rule named, nothing run, not even a1, audited refused); with `# precog:allow` it runs
    and the acknowledgement is audited."""
    ws.add("staging")
    write(ws, "a2_index.py", INDEX.format(ack=""))
    refused = alembic(ws, "-x", "env=staging", "upgrade", "head")
    assert refused.code != 0
    assert "require-concurrent-index-creation" in refused.err and "# precog:allow" in refused.err
    assert not ws.has_table("staging", "markets")
    assert ws.audit_entries()[-1]["outcome"] == "refused"
    write(ws, "a2_index.py", INDEX.format(ack="# precog:allow require-concurrent-index-creation: markets is tiny\n"))
    ok = alembic(ws, "-x", "env=staging", "upgrade", "head")
    assert ok.code == 0, ok.err
    assert index_exists(ws, "staging")
    entry = ws.audit_entries()[-1]
    assert entry["outcome"] == "ok"
    assert entry["acknowledged"] == [
        {"file": "a2_index.py", "rule": "require-concurrent-index-creation", "reason": "markets is tiny", "line": 8}
    ]


def test_acknowledging_an_unknown_rule_is_refused(ws: Workspace) -> None:
    """A `# precog:allow` of a rule squawk does not know: refused with a sentence, nothing run."""
    ws.add("test")
    write(ws, "a2_index.py", INDEX.format(ack="# precog:allow no-such-rule: because\n"))
    result = alembic(ws, "-x", "env=test", "upgrade", "head")
    assert result.code != 0
    assert "squawk does not know" in result.err
    assert not ws.has_table("test", "markets")


def test_offline_sql_is_not_linted_and_unchanged(ws: Workspace) -> None:
    """--sql itself is not linted (nothing runs); it still prints the revisions' SQL."""
    ws.add("staging")
    write(ws, "a2_index.py", INDEX.format(ack=""))
    result = alembic(ws, "-x", "env=staging", "upgrade", "head", "--sql")
    assert result.code == 0, result.err
    assert "CREATE INDEX markets_symbol" in result.out


CONCURRENT = '''\
"""index on markets.symbol, built concurrently outside the transaction"""
from alembic import op

revision = "a2"
down_revision = "a1"
branch_labels = None
depends_on = None


def upgrade():
    with op.get_context().autocommit_block():
        op.create_index("markets_symbol", "markets", ["symbol"], postgresql_concurrently=True)


def downgrade():
    op.drop_index("markets_symbol")
'''


def test_concurrent_index_in_an_autocommit_block(ws: Workspace) -> None:
    """CREATE INDEX CONCURRENTLY in autocommit_block(), the safe way with Alembic, passes the lint."""
    ws.add("test")
    write(ws, "a2_index.py", CONCURRENT)
    result = alembic(ws, "-x", "env=test", "upgrade", "head")
    assert result.code == 0, result.err
    assert index_exists(ws, "test")
    assert "warning" not in result.err
    assert "lint_warnings" not in ws.audit_entries()[-1]
