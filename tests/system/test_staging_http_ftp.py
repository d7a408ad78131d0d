"""HTTP(S) and FTP staging against real servers on loopback: every failure mode leaves
no file at the final path, and each provider works through htex_rs in a Parsl workflow."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import parsl
import pytest
from parsl.app.app import python_app
from parsl.config import Config
from parsl.data_provider.files import File
from parsl.providers import LocalProvider

from htex_rs import HighThroughputExecutor
from htex_rs.staging import (
    FTPInTaskStaging,
    FTPSeparateTaskStaging,
    HTTPInTaskStaging,
    HTTPSeparateTaskStaging,
    NoOpFileStaging,
    StagingError,
    default_staging,
)
from htex_rs.staging.ftp import fetch_ftp
from htex_rs.staging.http import fetch_http
from support.staging_servers import PAYLOAD, FTPServer, Handler, Server

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def http():
    s = Server()
    yield s
    s.close()


@pytest.fixture(scope="module")
def https(tmp_path_factory):
    s = Server(str(tmp_path_factory.mktemp("tls")))
    yield s
    s.close()


@pytest.fixture(scope="module")
def ftp(tmp_path_factory):
    root = tmp_path_factory.mktemp("ftproot")
    (root / "pub").mkdir()
    (root / "pub" / "data.bin").write_bytes(PAYLOAD)
    (root / "private.bin").write_bytes(PAYLOAD[:1000])
    s = FTPServer(str(root))
    yield s
    s.close()


def leftovers(directory) -> list[str]:
    return sorted(os.listdir(directory))


def test_http_200_and_https_with_a_self_signed_certificate(http, https, tmp_path):
    dest = tmp_path / "a.bin"
    assert fetch_http(http.url("/data.bin"), str(dest)) == len(PAYLOAD)
    assert dest.read_bytes() == PAYLOAD
    dest2 = tmp_path / "b.bin"
    fetch_http(https.url("/data.bin"), str(dest2), verify=https.cert)
    assert dest2.read_bytes() == PAYLOAD
    with pytest.raises(StagingError, match="CERTIFICATE_VERIFY_FAILED|SSLError"):
        fetch_http(https.url("/data.bin"), str(tmp_path / "c.bin"), retries=0)  # not trusted by default
    assert leftovers(tmp_path) == ["a.bin", "b.bin"]


def test_http_404_is_an_error_not_a_file(http, tmp_path):
    with pytest.raises(StagingError, match=r"missing\.bin: HTTP 404"):
        fetch_http(http.url("/missing.bin"), str(tmp_path / "m.bin"))
    assert leftovers(tmp_path) == []


def test_http_500_then_200_is_retried(http, tmp_path):
    dest = tmp_path / "f.bin"
    fetch_http(http.url("/flaky-2"), str(dest), retries=3, backoff=0.01)
    assert dest.read_bytes() == PAYLOAD
    with pytest.raises(StagingError, match="failed after 2 attempts: HTTP 500"):
        fetch_http(http.url("/flaky-5"), str(tmp_path / "g.bin"), retries=1, backoff=0.01)
    assert leftovers(tmp_path) == ["f.bin"]


def test_http_retry_backoff_doubles_from_the_first_retry(http, tmp_path):
    # Two 500s, then the file: waits of backoff, then 2 * backoff (urllib3's own schedule
    # would retry the first time at once), and exactly three requests.
    path = "/script/500,500,ok/backoff.bin"
    t0 = time.monotonic()
    fetch_http(http.url(path), str(tmp_path / "b.bin"), retries=3, backoff=0.3)
    elapsed = time.monotonic() - t0
    assert Handler.hits[path] == 3
    assert 0.9 <= elapsed < 5, elapsed
    assert (tmp_path / "b.bin").read_bytes() == PAYLOAD


def test_http_cut_body_is_retried_then_succeeds(http, tmp_path):
    dest = tmp_path / "c.bin"
    fetch_http(http.url("/script/cut,cut,ok/c.bin"), str(dest), retries=2, backoff=0.01)
    assert dest.read_bytes() == PAYLOAD
    assert Handler.hits["/script/cut,cut,ok/c.bin"] == 3
    assert leftovers(tmp_path) == ["c.bin"]  # no .part files from the cut attempts


def test_http_status_and_body_failures_share_one_budget(http, tmp_path):
    # A 500 (retried inside urllib3) and a cut body (retried by fetch_http) draw on the
    # same `retries`: one retry is not enough for both, and no fourth request is made.
    short = "/script/500,cut,ok/short.bin"
    with pytest.raises(StagingError, match=r"failed after 2 attempts: ChunkedEncodingError"):
        fetch_http(http.url(short), str(tmp_path / "s.bin"), retries=1, backoff=0.01)
    assert Handler.hits[short] == 2
    enough = "/script/500,cut,ok/enough.bin"
    fetch_http(http.url(enough), str(tmp_path / "e.bin"), retries=2, backoff=0.01)
    assert Handler.hits[enough] == 3
    assert leftovers(tmp_path) == ["e.bin"]


def test_http_retry_after_is_honoured(http, tmp_path):
    path = "/script/503ra,ok/ra.bin"
    t0 = time.monotonic()
    fetch_http(http.url(path), str(tmp_path / "r.bin"), retries=1, backoff=0.01)
    assert time.monotonic() - t0 >= 0.9  # the server's 1 s, not the 0.01 s backoff
    assert Handler.hits[path] == 2


def test_http_connection_refused_counts_every_attempt(tmp_path):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(StagingError, match=r"failed after 3 attempts: ConnectionError: .*refused"):
        fetch_http(f"http://127.0.0.1:{port}/x.bin", str(tmp_path / "x.bin"), retries=2, backoff=0.01)
    assert leftovers(tmp_path) == []


def test_http_connection_cut_mid_body_leaves_no_file(http, tmp_path):
    dest = tmp_path / "cut.bin"
    dest.write_bytes(b"previous version")  # an earlier file stays intact
    with pytest.raises(StagingError, match="failed after 2 attempts"):
        fetch_http(http.url("/cut.bin"), str(dest), retries=1, backoff=0.01)
    assert dest.read_bytes() == b"previous version"
    assert leftovers(tmp_path) == ["cut.bin"]


def test_http_slow_server_hits_the_read_timeout(http, tmp_path):
    with pytest.raises(StagingError, match="Timeout|timed out"):
        fetch_http(http.url("/slow.bin"), str(tmp_path / "s.bin"), read_timeout=0.5, retries=0)
    assert leftovers(tmp_path) == []


def test_http_large_file_streams_in_constant_memory(http, tmp_path):
    Handler.big_size = 400 * 2**20
    dest = tmp_path / "big.bin"
    # Peak RSS after imports vs after the download, in a fresh process: the growth must
    # stay a small constant, far below the 400 MiB that went through.
    code = ("import sys, resource; from htex_rs.staging.http import fetch_http; "
            "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss; "
            "n = fetch_http(sys.argv[1], sys.argv[2]); "
            "print(n, before, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    out = subprocess.run([sys.executable, "-c", code, http.url("/big.bin"), str(dest)],
                         capture_output=True, text=True, check=True).stdout.split()
    size, before, after = (int(x) for x in out)
    assert size == Handler.big_size == dest.stat().st_size
    grown_mib = (after - before) // 1024
    # Holding the file would grow it by 400 MiB; streaming in 256 KiB chunks grows it by ~0.
    assert grown_mib < 64, f"peak RSS grew by {grown_mib} MiB during a 400 MiB download"
    dest.unlink()


def test_ftp_anonymous_user_port_and_missing(ftp, tmp_path):
    dest = tmp_path / "anon.bin"
    assert fetch_ftp(f"ftp://127.0.0.1:{ftp.port}/data.bin", str(dest)) == len(PAYLOAD)
    assert dest.read_bytes() == PAYLOAD
    user_url = f"ftp://{FTPServer.USER}:s3cr%20et@127.0.0.1:{ftp.port}/private.bin"
    fetch_ftp(user_url, str(tmp_path / "priv.bin"))
    assert (tmp_path / "priv.bin").read_bytes() == PAYLOAD[:1000]
    with pytest.raises(StagingError, match="550") as info:
        fetch_ftp(f"ftp://{FTPServer.USER}:s3cr%20et@127.0.0.1:{ftp.port}/nope.bin", str(tmp_path / "n.bin"))
    assert "s3cr" not in str(info.value), "the password leaked into the error"
    with pytest.raises(StagingError, match="530|Authentication"):
        fetch_ftp(f"ftp://{FTPServer.USER}:wrong@127.0.0.1:{ftp.port}/private.bin", str(tmp_path / "w.bin"))
    assert leftovers(tmp_path) == ["anon.bin", "priv.bin"]


def test_default_staging_is_parsls_set_built_from_ours():
    from parsl.data_provider.zip import ZipFileStaging
    kinds = [type(s) for s in default_staging]
    assert kinds == [NoOpFileStaging, FTPSeparateTaskStaging, HTTPSeparateTaskStaging, ZipFileStaging]


# ---------------------------------------------------------------- through a workflow
@python_app
def checksum(inputs=()):
    import hashlib
    with open(inputs[0], "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


@python_app
def transform(inputs=(), outputs=()):
    with open(inputs[0], "rb") as f, open(outputs[0], "wb") as g:
        g.write(f.read()[::-1])


@pytest.mark.parametrize("provider", ["http-separate", "http-intask", "ftp-separate", "ftp-intask"])
def test_providers_in_a_parsl_workflow(provider, http, ftp, load_dfk, tmp_path):
    import hashlib
    staging = {"http-separate": HTTPSeparateTaskStaging(), "http-intask": HTTPInTaskStaging(),
               "ftp-separate": FTPSeparateTaskStaging(), "ftp-intask": FTPInTaskStaging()}[provider]
    url = http.url("/dir/data.bin") if provider.startswith("http") else f"ftp://127.0.0.1:{ftp.port}/data.bin"
    work = tmp_path / "work"
    load_dfk(Config(executors=[HighThroughputExecutor(
        label="stage", address="127.0.0.1", encrypted=False, max_workers_per_node=2,
        storage_access=[staging, NoOpFileStaging()], working_dir=str(work),
        provider=LocalProvider(init_blocks=1, max_blocks=1))], strategy="none"))
    parsl.dfk().executors["stage"].working_dir = str(work)  # load_dfk resets it to tmp_path
    assert checksum(inputs=[File(url)]).result(timeout=120) == hashlib.sha256(PAYLOAD).hexdigest()
    # An output File from one app chained into the next as a DataFuture.
    out = File(str(tmp_path / "reversed.bin"))
    t = transform(inputs=[File(url)], outputs=[out])
    assert checksum(inputs=[t.outputs[0]]).result(timeout=120) == hashlib.sha256(PAYLOAD[::-1]).hexdigest()
    assert os.path.exists(work / "data.bin")
    assert not [n for n in os.listdir(work) if n.endswith(".part")]
