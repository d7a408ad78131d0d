"""htex_rs.serialization: the C pickler where it means what dill means, dill (Parsl's own
path) where it does not, and a reader for both and for Parsl's bytes. The end-to-end test
(a user script as __main__ against real worker pools) is
tests/integration/test_serialization_e2e.py."""
from __future__ import annotations

import sys

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
