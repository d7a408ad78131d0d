"""RSyncStaging against a real sshd on 127.0.0.1 (a throwaway daemon with generated keys).

The "remote" side is the same machine in a different directory; nothing leaves loopback.
"""
from __future__ import annotations

import fcntl
import os
import shlex
import shutil
import socket
import subprocess
import sys
import termios
import textwrap
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
from htex_rs.staging.rsync import RSyncStaging, rsync_base_argv
from support import worker_pythonpath

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


def _rsh(ssh_options) -> str:
    """An RSYNC_RSH value running ssh with ``ssh_options``, quoted as rsync splits it."""
    return " ".join(shlex.quote(a) for a in ["ssh", "-o", "BatchMode=yes", *ssh_options])


@pytest.fixture
def recording_rsh(sshd, tmp_path):
    """A remote-shell wrapper that logs its arguments, then runs ssh to the test sshd;
    returns (RSYNC_RSH value, log path)."""
    log = tmp_path / "rsh.log"
    script = tmp_path / "recording rsh"
    script.write_text(f"#!/bin/sh\necho \"$@\" >> {shlex.quote(str(log))}\nexec {_rsh(sshd)} \"$@\"\n")
    script.chmod(0o755)
    return shlex.quote(str(script)), log


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


def test_remote_shell_is_rsyncs_own_unless_ssh_options_are_given():
    # No options: no -e at all, so RSYNC_RSH / ~/.ssh/config decide, as with Parsl's provider.
    assert rsync_base_argv() == ["rsync", "-s", "--timeout=300"]
    argv = rsync_base_argv(["-p", "2222", "-i", "/k ey"], io_timeout=5)
    assert argv[:4] == ["rsync", "-s", "--timeout=5", "-e"] and len(argv) == 5
    assert shlex.split(argv[4]) == ["ssh", "-o", "BatchMode=yes", "-p", "2222", "-i", "/k ey",
                                    "-o", "ConnectTimeout=10"]
    assert shlex.split(rsync_base_argv(["-p", "1"], connect_timeout=3)[-1])[-1] == "ConnectTimeout=3"


def test_connect_timeout_without_ssh_options_says_where_to_set_it():
    with pytest.raises(ValueError, match=r"ConnectTimeout.*~/\.ssh/config"):
        RSyncStaging(LOOPBACK, connect_timeout=5)
    with pytest.raises(TypeError, match=r"\['-p', '2222'\]"):
        RSyncStaging(LOOPBACK, ssh_options="-p 2222")  # type: ignore[arg-type]


def _stage_in_one(p: RSyncStaging, tmp_path, text: str = "via RSYNC_RSH\n") -> str:
    remote = tmp_path / "remote dir" / "in file.txt"
    remote.parent.mkdir(exist_ok=True)
    remote.write_text(text)
    f = File(str(remote))
    dm = _dm(tmp_path / "work")
    p.stage_in(dm, "ex", f, None)
    return p.replace_task(dm, "ex", f, _read)(f)


def test_default_uses_rsync_rsh(sshd, tmp_path, monkeypatch):
    # The test sshd is only reachable with its port and key, so success proves RSYNC_RSH
    # (a plain ssh command line, with a quoted key path containing a space) was used.
    monkeypatch.setenv("RSYNC_RSH", _rsh(sshd))
    assert _stage_in_one(RSyncStaging(LOOPBACK), tmp_path) == "via RSYNC_RSH\n"


def test_default_runs_the_rsync_rsh_wrapper(recording_rsh, tmp_path, monkeypatch):
    rsh, log = recording_rsh
    monkeypatch.setenv("RSYNC_RSH", rsh)
    assert _stage_in_one(RSyncStaging(LOOPBACK), tmp_path) == "via RSYNC_RSH\n"
    assert log.read_text().startswith(f"{LOOPBACK} rsync --server --sender")


def test_default_rsync_rsh_failure_is_reported(tmp_path, monkeypatch):
    monkeypatch.setenv("RSYNC_RSH", "ssh -F /dev/null -o BatchMode=yes -p 1")
    with pytest.raises(StagingError, match=r"rsync exited with code \d+: ssh: connect to host 127.0.0.1 port 1: "
                                           r"Connection refused"):
        _stage_in_one(RSyncStaging(LOOPBACK), tmp_path)


def test_ssh_options_take_precedence_over_rsync_rsh(sshd, recording_rsh, tmp_path, monkeypatch):
    rsh, log = recording_rsh
    monkeypatch.setenv("RSYNC_RSH", rsh)
    assert _stage_in_one(RSyncStaging(LOOPBACK, ssh_options=sshd), tmp_path) == "via RSYNC_RSH\n"
    assert not log.exists()  # our BatchMode ssh ran, not the wrapper


_CHILD = textwrap.dedent("""
    import sys
    from htex_rs.staging.errors import StagingError
    from htex_rs.staging.rsync import rsync_base_argv, run_rsync
    try:
        run_rsync("x", [*rsync_base_argv(), "--", sys.argv[1], sys.argv[2]])
    except StagingError as e:
        print(e)
""")


def test_no_prompt_even_from_a_terminal(sshd, tmp_path):
    # A worker started from a login shell has a controlling terminal. There, ssh with
    # the default StrictHostKeyChecking=ask would ask about the unknown host key on
    # /dev/tty and wait for ever; with no -e nothing on the command line forbids it, so
    # it is the missing terminal (a new session) that makes it fail at once instead.
    port = sshd[sshd.index("-p") + 1]
    key = sshd[sshd.index("-i") + 1]
    rsh = " ".join(shlex.quote(a) for a in [
        "ssh", "-F", "/dev/null", "-p", port, "-i", key, "-o", "IdentitiesOnly=yes",
        "-o", "UserKnownHostsFile=/dev/null", "-o", "GlobalKnownHostsFile=/dev/null"])
    (tmp_path / "in.txt").write_text("x")
    primary, secondary = os.openpty()

    def with_terminal() -> None:  # in the child: a session whose controlling terminal is the pty
        os.setsid()
        fcntl.ioctl(secondary, termios.TIOCSCTTY, 0)

    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "SSH_ASKPASS", "SSH_ASKPASS_REQUIRE")}
    env["RSYNC_RSH"] = rsh
    try:
        child = subprocess.run([sys.executable, "-c", _CHILD, f"{LOOPBACK}:{tmp_path / 'in.txt'}",
                                str(tmp_path / "out.txt")], preexec_fn=with_terminal, env=env,
                               stdin=secondary, capture_output=True, text=True, timeout=30)
        os.set_blocking(primary, False)
        try:
            on_terminal = os.read(primary, 65536).decode(errors="replace")
        except BlockingIOError:
            on_terminal = ""
    except subprocess.TimeoutExpired:
        pytest.fail(f"ssh waited for an answer on the terminal (RSYNC_RSH={rsh})")
    finally:
        os.close(primary)
        os.close(secondary)
    assert "Host key verification failed" in child.stdout, (child.stdout, child.stderr)
    assert "continue connecting" not in on_terminal
    assert not (tmp_path / "out.txt").exists()


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


@pytest.mark.parametrize("remote_shell", ["ssh_options", "RSYNC_RSH in worker_init"])
def test_parsl_workflow(sshd, tmp_path, monkeypatch, remote_shell):
    """One real run: htex_rs worker pulls the input over ssh, the app runs, the worker pushes
    the output back to the 'remote' directory. The remote shell comes from ``ssh_options``,
    or, as at a site that configures rsync itself, from RSYNC_RSH set by the provider's
    worker_init (and nowhere else: not in this process's environment)."""
    monkeypatch.setenv("PYTHONPATH", worker_pythonpath(__file__))  # so the worker can import upper_copy
    monkeypatch.delenv("RSYNC_RSH", raising=False)
    if remote_shell == "ssh_options":
        staging, worker_init = RSyncStaging(LOOPBACK, ssh_options=sshd), ""
    else:
        staging, worker_init = RSyncStaging(LOOPBACK), f"export RSYNC_RSH={shlex.quote(_rsh(sshd))}"
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
            storage_access=[staging],
            provider=LocalProvider(init_blocks=1, max_blocks=1, worker_init=worker_init),
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
