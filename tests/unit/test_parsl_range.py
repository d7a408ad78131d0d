"""The supported Parsl range (pyproject.toml, issue #7) is what the installed htex_rs
checks at import: a Parsl outside it fails with the fix named."""
from __future__ import annotations

import importlib.metadata
import os
import re

import parsl
import pytest

from htex_rs import parsl_range
from support import REPO_ROOT


def test_the_range_checked_is_the_one_in_pyproject_and_holds_the_installed_parsl():
    text = open(os.path.join(REPO_ROOT, "pyproject.toml")).read()
    low, high = re.search(r'"parsl>=([\d.]+),<([\d.]+)"', text).groups()
    assert parsl_range.supported() == (low, high), "the installed htex_rs was built from another pyproject.toml"
    assert parsl_range.release(low) <= parsl_range.release(parsl.__version__) < parsl_range.release(high)
    parsl_range.check()  # the Parsl under test is in range


@pytest.mark.parametrize("version", ["2026.5.4", "2027.12.6", "2030.1.1"])
def test_a_parsl_outside_the_range_fails_with_the_fix(monkeypatch, version):
    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda d: version if d == "parsl" else real(d))
    monkeypatch.delenv(parsl_range.OVERRIDE, raising=False)
    low, high = parsl_range.supported()
    with pytest.raises(ImportError) as e:
        parsl_range.check()
    assert f"Parsl {version} is installed" in str(e.value)
    assert f"pip install 'parsl>={low},<{high}'" in str(e.value)
    monkeypatch.setenv(parsl_range.OVERRIDE, "1")
    parsl_range.check()  # the override lets a user try it


def test_release_reads_parsl_versions_as_dates():
    assert parsl_range.release("2026.05.18") == (2026, 5, 18) == parsl_range.release("2026.5.18")
    assert parsl_range.release("2026.10.26") > parsl_range.release("2026.9.28")
