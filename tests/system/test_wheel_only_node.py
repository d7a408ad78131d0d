"""A node with nothing but the wheel (issue #7): a fresh virtual environment with only
dist/'s htex_rs wheel installed (and what pip pulls in for it), the system's libzmq and
libsodium hidden by /dev/null bind mounts in a private mount namespace, runs an
encrypted Parsl workflow end to end: executor, interchange and worker pool all from
that environment. If the extension needed a system libzmq or libsodium, it would not
even import there."""
from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from support import REPO_ROOT

WHEELS = sorted(glob.glob(os.path.join(REPO_ROOT, "dist", "htex_rs-*-cp310-abi3-manylinux_*_x86_64.whl")))
SYSTEM_LIBS = sorted({os.path.realpath(p) for pattern in ("libzmq.so*", "libsodium.so*")
                      for d in ("/usr/lib/x86_64-linux-gnu", "/usr/lib", "/lib/x86_64-linux-gnu",
                                "/usr/local/lib")
                      for p in glob.glob(os.path.join(d, pattern))})

pytestmark = [
    pytest.mark.timeout(600),
    pytest.mark.skipif(not WHEELS, reason="no wheel in dist/: run scripts/wheel.sh first"),
    pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None,
                       reason="needs root and unshare for a private mount namespace"),
]

WORKFLOW = textwrap.dedent('''
    import os, sys, tempfile
    import parsl
    from parsl import bash_app, python_app
    from parsl.config import Config
    from parsl.providers import LocalProvider
    import htex_rs._core
    from htex_rs import HighThroughputExecutor

    assert htex_rs._core.HAS_CURVE, "the wheel's libzmq has no CURVE"

    def system_libs(pid):
        """Mapped libzmq/libsodium files that are not inside a Python environment."""
        with open(f"/proc/{pid}/maps") as f:
            paths = {line.split()[-1] for line in f if "/" in line}
        return sorted(p for p in paths if ("libzmq" in p or "libsodium" in p) and "-packages/" not in p)

    @python_app
    def pool_libs():
        import os
        with open(f"/proc/{os.getppid()}/maps") as f:  # the worker's parent: the pool
            paths = {line.split()[-1] for line in f if "/" in line}
        return sorted(p for p in paths if ("libzmq" in p or "libsodium" in p) and "-packages/" not in p)

    @python_app
    def square(x):
        return x * x

    @bash_app
    def hello(stdout=None):
        return "echo hello from a wheel-only node"

    run_dir = tempfile.mkdtemp()
    ex = HighThroughputExecutor(label="wheel_only", address="127.0.0.1", encrypted=True,
                                max_workers_per_node=2,
                                provider=LocalProvider(init_blocks=1, min_blocks=0, max_blocks=1))
    parsl.load(Config(executors=[ex], run_dir=run_dir, strategy="none"))
    try:
        assert [f.result(timeout=120) for f in [square(i) for i in range(20)]] == [i * i for i in range(20)]
        out = os.path.join(run_dir, "hello.out")
        hello(stdout=out).result(timeout=120)
        assert open(out).read().strip() == "hello from a wheel-only node"
        assert pool_libs().result(timeout=120) == [], "the pool mapped a system libzmq/libsodium"
        assert system_libs(os.getpid()) == [], "the client mapped a system libzmq/libsodium"
        print("WORKFLOW OK", htex_rs.__file__)
    finally:
        parsl.dfk().cleanup()
''')


def test_an_encrypted_workflow_runs_from_the_wheel_alone_with_system_libzmq_hidden(tmp_path):
    env_dir = tmp_path / "node"
    subprocess.run([sys.executable, "-m", "venv", str(env_dir)], check=True)
    pip = [str(env_dir / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    subprocess.run(pip + [WHEELS[-1]], check=True, timeout=500)
    script = tmp_path / "workflow.py"
    script.write_text(WORKFLOW)
    hide = "".join(f"mount --bind /dev/null {lib} && " for lib in SYSTEM_LIBS)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env["PATH"] = f"{env_dir / 'bin'}:/usr/bin:/bin:/usr/sbin:/sbin"
    run = subprocess.run(
        ["unshare", "-m", "--propagation", "private", "sh", "-c",
         f"{hide}exec {env_dir / 'bin' / 'python'} {script}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    print(run.stdout, run.stderr[-4000:], sep="\n")
    assert run.returncode == 0, run.stderr[-4000:]
    assert "WORKFLOW OK" in run.stdout
    assert str(env_dir) in run.stdout, "htex_rs came from somewhere other than the fresh environment"
    if SYSTEM_LIBS:  # proof that the hiding works: the system copy cannot be loaded there
        probe = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c",
                                f"{hide}exec python3 -c 'import ctypes; ctypes.CDLL(\"{SYSTEM_LIBS[0]}\")'"],
                               capture_output=True, text=True)
        assert probe.returncode != 0, "the bind mount did not hide " + SYSTEM_LIBS[0]
