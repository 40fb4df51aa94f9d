"""The package's layering (ARCHITECTURE.md), as import-linter contracts in pyproject.toml: lower
layers never import higher ones, and no experiment imports another. Also the size rule: no module
over 400 lines."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MAX_MODULE_LINES = 400


def _lint_imports(cwd: Path, source_root: Path) -> subprocess.CompletedProcess:
    """`lint-imports` with the contracts of `cwd`/pyproject.toml, analysing the conca under `source_root`."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(source_root), os.environ.get("PYTHONPATH", "")])}
    code = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"
    return subprocess.run([sys.executable, "-c", code, "--no-cache"], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def test_import_contracts_hold():
    pytest.importorskip("importlinter", reason="import-linter comes with the test extra")
    result = _lint_imports(REPO, REPO / "src")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_an_upward_import_breaks_the_layer_contract(tmp_path):
    """The contracts have teeth: the bottom layer importing an experiment is reported, by name."""
    pytest.importorskip("importlinter", reason="import-linter comes with the test extra")
    shutil.copytree(REPO / "src" / "conca", tmp_path / "src" / "conca",
                    ignore=shutil.ignore_patterns("__pycache__", "data"))
    (tmp_path / "src" / "conca" / "data").mkdir()
    (tmp_path / "src" / "conca" / "data" / "__init__.py").write_text("")
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    fileio = tmp_path / "src" / "conca" / "fileio.py"
    fileio.write_text(fileio.read_text() + "\n\ndef _upward():\n    import conca.experiments.demo  # noqa: F401\n")
    result = _lint_imports(tmp_path, tmp_path / "src")
    assert result.returncode == 1
    assert "BROKEN" in result.stdout and "conca.fileio -> conca.experiments.demo" in result.stdout


def test_no_module_is_over_400_lines():
    sizes = {path.relative_to(REPO).as_posix(): len(path.read_text(encoding="utf-8").splitlines())
             for path in (REPO / "src").rglob("*.py")}
    assert {path: n for path, n in sizes.items() if n > MAX_MODULE_LINES} == {}
