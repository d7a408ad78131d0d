#!/usr/bin/env bash
# Set everything up, then run a small Parsl workflow on htex_rs with local workers.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python examples/demo.py
