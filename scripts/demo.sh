#!/usr/bin/env bash
# Set everything up, then run a small Parsl workflow on htex_rs with local workers.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The worker pools are started as `htex-rs-worker-pool`, found on PATH as Parsl finds
# process_worker_pool.py: put the environment's bin first.
export PATH="$PWD/.venv/bin:$PATH"
exec python examples/demo.py
