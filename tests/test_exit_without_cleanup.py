"""A script that exits with the executor still running (no ``parsl.dfk().cleanup()``,
no ``shutdown()``; an uncaught exception or ``sys.exit``): Python must exit with the
script's own status, not crash at finalization, and the pools must stop. Each case is
a real script in its own interpreter, with a real pool."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

pytestmark = pytest.mark.timeout(120)

SCRIPT = textwrap.dedent("""
    import os, sys
    import parsl
    from parsl.config import Config
    from parsl.providers import LocalProvider
    from htex_rs import HighThroughputExecutor

    how, run_dir = sys.argv[1], sys.argv[2]
    ex = HighThroughputExecutor(label="exits", address="127.0.0.1", max_workers_per_node=1,
                                provider=LocalProvider(init_blocks=1, max_blocks=1))

    def pool_pid():
        import os
        return os.getppid()  # a worker's parent is its pool

    if how == "standalone":
        ex.run_dir = run_dir
        ex.__enter__()  # started, never shut down
        print(ex.submit(pool_pid, {}).result(timeout=60), flush=True)
    else:
        parsl.load(Config(executors=[ex], run_dir=run_dir))
        print(parsl.python_app(pool_pid)().result(timeout=60), flush=True)
    if how == "raise":
        raise RuntimeError("the script's own error")
    if how == "exit":
        sys.exit(3)
""")


@pytest.mark.parametrize("how, status", [("end", 0), ("raise", 1), ("exit", 3), ("standalone", 0)])
def test_exit_with_the_executor_running(tmp_path, how, status):
    script = tmp_path / "script.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, PATH=os.pathsep.join([os.path.dirname(sys.executable), os.environ["PATH"]]))
    out = subprocess.run([sys.executable, str(script), how, str(tmp_path / "runinfo")], capture_output=True,
                         text=True, timeout=100, env=env, cwd=tmp_path)
    assert out.returncode == status, f"rc={out.returncode}\n{out.stderr[-3000:]}"  # -11: crashed at exit
    if how == "raise":
        assert "RuntimeError: the script's own error" in out.stderr
    pool = int(out.stdout.split()[0])
    deadline = time.monotonic() + 30  # told to exit by the interchange, not left to heartbeats (120 s)
    while psutil.pid_exists(pool) and psutil.Process(pool).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline, f"pool {pool} still running after its submitter exited"
        time.sleep(0.2)
