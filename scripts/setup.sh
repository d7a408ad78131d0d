#!/usr/bin/env bash
# Install everything htex_rs's tests need on a fresh Debian machine: the servers the
# tests start (apt), the wheel users install (scripts/wheel.sh: libzmq and libsodium
# inside), and virtual environments with that wheel and the test tools: .venv with the
# newest Parsl htex_rs supports, .venv-parsl-oldest with the oldest, .venv-gce with a
# Globus Compute endpoint (its engine tests run on htex_rs: tests/compat/test_globus_compute_engine.py).
set -euo pipefail
cd "$(dirname "$0")/.."
SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
# openssh-server + rsync: the rsync
# staging tests run a private sshd on loopback. openssl: the HTTPS test certificate.
# slurmd slurmctld slurm-client munge: the provider tests run a one-node Slurm cluster
# on loopback (tests/support/slurm_cluster.py); nothing is started system-wide.
APT_PACKAGES="openssh-server rsync openssl slurmd slurmctld slurm-client munge"
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
echo "==> building the wheel (scripts/wheel.sh)"
bash scripts/wheel.sh
wheel=$(ls dist/htex_rs-*-cp310-abi3-manylinux_*_x86_64.whl)
# The oldest Parsl in pyproject.toml's range; the newest is whatever pip picks in it.
PARSL_OLDEST=$(sed -n 's/.*"parsl>=\([0-9.]*\),.*/\1/p' pyproject.toml)
for env in .venv .venv-parsl-oldest; do
    if [ ! -x $env/bin/python ]; then
        echo "==> creating $env"
        python3 -m venv $env
    fi
    echo "==> installing $wheel and the test tools into $env"
    $env/bin/pip install -q --upgrade pip
    pin=""; [ $env = .venv-parsl-oldest ] && pin="parsl[monitoring]==$PARSL_OLDEST"
    $env/bin/pip install -q "$wheel[test]" $pin
    $env/bin/pip install -q --force-reinstall --no-deps "$wheel"  # this build, not an older 0.1.0
    $env/bin/python -c "import htex_rs._core as c, parsl; assert c.HAS_CURVE, 'libzmq without CURVE'; print('htex_rs', c.VERSION, 'protocol v%d' % c.PROTOCOL_VERSION, 'CURVE ok, parsl', parsl.__version__)"
done

# globus-compute-endpoint pins its own pytest (>= 9.1; Parsl's suite needs 7) and Parsl
# floor, so it gets an environment of its own; the version whose sdist tests we run.
GCE_VERSION=4.19.0
if [ ! -x .venv-gce/bin/python ]; then
    echo "==> creating .venv-gce"
    python3 -m venv .venv-gce
fi
echo "==> installing $wheel and globus-compute-endpoint $GCE_VERSION into .venv-gce"
.venv-gce/bin/pip install -q --upgrade pip
.venv-gce/bin/pip install -q "$wheel" "globus-compute-endpoint[test]==$GCE_VERSION"
.venv-gce/bin/pip install -q --force-reinstall --no-deps "$wheel"
.venv-gce/bin/python -c "import htex_rs, globus_compute_endpoint as g, parsl; print('htex_rs under globus-compute-endpoint', g.__version__, 'parsl', parsl.__version__)"
