#!/usr/bin/env bash
# Install everything htex_rs needs on a fresh Debian machine: libzmq with CURVE (apt),
# then a virtual environment at .venv with htex_rs built from source and its test tools.
set -euo pipefail
cd "$(dirname "$0")/.."
SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
if ! dpkg -s libzmq3-dev >/dev/null 2>&1; then
    echo "==> installing libzmq3-dev (libzmq built with libsodium, for CURVE)"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq libzmq3-dev >/dev/null
fi
if [ ! -x .venv/bin/python ]; then
    echo "==> creating .venv"
    python3 -m venv .venv
fi
echo "==> building and installing htex_rs (Rust extension via maturin) into .venv"
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -e ".[test]"
.venv/bin/python -c "import htex_rs._core as c; assert c.HAS_CURVE, 'libzmq without CURVE'; print('htex_rs', c.VERSION, 'protocol v%d' % c.PROTOCOL_VERSION, 'CURVE ok')"
