"""GlobusStaging (htex_rs.staging.globus) against the real globus-sdk 4.x classes, with every
HTTP call answered by canned responses (``globus_sdk.testing`` + ``responses``).

The SDK ships canned responses for ``submit_transfer``, ``get_submission_id`` and the OAuth2
token endpoint; ``get_task`` and ``task_event_list`` have none, so they are registered here
with ``register_response_set`` and loaded the same way. The ``offline`` fixture fails the test
if any request escapes the mock or any socket leaves the machine.
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import os
import socket
import stat
import time
import urllib.parse

import globus_sdk
import pytest
import responses
import typeguard
from globus_sdk.testing import get_last_request, load_response, register_response_set
from globus_sdk.testing.data.transfer._common import TASK_ID
from globus_sdk.token_storage import JSONTokenStorage, TokenStorageData
from parsl.config import Config
from parsl.data_provider.files import File
from parsl.executors.threads import ThreadPoolExecutor

import htex_rs.staging.globus as g
from htex_rs.staging.errors import StagingError

SRC = "aaaaaaaa-1111-4111-8111-111111111111"    # a remote collection named in globus:// URLs
LOCAL = "bbbbbbbb-2222-4222-8222-222222222222"  # the collection that serves working_dir
MOCKED_HOSTS = {"transfer.api.globus.org", "auth.globus.org"}


def _task(status: str, **extra) -> dict:
    return {"DATA_TYPE": "task", "task_id": TASK_ID, "type": "TRANSFER", "status": status,
            "source_endpoint_id": SRC, "destination_endpoint_id": LOCAL, **extra}


def _event(code: str, description: str, details: str, is_error: bool = True) -> dict:
    return {"DATA_TYPE": "event", "code": code, "description": description, "details": details,
            "is_error": is_error, "time": "2026-10-30 12:00:00+00:00"}


_FAULT = _event("PERMISSION_DENIED", "permission denied", "550 /data/in.txt: Permission denied")
_CANCEL = _event("FILE_NOT_FOUND", "file not found", "No such file: /data/in.txt")

_TASK_PATH = f"/v0.10/task/{TASK_ID}"
register_response_set("htex_rs.transfer.get_task", {
    "succeeded": {"service": "transfer", "path": _TASK_PATH, "json": _task("SUCCEEDED", nice_status="OK")},
    # ACTIVE twice (one task_wait timeout, so one pass of the logging loop), then FAILED
    "active_then_failed": [
        {"service": "transfer", "path": _TASK_PATH, "json": _task("ACTIVE", nice_status="PERMISSION_DENIED")},
        {"service": "transfer", "path": _TASK_PATH, "json": _task("ACTIVE", nice_status="PERMISSION_DENIED")},
        {"service": "transfer", "path": _TASK_PATH, "json": _task(
            "FAILED", nice_status=None,
            fatal_error={"code": "FILE_NOT_FOUND", "description": "No such file or directory"})},
    ],
}, metadata={"task_id": TASK_ID})
register_response_set("htex_rs.transfer.task_event_list", {
    "default": {"service": "transfer", "path": f"{_TASK_PATH}/event_list", "json": {
        "DATA_TYPE": "event_list", "limit": 10, "offset": 0, "total": 3,
        "DATA": [_CANCEL, _FAULT, _event("STARTED", "started", "", is_error=False)]}},
})


@pytest.fixture
def offline(monkeypatch):
    """A ``responses`` mock for all HTTP; sockets to anything but loopback/Unix are refused.
    At teardown every recorded call must have been answered by a registered response."""
    real_connect = socket.socket.connect

    def guarded_connect(self, address):
        if self.family == socket.AF_UNIX or address[0] in ("127.0.0.1", "::1", "localhost"):
            return real_connect(self, address)
        raise AssertionError(f"network access attempted: {address!r}")

    monkeypatch.setattr(socket.socket, "connect", guarded_connect)
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        yield rsps
        for call in rsps.calls:
            assert urllib.parse.urlsplit(call.request.url).hostname in MOCKED_HOSTS, call.request.url
            assert not isinstance(call.response, Exception), f"unmocked request {call.request.url}"


def _tokens(access_expires: float) -> dict:
    return {
        "auth.globus.org": {"scope": "openid", "access_token": "auth-at", "refresh_token": "auth-rt",
                            "expires_at_seconds": int(time.time()) + 3600, "resource_server": "auth.globus.org",
                            "token_type": "Bearer"},
        g.TRANSFER_RS: {"scope": "urn:globus:auth:scope:transfer.api.globus.org:all",
                        "access_token": "stored-at", "refresh_token": "stored-rt",
                        "expires_at_seconds": int(access_expires), "resource_server": g.TRANSFER_RS,
                        "token_type": "Bearer"},
    }


@pytest.fixture
def token_path(tmp_path, monkeypatch):
    """A valid token file named by HTEX_RS_GLOBUS_TOKENS; no cached authorizers; fast polls."""
    path = str(tmp_path / "tok" / "globus.json")
    monkeypatch.setenv(g.TOKENS_ENV, path)
    monkeypatch.setattr(g, "_AUTHORIZERS", {})
    monkeypatch.setattr(g, "WAIT_TIMEOUT_S", 1)
    monkeypatch.setattr(g, "POLL_INTERVAL_S", 1)
    _save(path, _tokens(time.time() + 3600))
    return path


def _save(path: str, tokens: dict) -> None:
    """Store by_resource_server-style token dicts through the module's own storage."""
    g.token_storage(path).store_token_data_by_resource_server(
        {rs: TokenStorageData.from_dict(t) for rs, t in tokens.items()})


def _stored(path) -> dict:
    """The token file's DEFAULT namespace, read as globus-sdk's own JSONTokenStorage reads it."""
    return {rs: t.to_dict() for rs, t in JSONTokenStorage(str(path)).get_token_data_by_resource_server().items()}


class _Executor:
    def __init__(self, working_dir):
        self.working_dir = working_dir


def _submitted(rsps) -> list[dict]:
    return [json.loads(c.request.body) for c in rsps.calls
            if c.request.method == "POST" and c.request.url.endswith("/v0.10/transfer")]


def _load_success(rsps):
    load_response(globus_sdk.TransferClient.get_submission_id, requests_mock=rsps)
    load_response(globus_sdk.TransferClient.submit_transfer, requests_mock=rsps)
    load_response("htex_rs.transfer.get_task", case="succeeded", requests_mock=rsps)
    load_response("htex_rs.transfer.task_event_list", requests_mock=rsps)


def test_stage_in_submits_transfer_to_mapped_endpoint_path(offline, token_path):
    # working_dir /scratch/alice/run1 lies under local_path /scratch/alice, which the
    # endpoint exports as /~/ so the file lands at /~/run1/in.txt on LOCAL.
    _load_success(offline)
    provider = g.GlobusStaging(LOCAL, endpoint_path="/~/", local_path="/scratch/alice")
    executor = _Executor("/scratch/alice/run1/")
    f = File(f"globus://{SRC}/data/in.txt")
    assert provider.can_stage_in(f) and provider.can_stage_out(f)
    assert not provider.can_stage_in(File("https://example.org/x")) and not provider.can_stage_in(File("/x"))
    provider._update_local_path(f, executor)
    assert f.filepath == "/scratch/alice/run1/in.txt"

    g._globus_stage_in(provider, executor, outputs=[f])

    (doc,) = _submitted(offline)
    assert (doc["DATA_TYPE"], doc["source_endpoint"], doc["destination_endpoint"]) == ("transfer", SRC, LOCAL)
    assert [(i["source_path"], i["destination_path"]) for i in doc["DATA"]] == [("/data/in.txt", "/~/run1/in.txt")]
    assert doc["submission_id"]  # fetched from the (canned) submission_id endpoint
    assert offline.calls[-1].request.url.endswith(f"/task/{TASK_ID}")  # status read after the wait
    assert get_last_request(requests_mock=offline).headers["Authorization"] == "Bearer stored-at"


def test_stage_out_submits_transfer_from_working_dir(offline, token_path, tmp_path):
    # Without endpoint_path/local_path the endpoint path is working_dir itself (as in Parsl).
    _load_success(offline)
    provider = g.GlobusStaging(LOCAL)
    f = File(f"globus://{SRC}/results/out.csv")
    g._globus_stage_out(provider, _Executor(str(tmp_path)), app_fu=None, inputs=[f])
    (doc,) = _submitted(offline)
    assert (doc["source_endpoint"], doc["destination_endpoint"]) == (LOCAL, SRC)
    assert [(i["source_path"], i["destination_path"]) for i in doc["DATA"]] == \
        [(os.path.join(str(tmp_path), "out.csv"), "/results/out.csv")]


def test_working_dir_required_and_local_path_checked():
    f = File(f"globus://{SRC}/a")
    with pytest.raises(ValueError, match="working_dir"):
        g.GlobusStaging(LOCAL)._update_local_path(f, _Executor(None))
    with pytest.raises(ValueError, match="local_path"):
        g.GlobusStaging(LOCAL, "/~/", "/elsewhere")._update_local_path(f, _Executor("/scratch/run"))
    with pytest.raises(typeguard.TypeCheckError):  # typechecked like Parsl's
        g.GlobusStaging(42)


def test_failed_task_raises_with_events(offline, token_path, monkeypatch, caplog):
    load_response(globus_sdk.TransferClient.get_submission_id, requests_mock=offline)
    load_response(globus_sdk.TransferClient.submit_transfer, requests_mock=offline)
    load_response("htex_rs.transfer.get_task", case="active_then_failed", requests_mock=offline)
    load_response("htex_rs.transfer.task_event_list", requests_mock=offline)
    monkeypatch.setattr("globus_sdk.services.transfer.client.time.sleep", lambda s: None)
    url = f"globus://{SRC}/data/in.txt"

    with caplog.at_level(logging.WARNING, logger=g.__name__), pytest.raises(StagingError) as ei:
        g._globus_stage_in(g.GlobusStaging(LOCAL), _Executor("/w"), outputs=[File(url)])

    e = ei.value
    assert e.url == url and str(e).startswith(f"staging {url}: ")
    for part in (TASK_ID, "ended FAILED", "FILE_NOT_FOUND", "No such file or directory",
                 "permission denied", "550 /data/in.txt: Permission denied", "No such file: /data/in.txt"):
        assert part in e.reason, (part, e.reason)
    assert "STARTED" not in e.reason  # non-error events only when there are no error events
    assert "still retrying" in caplog.text and "PERMISSION_DENIED" in caplog.text  # the ACTIVE pass


def test_rejected_submission_raises_staging_error(offline, token_path):
    load_response(globus_sdk.TransferClient.get_submission_id, requests_mock=offline)
    load_response(globus_sdk.TransferClient.submit_transfer, case="failure", requests_mock=offline)
    with pytest.raises(StagingError, match="NoTransferItems"):
        g.transfer_file("globus://x/y", SRC, "/y", LOCAL, "/w/y")


def test_missing_tokens_fail_without_prompting(offline, tmp_path, monkeypatch):
    monkeypatch.setenv(g.TOKENS_ENV, str(tmp_path / "none.json"))
    monkeypatch.setattr(g, "_AUTHORIZERS", {})
    monkeypatch.setattr("sys.stdin", io.StringIO(""))  # not a terminal: never prompt
    with pytest.raises(StagingError, match="htex-rs globus-auth"):
        g.transfer_file("globus://x/y", SRC, "/y", LOCAL, "/w/y")
    assert not offline.calls


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_token_file_is_0600_whatever_the_umask(tmp_path):
    path = tmp_path / "new" / "globus.json"
    old = os.umask(0)
    try:
        _save(str(path), _tokens(time.time()))
        assert _mode(path) == 0o600 and _mode(path.parent) == 0o700
        os.chmod(path, 0o644)  # a pre-existing loose file is replaced by a 0600 one
        t = _tokens(time.time())
        t[g.TRANSFER_RS]["access_token"] = "second-at"
        _save(str(path), t)
        assert _mode(path) == 0o600 and _stored(path)[g.TRANSFER_RS]["access_token"] == "second-at"
        assert g.token_storage(str(path)).remove_token_data("auth.globus.org")
        assert _mode(path) == 0o600 and set(_stored(path)) == {g.TRANSFER_RS}
    finally:
        os.umask(old)
    assert [p.name for p in path.parent.iterdir()] == ["globus.json"]  # no temp files left
    with open(path) as f:
        assert json.load(f)["format_version"] == "2.0"  # globus-sdk's own format


def test_failed_write_leaves_the_file_as_it_was(tmp_path, monkeypatch):
    path = str(tmp_path / "globus.json")
    _save(path, _tokens(time.time()))
    with open(path, "rb") as f:
        before = f.read()

    def crash(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(JSONTokenStorage, "store_token_data_by_resource_server", crash)
    with pytest.raises(OSError, match="disk full"):
        g.token_storage(path).store_token_data_by_resource_server({})
    with open(path, "rb") as f:
        assert f.read() == before
    assert os.listdir(tmp_path) == ["globus.json"]


def test_old_format_token_file_is_converted_and_used(offline, tmp_path, monkeypatch):
    # htex_rs wrote OAuthTokenResponse.by_resource_server as-is before it used the SDK's
    # storage; such a file keeps working, and is rewritten in the SDK's format.
    path = tmp_path / "globus.json"
    monkeypatch.setenv(g.TOKENS_ENV, str(path))
    monkeypatch.setattr(g, "_AUTHORIZERS", {})
    path.write_text(json.dumps(_tokens(time.time() + 3600)))
    path.chmod(0o600)
    _load_success(offline)

    g.transfer_file(f"globus://{SRC}/a", SRC, "/a", LOCAL, "/w/a")

    submit = next(c.request for c in offline.calls if c.request.url.endswith("/v0.10/transfer"))
    assert submit.headers["Authorization"] == "Bearer stored-at"
    saved = _stored(path)
    assert saved[g.TRANSFER_RS]["refresh_token"] == "stored-rt"
    assert saved["auth.globus.org"]["refresh_token"] == "auth-rt"
    assert json.loads(path.read_text())["format_version"] == "2.0" and _mode(path) == 0o600


def test_damaged_token_file_says_how_to_repair(offline, tmp_path, monkeypatch):
    path = tmp_path / "globus.json"
    path.write_text('{"format_version": "9.9", "data": {}}')
    monkeypatch.setenv(g.TOKENS_ENV, str(path))
    monkeypatch.setattr(g, "_AUTHORIZERS", {})
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    with pytest.raises(StagingError, match=r"cannot read the Globus token file .*unknown format.*"
                                           r"run `htex-rs globus-auth` first"):
        g.transfer_file("globus://x/y", SRC, "/y", LOCAL, "/w/y")
    assert not offline.calls


def test_refresh_rewrites_token_file(offline, token_path):
    # An expired access token: the first Transfer call refreshes it at the (canned) token
    # endpoint, whose answer has no refresh token, as real refresh responses usually don't.
    _save(token_path, _tokens(time.time() - 10))
    os.chmod(token_path, 0o644)
    load_response(globus_sdk.NativeAppAuthClient.oauth2_exchange_code_for_tokens, requests_mock=offline)
    _load_success(offline)

    g.transfer_file(f"globus://{SRC}/a", SRC, "/a", LOCAL, "/w/a")

    refresh = offline.calls[0].request
    assert refresh.url == "https://auth.globus.org/v2/oauth2/token"
    assert urllib.parse.parse_qs(refresh.body)["grant_type"] == ["refresh_token"]
    assert urllib.parse.parse_qs(refresh.body)["refresh_token"] == ["stored-rt"]
    saved = _stored(token_path)
    assert saved[g.TRANSFER_RS]["access_token"] == "transfer_access_token"
    assert saved[g.TRANSFER_RS]["refresh_token"] == "stored-rt"  # kept, not dropped
    assert saved[g.TRANSFER_RS]["expires_at_seconds"] > time.time() + 3600
    assert saved["auth.globus.org"]["refresh_token"] == "auth-rt"
    assert _mode(token_path) == 0o600
    submit = next(c.request for c in offline.calls if c.request.url.endswith("/v0.10/transfer"))
    assert submit.headers["Authorization"] == "Bearer transfer_access_token"


def test_globus_auth_main_logs_in_and_stores_tokens(offline, tmp_path, monkeypatch, capsys):
    path = tmp_path / "t" / "globus.json"
    monkeypatch.setenv(g.TOKENS_ENV, str(path))
    monkeypatch.setattr("sys.stdin", io.StringIO("the-code\n"))
    tokens = _tokens(time.time() + 3600)
    load_response(globus_sdk.testing.RegisteredResponse(
        service="auth", path="/v2/oauth2/token", method="POST",
        json={**{k: v for k, v in tokens[g.TRANSFER_RS].items() if k != "expires_at_seconds"},
              "expires_in": 172800, "other_tokens": []}), requests_mock=offline)

    assert g.globus_auth_main([]) == 0

    out = capsys.readouterr().out
    assert f"client_id={g.CLIENT_ID}" in out and "auth.globus.org/v2/oauth2/authorize" in out
    body = urllib.parse.parse_qs(offline.calls[0].request.body)
    assert body["grant_type"] == ["authorization_code"] and body["code"] == ["the-code"]
    assert _stored(path)[g.TRANSFER_RS]["refresh_token"] == "stored-rt"
    assert _mode(path) == 0o600
    # stored tokens: a second run (here through the subcommand) does not log in again
    parser = argparse.ArgumentParser()
    g.add_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["globus-auth", "--tokens", str(path)])
    assert args.func(args) == 0 and len(offline.calls) == 1
    monkeypatch.setattr("sys.stdin", io.StringIO(""))  # --force, no code given: exit 1
    assert g.globus_auth_main(["--force"]) == 1


def test_parsl_workflow_stages_in_and_out(offline, token_path, load_dfk, tmp_path):
    """End to end through a DFK with htex_rs: the app runs on a worker, the transfers run as
    tasks on _parsl_internal threads in this process, where the ``responses`` mock is active."""
    import parsl
    from parsl.providers import LocalProvider

    from htex_rs import HighThroughputExecutor

    _load_success(offline)
    # The app runs on an htex_rs worker; the transfers run in this process, mocked.
    load_dfk(Config(executors=[HighThroughputExecutor(
        label="htex_globus", address="127.0.0.1", encrypted=False, max_workers_per_node=1,
        storage_access=[g.GlobusStaging(LOCAL)], provider=LocalProvider(init_blocks=1, max_blocks=1))],
        strategy="none"))

    @parsl.python_app
    def use(inputs=(), outputs=()):
        with open(outputs[0], "w") as f:
            f.write("result")
        return inputs[0].filepath

    fut = use(inputs=[File(f"globus://{SRC}/data/in.txt")],
              outputs=[File(f"globus://{SRC}/results/out.txt")])
    assert fut.result(timeout=60) == os.path.join(str(tmp_path), "in.txt")
    fut.outputs[0].result(timeout=60)  # the stage-out transfer task finished

    stage_in, stage_out = _submitted(offline)
    assert (stage_in["source_endpoint"], stage_in["destination_endpoint"]) == (SRC, LOCAL)
    assert stage_in["DATA"][0]["destination_path"] == os.path.join(str(tmp_path), "in.txt")
    assert (stage_out["source_endpoint"], stage_out["destination_endpoint"]) == (LOCAL, SRC)
    assert [stage_out["DATA"][0][k] for k in ("source_path", "destination_path")] == \
        [os.path.join(str(tmp_path), "out.txt"), "/results/out.txt"]


def test_parsl_workflow_failed_stage_in_fails_the_app(offline, token_path, load_dfk, monkeypatch):
    """A FAILED transfer fails the consuming app with a DependencyError whose cause is the
    StagingError carrying the task's events."""
    import parsl
    from parsl.dataflow.errors import DependencyError

    load_response(globus_sdk.TransferClient.get_submission_id, requests_mock=offline)
    load_response(globus_sdk.TransferClient.submit_transfer, requests_mock=offline)
    load_response("htex_rs.transfer.get_task", case="active_then_failed", requests_mock=offline)
    load_response("htex_rs.transfer.task_event_list", requests_mock=offline)
    monkeypatch.setattr("globus_sdk.services.transfer.client.time.sleep", lambda s: None)
    load_dfk(Config(executors=[ThreadPoolExecutor(label="threads", max_threads=1,
                                                  storage_access=[g.GlobusStaging(LOCAL)])],
                    strategy="none"))

    @parsl.python_app
    def use(inputs=()):
        return "ran"

    fut = use(inputs=[File(f"globus://{SRC}/data/in.txt")])
    with pytest.raises(DependencyError) as ei:
        fut.result(timeout=60)
    ((cause, _tid),) = ei.value.dependent_exceptions_tids
    assert isinstance(cause, StagingError) and "550 /data/in.txt: Permission denied" in str(cause)
