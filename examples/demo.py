"""A small Parsl workflow on htex_rs: estimate pi with 2,000 Monte Carlo tasks on
local worker processes, then combine them in a dependent task.

    python examples/demo.py        # needs tqdm (pip install tqdm) for its progress bar
"""
from __future__ import annotations

import sys
import tempfile
import time
from concurrent.futures import as_completed

import parsl
from parsl import python_app
from parsl.config import Config
from parsl.providers import LocalProvider
from tqdm import tqdm

from htex_rs import HighThroughputExecutor


@python_app
def sample(seed: int, n: int = 2_000) -> int:
    import random
    rng = random.Random(seed)
    return sum(1 for _ in range(n) if rng.random() ** 2 + rng.random() ** 2 <= 1.0)


@python_app
def combine(*hits: int, n: int = 2_000) -> float:
    return 4.0 * sum(hits) / (n * len(hits))


def main(tasks: int = 2_000) -> None:
    run_dir = tempfile.mkdtemp(prefix="htex_rs-demo-")
    config = Config(
        executors=[HighThroughputExecutor(
            label="htex_rs_demo",
            address="127.0.0.1",          # workers reach the interchange on loopback
            max_workers_per_node=2,
            provider=LocalProvider(init_blocks=1, max_blocks=1),
        )],
        run_dir=run_dir,
        strategy="none",
    )
    with parsl.load(config):
        t0 = time.perf_counter()
        futures = [sample(i) for i in range(tasks)]
        # A live bar on a terminal; in a CI log (not a tty) disable=None turns it off, so
        # the log holds the summary line below rather than a run of carriage returns.
        with tqdm(total=tasks, unit="task", desc="  sampling", file=sys.stdout, disable=None) as bar:
            for fut in as_completed(futures):
                fut.result()
                bar.update()
        pi = combine(*futures).result()
        dt = time.perf_counter() - t0
    print(f"pi ~= {pi:.4f} from {tasks} tasks in {dt:.2f} s ({tasks / dt:.0f} tasks/s); logs in {run_dir}")


if __name__ == "__main__":
    main()
