"""python/htex_rs/_core.pyi describes the native module as built: mypy's stubtest
compares every name, signature and default of the stub with the module it imports."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("mypy")


def test_the_stub_matches_the_native_module(tmp_path):
    allowlist = os.path.join(os.path.dirname(os.path.abspath(__file__)), "core_stub_allowlist.txt")
    out = subprocess.run([sys.executable, "-m", "mypy.stubtest", "htex_rs._core", "--allowlist", allowlist],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
