"""The executor and the pool raise their soft RLIMIT_NOFILE to the hard limit at start,
and say once, with the fix, when the hard limit cannot cover the pools a provider may
start (Parsl #2165). Run in child processes with their own limits."""
from __future__ import annotations

import resource
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.timeout(120)

CHILD = textwrap.dedent("""
    import logging, resource, sys
    logging.basicConfig(level=logging.WARNING, stream=sys.stdout, format="%(levelname)s %(message)s")
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, {hard}))
    from parsl.providers import LocalProvider
    from htex_rs import HighThroughputExecutor
    ex = HighThroughputExecutor(label="fds", address="127.0.0.1", encrypted=False,
                                provider=LocalProvider(init_blocks=0, min_blocks=0, max_blocks={blocks}))
    ex.run_dir = sys.argv[1]
    ex.start()
    try:
        print("soft", resource.getrlimit(resource.RLIMIT_NOFILE)[0])
    finally:
        ex.shutdown()
""")


def run(tmp_path, hard, blocks):
    out = subprocess.run([sys.executable, "-c", CHILD.format(hard=hard, blocks=blocks), str(tmp_path)],
                         capture_output=True, text=True, timeout=100)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def test_the_soft_limit_is_raised_to_the_hard_limit_at_start(tmp_path):
    out = run(tmp_path, 4096, 10)
    assert "soft 4096" in out, out
    assert "ulimit -Hn" not in out, "no warning when the hard limit covers the pools"


def test_a_hard_limit_below_what_the_provider_may_start_is_reported_once_with_the_fix(tmp_path):
    out = run(tmp_path, 1024, 5000)
    assert "soft 1024" in out, out
    warnings = [line for line in out.splitlines() if "ulimit -Hn" in line]
    assert len(warnings) == 1, out
    assert "up to 5000 worker pools" in warnings[0] and "hard limit (ulimit -Hn) is 1024" in warnings[0]
    assert "limits.conf" in warnings[0]


def test_the_pool_raises_its_limit_too(load_dfk, tmp_path):
    """A pool started with a low soft limit (as a batch job may be) runs at its hard limit."""
    import parsl
    from parsl.config import Config
    from parsl.providers import LocalProvider

    from htex_rs import HighThroughputExecutor

    def soft_limit():
        import resource
        return resource.getrlimit(resource.RLIMIT_NOFILE)[0]

    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard == resource.RLIM_INFINITY or hard <= 300:
        pytest.skip(f"needs a finite hard limit above 300 (have {hard})")
    ex = HighThroughputExecutor(label="poolfds", address="127.0.0.1", max_workers_per_node=1, encrypted=False,
                                provider=LocalProvider(init_blocks=1, max_blocks=1,
                                                       worker_init="ulimit -Sn 300"))
    load_dfk(Config(executors=[ex], run_dir=str(tmp_path), strategy="none"))
    # The worker inherits the pool's raised limit.
    assert parsl.python_app(soft_limit)().result(timeout=60) == hard
