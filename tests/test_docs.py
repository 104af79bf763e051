"""The user docs: every test that docs/reliability.md names exists; no page reads as a development diary."""

from __future__ import annotations

import re

import pytest

from tests.loop.cli_helpers import ROOT


def named_tests(text: str) -> list[tuple[str, str | None]]:
    """(test file, test function or None) for every `tests/...py[::name]` in the text; a bare `::name` in a line
    belongs to the last file named before it on that line."""
    out = []
    for line in text.splitlines():
        last = None
        for ref in re.findall(r"`(tests/[\w/]+\.py(?:::\w+)?|::\w+)`", line):
            path, _, name = ref.partition("::")
            path = path or last
            assert path, f"{ref} has no file before it: {line}"
            last = path
            out.append((path, name or None))
    return out


def test_every_test_the_reliability_page_names_exists():
    refs = named_tests((ROOT / "docs" / "reliability.md").read_text())
    assert len(refs) > 40
    for path, name in refs:
        source = ROOT / path
        assert source.is_file(), path
        if name:
            assert re.search(rf"^def {name}\(", source.read_text(), re.M), f"{path}::{name}"


@pytest.mark.parametrize("page", ["README.md", "docs/architecture.md", "docs/benchmarks.md", "docs/demo_results.md",
                                  "docs/reliability.md"])
def test_pages_speak_to_users_not_of_sessions(page):
    text = (ROOT / page).read_text().lower()
    for word in ("session", "issue ", "lent", " box"):
        assert word not in text, (page, word)
