"""The `extra` marker and require_extra (tests/optional_extras.py): a missing extra skips with the install command and
is counted at the end of the run; HF_PTQ_REQUIRE_EXTRAS=1 fails instead. Run in a pytest subprocess where hqq looks
uninstalled."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from optional_extras import EXTRAS, install_hint, missing_modules

TESTS = Path(__file__).resolve().parent
CONFTEST = """
import sys
sys.modules["hqq"] = None  # as if not installed: find_spec gives None, import raises
from optional_extras import pytest_configure, pytest_runtest_setup, pytest_terminal_summary
"""
SUITE = """
import pytest
from optional_extras import require_extra

@pytest.mark.extra("hqq")
def test_marked():
    pass

@pytest.mark.parametrize("n", [1, 2])
def test_inside(n):
    require_extra("hqq", "hqq")

def test_plain():
    pass
"""


def run_pytest(folder: Path, **env: str) -> subprocess.CompletedProcess:
    (folder / "pytest.ini").write_text("[pytest]\n")
    (folder / "conftest.py").write_text(CONFTEST)
    (folder / "test_suite.py").write_text(SUITE)
    environ = {**os.environ, "PYTHONPATH": str(TESTS), "HF_PTQ_REQUIRE_EXTRAS": "", **env}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-c", str(folder / "pytest.ini")]
    return subprocess.run(command, cwd=folder, env=environ, capture_output=True, text=True, timeout=120)


def test_missing_extra_skips_naming_the_install_and_is_counted(tmp_path):
    result = run_pytest(tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 passed, 3 skipped" in result.stdout
    assert "3 tests skipped: extra 'hqq' not installed (pip install -e '.[hqq]')" in result.stdout
    assert "HF_PTQ_REQUIRE_EXTRAS=1 makes these fail" in result.stdout


def test_require_extras_fails_instead_of_skipping(tmp_path):
    result = run_pytest(tmp_path, HF_PTQ_REQUIRE_EXTRAS="1")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "2 failed, 1 passed, 1 error" in result.stdout  # the marker fails in setup: an error
    assert "3 tests failed: extra 'hqq' not installed" in result.stdout
    assert "HF_PTQ_REQUIRE_EXTRAS=1 forbids skipping" in result.stdout


def test_every_extra_is_in_pyproject_and_unknown_extras_are_a_bug():
    text = (TESTS.parent / "pyproject.toml").read_text()
    assert all(f"\n{extra} = [" in text for extra in EXTRAS)
    assert install_hint("gguf") == "extra 'gguf' not installed (pip install -e '.[gguf]')"
    with pytest.raises(KeyError, match="unknown extra 'hqqq'"):
        missing_modules("hqqq")
