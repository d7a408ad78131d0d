"""A script that exits with the executor still running (no ``parsl.dfk().cleanup()``,
no ``shutdown()``; an uncaught exception or ``sys.exit``): Python must exit with the
script's own status, not crash at finalization, the pools must stop, outstanding tasks
fail (a later exit hook may wait on them), and a fork()ed child leaves the parent's
executor alone. Each case is a real script in its own interpreter, with a real pool."""
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
    import atexit, os, sys, time
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

    if how in ("standalone", "pending", "fork"):
        pending = []
        # Registered before the executor starts, so it runs after the executor's own exit
        # hook (last in, first out): the task it waits on must be failed by then.
        atexit.register(lambda: pending and print(type(pending[0].exception(timeout=60)).__name__, flush=True))
        ex.run_dir = run_dir
        ex.__enter__()  # started, never shut down
        print(ex.submit(pool_pid, {}).result(timeout=60), flush=True)
        if how == "pending":
            pending.append(ex.submit(time.sleep, {}, 60))
        if how == "fork":  # a child that exits normally runs the atexit hooks it inherited
            child = os.fork()
            if child == 0:
                sys.exit(0)
            deadline = time.monotonic() + 30
            while not os.waitpid(child, os.WNOHANG)[0]:
                if time.monotonic() > deadline:
                    os.kill(child, 9)
                    print("child hung at exit", flush=True)
                    break
                time.sleep(0.1)
            else:
                print("child exited", flush=True)
            print("parent", ex.submit(pool_pid, {}).result(timeout=60), flush=True)  # untouched by the child
    else:
        parsl.load(Config(executors=[ex], run_dir=run_dir))
        print(parsl.python_app(pool_pid)().result(timeout=60), flush=True)
    if how == "raise":
        raise RuntimeError("the script's own error")
    if how == "exit":
        sys.exit(3)
""")


@pytest.mark.parametrize("how, status", [("end", 0), ("raise", 1), ("exit", 3), ("standalone", 0),
                                         ("pending", 0), ("fork", 0)])
def test_exit_with_the_executor_running(tmp_path, how, status):
    script = tmp_path / "script.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, PATH=os.pathsep.join([os.path.dirname(sys.executable), os.environ["PATH"]]))
    out = subprocess.run([sys.executable, str(script), how, str(tmp_path / "runinfo")], capture_output=True,
                         text=True, timeout=100, env=env, cwd=tmp_path)
    assert out.returncode == status, f"rc={out.returncode}\n{out.stderr[-3000:]}"  # -11: crashed at exit
    if how == "raise":
        assert "RuntimeError: the script's own error" in out.stderr
    if how == "pending":  # failed at exit, not left for a later hook to wait 60 s on
        assert out.stdout.split()[1:] == ["BadStateException"], out.stdout
    if how == "fork":
        assert "child exited" in out.stdout and f"parent {out.stdout.split()[0]}" in out.stdout, out.stdout
    pool = int(out.stdout.split()[0])
    deadline = time.monotonic() + 30  # told to exit by the interchange, not left to heartbeats (120 s)
    while psutil.pid_exists(pool) and psutil.Process(pool).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline, f"pool {pool} still running after its submitter exited"
        time.sleep(0.2)
