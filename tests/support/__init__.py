"""Helpers shared by the test kinds (``from support import fault_ledger``): tests/ is on
sys.path (pyproject.toml's ``pythonpath``), and each test module is imported by its own
name from its own folder (pytest's default import mode; the test folders are not packages).

Worker processes unpickle a function defined in a test module by that module's name, so
they need the module's folder on their path, and tests/ for the helpers it imports."""
from __future__ import annotations

import os

TESTS_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPO_ROOT = os.path.dirname(TESTS_DIR)


def module_dirs(test_file: str | os.PathLike[str]) -> list[str]:
    """What a process needs on its path to import the test module at ``test_file`` by
    name: its folder (tests/unit, tests/integration, ...) and tests/ (for ``support``)."""
    return [os.path.dirname(os.path.abspath(test_file)), TESTS_DIR]


def worker_pythonpath(test_file: str | os.PathLike[str]) -> str:
    """PYTHONPATH for the pools and workers a test starts: ``module_dirs`` first, then
    whatever PYTHONPATH already holds."""
    return os.pathsep.join([*module_dirs(test_file), *filter(None, [os.environ.get("PYTHONPATH")])])
