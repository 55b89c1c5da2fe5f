"""Banners and typed confirmations (no database needed: they act before any connection)."""

from __future__ import annotations

import io

import pytest

from precog_db.confirm import banner, require_confirmation, use_colour
from precog_db.environment import Environment
from precog_db.errors import ConfirmationError, ProductionAccessError
from precog_db.settings import DatabaseSettings
from tests._helpers.cli import tty_stdin

PROD = DatabaseSettings(env=Environment.PROD, host="db.internal", dbname="precog_prod", user="deploy")
STAGING = DatabaseSettings(env=Environment.STAGING, dbname="precog_staging")
DEV = DatabaseSettings(env=Environment.DEV)
CONFIRMED = {"PRECOG_PROD_CONFIRMED": "yes"}


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


class TestBanner:
    def test_names_environment_host_database_and_user(self) -> None:
        """The banner says PRODUCTION and the host, database and role."""
        text = banner(PROD, "migrate up")
        for part in ("PRODUCTION", "migrate up", "db.internal:5432", "'precog_prod'", "'deploy'"):
            assert part in text
        assert "\033[" not in text

    def test_colour_only_on_a_terminal_without_no_color(self) -> None:
        """Colour needs a terminal, and NO_COLOR or TERM=dumb turn it off."""
        assert use_colour(FakeTTY(), {}) is True
        assert use_colour(FakeTTY(), {"NO_COLOR": ""}) is False
        assert use_colour(FakeTTY(), {"TERM": "dumb"}) is False
        assert use_colour(io.StringIO(), {}) is False
        assert banner(STAGING, "x", colour=True).startswith("\033[")


class TestProduction:
    def test_exact_confirm_database_is_accepted(self) -> None:
        """--confirm-database with the exact name plus PRECOG_PROD_CONFIRMED confirms prod."""
        how = require_confirmation(PROD, "migrate", confirm_database="precog_prod", environ=CONFIRMED)
        assert how == "PRECOG_PROD_CONFIRMED=yes + --confirm-database"

    @pytest.mark.parametrize("given", ["precog_pro", "PRECOG_PROD", " precog_prod", "yes", ""])
    def test_any_other_name_is_refused(self, given: str) -> None:
        """Near misses, other case, spaces and 'yes' are all refused."""
        with pytest.raises(ConfirmationError, match="does not match"):
            require_confirmation(PROD, "migrate", confirm_database=given, environ=CONFIRMED)

    def test_yes_is_never_enough(self) -> None:
        """--yes alone does not confirm prod, with or without a terminal."""
        with pytest.raises(ConfirmationError, match="--yes is not enough"):
            require_confirmation(PROD, "migrate", yes=True, stdin=io.StringIO("precog_prod\n"), environ=CONFIRMED)
        with tty_stdin("\n") as stdin, pytest.raises(ConfirmationError):
            require_confirmation(PROD, "migrate", yes=True, stdin=stdin, prompt_to=io.StringIO(), environ=CONFIRMED)

    def test_piped_stdin_is_not_a_typed_confirmation(self) -> None:
        """The name arriving on a non-terminal stdin is not read; --confirm-database is required."""
        with pytest.raises(ConfirmationError, match="--confirm-database precog_prod"):
            require_confirmation(PROD, "migrate", stdin=io.StringIO("precog_prod\n"), environ=CONFIRMED)

    def test_typed_at_a_pty(self) -> None:
        """At a real terminal the exact name confirms and a wrong one is refused."""
        prompt = io.StringIO()
        with tty_stdin("precog_prod\n") as stdin:
            how = require_confirmation(PROD, "migrate", stdin=stdin, prompt_to=prompt, environ=CONFIRMED)
        assert how == "PRECOG_PROD_CONFIRMED=yes + typed database name"
        assert "Type the database name (precog_prod)" in prompt.getvalue()
        with tty_stdin("precog_prod \n") as stdin, pytest.raises(ConfirmationError, match="nothing was changed"):
            require_confirmation(PROD, "migrate", stdin=stdin, prompt_to=io.StringIO(), environ=CONFIRMED)

    def test_prod_confirmed_is_required_too(self) -> None:
        """The right name without PRECOG_PROD_CONFIRMED=yes is still refused."""
        with pytest.raises(ProductionAccessError):
            require_confirmation(PROD, "migrate", confirm_database="precog_prod", environ={})


class TestStagingAndDev:
    def test_yes_confirms_staging(self) -> None:
        """On staging --yes is accepted."""
        assert require_confirmation(STAGING, "migrate", yes=True) == "--yes"

    def test_staging_without_anything_is_refused(self) -> None:
        """Staging with no terminal and no --yes is refused."""
        with pytest.raises(ConfirmationError, match="pass --yes or --confirm-database"):
            require_confirmation(STAGING, "migrate", stdin=io.StringIO())

    def test_wrong_confirm_database_is_refused_even_with_yes(self) -> None:
        """A --confirm-database that names another database wins over --yes and refuses."""
        with pytest.raises(ConfirmationError):
            require_confirmation(DEV, "restore", yes=True, confirm_database="precog_prod")
