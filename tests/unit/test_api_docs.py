"""The API reference (docs/api, pdoc) builds from the docstrings and covers the whole public API.

Regenerate it with:
    .venv/bin/python -m pdoc -o docs/api --no-show-source --no-search autonat '!autonat\\..*'
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import autonat

ROOT = Path(__file__).parents[2]
COMMAND = ["-m", "pdoc", "--no-show-source", "--no-search", "autonat", r"!autonat\..*"]


def anchors(html: str) -> set[str]:
    return set(re.findall(r'<section id="([A-Za-z_][A-Za-z0-9_]*)">', html))


def test_the_reference_builds_and_documents_every_public_name(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, *COMMAND[:1], COMMAND[1], "-o", str(tmp_path), *COMMAND[2:]],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "Warn" not in result.stderr, result.stderr
    html = (tmp_path / "autonat.html").read_text()
    assert set(autonat.__all__) <= anchors(html)
    for name in ("RouterSession", "BlockingSession", "NatEngine", "MappingRequest"):
        section = html.split(f'<section id="{name}">', 1)[1].split("</section>", 1)[0]
        assert 'class="docstring"' in section, f"{name} renders without its docstring"


def test_the_checked_in_reference_lists_the_same_names() -> None:
    # The committed copy is regenerated with the command above whenever the public API changes.
    assert set(autonat.__all__) <= anchors((ROOT / "docs" / "api" / "autonat.html").read_text())
