"""Logging set-up for the worker pool and its workers: Parsl's file layout by default, or
the user's Parsl ``LogConfig`` (``Config(initialize_logging=...)``), which the executor
pickles to ``{logdir}/log_config/log_config.pkl`` and passes as ``--logconf``."""
from __future__ import annotations

import logging
import os
import pathlib
import pickle
from typing import Optional

FORMAT = ("%(asctime)s.%(msecs)03d %(name)s:%(lineno)d %(processName)s(%(process)d) "
          "%(threadName)s %(funcName)s [%(levelname)s] %(message)s")


def setup(log_dir: str, log_name: str, debug: bool, logconf: Optional[str] = None) -> None:
    """``{log_dir}/{log_name}.log``, or whatever the pickled LogConfig at ``logconf`` does
    with ``log_dir`` and ``log_name`` (as Parsl's process_worker_pool does)."""
    if logconf:
        from parsl.logconfigs.base import oneshot_initialize_logging
        with open(logconf, "rb") as f:
            config = pickle.load(f)
        oneshot_initialize_logging(log_config=config, log_dir=pathlib.Path(log_dir), log_name=log_name)
        return
    os.makedirs(log_dir, exist_ok=True)
    handler = logging.FileHandler(os.path.join(log_dir, log_name + ".log"))
    handler.setFormatter(logging.Formatter(FORMAT, datefmt="%Y-%m-%d %H:%M:%S"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if debug else logging.INFO)
