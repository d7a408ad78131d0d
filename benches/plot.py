"""Plot docs/benchmarks.json (written by compare.py) as docs/benchmarks.png."""
from __future__ import annotations

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(src: str = "docs/benchmarks.json", dst: str = "docs/benchmarks.png") -> None:
    runs = json.load(open(src))
    if isinstance(runs, dict):
        runs = [runs]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    metrics = [("throughput", "submit, encrypted"), ("throughput_unencrypted", "submit, plain"),
               ("dfk_throughput", "through DFK")]
    labels, parsl, ours = [], [], []
    for run in runs:
        pf = run["args"]["prefetch"]
        for key, name in metrics:
            labels.append(f"{name}\nprefetch={pf}")
            parsl.append(run["median"]["parsl"][key])
            ours.append(run["median"]["htex_rs"][key])
    x = range(len(labels))
    ax = axes[0]
    ax.bar([i - 0.2 for i in x], parsl, 0.4, label="Parsl HTEX")
    ax.bar([i + 0.2 for i in x], ours, 0.4, label="htex_rs")
    ax.set_xticks(list(x), labels, fontsize=7, rotation=25, ha="right")
    ax.set_ylabel("no-op tasks / s (median)")
    ax.set_title("Throughput, 2 workers, same run")
    ax.legend()
    ax = axes[1]
    run = runs[0]
    names = ["median", "p99"]
    p = [run["median"]["parsl"]["lat_median_ms"], run["median"]["parsl"]["lat_p99_ms"]]
    r = [run["median"]["htex_rs"]["lat_median_ms"], run["median"]["htex_rs"]["lat_p99_ms"]]
    ax.bar([i - 0.2 for i in range(2)], p, 0.4, label="Parsl HTEX")
    ax.bar([i + 0.2 for i in range(2)], r, 0.4, label="htex_rs")
    ax.set_xticks(range(2), names)
    ax.set_ylabel("ms")
    ax.set_title("One-at-a-time round trip")
    ax.legend()
    fig.tight_layout()
    fig.savefig(dst, dpi=110)
    print(f"wrote {dst}")


if __name__ == "__main__":
    main(*sys.argv[1:])
