"""The code passes `ruff check` and `mypy` as configured in pyproject.toml (the test extra installs both)."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(importlib.util.find_spec("ruff") is None, reason="ruff is not installed: pip install '.[test]'")
def test_ruff_check_passes():
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", str(REPO)], capture_output=True,
                            text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr


NO_MYPY = pytest.mark.skipif(importlib.util.find_spec("mypy") is None,
                             reason="mypy is not installed: pip install '.[test]'")


def _mypy(*args):
    """mypy as pyproject.toml configures it, run from the repository root."""
    return subprocess.run([sys.executable, "-m", "mypy", "--config-file", str(REPO / "pyproject.toml"), *args],
                          capture_output=True, text=True, cwd=REPO, timeout=600)


@NO_MYPY
def test_the_package_type_checks_clean():
    result = _mypy()  # the files pyproject.toml names: npllama/
    assert result.returncode == 0, result.stdout + result.stderr


@NO_MYPY
def test_the_type_check_catches_a_missing_return_and_a_wrong_attribute(tmp_path):
    """The planted failure: the configuration that passes the package rejects these two mistakes."""
    wrong = tmp_path / "wrong.py"
    wrong.write_text("def count(n) -> int:\n"
                     "    if n:\n"
                     "        return 1\n"  # and nothing when n is 0
                     "\n"
                     "\n"
                     "def shout(word):\n"  # unannotated, as array code is: check_untyped_defs still reads it
                     "    return \"x\".no_such_attribute\n")
    result = _mypy("--cache-dir", str(tmp_path / "cache"), str(wrong))
    assert result.returncode == 1, result.stdout + result.stderr
    assert "wrong.py:1: error: Missing return statement  [return]" in result.stdout, result.stdout
    assert 'wrong.py:7: error: "str" has no attribute "no_such_attribute"  [attr-defined]' in result.stdout, \
        result.stdout
