"""Load an endpoint's config.py the way globus-compute-endpoint does, start its engine,
run functions through it and check that htex_rs's executor ran them.

    python run_endpoint_config.py ENDPOINT_DIR RUN_DIR

Run in an environment with globus-compute-endpoint (tests/compat/test_globus_compute_engine.py
runs it on the README's example). No Globus service is contacted: the engine is driven
directly, as the endpoint's own engine tests do.
"""
from __future__ import annotations

import pathlib
import sys
import uuid

from globus_compute_common import messagepack
from globus_compute_endpoint.endpoint.config.utils import get_config
from globus_compute_endpoint.engines import GCFuture
from globus_compute_sdk.serialize import ComputeSerializer

import htex_rs


def double(x: int) -> int:
    return 2 * x


def main(endpoint_dir: str, run_dir: str) -> None:
    config = get_config(pathlib.Path(endpoint_dir))
    engine = config.engine
    assert isinstance(engine.executor, htex_rs.HighThroughputExecutor), type(engine.executor)
    engine.start(endpoint_id=uuid.uuid4(), run_dir=run_dir)
    serde = ComputeSerializer()
    try:
        futures = []
        for i in range(20):
            task_id = uuid.uuid4()
            body = serde.pack_buffers([serde.serialize(double), serde.serialize((i,)), serde.serialize({})])
            f = GCFuture(task_id)
            engine.submit(f, messagepack.pack(messagepack.message_types.Task(task_id=task_id, task_buffer=body)), {})
            futures.append((i, task_id, f))
        for i, task_id, f in futures:
            result = messagepack.unpack(f.result(timeout=120))
            assert result.task_id == task_id and not result.error_details, result
            assert serde.deserialize(result.data) == 2 * i
        print(f"ok: 20 functions ran on {type(engine.executor).__module__}.{type(engine.executor).__name__} "
              f"(label {engine.executor.label!r}, pools given {sorted(engine.executor.all_addresses)})")
    finally:
        engine.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
