"""The reference facts the tests check the code against ship with the repository (tests/data), so
that a fresh clone runs every test; beside the team's reference folder they must agree with it."""
import os

from helpers import SHARED_FORMATS_MD, SHIPPED_FORMATS_MD, formats_section, greedy_story


def test_shipped_formats_reference_holds_the_sections_the_tests_read():
    for number in (1, 7, 9):
        assert formats_section(number).startswith(f"## {number}. ")
    assert greedy_story().startswith("Once upon a time")


def test_shipped_copy_is_the_teams_reference_where_that_is_present():
    """A fresh clone has no ../shared: then the shipped copy is the reference and there is nothing
    to compare; beside it, the two must be the same text."""
    if os.path.isfile(SHARED_FORMATS_MD):
        with open(SHARED_FORMATS_MD, "rb") as a, open(SHIPPED_FORMATS_MD, "rb") as b:
            assert a.read() == b.read(), "tests/data/formats_reference.md differs from ../shared/docs/formats.md"

