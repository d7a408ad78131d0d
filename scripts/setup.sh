#!/usr/bin/env bash
# Install everything htex_rs needs on a fresh Debian machine: libzmq with CURVE (apt),
# then a virtual environment at .venv with htex_rs built from source and its test tools.
set -euo pipefail
cd "$(dirname "$0")/.."
SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
# libzmq3-dev: libzmq built with libsodium (CURVE). openssh-server + rsync: the rsync
# staging tests run a private sshd on loopback. openssl: the HTTPS test certificate.
# slurmd slurmctld slurm-client munge: the provider tests run a one-node Slurm cluster
# on loopback (tests/slurm_cluster.py); nothing is started system-wide.
APT_PACKAGES="libzmq3-dev openssh-server rsync openssl slurmd slurmctld slurm-client munge"
missing=$(for p in $APT_PACKAGES; do dpkg -s "$p" >/dev/null 2>&1 || echo "$p"; done)
if [ -n "$missing" ]; then
    echo "==> installing" $missing
    $SUDO apt-get update -qq
    # policy-rc.d 101: do not start the system sshd; the tests start their own.
    made_policy=""
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' | $SUDO tee /usr/sbin/policy-rc.d >/dev/null
        $SUDO chmod +x /usr/sbin/policy-rc.d
        made_policy=1
    fi
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $missing >/dev/null
    if [ -n "$made_policy" ]; then $SUDO rm -f /usr/sbin/policy-rc.d; fi
fi
if [ ! -x .venv/bin/python ]; then
    echo "==> creating .venv"
    python3 -m venv .venv
fi
echo "==> building and installing htex_rs (Rust extension via maturin) into .venv"
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -e ".[test]"
.venv/bin/python -c "import htex_rs._core as c; assert c.HAS_CURVE, 'libzmq without CURVE'; print('htex_rs', c.VERSION, 'protocol v%d' % c.PROTOCOL_VERSION, 'CURVE ok')"
