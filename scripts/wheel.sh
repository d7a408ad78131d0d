#!/usr/bin/env bash
# Build what users install: dist/htex_rs-<version>-cp310-abi3-manylinux_2_28_x86_64.whl
# (libzmq and libsodium compiled from source and linked into the extension statically,
# CURVE on; glibc 2.28 through zig's glibc stubs) and the sdist beside it. Then check the
# wheel: its tag, `auditwheel show`, no libzmq/libsodium NEEDED, no glibc symbol newer
# than the tag, CURVE present. The build tools live in .wheel-venv, pinned.
#
#   bash scripts/wheel.sh            # wheel + sdist in dist/
set -euo pipefail
cd "$(dirname "$0")/.."
GLIBC=2.28
TOOLS=.wheel-venv
if [ ! -x "$TOOLS/bin/python" ]; then
    python3 -m venv "$TOOLS"
fi
"$TOOLS/bin/pip" install -q "maturin==1.16.0" "ziglang==0.15.2" "auditwheel==6.8.2"
# maturin finds zig as `python3 -m ziglang`: this environment's python3 first.
export PATH="$PWD/$TOOLS/bin:$PATH"
# zig's clang turns on UBSan traps at -O0; none of this is built at -O0, but a debug
# build must not turn undefined behaviour in C into SIGILL either.
export CFLAGS="${CFLAGS:-} -fno-sanitize=undefined" CXXFLAGS="${CXXFLAGS:-} -fno-sanitize=undefined"
rm -f dist/htex_rs-*.whl dist/htex_rs-*.tar.gz
"$TOOLS/bin/maturin" build --release --locked --zig --compatibility "manylinux_${GLIBC/./_}" -o dist
"$TOOLS/bin/maturin" sdist -o dist
wheel=$(ls dist/htex_rs-*-cp310-abi3-manylinux_${GLIBC/./_}_x86_64.whl)
echo "==> $wheel"
"$TOOLS/bin/auditwheel" show "$wheel"
"$TOOLS/bin/python" scripts/check_wheel.py "$wheel" --glibc "$GLIBC"
