"""Globus staging for ``globus://<endpoint-uuid>/<path>`` files, on globus-sdk 4.x.

A drop-in for :class:`parsl.data_provider.globus.GlobusStaging`: the same constructor, the
same ``endpoint_path``/``local_path`` mapping onto the executor's ``working_dir``, and the
same mechanism (each transfer is a separate task on the DFK's ``_parsl_internal`` thread-pool
executor, so it runs in the submit process, where the tokens are). What differs:

* globus-sdk 4.x API: ``TransferData(source_endpoint=..., destination_endpoint=...)``
  by keyword (Parsl's positional call raises ``TypeError`` on 4.x);
* a failed task raises :class:`~htex_rs.staging.errors.StagingError` naming the URL, the
  task's status and its error events;
* tokens live in ``$HTEX_RS_GLOBUS_TOKENS`` or ``~/.htex_rs/globus.json``, always mode 0600,
  and a refresh merges into the file instead of dropping the refresh token;
* with no stored tokens a staging task prompts only on an interactive terminal, otherwise it
  fails and says to run ``htex-rs globus-auth`` (a prompt in a batch job would hang forever).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import threading
from functools import partial
from typing import Any, Callable, Dict, List, Optional

import globus_sdk
import typeguard
from globus_sdk.authorizers import GlobusAuthorizer
from parsl.app.app import python_app
from parsl.data_provider.files import File
from parsl.data_provider.staging import Staging
from parsl.utils import RepresentationMixin

from htex_rs.staging.errors import StagingError

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

Tokens = Dict[str, Dict[str, Any]]  # by_resource_server: {"transfer.api.globus.org": {...}}

# Staging tasks run concurrently on _parsl_internal threads; one authorizer per token file,
# shared, so a refresh or the interactive login happens once, and file rewrites don't race.
_LOCK = threading.RLock()
_AUTHORIZERS: Dict[str, globus_sdk.RefreshTokenAuthorizer] = {}


# --------------------------------------------------------------------------- tokens

def token_file() -> str:
    """The token file: ``$HTEX_RS_GLOBUS_TOKENS`` or ``~/.htex_rs/globus.json``."""
    return os.environ.get(TOKENS_ENV) or os.path.join(os.path.expanduser("~"), ".htex_rs", "globus.json")


def load_tokens(path: str) -> Optional[Tokens]:
    """The stored tokens, or None when the file is missing or unreadable as JSON."""
    try:
        with open(path) as f:
            tokens = json.load(f)
    except (OSError, ValueError):
        return None
    return tokens if isinstance(tokens, dict) else None


def save_tokens(path: str, tokens: Tokens) -> None:
    """Write ``tokens`` to ``path`` atomically, mode 0600 whatever the umask (refresh tokens
    are long-lived credentials); a directory we create is 0700."""
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        os.makedirs(directory, mode=0o700, exist_ok=True)
    # mkstemp creates the file 0600, so the secret is never briefly world-readable; the
    # rename then replaces any older file, whatever its mode was.
    fd, tmp = tempfile.mkstemp(prefix=".globus.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w") as f:
            os.fchmod(f.fileno(), 0o600)
            json.dump(tokens, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _merge_refresh(path: str, response: globus_sdk.OAuthTokenResponse) -> None:
    """``on_refresh``: fold the new access token into the file. A refresh response usually
    carries no refresh token (Parsl overwrote the file with it, losing the refresh token);
    keep the stored fields the response leaves empty."""
    with _LOCK:
        tokens = load_tokens(path) or {}
        for server, new in response.by_resource_server.items():
            tokens[server] = {**tokens.get(server, {}), **{k: v for k, v in new.items() if v is not None}}
        save_tokens(path, tokens)


def login(client_id: str = CLIENT_ID, *, read: Callable[[str], str] = input) -> Tokens:
    """Interactive native-app OAuth2 login: print the authorize URL, read the code, and
    return the tokens by resource server (with refresh tokens)."""
    client = globus_sdk.NativeAppAuthClient(client_id=client_id)
    client.oauth2_start_flow(SCOPES, redirect_uri=REDIRECT_URI, refresh_tokens=True)
    print(f"Please visit the following URL to provide authorization:\n{client.oauth2_get_authorize_url()}")
    code = read("Enter the auth code: ").strip()
    return dict(client.oauth2_exchange_code_for_tokens(code).by_resource_server)


def _usable(tokens: Optional[Tokens]) -> bool:
    return bool(tokens and tokens.get(TRANSFER_RS, {}).get("refresh_token"))


def get_authorizer(path: Optional[str] = None) -> globus_sdk.RefreshTokenAuthorizer:
    """The shared Transfer authorizer for ``path`` (default :func:`token_file`), logging in
    first when no usable tokens are stored and stdin is a terminal."""
    path = path or token_file()
    with _LOCK:
        if path in _AUTHORIZERS:
            return _AUTHORIZERS[path]
        tokens = load_tokens(path)
        if not _usable(tokens):
            if not sys.stdin or not sys.stdin.isatty():
                raise RuntimeError(f"no Globus Transfer refresh token in {path}; "
                                   f"run `htex-rs globus-auth` first")
            tokens = login()
            save_tokens(path, tokens)
        assert tokens is not None
        t = tokens[TRANSFER_RS]
        # The SDK wants access token and expiry both or neither; with neither it refreshes now.
        have_access = bool(t.get("access_token") and t.get("expires_at_seconds"))
        authorizer = globus_sdk.RefreshTokenAuthorizer(
            t["refresh_token"], globus_sdk.NativeAppAuthClient(client_id=CLIENT_ID),
            access_token=t["access_token"] if have_access else None,
            expires_at=t["expires_at_seconds"] if have_access else None,
            on_refresh=partial(_merge_refresh, path))
        _AUTHORIZERS[path] = authorizer
        return authorizer


# --------------------------------------------------------------------------- transfers

def _describe(event: Dict[str, Any]) -> str:
    return f"{event.get('time')} {event.get('code')}: {event.get('description')} ({event.get('details')})"


def transfer_file(url: str, src_ep: str, src_path: str, dst_ep: str, dst_path: str, *,
                  authorizer: Optional[GlobusAuthorizer] = None) -> str:
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
        seen: set = set()
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
    def __init__(self, endpoint_uuid: str, endpoint_path: Optional[str] = None,
                 local_path: Optional[str] = None) -> None:
        self.endpoint_uuid = endpoint_uuid
        self.endpoint_path = endpoint_path
        self.local_path = local_path

    def can_stage_in(self, file: File) -> bool:
        return file.scheme == "globus"

    def can_stage_out(self, file: File) -> bool:
        return file.scheme == "globus"

    # The DataManager hands us the executor's own matching provider (self), so unlike Parsl
    # there is no need to search executor.storage_access for it again.
    def stage_in(self, dm: Any, executor: str, file: File, parent_fut: Any):
        executor_obj = dm.dfk.executors[executor]
        self._update_local_path(file, executor_obj)
        app = python_app(executors=["_parsl_internal"], data_flow_kernel=dm.dfk)(
            partial(_globus_stage_in, self, executor_obj))
        app_fut = app(outputs=[file], _parsl_staging_inhibit=True, parent_fut=parent_fut)
        return app_fut._outputs[0]

    def stage_out(self, dm: Any, executor: str, file: File, app_fu: Any):
        executor_obj = dm.dfk.executors[executor]
        self._update_local_path(file, executor_obj)
        app = python_app(executors=["_parsl_internal"], data_flow_kernel=dm.dfk)(
            partial(_globus_stage_out, self, executor_obj))
        # app_fu as an argument makes the transfer wait for the producing task
        return app(app_fu, _parsl_staging_inhibit=True, inputs=[file])

    def _get_globus_endpoint(self, executor: Any) -> Dict[str, str]:
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
def _globus_stage_in(provider: GlobusStaging, executor: Any, parent_fut: Any = None,
                     outputs: List[File] = [], _parsl_staging_inhibit: bool = True) -> None:
    ep = provider._get_globus_endpoint(executor)
    file = outputs[0]
    transfer_file(file.url, file.netloc, file.path,
                  ep["endpoint_uuid"], os.path.join(ep["endpoint_path"], file.filename))


def _globus_stage_out(provider: GlobusStaging, executor: Any, app_fu: Any,
                      inputs: List[File] = [], _parsl_staging_inhibit: bool = True) -> None:
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
    path = args.tokens or token_file()
    if not args.force and _usable(load_tokens(path)):
        print(f"Globus tokens already stored in {path} (use --force to log in again)")
        return 0
    try:
        tokens = login()
    except EOFError:
        print("htex-rs globus-auth: no auth code given", file=sys.stderr)
        return 1
    except globus_sdk.GlobusError as e:
        print(f"htex-rs globus-auth: login failed: {e}", file=sys.stderr)
        return 1
    save_tokens(path, tokens)
    print(f"Globus tokens stored in {path}")
    return 0


def globus_auth_main(argv: Optional[List[str]] = None) -> int:
    """Log in to Globus ahead of a run (prints a URL, reads the code from stdin) and store
    the tokens; the return value is the exit status."""
    p = argparse.ArgumentParser(prog="htex-rs globus-auth", description=globus_auth_main.__doc__)
    _add_arguments(p)
    return _auth_command(p.parse_args(argv))


def add_cli(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``globus-auth`` on an ``add_subparsers()`` object; the parsed arguments'
    ``func(args)`` returns the exit status."""
    p = subparsers.add_parser("globus-auth", help="log in to Globus and store tokens for GlobusStaging")
    _add_arguments(p)
    p.set_defaults(func=_auth_command)
    return p
