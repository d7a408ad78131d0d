"""htex_rs.serialization: the C pickler where it means what dill means, dill (Parsl's own
path) where it does not, and a reader for both and for Parsl's bytes. The end-to-end test
runs a user script as __main__ against real worker pools: its classes and functions must
travel by value, as with Parsl."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
from parsl.serialize import facade
from parsl.serialize import pack_apply_message as parsl_pack_apply_message
from parsl.serialize.concretes import PickleSerializer

from htex_rs import serialization

pytestmark = pytest.mark.timeout(120)


def add(a, b=0):
    return a + b


def test_plain_data_is_c_pickled_and_reads_back():
    for obj in (5, "text", None, (1, 2.5, b"x"), {"k": [1, {2, 3}]}, ValueError("kept")):
        data = serialization.serialize(obj)
        assert data.startswith(b"01\n"), obj
        back = serialization.deserialize(data)
        assert (back.args, type(back)) == (obj.args, ValueError) if isinstance(obj, ValueError) else back == obj


def test_what_pickle_cannot_write_or_names_main_goes_through_dill():
    def local(x):
        return x * 3

    data = serialization.serialize((lambda y: y + 1, local))
    assert data.startswith(b"02\n")  # Parsl's DillSerializer
    inc, triple = serialization.deserialize(data)
    assert (inc(1), triple(2)) == (2, 6)

    main = sys.modules["__main__"]
    cls = type("DefinedInMain", (), {"__module__": "__main__", "v": 7})
    main.DefinedInMain = cls  # type: ignore[attr-defined]
    try:
        data = serialization.serialize([cls()])
        assert data.startswith(b"02\n"), "a __main__ class travels by value, as dill sends it"
        assert serialization.deserialize(data)[0].v == 7
    finally:
        del main.DefinedInMain  # type: ignore[attr-defined]


def test_plain_data_skips_the_look_for_main_and_anything_else_still_takes_it():
    import numpy

    # Plain data over 64 KiB: not searched, nothing of __main__ can be named, even by text
    # that contains the word (a small pickle is searched: quicker than the object).
    for obj in ((b"__main__" * 10_000,), {"k": ["__main__" * 10_000, 1.5]}, numpy.arange(10_000)):
        assert serialization._plain(obj), obj
        data = serialization.serialize(obj)
        assert data.startswith(b"01\n")
        back = serialization.deserialize(data)
        assert (back == obj).all() if isinstance(obj, numpy.ndarray) else back == obj
    main = sys.modules["__main__"]
    cls = type("InMain", (), {"__module__": "__main__"})
    main.InMain = cls  # type: ignore[attr-defined]
    try:
        # Not plain (a class, an object array, deeper nesting): the pickle is searched.
        for obj in ((cls(),), numpy.array([cls()], dtype=object), [[[cls()]]], {"k": {"j": [cls()]}}):
            assert not serialization._plain(obj), obj
            assert serialization.serialize(obj).startswith(b"02\n"), obj
    finally:
        del main.InMain  # type: ignore[attr-defined]


def test_a_users_own_data_serializer_keeps_parsls_path(monkeypatch):
    monkeypatch.setattr(facade, "methods_for_data", {b"01": PickleSerializer(), **facade.methods_for_data})
    assert serialization.serialize({"a": 1}) == facade.serialize({"a": 1})


def test_apply_messages_read_parsls_and_ours():
    for pack in (parsl_pack_apply_message, serialization.pack_apply_message):
        packed = pack(add, (2,), {"b": 3})
        f, args, kwargs = serialization.unpack_apply_message(packed)
        assert f(*args, **kwargs) == 5
    assert serialization.pack_buffers([b"ab", b""]) == facade.pack_buffers([b"ab", b""])
    with pytest.raises(ValueError, match="claims 9 bytes"):
        serialization.unpack_buffers(b"9\nshort")


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
