"""Globus staging for ``globus://<endpoint-uuid>/<path>`` files, on globus-sdk 4.x.

A drop-in for :class:`parsl.data_provider.globus.GlobusStaging`: the same constructor, the
same ``endpoint_path``/``local_path`` mapping onto the executor's ``working_dir``, and the
same mechanism (each transfer is a separate task on the DFK's ``_parsl_internal`` thread-pool
executor, so it runs in the submit process, where the tokens are). What differs:

* globus-sdk 4.x API: ``TransferData(source_endpoint=..., destination_endpoint=...)``
  by keyword (Parsl's positional call raises ``TypeError`` on 4.x);
* a failed task raises :class:`~htex_rs.staging.errors.StagingError` naming the URL, the
  task's status and its error events;
* tokens live in ``$HTEX_RS_GLOBUS_TOKENS`` or ``~/.htex_rs/globus.json``, kept by
  globus-sdk's ``JSONTokenStorage`` (its format and its ``on_refresh`` hook), written
  atomically and always mode 0600, and a refresh never drops the stored refresh token
  (:class:`TokenFile`); a file in htex_rs's earlier format is converted on first use;
* with no stored tokens a staging task prompts only on an interactive terminal, otherwise it
  fails and says to run ``htex-rs globus-auth`` (a prompt in a batch job would hang forever).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any

import globus_sdk
import typeguard
from globus_sdk.authorizers import GlobusAuthorizer
from globus_sdk.token_storage import JSONTokenStorage, TokenStorageData
from parsl.app.app import python_app
from parsl.app.futures import DataFuture
from parsl.data_provider.files import File
from parsl.data_provider.staging import Staging
from parsl.dataflow.futures import AppFuture
from parsl.utils import RepresentationMixin

from htex_rs.staging.errors import StagingError

if TYPE_CHECKING:
    from concurrent.futures import Future

    from parsl.data_provider.data_manager import DataManager

logger = logging.getLogger(__name__)

#: The "Parsl Application" native-app client registered with Globus Auth (Parsl's own), so
#: existing consents carry over.
CLIENT_ID = "8b8060fd-610e-4a74-885e-1051c71ad473"
REDIRECT_URI = "https://auth.globus.org/v2/web/auth-code"
SCOPES = "openid urn:globus:auth:scope:transfer.api.globus.org:all"
TRANSFER_RS = "transfer.api.globus.org"
TOKENS_ENV = "HTEX_RS_GLOBUS_TOKENS"

#: ``task_wait`` arguments: wake every WAIT_TIMEOUT_S to log new (retried) fault events,
#: polling the service every POLL_INTERVAL_S. Module-level so tests can shorten them.
WAIT_TIMEOUT_S = 60
POLL_INTERVAL_S = 15
#: At most this many events go into a failure message (the most recent ones).
MAX_EVENTS = 5

# Staging tasks run concurrently on _parsl_internal threads; one authorizer per token file,
# shared, so a refresh or the interactive login happens once, and file rewrites don't race.
_LOCK = threading.RLock()
_AUTHORIZERS: dict[str, globus_sdk.RefreshTokenAuthorizer] = {}

#: What reading a damaged token file can raise (bad JSON, an unknown format_version and
#: token data failing the SDK's validation are all ValueErrors).
_UNREADABLE = (OSError, ValueError, TypeError, AttributeError)


# --------------------------------------------------------------------------- tokens

def token_file() -> str:
    """The token file: ``$HTEX_RS_GLOBUS_TOKENS`` or ``~/.htex_rs/globus.json``."""
    return os.environ.get(TOKENS_ENV) or os.path.join(os.path.expanduser("~"), ".htex_rs", "globus.json")


class TokenFile(JSONTokenStorage):
    """globus-sdk's JSON token storage (its format, namespaces and ``store_token_response``
    for ``on_refresh``), with two changes to how it writes, because a refresh token is a
    long-lived credential that a batch job cannot replace:

    * a write never drops a stored refresh token: refresh responses usually carry none, and
      the SDK's storage would otherwise save ``refresh_token: null`` over it;
    * the file is replaced atomically and is always mode 0600: the SDK truncates and
      rewrites it in place (a crash mid-write loses every token) and keeps the mode of an
      existing file (a 0644 one stays readable by all).
    """

    def store_token_data_by_resource_server(
            self, token_data_by_resource_server: Mapping[str, TokenStorageData]) -> None:
        with _LOCK:
            try:
                stored: dict[str, TokenStorageData] | None = self.get_token_data_by_resource_server()
            except _UNREADABLE:  # a damaged file is replaced (a login is what repairs it)
                stored = None
            merged = {rs: _keep_refresh_token(new, (stored or {}).get(rs))
                      for rs, new in token_data_by_resource_server.items()}
            with self._replacement(keep=stored is not None) as staged:
                staged.store_token_data_by_resource_server(merged)

    def remove_token_data(self, resource_server: str) -> bool:
        with _LOCK, self._replacement(keep=True) as staged:
            return staged.remove_token_data(resource_server)

    @contextlib.contextmanager
    def _replacement(self, keep: bool) -> Iterator[JSONTokenStorage]:
        """A plain SDK storage on a private copy of the file (``keep``) or on no file; what
        it writes replaces the file, 0600, when the block ends without an error."""
        directory = os.path.dirname(os.path.abspath(self.filepath))
        # mkdtemp makes a 0700 directory: the copy is never readable by others, whatever
        # the umask, and sits on the same file system for the rename.
        scratch = tempfile.mkdtemp(prefix=".globus-tokens.", dir=directory)
        try:
            staged = os.path.join(scratch, "tokens.json")
            if keep and self.file_exists():
                shutil.copyfile(self.filepath, staged)
            yield JSONTokenStorage(staged, namespace=self.namespace)
            os.chmod(staged, 0o600)
            with open(staged, "rb") as f:
                os.fsync(f.fileno())
            os.replace(staged, self.filepath)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)


def _keep_refresh_token(new: TokenStorageData, old: TokenStorageData | None) -> TokenStorageData:
    if new.refresh_token is not None or old is None or old.refresh_token is None:
        return new
    data = new.to_dict(include_extra=True)
    data["refresh_token"] = old.refresh_token
    data["identity_id"] = new.identity_id or old.identity_id
    return TokenStorageData.from_dict(data)


def _migrate_by_resource_server_file(path: str) -> None:
    """Rewrite a token file written by htex_rs before it used the SDK's storage (a bare
    ``{resource_server: token dict}`` mapping, no ``format_version``) in the SDK's format."""
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, ValueError):
        return  # missing, or damaged: reported when the tokens are read
    if not isinstance(raw, dict) or "format_version" in raw or not raw:
        return
    try:
        # Its token dicts are OAuthTokenResponse.by_resource_server entries: TokenStorageData's
        # fields, less identity_id.
        data = {rs: TokenStorageData.from_dict(tokens) for rs, tokens in raw.items()}
    except _UNREADABLE:
        return
    logger.info("Converting the Globus token file %s to globus-sdk's format", path)
    TokenFile(path).store_token_data_by_resource_server(data)


def token_storage(path: str | None = None) -> TokenFile:
    """The token storage at ``path`` (default :func:`token_file`). A directory it creates is
    0700; a file in htex_rs's earlier format is converted."""
    path = os.path.abspath(path or token_file())
    # Made here so that it is 0700; the SDK's own makedirs would follow the umask.
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    with _LOCK:
        _migrate_by_resource_server_file(path)
        return TokenFile(path)


def transfer_tokens(storage: TokenFile) -> tuple[TokenStorageData | None, str]:
    """The stored Transfer tokens if they include a refresh token, else None and why not."""
    try:
        data = storage.get_token_data(TRANSFER_RS)
    except _UNREADABLE as e:
        return None, f"cannot read the Globus token file {storage.filepath} ({e})"
    if data is None or not data.refresh_token:
        return None, f"no Globus Transfer refresh token in {storage.filepath}"
    return data, ""


def login(client_id: str = CLIENT_ID, *, read: Callable[[str], str] = input) -> globus_sdk.OAuthTokenResponse:
    """Interactive native-app OAuth2 login: print the authorize URL, read the code, and
    return the token response (with refresh tokens)."""
    client = globus_sdk.NativeAppAuthClient(client_id=client_id)
    client.oauth2_start_flow(SCOPES, redirect_uri=REDIRECT_URI, refresh_tokens=True)
    print(f"Please visit the following URL to provide authorization:\n{client.oauth2_get_authorize_url()}")
    code = read("Enter the auth code: ").strip()
    return client.oauth2_exchange_code_for_tokens(code)


def store_login(storage: TokenFile, response: globus_sdk.OAuthTokenResponse) -> None:
    """Store a login's tokens. Not ``store_token_response``: that decodes the id_token to
    record the identity, which costs two more requests to Globus Auth and can fail (clock
    skew) after the one-time code is spent; the identity is not needed to transfer."""
    storage.store_token_data_by_resource_server(
        {rs: TokenStorageData.from_dict(tokens) for rs, tokens in response.by_resource_server.items()})


def get_authorizer(path: str | None = None) -> globus_sdk.RefreshTokenAuthorizer:
    """The shared Transfer authorizer for ``path`` (default :func:`token_file`), logging in
    first when no usable tokens are stored and stdin is a terminal."""
    path = os.path.abspath(path or token_file())
    with _LOCK:
        if path in _AUTHORIZERS:
            return _AUTHORIZERS[path]
        storage = token_storage(path)
        tokens, why = transfer_tokens(storage)
        if tokens is None:
            if not sys.stdin or not sys.stdin.isatty():
                raise RuntimeError(f"{why}; run `htex-rs globus-auth` first")
            store_login(storage, login())
            tokens, why = transfer_tokens(storage)
            if tokens is None:
                raise RuntimeError(f"{why} after logging in; run `htex-rs globus-auth --force`")
        assert tokens.refresh_token is not None  # transfer_tokens checked it
        authorizer = globus_sdk.RefreshTokenAuthorizer(
            tokens.refresh_token, globus_sdk.NativeAppAuthClient(client_id=CLIENT_ID),
            access_token=tokens.access_token, expires_at=tokens.expires_at_seconds,
            # The SDK's own hook; TokenFile keeps the refresh token the response lacks.
            on_refresh=storage.store_token_response)
        _AUTHORIZERS[path] = authorizer
        return authorizer


# --------------------------------------------------------------------------- transfers

def _describe(event: Mapping[str, Any]) -> str:
    return f"{event.get('time')} {event.get('code')}: {event.get('description')} ({event.get('details')})"


def transfer_file(url: str, src_ep: str, src_path: str, dst_ep: str, dst_path: str, *,
                  authorizer: GlobusAuthorizer | None = None) -> str:
    """Transfer one file and wait for the task to end; return the task id.

    Raises :class:`StagingError` for ``url`` when authentication or submission fails, or
    when the task ends in any status but SUCCEEDED (the message lists its error events)."""
    route = f"{src_ep}:{src_path} -> {dst_ep}:{dst_path}"
    try:
        authorizer = authorizer or get_authorizer()
    except Exception as e:  # any way of not having credentials is an auth failure here
        raise StagingError(url, f"Globus authentication failed: {e}") from e
    tc = globus_sdk.TransferClient(authorizer=authorizer)
    td = globus_sdk.TransferData(source_endpoint=src_ep, destination_endpoint=dst_ep)
    td.add_item(src_path, dst_path)
    try:
        task_id = str(tc.submit_transfer(td)["task_id"])
        logger.debug("Globus task %s submitted: %s", task_id, route)
        seen: set[str] = set()
        while not tc.task_wait(task_id, timeout=WAIT_TIMEOUT_S, polling_interval=POLL_INTERVAL_S):
            # An ACTIVE task's faults are retried by Globus itself; surface them, don't fail.
            for event in tc.task_event_list(task_id):
                if event.get("is_error") and _describe(event) not in seen:
                    seen.add(_describe(event))
                    logger.warning("Globus task %s (%s) still retrying: %s", task_id, url, _describe(event))
        task = tc.get_task(task_id)
        if task["status"] == "SUCCEEDED":
            return task_id
        events = list(tc.task_event_list(task_id))
        shown = [e for e in events if e.get("is_error")] or events
    except globus_sdk.GlobusError as e:
        raise StagingError(url, f"Globus transfer {route} failed: {e}") from e
    fatal = task.get("fatal_error") or {}
    reason = f"Globus transfer task {task_id} ({route}) ended {task['status']}"
    if task.get("nice_status"):
        reason += f" [{task['nice_status']}]"
    if fatal:
        reason += f"; fatal error {fatal.get('code')}: {fatal.get('description')}"
    reason += "; events: " + ("; ".join(_describe(e) for e in shown[:MAX_EVENTS]) or "none")
    raise StagingError(url, reason)


# --------------------------------------------------------------------------- provider

class GlobusStaging(Staging, RepresentationMixin):
    """Stage ``globus://<endpoint-uuid>/<path>`` files in and out with Globus Transfer.

    Parameters
    ----------
    endpoint_uuid : str
        The Globus endpoint (collection) that serves the executor's ``working_dir``.
    endpoint_path : str, optional
        The path on that endpoint under which ``local_path`` appears.
    local_path : str, optional
        A local directory, equal to or above ``working_dir``, that the endpoint exports
        as ``endpoint_path``. Without both, the endpoint path is ``working_dir`` itself.
    """

    @typeguard.typechecked
    def __init__(self, endpoint_uuid: str, endpoint_path: str | None = None,
                 local_path: str | None = None) -> None:
        self.endpoint_uuid = endpoint_uuid
        self.endpoint_path = endpoint_path
        self.local_path = local_path

    def can_stage_in(self, file: File) -> bool:
        return file.scheme == "globus"

    def can_stage_out(self, file: File) -> bool:
        return file.scheme == "globus"

    # The DataManager hands us the executor's own matching provider (self), so unlike Parsl
    # there is no need to search executor.storage_access for it again.
    def stage_in(self, dm: DataManager, executor: str, file: File, parent_fut: Future[Any] | None) -> DataFuture:
        executor_obj = dm.dfk.executors[executor]
        self._update_local_path(file, executor_obj)
        app = python_app(executors=["_parsl_internal"], data_flow_kernel=dm.dfk)(
            partial(_globus_stage_in, self, executor_obj))
        app_fut: AppFuture = app(outputs=[file], _parsl_staging_inhibit=True, parent_fut=parent_fut)
        return app_fut._outputs[0]

    def stage_out(self, dm: DataManager, executor: str, file: File, app_fu: Future[Any]) -> AppFuture:
        executor_obj = dm.dfk.executors[executor]
        self._update_local_path(file, executor_obj)
        app = python_app(executors=["_parsl_internal"], data_flow_kernel=dm.dfk)(
            partial(_globus_stage_out, self, executor_obj))
        # app_fu as an argument makes the transfer wait for the producing task
        fut: AppFuture = app(app_fu, _parsl_staging_inhibit=True, inputs=[file])
        return fut

    def _get_globus_endpoint(self, executor: Any) -> dict[str, str]:
        """``endpoint_uuid``, ``endpoint_path`` (where working_dir is on the endpoint) and
        ``working_dir``, exactly as Parsl computes them."""
        if not getattr(executor, "working_dir", None):
            raise ValueError("executor working_dir must be specified for GlobusStaging")
        working_dir = os.path.normpath(executor.working_dir)
        if self.endpoint_path and self.local_path:
            local_path = os.path.normpath(self.local_path)
            common = os.path.commonpath((local_path, working_dir))
            if local_path != common:
                raise ValueError('"local_path" must be equal or an absolute subpath of "working_dir"')
            endpoint_path = os.path.join(os.path.normpath(self.endpoint_path),
                                         os.path.relpath(working_dir, common))
        else:
            endpoint_path = working_dir
        return {"endpoint_uuid": self.endpoint_uuid, "endpoint_path": endpoint_path,
                "working_dir": working_dir}

    def _update_local_path(self, file: File, executor: Any) -> None:
        file.local_path = os.path.join(self._get_globus_endpoint(executor)["working_dir"], file.filename)


# Module-level functions (not methods) so that functools.partial can bind the provider and
# executor and python_app can still see the outputs/inputs keywords, as in Parsl.
def _globus_stage_in(provider: GlobusStaging, executor: Any, parent_fut: Future[Any] | None = None,
                     outputs: Sequence[File] = (), _parsl_staging_inhibit: bool = True) -> None:
    ep = provider._get_globus_endpoint(executor)
    file = outputs[0]
    transfer_file(file.url, file.netloc, file.path,
                  ep["endpoint_uuid"], os.path.join(ep["endpoint_path"], file.filename))


def _globus_stage_out(provider: GlobusStaging, executor: Any, app_fu: Any,
                      inputs: Sequence[File] = (), _parsl_staging_inhibit: bool = True) -> None:
    ep = provider._get_globus_endpoint(executor)
    file = inputs[0]
    transfer_file(file.url, ep["endpoint_uuid"], os.path.join(ep["endpoint_path"], file.filename),
                  file.netloc, file.path)


# --------------------------------------------------------------------------- CLI

def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokens", default=None,
                   help=f"token file (default: ${TOKENS_ENV} or ~/.htex_rs/globus.json)")
    p.add_argument("--force", action="store_true", help="log in again even if tokens are stored")


def _auth_command(args: argparse.Namespace) -> int:
    storage = token_storage(args.tokens)
    tokens, why = transfer_tokens(storage)
    if not args.force and tokens is not None:
        print(f"Globus tokens already stored in {storage.filepath} (use --force to log in again)")
        return 0
    if not args.force:
        print(f"{why}; logging in")
    try:
        response = login()
    except EOFError:
        print("htex-rs globus-auth: no auth code given", file=sys.stderr)
        return 1
    except globus_sdk.GlobusError as e:
        print(f"htex-rs globus-auth: login failed: {e}", file=sys.stderr)
        return 1
    store_login(storage, response)
    print(f"Globus tokens stored in {storage.filepath}")
    return 0


def globus_auth_main(argv: list[str] | None = None) -> int:
    """Log in to Globus ahead of a run (prints a URL, reads the code from stdin) and store
    the tokens; the return value is the exit status."""
    p = argparse.ArgumentParser(prog="htex-rs globus-auth", description=globus_auth_main.__doc__)
    _add_arguments(p)
    return _auth_command(p.parse_args(argv))


def add_cli(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``globus-auth`` on an ``add_subparsers()`` object; the parsed arguments'
    ``func(args)`` returns the exit status."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "globus-auth", help="log in to Globus and store tokens for GlobusStaging")
    _add_arguments(p)
    p.set_defaults(func=_auth_command)
    return p
