"""``scripts/verify_clients.py`` without its clients: the help, and what it says when the
throwaway venv is missing. (Running the clients needs ccxt, pyupbit and cryptofeed, which are
not the project's dependencies: not in CI; see the script's docstring.)"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from broker.testing import clean_env, scaled

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "verify_clients.py"


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args],
        capture_output=True,
        text=True,
        timeout=scaled(30),
        check=False,
        env=clean_env(COLUMNS="200"),
    )


def test_help_runs_on_the_standard_library_alone() -> None:
    """The clients' venv runs this very file: its top level must import nothing but the
    standard library (``-S``: no site-packages, not even the project's)."""
    result = run("-I", "-S", str(SCRIPT), "--help")
    assert result.returncode == 0, result.stderr
    for said in ("venv", "--seconds", "--drop", "--json", "ccxt==", "pyupbit==", "cryptofeed=="):
        assert said in result.stdout, said
    assert "--client" not in result.stdout  # the clients' own entry is not for people


def test_a_missing_venv_says_how_to_make_it(tmp_path: Path) -> None:
    venv = tmp_path / "no-such-venv"
    result = run(str(SCRIPT), str(venv))
    assert result.returncode == 2
    assert f"no venv at {venv}" in result.stderr
    assert f"python3 -m venv {venv}" in result.stderr
    assert f"{venv}/bin/pip install ccxt==" in result.stderr
    assert "Traceback" not in result.stderr
