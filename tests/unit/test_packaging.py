"""What a user installs: the wheel (py.typed, the unit, the example config, the fail2ban files), a fresh venv
where `autonat --version` and `autonat run --check` work, and a systemd unit systemd itself accepts."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SHIPPED = {
    "autonat/py.typed",
    "autonat/data/autonat.toml",
    "autonat/data/autonat.service",
    "autonat/data/fail2ban/filter.conf",
    "autonat/data/fail2ban/jail.conf",
    "autonat/web/static/index.html",
    "autonat/web/static/style.css",
    "autonat/web/static/app.js",
    "autonat/web/static/icon.svg",
}


def run(*argv: str | Path, timeout: float = 300, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=timeout, check=False, **kw)  # type: ignore[call-overload, no-any-return]


@pytest.mark.slow
def test_the_wheel_ships_its_files_and_installs_into_a_fresh_venv(tmp_path: Path) -> None:
    built = run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", tmp_path / "dist", REPO)
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("autonat-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert names >= SHIPPED, SHIPPED - names
    assert any(name.endswith("licenses/LICENSE") for name in names)
    venv = tmp_path / "venv"
    elsewhere = {"cwd": tmp_path, "env": {**os.environ, "PYTHONPATH": ""}}  # nothing of the clone
    assert run(sys.executable, "-m", "venv", venv).returncode == 0
    installed = run(venv / "bin" / "pip", "install", "-q", "--disable-pip-version-check", wheel, **elsewhere)
    assert installed.returncode == 0, installed.stderr[-2000:]
    autonat = venv / "bin" / "autonat"
    assert autonat.exists(), installed.stdout[-2000:]
    version = run(autonat, "--version", **elsewhere)
    assert version.returncode == 0 and version.stdout.startswith("autonat, version "), version.stderr
    example = run(autonat, "example", "config", **elsewhere)
    assert example.returncode == 0 and "[nat]" in example.stdout
    config = tmp_path / "autonat.toml"
    config.write_text(example.stdout)
    good = run(autonat, "run", "--check", "--config", config, **elsewhere)
    assert good.returncode == 0, good.stderr
    config.write_text("[nat]\nleese = 7200\n")
    bad = run(autonat, "run", "--check", "--config", config, **elsewhere)
    assert bad.returncode == 2 and bad.stderr.strip().endswith("unknown key nat.leese (did you mean nat.lease?)")


def test_the_examples_print_what_is_shipped_and_deploy_links_to_it() -> None:
    from click.testing import CliRunner

    from autonat.cli.daemon import EXAMPLES, example

    for what, name in EXAMPLES.items():
        shown = CliRunner().invoke(example, [what])
        assert shown.exit_code == 0
        assert shown.output == (REPO / "src" / "autonat" / "data" / name).read_text()
    for link in ("autonat.toml", "autonat.service", "fail2ban/filter.d/autonat.conf", "fail2ban/jail.d/autonat.conf"):
        path = REPO / "deploy" / link
        assert path.is_symlink() and path.resolve().is_relative_to(REPO / "src" / "autonat" / "data"), link


def test_systemd_accepts_the_unit(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze is missing (Debian's systemd package)"
    unit = tmp_path / "autonat.service"
    text = (REPO / "src" / "autonat" / "data" / "autonat.service").read_text()
    # verify checks that ExecStart's program exists: point it at this test's interpreter's autonat.
    unit.write_text(text.replace("/usr/local/bin/autonat", str(Path(sys.executable).with_name("autonat"))))
    checked = run(analyze, "verify", unit, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    for setting in ("Type=notify", "WatchdogSec=", "ExecReload=/bin/kill -HUP $MAINPID", "ProtectHome=read-only"):
        assert setting in text, setting


def test_the_version_is_said_once_in_the_code_and_the_same_in_pyproject() -> None:
    import tomllib

    import autonat
    from autonat.version import __version__

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["version"] == __version__ == autonat.__version__
