"""Break each defence of the worker port on purpose and check that a test fails.

Each mutant below is one check of rust/zmtp removed or weakened. For each, the file is
changed in place, ``cargo test --lib zmtp::`` runs, and the file is restored (also on
Ctrl-C). A mutant no test catches is a defence without evidence; the script exits 1.

    python scripts/security_mutants.py            # every mutant (a build each: minutes)
    python scripts/security_mutants.py vouch-server nonce

Prints one line per mutant: its name, what it breaks, and the tests that failed.
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CURVE = "rust/zmtp/curve.rs"
ROUTER = "rust/zmtp/router.rs"
CONN = "rust/zmtp/conn.rs"


@dataclass(frozen=True)
class Mutant:
    name: str
    breaks: str
    path: str
    old: str
    new: str


MUTANTS = [
    Mutant("hello-version", "the HELLO's CurveZMQ version is not checked", CURVE,
           "if cmd[6] != 1 || cmd[7] != 0 {", "if false {"),
    Mutant("hello-zeros", "the HELLO signature's 64 zeros are not checked", CURVE,
           "if signature.iter().any(|&b| b != 0) {", "if false {"),
    Mutant("cookie", "the INITIATE's cookie is not checked", CURVE,
           "if !cookie.is_some_and(", "if false && !cookie.is_some_and("),
    Mutant("vouch-box", "the vouch is taken without opening its box (anyone can claim a key)", CURVE,
           "open(&plain[48..128], &nonce(b\"VOUCH---\", &plain[32..48]), &vk).ok_or_else(",
           "Some([&client_short[..], &server.public[..]].concat()).ok_or_else("),
    Mutant("vouch-short", "the vouch's short-term key is not compared", CURVE,
           "if vouch[..32] != client_short[..] {", "if false {"),
    Mutant("vouch-server", "the vouch's server key is not compared", CURVE,
           "if vouch[32..] != server.public[..] {", "if false {"),
    Mutant("allowed-set", "any key is admitted", CURVE,
           "if !server.admits(&client_long) {", "if false {"),
    Mutant("nonce", "MESSAGE nonces need not rise (replays open)", CURVE,
           "if n <= self.recv_nonce {", "if false {"),
    Mutant("reflection", "a MESSAGE opens under the server's nonce prefix too", CURVE,
           "let mut m = open(c, &nonce(b\"CurveZMQMESSAGEC\", tail), &self.precomputed)",
           "let mut m = open(c, &nonce(b\"CurveZMQMESSAGEC\", tail), &self.precomputed)"
           ".or_else(|| open(c, &nonce(b\"CurveZMQMESSAGES\", tail), &self.precomputed))"),
    Mutant("plaintext", "a frame that is not a MESSAGE box passes in the clear after CURVE", CONN,
           "                    Some(s) => {\n                        let (f, d) = s.decode(body)?;",
           "                    Some(s) if body.starts_with(b\"\\x07MESSAGE\") => {\n"
           "                        let (f, d) = s.decode(body)?;"),
    Mutant("handshake-frame", "frames over 64 KiB are taken before the handshake ends", CONN,
           "if !self.is_ready() && size > HANDSHAKE_FRAME {", "if false {"),
    Mutant("timeout", "a handshake never times out", ROUTER,
           "if deadline > now {", "if true {"),
    Mutant("per-source", "one address may hold any number of handshakes", ROUTER,
           "if mine >= limits.max_pending_per_source {", "if false {"),
    Mutant("max-pending", "no cap on handshakes in all", ROUTER,
           "while self.pending >= limits.max_pending {", "while false {"),
    Mutant("steps-per-turn", "handshake work per turn is unbounded", ROUTER,
           "if self.steps >= self.options.handshakes.steps_per_turn", "if false"),
]


def run(m: Mutant) -> list[str]:
    """The tests that fail with `m` applied (an empty list: the mutant survived)."""
    path = ROOT / m.path
    original = path.read_text()
    if original.count(m.old) != 1:
        raise SystemExit(f"{m.name}: the code it breaks is not (once) in {m.path}; update the mutant")
    mutated = original.replace(m.old, m.new)
    if m.name == "plaintext":  # the fall-through arm that lets the clear frame pass
        mutated = mutated.replace("                    None => (flags, Cow::Borrowed(body)),",
                                  "                    _ => (flags, Cow::Borrowed(body)),", 1)
    try:
        path.write_text(mutated)
        out = subprocess.run(["cargo", "test", "--lib", "-q", "zmtp::"], cwd=ROOT,
                             capture_output=True, text=True)
    finally:
        path.write_text(original)
    text = out.stdout + out.stderr
    if "error[" in text or "could not compile" in text:
        raise SystemExit(f"{m.name}: the mutant does not build:\n{text[-3000:]}")
    return sorted(set(re.findall(r"^    (zmtp::\S+)$", text, re.M)))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("names", nargs="*", help="mutants to run (default: all)")
    args = p.parse_args()
    chosen = [m for m in MUTANTS if not args.names or m.name in args.names]
    survived = []
    for m in chosen:
        failed = run(m)
        print(f"{m.name:16} {m.breaks}\n{'':16} caught by: {', '.join(failed) or 'NOTHING'}", flush=True)
        if not failed:
            survived.append(m.name)
    if survived:
        print(f"survived: {', '.join(survived)}")
        return 1
    print(f"all {len(chosen)} mutants caught")
    return 0


if __name__ == "__main__":
    sys.exit(main())
