"""A pool's block end: the override, Slurm's word, the provider's walltime, and the errors
a user sees for values that are not times."""
from __future__ import annotations

import pytest

from htex_rs.block_end import BlockEndError, block_end, parse_walltime


@pytest.mark.parametrize("text, seconds", [
    ("01:30:00", 5400.0), ("30:00", 1800.0), ("45", 45.0), ("1-00:00:10", 86410.0), (None, None),
    ("None", None), ("00:00:00", None), (3600, 3600.0),
])
def test_provider_walltimes_in_seconds(text, seconds):
    assert parse_walltime(text) == seconds


@pytest.mark.parametrize("bad", ["soon", "1:2:3:4", "-5", "01:xx:00"])
def test_a_walltime_that_is_not_a_duration_says_how_to_write_one(bad):
    with pytest.raises(BlockEndError, match="HH:MM:SS"):
        parse_walltime(bad)


def test_the_explicit_end_wins_then_slurm_then_the_walltime():
    env = {"HTEX_RS_BLOCK_END": "2000000000", "SLURM_JOB_END_TIME": "1900000000"}
    assert block_end(600, 1000.0, env) == 2e9
    del env["HTEX_RS_BLOCK_END"]
    assert block_end(600, 1000.0, env) == 1.9e9
    assert block_end(600, 1000.0, {}) == 1600.0
    assert block_end(None, 1000.0, {}) is None


def test_an_override_that_is_not_a_time_fails_with_the_fix():
    with pytest.raises(BlockEndError, match="seconds since the epoch"):
        block_end(None, 0.0, {"HTEX_RS_BLOCK_END": "tomorrow"})


def test_plan_shows_the_block_end_and_where_it_came_from():
    import json
    import os
    import subprocess
    import sys
    import time
    env = dict(os.environ, HTEX_RS_BLOCK_END=str(int(time.time()) + 600))
    out = subprocess.run([sys.executable, "-m", "htex_rs.cli", "plan", "--workers", "1", "--json"], env=env,
                         capture_output=True, text=True, check=True).stdout
    block = json.loads(out)["block"]
    assert block["source"] == "HTEX_RS_BLOCK_END" and 590 < block["time_left"] <= 600
    env.pop("HTEX_RS_BLOCK_END")
    env.pop("SLURM_JOB_ID", None)
    text = subprocess.run([sys.executable, "-m", "htex_rs.cli", "plan", "--workers", "1", "--walltime", "00:10:00"],
                          env=env, capture_output=True, text=True, check=True).stdout
    assert "block: ends in 600 s (walltime)" in text, text
