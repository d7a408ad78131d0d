"""htex_rs.serialization end to end: a user script runs as __main__ against real worker
pools, and its classes and functions must travel by value, as with Parsl. (The
serializer's own cases are tests/unit/test_serialization.py.)"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.timeout(120)

SCRIPT = textwrap.dedent("""
    import sys
    from parsl.providers import LocalProvider
    from htex_rs import HighThroughputExecutor

    class Point:
        def __init__(self, x):
            self.x = x

    def double(p, scale=lambda v: 2 * v):
        return type(p)(scale(p.x))  # a __main__ function sees the worker's globals, as in Parsl

    ex = HighThroughputExecutor(label="main", address="127.0.0.1", max_workers_per_node=1,
                                provider=LocalProvider(init_blocks=1, max_blocks=1))
    ex.run_dir = sys.argv[1]
    with ex:
        out = ex.submit(double, {}, Point(21)).result(timeout=60)
        plain = ex.submit(max, {}, [3, 9, 4]).result(timeout=60)
    print(type(out).__module__, out.x, plain)
""")


def test_a_scripts_own_classes_and_functions_travel_by_value(tmp_path):
    script = tmp_path / "user_script.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, PATH=os.pathsep.join([os.path.dirname(sys.executable), os.environ["PATH"]]))
    out = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True,
                         timeout=100, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["__main__", "42", "9"]
