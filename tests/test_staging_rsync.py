"""RSyncStaging against a real sshd on 127.0.0.1 (a throwaway daemon with generated keys).

The "remote" side is the same machine in a different directory; nothing leaves loopback.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from types import SimpleNamespace

import parsl
import pytest
from parsl.app.app import python_app
from parsl.config import Config
from parsl.data_provider.files import File
from parsl.dataflow.dflow import DataFlowKernelLoader
from parsl.providers import LocalProvider
from parsl.utils import RepresentationMixin

from htex_rs import HighThroughputExecutor
from htex_rs.staging.errors import StagingError
from htex_rs.staging.rsync import RSyncStaging

SSHD = "/usr/sbin/sshd"
LOOPBACK = "127.0.0.1"
_missing = [p for p in (SSHD, "ssh", "ssh-keygen", "rsync") if shutil.which(p) is None]
pytestmark = pytest.mark.skipif(
    bool(_missing), reason=f"needs OpenSSH server/client and rsync; missing: {', '.join(_missing)} "
                           "(apt-get install openssh-server openssh-client rsync)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    """A private sshd on 127.0.0.1:<random port> that accepts one generated key; yields
    the ssh options a client needs to reach it."""
    d = tmp_path_factory.mktemp("sshd")
    host_key, user_key = d / "host_ed25519", d / "user_ed25519"
    for key in (host_key, user_key):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    # The client reads its identity from a directory with a space, to prove the -e
    # string rsync is given keeps such paths whole.
    key_dir = d / "client keys"
    key_dir.mkdir()
    client_key = key_dir / "id ed25519"
    shutil.copy(user_key, client_key)
    client_key.chmod(0o600)
    port = _free_port()
    config = d / "sshd_config"
    config.write_text("\n".join([
        f"ListenAddress {LOOPBACK}",
        f"Port {port}",
        f"HostKey {host_key}",
        f"AuthorizedKeysFile {user_key}.pub",
        f"PidFile {d / 'sshd.pid'}",
        "UsePAM no",
        "StrictModes no",
        "PermitRootLogin yes",
        "PubkeyAuthentication yes",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "",
    ]))
    if os.geteuid() == 0:
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege-separation dir
    log = open(d / "sshd.log", "wb")
    proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 15
        while True:
            if proc.poll() is not None:
                pytest.fail(f"sshd exited with {proc.returncode}: {(d / 'sshd.log').read_text()}")
            try:
                socket.create_connection((LOOPBACK, port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"sshd did not listen on {port}: {(d / 'sshd.log').read_text()}")
                time.sleep(0.05)
        yield ["-F", "/dev/null", "-p", str(port), "-i", str(client_key), "-o", "IdentitiesOnly=yes",
               "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
               "-o", "LogLevel=ERROR"]
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture
def provider(sshd) -> RSyncStaging:
    return RSyncStaging(LOOPBACK, ssh_options=sshd)


def _dm(working_dir) -> SimpleNamespace:
    """The one thing a Staging provider reads from the DataManager: the executor's working_dir."""
    return SimpleNamespace(dfk=SimpleNamespace(executors={"ex": SimpleNamespace(working_dir=str(working_dir))}))


def _read(f: File) -> str:
    with open(f) as fh:
        return fh.read()


def test_repr_is_valid(monkeypatch):
    monkeypatch.setattr(RepresentationMixin, "_validate_repr", True)
    r = repr(RSyncStaging("user@example.org", ssh_options=["-p", "2222"]))
    assert "user@example.org" in r and "2222" in r


@pytest.mark.parametrize("bad", ["", "-oProxyCommand=x", "a b"])
def test_rejects_hostnames_ssh_would_misread(bad):
    with pytest.raises(ValueError):
        RSyncStaging(bad)


# Parsl parses File names as URLs, so ";", "?" and "#" cannot appear; the rest would break a shell.
@pytest.mark.parametrize("name", ["in put.txt", "a&b $(touch pwned) `touch pwned` 'q' \"d\" |x>y.txt"])
def test_stage_in_wrapper(provider, tmp_path, monkeypatch, name):
    remote_dir = tmp_path / "remote side"
    remote_dir.mkdir()
    (remote_dir / name).write_text("hello from remote\n")
    work = tmp_path / "worker dir"
    # A relative path: made absolute for rsync, but the File keeps what the user wrote.
    monkeypatch.chdir(tmp_path)
    f = File(os.path.join("remote side", name))
    path_before = f.path
    dm = _dm(work)

    assert provider.can_stage_in(f)
    assert provider.stage_in(dm, "ex", f, None) is None
    assert f.local_path == os.path.join(str(work), name)
    wrapped = provider.replace_task(dm, "ex", f, _read)
    assert f.path == path_before

    monkeypatch.chdir(work.parent)  # the worker's cwd is irrelevant: local_path is absolute
    assert wrapped(f) == "hello from remote\n"
    assert (work / name).read_text() == "hello from remote\n"
    assert sorted(os.listdir(work)) == [name]  # no temporary file left behind
    assert not (tmp_path / "pwned").exists() and not (work / "pwned").exists()


def test_stage_in_wildcard_names_are_literal(provider, tmp_path):
    # The remote rsync globs requested names: unescaped, "a[1] *.txt" would fetch the decoys.
    remote_dir = tmp_path / "remote"
    remote_dir.mkdir()
    for name, text in [("a[1] *.txt", "wanted"), ("a1 x.txt", "decoy"), ("a1 *.txt", "decoy")]:
        (remote_dir / name).write_text(text)
    f = File(str(remote_dir / "a[1] *.txt"))
    dm = _dm(tmp_path / "work")
    provider.stage_in(dm, "ex", f, None)
    assert provider.replace_task(dm, "ex", f, _read)(f) == "wanted"


def test_stage_out_wrapper(provider, tmp_path):
    remote_dir = tmp_path / "remote side"
    remote_dir.mkdir()
    remote = remote_dir / "out put.txt"
    f = File(str(remote))
    work = tmp_path / "worker dir"
    work.mkdir()
    dm = _dm(work)

    def produce(outputs=()):
        with open(outputs[0], "w") as fh:
            fh.write("result\n")
        return 42

    assert provider.can_stage_out(f)
    assert provider.stage_out(dm, "ex", f, None) is None
    wrapped = provider.replace_task_stage_out(dm, "ex", f, produce)
    assert not remote.exists()  # nothing moves until the app has run
    assert wrapped(outputs=[f]) == 42
    assert remote.read_text() == "result\n"
    assert (work / "out put.txt").read_text() == "result\n"


def test_missing_remote_file_raises_staging_error(provider, tmp_path):
    f = File(str(tmp_path / "no such dir" / "absent file.txt"))
    dm = _dm(tmp_path / "work")
    provider.stage_in(dm, "ex", f, None)
    called = []
    wrapped = provider.replace_task(dm, "ex", f, lambda: called.append(1))
    with pytest.raises(StagingError) as info:
        wrapped()
    err = info.value
    assert err.url == f.url
    assert "exited with code 23" in str(err)  # rsync's "partial transfer due to error"
    assert "No such file or directory" in str(err) and "absent file.txt" in str(err)
    assert not called
    assert not os.path.exists(f.local_path)


def test_unreachable_host_fails_fast_without_prompting(tmp_path):
    # Port 1 on loopback refuses; BatchMode and stdin=/dev/null mean no prompt can hang us.
    p = RSyncStaging(LOOPBACK, ssh_options=["-F", "/dev/null", "-p", "1"], connect_timeout=2)
    f = File(str(tmp_path / "x"))
    dm = _dm(tmp_path / "work")
    p.stage_in(dm, "ex", f, None)
    t0 = time.monotonic()
    with pytest.raises(StagingError, match=r"rsync exited with code \d+: ssh: connect to host 127.0.0.1 port 1: "
                                           r"Connection refused"):
        p.replace_task(dm, "ex", f, lambda: None)()
    assert time.monotonic() - t0 < 30


@python_app
def upper_copy(inputs=(), outputs=()):
    with open(inputs[0]) as src, open(outputs[0], "w") as dst:
        dst.write(src.read().upper())
    return os.path.abspath(inputs[0].filepath)


def test_parsl_workflow(sshd, tmp_path, monkeypatch):
    """One real run: htex_rs worker pulls the input over ssh, the app runs, the worker pushes
    the output back to the 'remote' directory."""
    tests_dir = os.path.dirname(os.path.abspath(__file__))  # so the worker can import upper_copy
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (tests_dir, os.environ.get("PYTHONPATH")) if p))
    assert DataFlowKernelLoader._dfk is None, "a DFK leaked from an earlier test"
    remote_dir = tmp_path / "remote data"
    remote_dir.mkdir()
    (remote_dir / "in file.txt").write_text("staged via rsync\n")
    work = tmp_path / "worker work"
    config = Config(
        executors=[HighThroughputExecutor(
            label="htex_rsync",
            address=LOOPBACK,
            max_workers_per_node=1,
            working_dir=str(work),
            storage_access=[RSyncStaging(LOOPBACK, ssh_options=sshd)],
            provider=LocalProvider(init_blocks=1, max_blocks=1),
        )],
        run_dir=str(tmp_path / "runinfo"),
        strategy="none",
    )
    dfk = parsl.load(config)
    try:
        fut = upper_copy(inputs=[File(str(remote_dir / "in file.txt"))],
                         outputs=[File(str(remote_dir / "out file.txt"))])
        staged_in = fut.result(timeout=120)
        fut.outputs[0].result(timeout=30)
    finally:
        dfk.cleanup()
        if DataFlowKernelLoader._dfk is not None:
            parsl.clear()
    assert staged_in == str(work / "in file.txt")
    assert (remote_dir / "out file.txt").read_text() == "STAGED VIA RSYNC\n"
