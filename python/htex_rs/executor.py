"""htex_rs.HighThroughputExecutor: Parsl's HTEX API on a Rust interchange thread.

The executor subclasses Parsl's own HighThroughputExecutor so every piece of Parsl
that checks for it (the htex_auto_scale strategy, resource-spec tests, monitoring)
treats it as one, and so block scaling, `scale_in`, `status` (MISSING blocks) and
`workers_per_node` are Parsl's own, tested code. What is replaced is the data path:
no interchange process, no pickled envelopes, no command channel. Tasks go to the
Rust interchange through one non-blocking call; results come back in batches.
"""
from __future__ import annotations

import atexit
import datetime
import json
import logging
import math
import os
import pickle
import shutil
import sys
import threading
from concurrent.futures import Future, InvalidStateError
from typing import Any, Callable, Dict, List, Literal, Optional, Sequence, Tuple, TypeVar, Union

import typeguard
from parsl import curvezmq
from parsl.app.errors import AppTimeout, RemoteExceptionWrapper
from parsl.data_provider.staging import Staging
from parsl.executors.errors import BadStateException
from parsl.executors.high_throughput.errors import ManagerLost, WorkerLost
from parsl.executors.high_throughput.executor import HighThroughputExecutor as ParslHTEX
from parsl.executors.high_throughput.executor import HTEXFuture
from parsl.executors.high_throughput.manager_selector import (
    BlockIdManagerSelector,
    ManagerSelector,
    RandomManagerSelector,
)
from parsl.executors.status_handling import BlockProviderExecutor
from parsl.jobs.states import JobStatus
from parsl.monitoring.message_type import MessageType
from parsl.monitoring.radios.base import RadioConfig
from parsl.monitoring.radios.htex import HTEXRadio
from parsl.providers import LocalProvider
from parsl.providers.base import ExecutionProvider
from parsl.serialize.errors import DeserializationError, SerializationError

from htex_rs import _core, block_end, fd_limits, validation, wire
from htex_rs.addresses import is_loopback, local_addresses, resolve_address
from htex_rs.errors import (
    BlockEnded,
    CommandTimeout,
    HtexRsConfigurationError,
    InterchangeDied,
    InterchangeStopped,
    ProtocolVersionMismatch,
    ResourceRequestTooLarge,
    TaskTooLarge,
)
from htex_rs.planner import validate_cpu_affinity
from htex_rs.serialization import deserialize, pack_apply_message
from htex_rs.staging import default_staging
from htex_rs.task_future import new_future

logger = logging.getLogger(__name__)
_T = TypeVar("_T")

DEFAULT_LAUNCH_CMD = ("htex-rs-worker-pool {debug} {max_workers_per_node} "
                      "-a {addresses} "
                      "-p {prefetch_capacity} "
                      "-c {cores_per_worker} "
                      "-m {mem_per_worker} "
                      "--poll {poll_period} "
                      "--port={worker_port} "
                      "--cert_dir {cert_dir} "
                      "--logdir={logdir} "
                      "--logconf={logconf} "
                      "--block_id={{block_id}} "
                      "--hb_period={heartbeat_period} "
                      "{address_probe_timeout_string} "
                      "--hb_threshold={heartbeat_threshold} "
                      "--drain_period={drain_period} "
                      "--cpu-affinity {cpu_affinity} "
                      "{enable_mpi_mode} "
                      "--mpi-launcher={mpi_launcher} "
                      "--available-accelerators {accelerators} "
                      "--max-message-bytes={{max_message_bytes}} "
                      "--block-walltime={{block_walltime}}")

#: Most events taken from the interchange per GIL acquisition.
_RESULT_BATCH = 4096


#: The worker stream frames lengths in 32 bits; a payload and its framing must fit.
MAX_MESSAGE_BYTES_LIMIT = (1 << 32) - 1 - _core.FRAMING_HEADROOM


def _check_max_message_bytes(value: object) -> None:
    """``max_message_bytes`` is set as an attribute, not passed to the constructor: check
    it when the executor starts, before anything is sent with it."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= MAX_MESSAGE_BYTES_LIMIT:
        raise HtexRsConfigurationError(
            f"max_message_bytes={value!r} must be a whole number of bytes from 1 to {MAX_MESSAGE_BYTES_LIMIT} "
            "(4 GiB less framing); pass larger data as files (parsl File objects)")


def _settle(fut: Optional[Future[Any]], result: Any = None, exception: Optional[BaseException] = None) -> None:
    """Complete a future unless it is gone or already done (a user may have cancelled it):
    set_* says so itself, without a second trip through the future's lock to ask first."""
    if fut is None:
        return
    try:
        if exception is not None:
            fut.set_exception(exception)
        else:
            fut.set_result(result)
    except InvalidStateError:  # cancelled, or already failed
        pass


class HighThroughputExecutor(ParslHTEX):
    """Drop-in replacement for :class:`parsl.executors.HighThroughputExecutor`.

    Takes exactly Parsl's 28 constructor parameters with Parsl's defaults; see
    Parsl's documentation for each. Differences: worker pools are started with
    ``htex-rs-worker-pool``; ``interchange_launch_cmd`` and ``interchange_port_range``
    are accepted and stored but unused (the interchange is a thread of this process);
    bad configuration is rejected here, in the constructor.

    ``max_message_bytes`` (a class attribute, 1 GiB; set it on an instance before
    ``start()``) bounds memory on both ends: a larger task is refused at submit with
    :class:`~htex_rs.errors.TaskTooLarge`, a larger result fails its task on the worker
    with the same error, and the worker port disconnects any peer sending a larger frame.

    Usable without Parsl's DataFlowKernel as a context manager::

        with HighThroughputExecutor(address="127.0.0.1") as htex:
            fut = htex.submit(pow, {}, 2, 10)
    """

    max_message_bytes: int = 1 << 30

    @typeguard.typechecked
    def __init__(self,
                 label: str = 'HighThroughputExecutor',
                 provider: Optional[ExecutionProvider] = None,
                 launch_cmd: Optional[str] = None,
                 interchange_launch_cmd: Optional[Sequence[str]] = None,
                 address: Optional[str] = None,
                 loopback_address: str = "127.0.0.1",
                 worker_port: Optional[int] = None,
                 worker_port_range: Optional[Tuple[int, int]] = (54000, 55000),
                 interchange_port_range: Optional[Tuple[int, int]] = (55000, 56000),
                 storage_access: Optional[List[Staging]] = None,
                 working_dir: Optional[str] = None,
                 worker_debug: bool = False,
                 cores_per_worker: float = 1.0,
                 mem_per_worker: Optional[float] = None,
                 max_workers_per_node: Optional[int] = None,
                 cpu_affinity: str = 'none',
                 available_accelerators: Union[int, Sequence[str]] = (),
                 prefetch_capacity: int = 0,
                 heartbeat_threshold: int = 120,
                 heartbeat_period: int = 30,
                 drain_period: Optional[int] = None,
                 poll_period: int = 10,
                 address_probe_timeout: Optional[int] = None,
                 worker_logdir_root: Optional[str] = None,
                 manager_selector: ManagerSelector = RandomManagerSelector(),  # noqa: B008 (Parsl's default)
                 block_error_handler: Union[bool, Callable[[BlockProviderExecutor, Dict[str, JobStatus]], None]] = True,
                 encrypted: bool = True,
                 remote_monitoring_radio: Optional[RadioConfig] = None):
        # Host names are resolved here, once: a name that does not resolve fails now, and
        # every pool is given the same numeric address.
        self._worker_address = resolve_address("address", address) if address else None
        resolve_address("loopback_address", loopback_address)
        validation.check_port("worker_port", worker_port)
        validation.check_port_range("worker_port_range", worker_port_range)
        validation.check_port_range("interchange_port_range", interchange_port_range)
        validation.check_positive("heartbeat_period", heartbeat_period)
        validation.check_positive("heartbeat_threshold", heartbeat_threshold)
        validation.check_positive("poll_period", poll_period)
        validation.check_positive("cores_per_worker", cores_per_worker)
        validation.check_launch_cmd(launch_cmd)
        if prefetch_capacity < 0:
            raise HtexRsConfigurationError(f"prefetch_capacity={prefetch_capacity} must be 0 or more")
        if max_workers_per_node is not None and max_workers_per_node < 1:
            raise HtexRsConfigurationError(f"max_workers_per_node={max_workers_per_node} must be at least 1")
        if not isinstance(manager_selector, (RandomManagerSelector, BlockIdManagerSelector)):
            raise HtexRsConfigurationError(
                f"manager_selector {type(manager_selector).__name__} is not supported by the Rust "
                "interchange; use RandomManagerSelector() or BlockIdManagerSelector()"
            )
        accelerators = (list(map(str, range(available_accelerators)))
                        if isinstance(available_accelerators, int) else list(available_accelerators))
        validate_cpu_affinity(cpu_affinity, max_workers_per_node, accelerators)

        BlockProviderExecutor.__init__(self,
                                       provider=provider if provider else LocalProvider(),
                                       block_error_handler=block_error_handler)
        self.label = label
        self.worker_debug = worker_debug
        # None means Parsl's default set; ours is the same set with the safe providers.
        self.storage_access = storage_access if storage_access is not None else list(default_staging)
        self.working_dir = working_dir
        self.cores_per_worker = cores_per_worker
        self.mem_per_worker = mem_per_worker
        self.prefetch_capacity = prefetch_capacity
        self.address = address
        self.address_probe_timeout = address_probe_timeout
        self.manager_selector = manager_selector
        self.loopback_address = loopback_address
        # Parsl also asks ipify.org and routes to 8.8.8.8; we only read local interfaces.
        self.all_addresses = {self._worker_address} if self._worker_address else local_addresses()
        self.max_workers_per_node = max_workers_per_node or float("inf")

        mem_slots = cpu_slots = self.max_workers_per_node
        assert self.provider is not None
        mem_per_node: Optional[float] = getattr(self.provider, "mem_per_node", None)
        cores_per_node: Optional[int] = getattr(self.provider, "cores_per_node", None)
        if mem_per_node is not None and mem_per_worker is not None and mem_per_worker > 0:
            mem_slots = math.floor(mem_per_node / mem_per_worker)
        if cores_per_node is not None:
            cpu_slots = math.floor(cores_per_node / cores_per_worker)
        self.available_accelerators = accelerators
        self._workers_per_node = min(self.max_workers_per_node, mem_slots, cpu_slots)
        if self.available_accelerators:
            self._workers_per_node = min(self._workers_per_node, len(self.available_accelerators))
        if self._workers_per_node == float("inf"):
            self._workers_per_node = 1

        self._task_counter = 0
        self._submit_lock = threading.Lock()
        # This thread's last specification checked by validate_resource_spec and its
        # parse, so that submit parses a specification once.
        self._checked_spec = threading.local()
        self.remote_monitoring_radio = remote_monitoring_radio if remote_monitoring_radio is not None \
            else HTEXRadio()
        self.worker_port = worker_port
        self.worker_port_range = worker_port_range
        self.interchange_proc = None
        self.interchange_port_range = interchange_port_range
        self.heartbeat_threshold = heartbeat_threshold
        self.heartbeat_period = heartbeat_period
        self.drain_period = drain_period
        self.poll_period = poll_period
        self.run_dir = "."
        self.worker_logdir_root = worker_logdir_root
        self.cpu_affinity = cpu_affinity
        self.encrypted = encrypted
        # Parsl types these as they start (None; a str); they hold a path once known.
        self.cert_dir: Optional[str] = None  # type: ignore[assignment]
        self._check_python_mismatch = True
        # Worker-port connections still in their CURVE handshake: at most this many in all
        # (a newer one drops the oldest) and from one address (newer ones are refused).
        # Attributes, not parameters, to keep Parsl's signature; set them before start().
        self.max_pending_handshakes = 4096
        self.max_pending_handshakes_per_source = 256
        self.launch_cmd = launch_cmd or DEFAULT_LAUNCH_CMD
        self.interchange_launch_cmd = interchange_launch_cmd or ["(in-process Rust interchange)"]
        self._result_queue_thread_exit = threading.Event()
        self._result_queue_thread: Optional[threading.Thread] = None
        self.zmq_monitoring = None
        self.hub_zmq_port = None
        self.logconf_path: Optional[str] = None  # type: ignore[assignment]
        self._ix: Optional[_core.Interchange] = None

    # ------------------------------------------------------------------ start-up
    def _curve_cert_dir(self) -> Optional[str]:
        """The private certificate directory the interchange reads its keys from (made if
        none was given), or None when unencrypted. The interchange reads the server's secret
        key itself: it is never held by Python."""
        if not self.encrypted:
            if self.cert_dir:
                raise AttributeError(
                    "The certificates directory path attribute (cert_dir) is defined, but the "
                    "encrypted attribute is set to False. You must either change cert_dir to "
                    "None or encrypted to True."
                )
            return None
        if self.cert_dir is None:
            self.cert_dir = curvezmq.create_certificates(self.logdir)
        cert_dir: str = self.cert_dir
        mode = os.stat(cert_dir).st_mode & 0o777
        if mode != 0o700:
            raise OSError(
                f"The certificates directory must be private: {cert_dir} has mode {oct(mode)}; "
                f"run `chmod 700 {cert_dir}`"
            )
        return cert_dir

    def start(self) -> None:
        """Start the interchange thread and the result thread; compose the launch command."""
        _check_max_message_bytes(self.max_message_bytes)
        validation.check_positive("max_pending_handshakes", self.max_pending_handshakes)
        validation.check_positive("max_pending_handshakes_per_source", self.max_pending_handshakes_per_source)
        # One TCP connection per pool the provider may start (nodes_per_block pools a block).
        provider = self.provider
        pools = (provider.max_blocks * max(1, getattr(provider, "nodes_per_block", 1) or 1)
                 if provider is not None else 1)
        fd_limits.raise_nofile(pools, f"executor {self.label!r} (up to {pools} worker pools)")
        BlockProviderExecutor.start(self)
        self._warn_if_pool_command_missing()
        cert_dir = self._curve_cert_dir()
        if self.log_config:
            log_config_dir = os.path.join(self.logdir, "log_config")
            os.makedirs(log_config_dir, mode=0o700, exist_ok=True)
            self.logconf_path = os.path.join(log_config_dir, "log_config.pkl")
            with open(self.logconf_path, "wb") as f:
                pickle.dump(self.log_config, f)
        os.makedirs(self.logdir, exist_ok=True)
        selector = "block" if isinstance(self.manager_selector, BlockIdManagerSelector) else "random"
        bind = "*" if self._worker_address is None else self._worker_address
        self._ix = _core.Interchange(
            bind,
            self.worker_port,
            self.worker_port_range or (54000, 55000),
            float(self.heartbeat_threshold),
            int(self.poll_period),
            selector,
            cert_dir=cert_dir,
            log_path=os.path.join(self.logdir, "interchange.log"),
            debug=self.worker_debug,
            python_version="{}.{}".format(*sys.version_info[:2]),
            check_python=self._check_python_mismatch,
            max_message_bytes=self.max_message_bytes,
            node_events=self.monitoring_messages is not None,
            max_pending_handshakes=self.max_pending_handshakes,
            max_pending_handshakes_per_source=self.max_pending_handshakes_per_source,
        )
        self.worker_port = self._ix.port
        logger.info("htex_rs interchange listening for worker pools on port %s (encrypted=%s)",
                    self.worker_port, self.encrypted)
        self._warn_if_open_and_unencrypted(bind)
        self._result_queue_thread = threading.Thread(target=self._result_queue_worker,
                                                     name="HTEX-Result-Queue-Thread", daemon=True)
        self._result_queue_thread.start()
        self._started_pid = os.getpid()
        atexit.register(self._stop_at_exit)
        self.initialize_scaling()  # type: ignore[no-untyped-call]  # Parsl's, in its own class
        self.launch_cmd = self.launch_cmd.replace("{max_message_bytes}", str(self.max_message_bytes))
        # A pool counts its block's end from the provider's walltime where the batch
        # system does not say (htex_rs/block_end.py).
        walltime = block_end.parse_walltime(getattr(self.provider, "walltime", None))
        self.launch_cmd = self.launch_cmd.replace("{block_walltime}", str(walltime))

    def _warn_if_open_and_unencrypted(self, bind: str) -> None:
        """Without CURVE the worker port authenticates nobody, and what crosses it is
        pickles both ways: fine on loopback, a risk on any address another host can reach."""
        if self.encrypted or is_loopback(bind):
            return
        where = "every interface" if bind == "*" else bind
        logger.warning("Executor %r listens for worker pools unencrypted on %s, port %s: anyone who can "
                       "reach port %s can register as a worker pool, read pickled tasks and return results "
                       "the submit host unpickles; set encrypted=True (or address='127.0.0.1' if every "
                       "pool runs on this host)", self.label, where, self.worker_port, self.worker_port)

    def _warn_if_pool_command_missing(self) -> None:
        """Pools start as ``htex-rs-worker-pool`` found on PATH (as Parsl's do with
        process_worker_pool.py). Local and batch providers pass this process's PATH on,
        so say it now, not as a block failing with 'command not found' later."""
        if self.launch_cmd.startswith("htex-rs-worker-pool") and shutil.which("htex-rs-worker-pool") is None:
            bindir = os.path.dirname(sys.executable)
            hint = (f"it is in {bindir}: put that directory on PATH (activate the environment)"
                    if os.path.exists(os.path.join(bindir, "htex-rs-worker-pool"))
                    else "install htex_rs where the pools run")
            logger.warning("htex-rs-worker-pool is not on PATH, so worker pools started with this PATH "
                           "will fail with 'command not found'; %s, or set it up in the provider's "
                           "worker_init", hint)

    def __enter__(self) -> HighThroughputExecutor:
        provider = self.provider
        assert provider is not None  # the constructor defaults it
        if provider.script_dir is None:
            provider.script_dir = os.path.join(self.logdir, "submit_scripts")
            os.makedirs(provider.script_dir, exist_ok=True)
        self.start()
        if provider.init_blocks:
            self.scale_out_facade(provider.init_blocks)
        return self

    def __exit__(self, exc_type: Any, exc_val: Any, exc_tb: Any) -> Literal[False]:
        try:
            live = [b for b, s in self._status.items() if not s.terminal]
            if live:
                self.scale_in_facade(len(live))
        finally:
            self.shutdown()
        return False

    # ------------------------------------------------------------------ tasks
    def validate_resource_spec(self, resource_specification: dict[str, Any]) -> None:
        self._checked_spec.last = (resource_specification, self._parse_spec(resource_specification))

    def _parse_spec(self, spec: Optional[dict[str, Any]]) -> tuple[float, Optional[dict[str, int]]]:
        """(priority, request) of a task's resource specification, as it travels.
        MPI mode's keys (num_nodes, ...) are checked by its ``validate_resource_spec``;
        they carry no priority and no request for the interchange."""
        if self.enable_mpi_mode:
            return math.inf, None
        return validation.parse_resource_spec(spec)

    def _parsed_spec(self, spec: Optional[dict[str, Any]]) -> tuple[float, Optional[dict[str, int]]]:
        """The parse of ``spec``: the one ``validate_resource_spec`` just made on this
        thread for this very object, else a new one."""
        last = getattr(self._checked_spec, "last", None)
        if last is not None and last[0] is spec:
            self._checked_spec.last = None
            return last[1]  # type: ignore[no-any-return]
        return self._parse_spec(spec)

    def submit(self, func: Callable[..., Any], resource_specification: dict[str, Any], *args: Any,
               **kwargs: Any) -> HTEXFuture:
        """Serialize ``func(*args, **kwargs)`` and queue it; returns a future."""
        # Parsl's hook (a subclass or a test may wrap it), then the parse the task travels
        # with (an empty specification returns at once).
        self.validate_resource_spec(resource_specification)
        parsed = self._parsed_spec(resource_specification)
        walltime = validation.walltime_of(resource_specification, kwargs)
        try:
            buffer = pack_apply_message(func, args, kwargs, buffer_threshold=1 << 20)
        except TypeError as e:
            raise SerializationError(func.__name__) from e
        context = {"resource_spec": resource_specification} if resource_specification else {}
        return self._submit(context, buffer, *parsed, walltime)

    def submit_payload(self, context: dict[str, Any], buffer: bytes) -> HTEXFuture:
        """Queue an already-serialized task. ``context['task_executor']`` = {f, a, k}
        makes the worker call the importable function ``f(buffer, *a, **k)`` instead."""
        spec = context.get("resource_spec")
        return self._submit(context, buffer, *self._parsed_spec(spec), validation.walltime_of(spec, {}))

    def _submit(self, context: dict[str, Any], buffer: bytes, priority: float,
                request: Optional[dict[str, int]], walltime: Optional[float] = None) -> HTEXFuture:
        if self.bad_state_is_set:
            raise self.executor_exception
        if self._ix is None:
            raise RuntimeError("the executor has not been started; call start() or use it as a context manager")
        flags, payload = wire.encode_task(context, buffer)
        # A request travels typed: the interchange packs the task onto a pool with room and
        # puts the request at the head of its payload for the pool (rust/resources.rs).
        typed = None if request is None else (request["cores"], request.get("memory", 0), request.get("gpus", 0))
        if len(payload) > self.max_message_bytes:
            raise TaskTooLarge("this task", len(payload), self.max_message_bytes)
        with self._submit_lock:
            self._task_counter += 1
            task_id = self._task_counter
            fut = new_future(task_id)
            self.tasks[task_id] = fut
            # Bad state may have been set (and self.tasks emptied) since the check above.
            if self.bad_state_is_set:
                self.tasks.pop(task_id, None)
                raise self.executor_exception
            try:
                self._ix.submit(task_id, priority, flags, payload, typed, walltime)
            except BaseException:
                self.tasks.pop(task_id, None)
                raise
        return fut

    def _result_queue_worker(self) -> None:
        logger.debug("Result queue worker starting")
        ix = self._ix
        assert ix is not None
        timeout = max(1, int(self.poll_period))
        while not self._result_queue_thread_exit.is_set():
            try:
                events = ix.wait_events(timeout, _RESULT_BATCH)
            except InterchangeStopped:
                if not self._result_queue_thread_exit.is_set():
                    self.set_bad_state_and_fail_all(InterchangeDied(
                        "the htex_rs interchange was stopped while the executor was running"))
                break
            try:
                self._handle_events(events)
            except BaseException as e:  # this thread must never die silently: fail everything
                logger.exception("Result queue worker failed")
                self.set_bad_state_and_fail_all(InterchangeDied(f"the result thread failed: {e!r}"))
                break
            if not ix.alive() and not self._result_queue_thread_exit.is_set():
                self.set_bad_state_and_fail_all(
                    InterchangeDied("the htex_rs interchange thread stopped unexpectedly; see interchange.log"))
                break
        logger.info("Result queue worker finished")

    def _handle_events(self, events: _core.Events) -> None:
        # Node records first: the interchange reports where a task ran before its result,
        # and Globus Compute endpoints place tasks from these (a task's block and job).
        for node in events.nodes:  # as Parsl's interchange sends them: monitoring's `node` table
            if self.monitoring_messages is not None:
                record: dict[str, Any] = dict(node)
                record.update(run_id=self.run_id, timestamp=datetime.datetime.now(),
                              last_heartbeat=datetime.datetime.fromtimestamp(node["last_heartbeat"]))
                self.monitoring_messages.put((MessageType.NODE_INFO, record))
        for r in events.results:
            if r.status == wire.STATUS_MONITORING:
                self._monitoring_message(r.payload)
            else:
                self._complete(r.task_id, r.status, r.payload)
        for lost in events.lost:
            for task_id in lost.tasks:
                exc = (ManagerLost(lost.uid.encode(), lost.hostname) if lost.reason is None
                       else BlockEnded(lost.uid.encode(), lost.hostname, lost.reason))
                _settle(self.tasks.pop(task_id, None), exception=exc)
        for message in events.fatal:
            logger.error("Failing all tasks: %s", message)
            self.set_bad_state_and_fail_all(ProtocolVersionMismatch(message))

    def _monitoring_message(self, data: bytes) -> None:
        """A worker's HTEXRadio message: hand its payload to the monitoring hub, as
        Parsl's interchange does (trusted: it comes from our own, authenticated pools)."""
        try:
            msg = pickle.loads(data)
        except Exception:
            logger.warning("Dropped an unreadable monitoring message", exc_info=True)
            return
        if self.monitoring_messages is not None and isinstance(msg, dict) and msg.get("type") == "monitoring":
            self.monitoring_messages.put(msg["payload"])

    def _complete(self, task_id: int, status: int, data: bytes) -> None:
        fut = self.tasks.pop(task_id, None)
        if fut is None:
            logger.warning("Result for unknown or already failed task %s ignored", task_id)
            return
        if status == wire.STATUS_UNPLACEABLE:
            why = bytes(data).decode(errors="replace")
            logger.warning("Task %s failed: %s", task_id, why)
            _settle(fut, exception=ResourceRequestTooLarge(task_id, why))
            return
        if status == wire.STATUS_TIMEOUT:
            try:
                why = wire.timed_out(task_id, data)
            except ValueError as e:
                why = f"task {task_id} ran past its walltime (unreadable report: {e})"
            logger.warning("Task %s failed: %s", task_id, why)
            _settle(fut, exception=AppTimeout(why))
            return
        if status == wire.STATUS_WORKER_LOST:
            try:
                worker_id, hostname, how = wire.worker_lost(data)
            except ValueError as e:
                _settle(fut, exception=DeserializationError(f"Unreadable worker loss for task {task_id}: {e}"))
                return
            logger.warning("Task %s failed: worker %s on %s died running it (%s)", task_id, worker_id,
                           hostname, how)
            _settle(fut, exception=WorkerLost(worker_id, hostname))
            return
        try:
            obj = deserialize(data)
        except Exception as e:
            _settle(fut, exception=DeserializationError(f"Could not deserialize the result of task {task_id}: {e}"))
            return
        if status == wire.STATUS_RESULT:
            _settle(fut, result=obj)
        elif isinstance(obj, RemoteExceptionWrapper):
            try:
                obj.reraise()
            except BaseException as e:
                _settle(fut, exception=e)
        elif isinstance(obj, BaseException):
            _settle(fut, exception=obj)
        else:
            _settle(fut, exception=DeserializationError(f"Unknown exception-like type received: {type(obj)}"))

    def set_bad_state_and_fail_all(self, exception: Exception) -> None:
        """Fail every outstanding task once. Unlike Parsl's version this removes the
        futures as it fails them, so it is safe to call twice and against the result
        thread, which also pops futures before completing them."""
        logger.error("Setting bad state: %s", exception)
        if not self._executor_bad_state.is_set():
            self._executor_exception = exception
            self._executor_bad_state.set()
        while True:
            try:
                _, fut = self.tasks.popitem()
            except KeyError:
                break
            _settle(fut, exception=BadStateException(self, self._executor_exception))

    # ------------------------------------------------------------------ queries
    def _query(self, ask: Callable[[_core.Interchange], _T], default: _T) -> _T:
        """Ask the interchange; once it has stopped nothing is connected any more. A
        query it does not answer in time (CommandTimeout) is an error the caller sees."""
        if self._ix is None:
            raise RuntimeError("the executor has not been started")
        try:
            return ask(self._ix)
        except InterchangeStopped:
            return default
        except CommandTimeout:
            logger.error("The interchange did not answer within %.0f s", _core.COMMAND_TIMEOUT_S)
            raise

    def connected_managers(self) -> List[Dict[str, Any]]:
        """One dict per registered worker pool (Parsl's MANAGERS keys); thread-safe."""
        none: list[_core.ManagerRecord] = []
        return [dict(m) for m in self._query(_core.Interchange.managers, none)]

    def connected_managers_packages(self) -> Dict[str, Dict[str, str]]:
        none: list[tuple[str, str]] = []
        return {uid: json.loads(doc) for uid, doc in self._query(_core.Interchange.packages, none)}

    def connected_blocks(self) -> List[str]:
        none: list[str] = []
        return self._query(_core.Interchange.connected_blocks, none)

    def _hold_manager(self, manager_id: str) -> None:
        self._query(lambda ix: ix.hold(manager_id), False)
        logger.debug("Held manager %s", manager_id)

    def interchange_stats(self) -> Dict[str, int]:
        """Counters from the interchange: dropped (malformed or refused) messages, tasks, results."""
        s = self._query(_core.Interchange.stats, None)
        if s is None:
            return {"dropped_messages": 0, "tasks_received": 0, "results_forwarded": 0}
        return {"dropped_messages": s.dropped, "tasks_received": s.tasks_received,
                "results_forwarded": s.results_forwarded}

    # ------------------------------------------------------------------ shutdown
    def _stop_at_exit(self) -> None:
        """Python is exiting with this executor running (a script that never called
        ``parsl.dfk().cleanup()`` or ``shutdown()``; Parsl's own exit hook only warns).
        Stop the result thread while the interpreter still runs threads: once it
        finalizes, a thread coming back from the interchange to take the GIL is ended
        with ``pthread_exit``, whose unwinding through Rust frames crashes the process
        (SIGSEGV at exit). Then stop the interchange, so the pools exit now rather than
        when their heartbeats go unanswered."""
        if os.getpid() != self._started_pid:  # a fork()ed child: the threads are the parent's
            return
        logger.warning("Python is exiting with executor %r running; stopping its interchange", self.label)
        self._stop(10, "Python exited with tasks outstanding")

    def _stop(self, timeout: float, outstanding: str) -> None:
        """Stop the result thread, hand on results that already arrived, stop the
        interchange (pools are told to exit) and fail what is left with ``outstanding``."""
        assert self._ix is not None
        try:
            self._result_queue_thread_exit.set()
            if self._result_queue_thread:
                self._result_queue_thread.join(timeout)
            try:  # results that arrived after the result thread's last look still count
                while events := self._ix.wait_events(0, _RESULT_BATCH):
                    self._handle_events(events)
            except InterchangeStopped:
                pass
        finally:
            self._ix.stop()
        atexit.unregister(self._stop_at_exit)  # only now: had anything above raised, it still runs at exit
        if self.tasks:  # an exit hook that runs after ours may wait on them
            self.set_bad_state_and_fail_all(InterchangeDied(outstanding))

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the interchange (pools are told to exit) and the result thread."""
        if self._ix is None:
            logger.info("HighThroughputExecutor has not started; skipping shutdown")
            return
        logger.info("Attempting HighThroughputExecutor shutdown")
        self._stop(timeout, "the executor was shut down with tasks outstanding")
        BlockProviderExecutor.shutdown(self)
        logger.info("Finished HighThroughputExecutor shutdown attempt")
