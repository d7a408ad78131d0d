"""Type stubs of htex_rs's native module (rust/python/). Keep in step with the binding;
``tests/unit/test_core_stub.py`` checks with ``mypy.stubtest`` that they agree."""
from typing import Optional, Sequence, TypedDict, final

VERSION: str
HAS_CURVE: bool

def batch_scheduling() -> bool: ...

#: How long a query to the interchange thread may take before CommandTimeout.
COMMAND_TIMEOUT_S: float

# --------------------------------------------------------------------------- protocol
PROTOCOL_VERSION: int
MAGIC: bytes
#: Bytes per meta entry: task id (u64 LE) + flag or status (u8).
META_ENTRY: int
#: What a message may carry beyond its payload limit (header, meta, framing).
FRAMING_HEADROOM: int
#: Most frames in one worker-stream message.
MAX_FRAMES: int
KIND_PROBE: int
KIND_REGISTER: int
KIND_HEARTBEAT: int
KIND_RESULTS: int
KIND_RETURNED: int
KIND_PROBE_ACK: int
KIND_TASKS: int
KIND_HEARTBEAT_REPLY: int
KIND_SHUTDOWN: int
KIND_REFUSED: int
KIND_REGISTERED: int
KIND_RECLAIM: int
STATUS_RESULT: int
STATUS_EXCEPTION: int
STATUS_MONITORING: int
STATUS_WORKER_LOST: int
STATUS_UNPLACEABLE: int
STATUS_TIMEOUT: int
FLAG_CONTEXT: int
FLAG_RESOURCES: int

def header(kind: int) -> bytes: ...
def kind_of(frame: bytes) -> int: ...
def encode_meta(entries: list[tuple[int, int]]) -> bytes: ...
def decode_meta(meta: bytes, count: int) -> list[tuple[int, int]]: ...
def registration(fields: bytes) -> bytes: ...
def client_keys(cert_dir: str) -> tuple[bytes, bytes, bytes]: ...
def split_head(payload: bytes) -> tuple[bytes, bytes]: ...
def encode_stream(frames: list[bytes]) -> bytes: ...

# --------------------------------------------------------------------------- errors
class InterchangeStopped(RuntimeError): ...
class CommandTimeout(TimeoutError): ...
class PoolStopped(RuntimeError): ...

# --------------------------------------------------------------------------- interchange
@final
class TaskResult:
    @property
    def task_id(self) -> int: ...
    @property
    def status(self) -> int: ...
    @property
    def payload(self) -> bytes: ...

@final
class ManagerLost:
    @property
    def uid(self) -> str: ...
    @property
    def hostname(self) -> str: ...
    @property
    def tasks(self) -> list[int]: ...
    @property
    def reason(self) -> Optional[str]: ...

class NodeInfo(TypedDict):
    """A manager's record for Parsl monitoring's ``node`` table."""

    uid: str
    hostname: str
    block_id: Optional[str]
    cpu_count: int
    total_memory: int
    worker_count: int
    max_capacity: int
    python_v: str
    python_version: str
    parsl_version: str
    active: bool
    draining: bool
    tasks: list[int]
    start_time: float
    last_heartbeat: float
    idle_since: Optional[float]

class ManagerRecord(TypedDict):
    """One entry of ``connected_managers()`` (Parsl's keys, and ``time_left``: seconds
    left in the pool's block, None when its end is unknown)."""

    manager: str
    block_id: Optional[str]
    worker_count: int
    tasks: int
    idle_duration: float
    active: bool
    parsl_version: str
    python_version: str
    draining: bool
    hostname: str
    time_left: Optional[float]

@final
class Events:
    @property
    def results(self) -> list[TaskResult]: ...
    @property
    def lost(self) -> list[ManagerLost]: ...
    @property
    def fatal(self) -> list[str]: ...
    @property
    def nodes(self) -> list[NodeInfo]: ...
    def __bool__(self) -> bool: ...

@final
class InterchangeStats:
    @property
    def dropped(self) -> int: ...
    @property
    def tasks_received(self) -> int: ...
    @property
    def results_forwarded(self) -> int: ...

@final
class Interchange:
    def __new__(
        cls,
        bind_address: str,
        worker_port: Optional[int],
        port_range: tuple[int, int],
        heartbeat_threshold: float,
        poll_period_ms: int,
        selector: str,
        cert_dir: Optional[str] = None,
        log_path: Optional[str] = None,
        debug: bool = False,
        python_version: str = ...,
        check_python: bool = False,
        max_message_bytes: Optional[int] = None,
        node_events: bool = False,
        max_pending_handshakes: Optional[int] = None,
        max_pending_handshakes_per_source: Optional[int] = None,
    ) -> Interchange: ...
    @property
    def port(self) -> int: ...
    def submit(self, task_id: int, priority: float, flags: int, payload: bytes,
               request: Optional[tuple[int, int, int]] = None, walltime: Optional[float] = None) -> None: ...
    def wait_events(self, timeout_ms: int, max_events: int) -> Events: ...
    def alive(self) -> bool: ...
    def managers(self) -> list[ManagerRecord]: ...
    def connected_blocks(self) -> list[str]: ...
    def packages(self) -> list[tuple[str, str]]: ...
    def hold(self, uid: str) -> bool: ...
    def stats(self) -> InterchangeStats: ...
    def stop(self) -> None: ...

# --------------------------------------------------------------------------- pool
@final
class PoolCounts:
    @property
    def received(self) -> int: ...
    @property
    def started(self) -> int: ...
    @property
    def results(self) -> int: ...
    @property
    def lost(self) -> int: ...
    @property
    def timed_out(self) -> int: ...
    @property
    def given_back(self) -> int: ...
    @property
    def deaths(self) -> int: ...
    @property
    def requeued(self) -> int: ...
    @property
    def queued(self) -> int: ...
    @property
    def held(self) -> int: ...
    @property
    def workers(self) -> int: ...
    @property
    def dropped(self) -> int: ...

@final
class StopReason:
    @property
    def exit_code(self) -> int: ...
    @property
    def message(self) -> str: ...
    @property
    def refused(self) -> bool: ...

@final
class LogRecord:
    @property
    def levelno(self) -> int: ...
    @property
    def name(self) -> str: ...
    @property
    def message(self) -> str: ...

@final
class Pool:
    def __new__(
        cls,
        interchange_url: str,
        identity: bytes,
        worker_url: str,
        registration: bytes,
        heartbeat_period: float,
        heartbeat_threshold: float,
        hostname: str,
        curve_keys: Optional[tuple[bytes, bytes, bytes]] = None,
        max_message_bytes: int = ...,
        cpu_slots: list[tuple[int, int]] = ...,
        memory_mb: int = 0,
        accelerators: list[str] = ...,
        debug: bool = False,
        block_end: Optional[float] = None,
        drain_time: Optional[float] = None,
    ) -> Pool: ...
    def worker_died(self, pid: int, exit_code: int) -> None: ...
    def end(self, why: str) -> None: ...
    def events_fd(self) -> int: ...
    def drain_log(self) -> list[LogRecord]: ...
    def counts(self) -> PoolCounts: ...
    def wait_stopped(self, timeout_ms: int) -> Optional[StopReason]: ...
    def stop(self) -> None: ...

@final
class Task:
    @property
    def task_id(self) -> int: ...
    @property
    def flags(self) -> int: ...
    @property
    def payload(self) -> bytes: ...

@final
class WorkerInbox:
    def __new__(cls, url: str, rank: str, max_message_bytes: int = ...) -> WorkerInbox: ...
    def next(self) -> Optional[Task]: ...
    def send_result(self, task_id: int, status: int, payload: Sequence[bytes]) -> None: ...

# --------------------------------------------------------------------------- planner
class WorkerPlan(TypedDict):
    rank: int
    cpus: Optional[list[int]]
    cores: list[tuple[int, int, int]]
    numa_nodes: list[int]
    accelerator: Optional[str]
    env: dict[str, str]

def validate_cpu_affinity(value: str, workers: Optional[int] = None) -> None: ...
def parse_cpu_list(text: str) -> list[int]: ...
def format_cpu_list(cpus: list[int]) -> str: ...
def allowed_cpus() -> list[int]: ...
def cpu_slots(
    declared: Optional[int] = None,
    allowed: Optional[list[int]] = None,
    sysfs_root: str = ...,
    synthetic: Optional[tuple[int, int, int, int]] = None,
) -> list[tuple[int, int]]: ...
def plan_pool(
    strategy: str,
    workers: int,
    accelerators: list[str] = ...,
    allowed: Optional[list[int]] = None,
    sysfs_root: str = ...,
    num_gpus: Optional[int] = None,
    synthetic: Optional[tuple[int, int, int, int]] = None,
) -> list[WorkerPlan]: ...
