"""The docs: the README's example runs as written, the generated settings table is current, the README stays short."""

from __future__ import annotations

import os
import re
import runpy
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from psycopg import sql

from precog_db import close_pool, get_cursor, initialize_pool
from tests._helpers.server import REPO, Server
from tools import config_reference

README = REPO / "README.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, re.S)


@pytest.fixture
def demo_db(pg_server: Server) -> Iterator[str]:
    """A database of this test's own with the demo's schema (examples/trading_service.py's ensure_schema)."""
    name = pg_server.fresh_database(f"precog_test_docs_{os.getpid()}_{secrets.token_hex(3)}")
    try:
        initialize_pool(settings=pg_server.settings(name))
        runpy.run_path(str(REPO / "examples" / "trading_service.py"), run_name="trading_service")["ensure_schema"]()
        yield name
    finally:
        close_pool()
        with pg_server.connect() as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


class TestReadme:
    def test_is_a_short_front_door(self) -> None:
        """At most 200 lines (issue 26)."""
        assert len(README.read_text(encoding="utf-8").splitlines()) <= 200

    def test_tables_are_not_split_by_a_blank_line(self) -> None:
        """A row after a blank line below a table, not a new table's header, renders as text (the old config table)."""
        for path in [README, *sorted((REPO / "docs").glob("*.md"))]:
            lines = path.read_text(encoding="utf-8").splitlines()
            for number in range(2, len(lines)):
                if (
                    lines[number].startswith("| ")
                    and not lines[number - 1].strip()
                    and lines[number - 2].startswith("|")
                    and not (number + 1 < len(lines) and lines[number + 1].startswith("| ---"))
                ):
                    pytest.fail(f"{path.name}:{number + 1}: a table continues after a blank line")

    def test_first_example_runs_as_written_against_the_demo_schema(self, demo_db: str) -> None:
        """The ten lines, unchanged, against the tables `make demo` creates: the read finds BTC-USD, the write lands."""
        block = python_blocks(README.read_text(encoding="utf-8"))[0]
        namespace: dict[str, object] = {}
        exec(compile(block, "README.md", "exec"), namespace)  # the README's own example
        market = namespace["market"]
        assert isinstance(market, dict) and market["symbol"] == "BTC-USD"
        with get_cursor() as cur:
            cur.execute("SELECT qty, side FROM fills WHERE market_id = %s", (market["id"],))
            assert cur.fetchall() == [{"qty": 3, "side": "buy"}]

    def test_docs_index_example_is_the_readme_example(self) -> None:
        """The site's home page shows the same tested example."""
        index = (REPO / "docs" / "index.md").read_text(encoding="utf-8")
        assert python_blocks(index)[0] == python_blocks(README.read_text(encoding="utf-8"))[0]

    def test_links_point_at_files_that_exist(self) -> None:
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", README.read_text(encoding="utf-8")):
            assert (REPO / target).exists(), target


class TestConfigReference:
    def test_page_is_current(self) -> None:
        """docs/CONFIGURATION.md's settings table is what tools/config_reference.py generates (`make generate`)."""
        page = config_reference.PAGE.read_text(encoding="utf-8")
        assert config_reference.render(page) == page, "docs/CONFIGURATION.md is stale: run `make generate`"

    def test_every_setting_has_a_row_with_its_defaults(self) -> None:
        from precog_db._database_settings import env_defaults
        from precog_db._fields import SPECS
        from precog_db.environment import Environment

        table = config_reference.table()
        for spec in SPECS:
            row = next(line for line in table.splitlines() if line.startswith(f"| `{spec.var}` |"))
            assert row.count("|") == 8
            assert config_reference._cell(env_defaults(Environment.PROD)[spec.field]) in row.split("|")[-2]

    def test_check_fails_on_a_stale_page_and_writes_nothing(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        stale = config_reference.PAGE.read_text(encoding="utf-8").replace("| `DB_NAME` |", "| `DB_NAME_OLD` |")
        page = tmp_path / "CONFIGURATION.md"
        page.write_text(stale, encoding="utf-8")
        monkeypatch.setattr(config_reference, "PAGE", page)
        monkeypatch.setattr(config_reference, "ROOT", tmp_path)
        assert config_reference.main(["--check"]) == 1
        assert page.read_text(encoding="utf-8") == stale
        assert config_reference.main([]) == 0
        assert config_reference.main(["--check"]) == 0
        assert "| `DB_NAME` |" in page.read_text(encoding="utf-8")

    def test_missing_markers_are_a_clear_error(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        page = tmp_path / "CONFIGURATION.md"
        page.write_text("# Configuration\n\nno markers\n", encoding="utf-8")
        monkeypatch.setattr(config_reference, "PAGE", page)
        monkeypatch.setattr(config_reference, "ROOT", tmp_path)
        assert config_reference.main([]) == 1
        assert "lacks the markers" in capsys.readouterr().err
        assert page.read_text(encoding="utf-8") == "# Configuration\n\nno markers\n"

    def test_runs_as_a_script(self) -> None:
        """`python tools/config_reference.py --check`, as make check-generated runs it."""
        done = subprocess.run(
            [sys.executable, "tools/config_reference.py", "--check"],
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr


class TestApiReference:
    def test_every_public_name_is_listed(self) -> None:
        import precog_db

        page = (REPO / "docs" / "api" / "precog_db.md").read_text(encoding="utf-8")
        missing = [name for name in precog_db.__all__ if f"[`{name}`]" not in page]
        assert not missing, f"add to docs/api/precog_db.md: {missing}"

    def test_every_public_module_has_a_page_in_the_nav(self) -> None:
        nav = (REPO / "mkdocs.yml").read_text(encoding="utf-8")
        modules = sorted(
            p.stem if p.is_file() else p.name
            for p in (REPO / "precog_db").iterdir()
            if not p.name.startswith("_") and (p.suffix == ".py" or (p / "__init__.py").exists())
        )
        missing = [m for m in modules if f"api/{m}.md" not in nav]
        assert not missing, f"add an API page and a nav entry for: {missing}"


def test_changelog_has_an_unreleased_section() -> None:
    assert "\n## Unreleased\n" in (REPO / "CHANGELOG.md").read_text(encoding="utf-8")
