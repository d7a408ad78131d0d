"""Check a built wheel's extension: no libzmq or libsodium needed at run time, no glibc
symbol version newer than the wheel's manylinux tag allows, CURVE compiled in. Exits non-zero, naming
what is wrong, otherwise prints what it found.

    python scripts/check_wheel.py dist/htex_rs-...whl --glibc 2.28
"""
from __future__ import annotations

import argparse
import importlib.machinery
import importlib.util
import re
import subprocess
import sys
import tempfile
import zipfile


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("wheel")
    p.add_argument("--glibc", required=True, help="the oldest glibc the tag promises, e.g. 2.28")
    args = p.parse_args()
    with zipfile.ZipFile(args.wheel) as z, tempfile.TemporaryDirectory() as d:
        [ext] = [n for n in z.namelist() if re.match(r"htex_rs/_core\..*so$", n)]
        path = z.extract(ext, d)
        dynamic = subprocess.run(["readelf", "-d", path], check=True, capture_output=True, text=True).stdout
        symbols = subprocess.run(["readelf", "-W", "--dyn-syms", path], check=True, capture_output=True,
                                 text=True).stdout
        curve = has_curve(path)
    needed = re.findall(r"\(NEEDED\)\s+Shared library: \[(.+?)\]", dynamic)
    versions = {tuple(map(int, v.split("."))) for v in re.findall(r"@GLIBC_([0-9.]+)", symbols)}
    newest = max(versions) if versions else (0,)
    limit = tuple(map(int, args.glibc.split(".")))
    problems = [f"needs {n} at run time" for n in needed if re.search(r"zmq|sodium|stdc\+\+", n)]
    if not curve:
        problems.append("libzmq was built without CURVE (encrypted=True could not work)")
    if newest > limit:
        problems.append(f"uses glibc {'.'.join(map(str, newest))} symbols, newer than {args.glibc}")
    print(f"{ext}: NEEDED {', '.join(needed)}; newest glibc symbol version "
          f"{'.'.join(map(str, newest))}")
    if problems:
        sys.exit("wheel check failed: " + "; ".join(problems))
    print("wheel check ok: CURVE on, no libzmq/libsodium/libstdc++ needed, glibc <=", args.glibc)


def has_curve(path: str) -> bool:
    """Load the extension on its own (not the package, which imports Parsl)."""
    loader = importlib.machinery.ExtensionFileLoader("htex_rs._core", path)
    spec = importlib.util.spec_from_file_location("htex_rs._core", path, loader=loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return bool(module.HAS_CURVE)


if __name__ == "__main__":
    main()
