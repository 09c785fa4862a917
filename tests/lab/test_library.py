"""The README's library examples, run unchanged as scripts on the lab's LAN host against the real router:
each must succeed, print the router's external address, and leave nothing mapped behind it."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from autonat.lab import Lab
from tests.lab.cli_helpers import listed

pytestmark = pytest.mark.lab

README = Path(__file__).parents[2] / "README.md"


def library_examples() -> list[str]:
    """The ```python blocks of the README's "As a library" section, in order."""
    text = README.read_text()
    section = text.split("### As a library", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, re.S)


def test_the_readme_has_the_three_examples() -> None:
    examples = library_examples()
    assert len(examples) == 3
    assert "RouterSession" in examples[0] and "open_router" in examples[1] and "NatEngine" in examples[2]


@pytest.mark.parametrize(("index", "port", "transport"), [(0, 5060, "udp"), (1, 8080, "tcp"), (2, 5060, "udp")])
def test_a_readme_example_runs_as_it_stands(lab: Lab, tmp_path: Path, index: int, port: int, transport: str) -> None:
    script = tmp_path / "example.py"
    script.write_text(library_examples()[index])
    state = tmp_path / "state"
    result = lab.run("lan", ["env", f"AUTONAT_STATE_DIR={state}", sys.executable, str(script)], timeout=60)
    assert result.returncode == 0, result.stderr
    assert Lab.ROUTER_WAN in result.stdout, result.stdout
    assert "Traceback" not in result.stderr
    assert not listed(lab, transport, port), "the example left its mapping on the router"
