"""Quantization on a Ray cluster: the calibration stream split across workers, each block's Hessians
the exact sum of the workers' parts, the block's linears quantized as parallel tasks (issue 16;
memory, traffic and time per worker: ``docs/scaling.md``).

The driver (the process running :func:`quipsharp.pipeline.quantize_model`) holds the model, or its
skeleton when the weights are streamed, and walks the blocks as one process does. The heavy steps
run as Ray tasks:

0. A cluster address is joined at once (an unreachable one fails before the model loads). A new
   local cluster starts in a background thread while the driver loads the model, and its workers
   import torch and quipsharp then (a first task each), not when the first block's tasks arrive.
1. After the calibration pass, the hidden states entering block 0 and every block's call arguments
   (masks, rotary embeddings) are cut into one shard of whole batches per worker and put into the
   cluster's object store. From then on the stream lives there; the driver keeps none of it.
2. Per block: one task per shard finds the block's groups of linears that read one input and sums
   the shard's Hessians, one object per group. One task per group merges its shards' sums in shard
   order into the group's mean. The sums are exact (:class:`~quipsharp.hessian.HessianAccumulator`),
   so the merge equals one process's sum bit for bit, and the driver never fetches a Hessian. Then
   one task per linear quantizes it, costliest first, with the same seed as in one process. Then one
   task per shard runs the quantized block (dequantized once, by the driver) on its shard; the
   outputs are the shard of the next block's stream.
3. A task whose worker dies is run again by Ray (``TASK_RETRIES``). Its inputs are immutable objects
   in the store, so the retry computes the same bits and nothing is lost. Finished blocks are saved to
   the work directory as in one process, so ``--resume`` continues after the driver itself dies.

Two things keep the workers' time on the work itself. Tensors cross the object store as raw numpy bytes, not
through torch's pickling (:func:`tensor_to_wire`). And each worker keeps the heap its tasks free, where glibc
would otherwise hand it back to the kernel and fault it in again, zeroed (:func:`keep_freed_heap`).

Bit-identity with one process needs the same float operations, and LAPACK's blocked factorisations
round differently with different thread counts. So every task runs with ``RayOptions.threads`` torch
threads, and one process matches the cluster when it runs with that many threads too.

Ray is optional (``pip install 'quipsharp[ray]'``) and imported only here, when a cluster is used.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import io
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quipsharp import faults
from quipsharp.config import ModelQuantConfig
from quipsharp.errors import QuipSharpError
from quipsharp.hessian import HessianAccumulator
from quipsharp.models.walker import BlockCall, linear_shape, set_submodule
from quipsharp.pipeline import (
    LayerReport,
    SharedMeans,
    StepTimes,
    _dequantized,
    _empty_quantized_like,
    collect_hessians,
    dense_weight,
    quantize_linear,
    run_block,
    shared_input_groups,
)

logger = logging.getLogger(__name__)

#: ``--ray`` values that are not addresses: ``local`` starts a private cluster on this machine; ``auto``
#: joins the cluster of ``RAY_ADDRESS`` or one already running here, else starts a local one.
LOCAL = "local"
AUTO = "auto"
#: Times Ray runs a task again after its worker process died (a crash, the OOM killer, a lost node).
TASK_RETRIES = 3
#: Seconds to wait for a TCP connection to a cluster address before calling it unreachable.
CONNECT_TIMEOUT_S = 5.0
DEFAULT_RAY_PORT = 6379
RAY_CLIENT_SCHEME = "ray://"
INSTALL_HINT = "pip install 'quipsharp[ray]'"
#: Ray's own usage reporting contacts the internet: off unless the user turned it on.
USAGE_STATS_ENV = "RAY_USAGE_STATS_ENABLED"
RAY_ADDRESS_ENV = "RAY_ADDRESS"
#: Where ``ray start`` records the address of the cluster it started on this machine.
RAY_TMPDIR_ENV = "RAY_TMPDIR"
DEFAULT_TMP = "/tmp"
RAY_ADDRESS_FILE = "ray_current_cluster"
#: Set to a file name: the cluster's task timeline (``ray.timeline``, Chrome trace JSON) is written there
#: when a cluster this process started closes (docs/scaling.md reads one).
TIMELINE_ENV = "QUIPSHARP_RAY_TIMELINE"
#: ``ray.init``'s settings: no dashboard, only Ray's warnings.
RAY_QUIET = {"logging_level": logging.WARNING, "include_dashboard": False}
#: A wait for the background start longer than this is logged (the model loaded faster than Ray started).
READY_WAIT_NOTE_S = 0.5


class ClusterError(QuipSharpError, RuntimeError):
    """The Ray cluster cannot be used: not installed, unreachable, or a task failed beyond its retries."""


@dataclass(frozen=True)
class RayOptions:
    """Where and how to run on Ray.

    Args:
        address: ``"local"``, ``"auto"`` or a cluster address (``HOST:PORT`` of its head, or
            ``ray://HOST:PORT`` for Ray Client).
        workers: shards of the calibration stream (default: the cluster's CPUs divided by
            ``threads``); for a local cluster also its CPUs.
        threads: torch threads of every task.
    """

    address: str = AUTO
    workers: int | None = None
    threads: int = 1

    def __post_init__(self) -> None:
        if not self.address:
            raise ValueError("the Ray address must not be empty")
        if self.workers is not None and self.workers < 1:
            raise ValueError(f"Ray workers must be at least 1, got {self.workers}")
        if self.threads < 1:
            raise ValueError(f"threads per Ray task must be at least 1, got {self.threads}")


def _import_ray() -> Any:
    try:
        import ray
    except ImportError as err:
        raise ClusterError(f"--ray needs Ray, which is not installed: {INSTALL_HINT}") from err
    return ray


def _host_port(address: str) -> tuple[str, int]:
    """``(host, port)`` of a cluster address (``HOST[:PORT]`` or ``ray://HOST[:PORT]``)."""
    rest = address.removeprefix(RAY_CLIENT_SCHEME)
    host, sep, port = rest.rpartition(":")
    if not sep:
        return rest, DEFAULT_RAY_PORT
    if not port.isdigit() or not host:
        raise ClusterError(f"not a Ray address: {address!r} (expected HOST:PORT, ray://HOST:PORT, auto or local)")
    return host.strip("[]"), int(port)


def _address_recorded_here() -> str | None:
    """The address ``ray start`` recorded on this machine (``$RAY_TMPDIR/ray/ray_current_cluster``), if any."""
    try:
        text = (Path(os.environ.get(RAY_TMPDIR_ENV, DEFAULT_TMP)) / "ray" / RAY_ADDRESS_FILE).read_text().strip()
    except OSError:
        return None
    return text or None


def check_reachable(address: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Fail fast, with the address in the message, when nothing accepts connections there (Ray's own
    connection attempts retry for a long time before giving up)."""
    host, port = _host_port(address)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as err:
        raise ClusterError(f"cannot reach the Ray cluster at {address}: {err.strerror or err}") from None


def _exit_on_signal(signum: int, _frame: Any) -> None:
    sys.exit(signum)


class _DropMessage(logging.Filter):
    """Drops log records whose message starts with ``prefix``."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


# ------------------------------------------------------------------------------------------ tensors on the wire
# torch pickles a tensor by saving its whole storage into a byte string (``torch.save``) and loading it back on
# the other side: two extra copies and the save's own overhead (SmolLM2's 151 MB stream as two shards: 0.19 s to
# put, against 0.03 s as numpy arrays; benchmarks/ray_overheads.py). Ray passes numpy arrays as pickle-5
# out-of-band buffers instead: one copy into the object store, a view out of it. The view is copied once on
# arrival, so a task owns what it is given: writing into an argument can never change the object other tasks
# read.

#: How a tensor travels: its bytes as a flat uint8 numpy array (``RAW``), or torch's own pickling (``TORCH``) for
#: what that cannot carry: tensors that require grad, are not on the CPU, not strided, or quantized.
WIRE_RAW = "raw"
WIRE_TORCH = "torch"
_wire_registered = False  # in this process (see use_wire_tensors)


def tensor_to_wire(t: torch.Tensor) -> tuple[Any, ...]:
    """A tensor as a picklable tuple: ``(WIRE_RAW, bytes as uint8 numpy [t.nbytes], dtype name, shape)`` for a
    plain CPU tensor (only its own elements: a view does not drag its base's storage along, as torch's pickling
    does), else ``(WIRE_TORCH, torch.save bytes)``."""
    if t.requires_grad or t.device.type != "cpu" or t.layout != torch.strided or t.is_quantized:
        buffer = io.BytesIO()
        torch.save(t, buffer)
        return (WIRE_TORCH, buffer.getvalue())
    flat = t.detach().resolve_conj().resolve_neg().contiguous().reshape(-1)
    return (WIRE_RAW, flat.view(torch.uint8).numpy(), str(t.dtype).removeprefix("torch."), tuple(t.shape))


def tensor_from_wire(wire: tuple[Any, ...]) -> torch.Tensor:
    """The tensor :func:`tensor_to_wire` described, in memory of its own (writable, not the store's)."""
    if wire[0] == WIRE_TORCH:
        return torch.load(io.BytesIO(wire[1]), weights_only=True)
    _, raw, dtype, shape = wire
    if raw.size == 0:  # numpy gives an empty array stride 0, which a dtype view refuses
        return torch.empty(shape, dtype=getattr(torch, dtype))
    return torch.from_numpy(raw.copy()).view(getattr(torch, dtype)).reshape(shape)


def use_wire_tensors(ray: Any) -> None:
    """Send this process's tensors through Ray as :func:`tensor_to_wire` describes (Ray's serializers are per
    process: the driver and every task call this; calling it again does nothing)."""
    global _wire_registered
    if not _wire_registered:
        ray.util.register_serializer(torch.Tensor, serializer=tensor_to_wire, deserializer=tensor_from_wire)
        _wire_registered = True


def drop_wire_tensors(ray: Any) -> None:
    """Give this process's tensors back to Ray's default serialization (the driver, when its cluster closes)."""
    global _wire_registered
    if _wire_registered:
        ray.util.deregister_serializer(torch.Tensor)
        _wire_registered = False


# ------------------------------------------------------------------------------------------ tasks
# Plain functions, run in the workers by the remote wrappers RayCluster builds.

def _warm_task(threads: int) -> int:
    """Nothing but this module's imports (torch, quipsharp) and the thread setting, done while the
    driver loads the model; returns the worker's process id."""
    _task_setup(threads)
    return os.getpid()


def _task_setup(threads: int) -> None:
    """What every task does first: its torch threads, tensors sent the cheap way (:func:`use_wire_tensors`),
    and a heap that keeps what the tasks free (:func:`keep_freed_heap`)."""
    global _heap_kept
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    use_wire_tensors(_import_ray())
    if not _heap_kept:
        keep_freed_heap()
        _heap_kept = True


# glibc's ``mallopt`` parameters (malloc.h) and the values a worker runs with. By default glibc hands freed
# memory back to the kernel and faults it in again, zeroed, on the next allocation. A worker's tasks allocate
# and free the same large activations over and over, and in the workers that cost 10% of their time in the
# kernel (``clear_page``; one process: 3%). The worker keeps its heap instead: blocks up to the largest mmap
# threshold glibc allows come from the heap, and up to ``WORKER_TRIM_THRESHOLD`` of free memory stays there.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
WORKER_MMAP_THRESHOLD = 32 << 20
WORKER_TRIM_THRESHOLD = 1 << 30
_heap_kept = False  # in this process (see _task_setup)


def keep_freed_heap() -> bool:
    """Make this process's allocator keep freed memory for reuse (glibc; elsewhere nothing happens).
    Returns whether both settings took. Only for processes quipsharp owns: Ray's workers."""
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt if name else None
    except (OSError, AttributeError):
        mallopt = None
    if mallopt is None:
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, WORKER_MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD,
                                                                                  WORKER_TRIM_THRESHOLD))


def _hessians_task(block: nn.Module, names: list[str], shard: list[torch.Tensor], calls: list[list[BlockCall]],
                   index: int, keep_outputs: bool, threads: int) -> tuple[Any, ...]:
    """The block's groups of linears that read one input (seen on the shard's first batch), the block's
    outputs when asked (else None), then one accumulator per group over the shard, padded with None to
    ``len(names)`` slots: each group's sums are their own object, fetched by the group's mean task
    (:func:`_mean_task`) and by no one else."""
    _task_setup(threads)
    faults.point("ray:hessians")
    groups = shared_input_groups(block, names, shard[0], calls[index][0])
    accs, outputs = collect_hessians(block, groups, shard, calls[index], keep_outputs)
    slots = [accs[group[0]] for group in groups] + [None] * (len(names) - len(groups))
    return (groups, outputs, *slots)


def _forward_task(block: nn.Module, shard: list[torch.Tensor], calls: list[list[BlockCall]], index: int,
                  threads: int) -> list[torch.Tensor]:
    """The shard's hidden states after the block."""
    _task_setup(threads)
    faults.point("ray:forward")
    return run_block(block, shard, calls[index])


def _mean_task(threads: int, *parts: HessianAccumulator) -> torch.Tensor:
    """One group's Hessian ``E[x xᵀ]`` (float64 ``[n, n]``) from its shards' accumulators, merged in shard
    order (the sums are exact: the same bits as one process's)."""
    _task_setup(threads)
    faults.point("ray:mean")
    merged = HessianAccumulator(parts[0].n)  # a fresh one: the parts stay as they were fetched
    for part in parts:
        merged.merge(part)
    return merged.mean()


def _quantize_task(module: nn.Module, full_name: str, cfg: Any, H: torch.Tensor | None,
                   threads: int) -> tuple[dict[str, torch.Tensor], LayerReport]:
    """One linear quantized: the :class:`QuantizedLinear`'s state (the module itself holds the
    process's kernel handles) and its report."""
    _task_setup(threads)
    faults.point("ray:quantize")
    q, report = quantize_linear(module, full_name, cfg, H)
    return q.state_dict(), report


def _shards(n: int, parts: int) -> list[range]:
    """``n`` batches cut into ``min(parts, n)`` contiguous ranges whose sizes differ by at most one."""
    parts = max(1, min(parts, n))
    base, extra = divmod(n, parts)
    out, start = [], 0
    for p in range(parts):
        size = base + (p < extra)
        out.append(range(start, start + size))
        start += size
    return out


def _quantize_cost(module: nn.Module) -> float:
    """Relative cost of quantizing a linear ``[m, n]``: BlockLDLQ's ``m·n²`` feedback and the ``n³/3``
    factorisation (docs/scaling.md's measured times follow it within a factor of 1.5)."""
    m, n = linear_shape(module)
    return m * n**2 + n**3 / 3


#: A Hessian task's first returns: the groups, the outputs (or None); the groups' accumulators follow.
HESSIAN_HEAD = 2


@dataclass(frozen=True)
class RemoteHessians:
    """A block's Hessians left on the cluster: ``parts[linear name]`` is the list of object refs of its
    group's accumulator on each shard, in shard order (layers sharing an input share the refs)."""

    parts: dict[str, list[Any]]


class RayCluster:
    """A connection to a Ray cluster serving :func:`quipsharp.pipeline.quantize_model` (``cluster=``).

    Use as a context manager: a cluster this object started is shut down on exit; a connection that
    existed before (``ray.init`` by the caller) is left open.
    """

    def __init__(self, options: RayOptions | None = None) -> None:
        self.options = options or RayOptions()
        self._ray = _import_ray()
        self._started = False
        self._ready_done = False
        self._starting: threading.Thread | None = None  # the local start's thread: lives until close()
        self._up = threading.Event()  # set by that thread once the cluster is up (or failed to start)
        self._release = threading.Event()  # set by close(): the thread may end
        self._start_error: BaseException | None = None
        self._warm_refs: list[Any] = []
        self._shard_refs: list[Any] = []
        self._calls_refs: list[Any] = []
        self._dtype = torch.float32  # of the stream
        self._dense: dict[str, tuple[Any, torch.Tensor]] = {}  # the block's Ŵ, computed as each linear arrives
        self.workers = self.options.workers or 0  # known once the cluster is up (:meth:`_ready`)
        self.times = StepTimes()  # the driver's serial work between tasks
        if self._connect():  # a new local cluster starts while the caller loads the model
            self._starting = threading.Thread(target=self._start_local, name="quipsharp-ray-start", daemon=True)
            self._starting.start()

    # ------------------------------------------------------------------ connection
    def _connect(self) -> bool:
        """Join the cluster the options name; True when a new local cluster is to be started instead
        (:meth:`_start_local`, in the background: nothing there can be unreachable)."""
        ray, address = self._ray, self.options.address
        os.environ.setdefault(USAGE_STATS_ENV, "0")
        if ray.is_initialized():
            if address not in (AUTO, LOCAL):
                logger.warning("Ray is already initialised in this process: using that cluster, not %s", address)
            return False
        if address == AUTO:  # RAY_ADDRESS, or a cluster started on this machine by `ray start`
            address = os.environ.get(RAY_ADDRESS_ENV) or LOCAL
            recorded = _address_recorded_here()
            if address == LOCAL and recorded is not None:
                try:
                    check_reachable(recorded)
                    address = recorded
                except ClusterError:  # a stale record: Ray itself would retry it for minutes
                    logger.info("the Ray cluster recorded here (%s) is gone", recorded)
            if address == LOCAL:
                logger.info("no Ray cluster running here: starting a local one")
        if address == LOCAL:
            if threading.current_thread() is threading.main_thread() \
                    and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
                # what ray.init does in the main thread: SIGTERM unwinds (locks released, cluster shut down)
                signal.signal(signal.SIGTERM, _exit_on_signal)
            return True
        check_reachable(address)
        try:
            ray.init(address=address, **RAY_QUIET)
        except (ConnectionError, RuntimeError, ValueError) as err:
            raise ClusterError(f"cannot join the Ray cluster at {address}: {str(err).splitlines()[0]}") from None
        self._started = True
        return False

    def _start_local(self) -> None:
        """Start a private local cluster (a new one even when an old one is recorded here) and warm its
        workers: each imports torch and quipsharp, which would otherwise delay the first real tasks.

        Runs in a background thread; :meth:`_ready` waits for ``_up`` and raises what it raised. The
        thread then waits until :meth:`close`: Ray's head processes die with the thread that started
        them (they are started with the parent-death signal, which Linux ties to the thread)."""
        try:
            workers = self.options.workers or os.cpu_count() or 1
            quiet_thread = _DropMessage("SIGTERM handler is not set")  # set in the main thread instead
            ray_logger = logging.getLogger("ray._private.worker")
            ray_logger.addFilter(quiet_thread)
            start = time.perf_counter()
            try:
                self._ray.init(address=LOCAL, num_cpus=workers * self.options.threads, **RAY_QUIET)
            finally:
                ray_logger.removeFilter(quiet_thread)
            self._started = True
            logger.info("local Ray cluster started in %.1fs (in the background)", time.perf_counter() - start)
            warm = self._ray.remote(num_cpus=self.options.threads)(_warm_task)
            self._warm_refs = [warm.remote(self.options.threads) for _ in range(workers)]
        except BaseException as err:  # handed to the main thread by _ready
            self._start_error = err
        finally:
            self._up.set()
        self._release.wait()

    def _ready(self) -> None:
        """Wait for the cluster (started in the background or joined), then build the task wrappers."""
        if self._ready_done:
            return
        if self._starting is not None:
            start = time.perf_counter()
            self._up.wait()
            waited = time.perf_counter() - start
            if waited > READY_WAIT_NOTE_S:
                logger.info("waited %.1fs for the local Ray cluster to start", waited)
            if self._start_error is not None:
                err, self._start_error = self._start_error, None
                raise ClusterError(f"cannot start a local Ray cluster: {str(err).splitlines()[0]}") from err
        ray = self._ray
        use_wire_tensors(ray)

        def remote(task: Callable[..., Any], returns: int = 1) -> Any:  # ``threads`` CPUs per task, retried
            return ray.remote(num_cpus=self.options.threads, max_retries=TASK_RETRIES, num_returns=returns)(task)

        self._hessians = remote(_hessians_task)  # its number of returns set per block (HESSIAN_HEAD + linears)
        self._forward = remote(_forward_task)
        self._mean = remote(_mean_task)
        self._quantize = remote(_quantize_task)
        cpus = int(ray.cluster_resources().get("CPU", 1))
        self.workers = self.options.workers or max(1, cpus // self.options.threads)
        self._ready_done = True
        logger.info("Ray cluster with %d CPUs: %d shards, %d threads per task", cpus, self.workers,
                    self.options.threads)
        if self._warm_refs:  # done by now, or soon: a worker that cannot import quipsharp fails here, clearly
            refs, self._warm_refs = self._warm_refs, []
            self._get(refs)

    def close(self) -> None:
        """Drop the stream's objects; shut the cluster down if this object started it."""
        if self._starting is not None:  # a start still under way: let it finish (shut down below)
            self._up.wait()
        self._shard_refs, self._calls_refs, self._warm_refs = [], [], []
        timeline = os.environ.get(TIMELINE_ENV)
        if timeline and self._started and self._ray.is_initialized():
            self._ray.timeline(filename=timeline)  # every task's start and end on every worker (Chrome trace)
            logger.info("Ray task timeline written to %s", timeline)
        if self._ready_done:
            drop_wire_tensors(self._ray)
        if self._started and self._ray.is_initialized():
            self._ray.shutdown()
            self._started = False
        if self._starting is not None:  # the head processes are gone: the starting thread may end
            self._release.set()
            self._starting.join()
            self._starting = None

    def __enter__(self) -> RayCluster:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _get(self, refs: Any) -> Any:
        """``ray.get`` with a task that failed beyond its retries turned into a :class:`ClusterError`
        (errors raised by our own code inside a task come back as themselves)."""
        ray = self._ray
        try:
            return ray.get(refs)
        except (ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError,
                ray.exceptions.ObjectLostError, ray.exceptions.RaySystemError) as err:
            raise ClusterError(f"a Ray task failed {TASK_RETRIES + 1} times ({type(err).__name__}); the blocks "
                               f"done so far are saved: rerun with --resume") from err

    # ------------------------------------------------------------------ the stream
    def scatter(self, stream: Iterable[torch.Tensor], calls: list[list[BlockCall]]) -> None:
        """Put the calibration stream (per batch ``[b, ctx, hidden]``) and the blocks' call arguments
        (``calls[block][batch]``) into the object store, one shard of whole batches per worker."""
        self._ready()
        batches = list(stream)
        if batches:
            self._dtype = batches[0].dtype
        ray = self._ray
        self._shard_refs, self._calls_refs = [], []
        for part in _shards(len(batches), self.workers):
            self._shard_refs.append(ray.put([batches[b] for b in part]))
            self._calls_refs.append(ray.put([[block_calls[b] for b in part] for block_calls in calls]))
        logger.info("calibration stream of %d batches in %d shards", len(batches), len(self._shard_refs))

    def hessians(self, block: nn.Module, names: list[str], index: int,
                 keep_outputs: bool) -> tuple[list[list[str]], RemoteHessians]:
        """Block ``index``'s groups of linears that read one input (as
        :func:`~quipsharp.pipeline.shared_input_groups` finds them, on each shard's first batch) and
        its Hessians over the whole stream, left in the object store: each group's shard sums are
        merged there by a task (:meth:`quantize_linears`), so the driver never fetches or holds a
        block's Hessians (three float64 ``[n, n]`` bins per group: 87 GB per shard for one 405B block).
        With ``keep_outputs`` the float block's outputs become the stream (the "original inputs" mode)."""
        self._ready()
        ray = self._ray
        block_ref = ray.put(block)
        task = self._hessians.options(num_returns=HESSIAN_HEAD + len(names))
        pending = [task.remote(block_ref, names, shard, calls, index, keep_outputs, self.options.threads)
                   for shard, calls in zip(self._shard_refs, self._calls_refs, strict=True)]
        found = self._get([refs[0] for refs in pending])
        if any(groups != found[0] for groups in found[1:]):
            raise ClusterError(f"block {index}'s linears share their inputs differently on different shards "
                               f"({found[0]} and {next(g for g in found if g != found[0])}): cannot merge")
        if keep_outputs:  # made by the tasks just waited on: they exist
            self._shard_refs = [refs[1] for refs in pending]
        groups = found[0]
        shared = [[refs[HESSIAN_HEAD + g] for refs in pending] for g in range(len(groups))]  # one list per group
        return groups, RemoteHessians({name: shared[g] for g, group in enumerate(groups) for name in group})

    def advance(self, block: nn.Module, index: int) -> None:
        """The stream through block ``index`` as it stands (quantized linears run as dense layers of
        their dequantized weights, computed once here as :func:`~quipsharp.pipeline.run_block` does).

        Does not wait: the shards' new streams are the pending tasks' outputs, and the next block's
        Hessian task on a shard starts as soon as that shard's forward is done (Ray resolves the
        dependency on the worker side), so no worker waits for the other shards or for the driver
        between the two. A failure surfaces where the outputs are next waited on (:meth:`hessians`)."""
        self._ready()
        ready, self._dense = self._dense, {}
        with self.times("dequantizing and sending blocks"), _dequantized(block, self._dtype, ready):
            block_ref = self._ray.put(block)
        pending = [self._forward.remote(block_ref, shard, calls, index, self.options.threads)
                   for shard, calls in zip(self._shard_refs, self._calls_refs, strict=True)]
        self._shard_refs = pending

    # ------------------------------------------------------------------ quantization
    def quantize_linears(
        self,
        block: nn.Module,
        block_name: str,
        names: list[str],
        hessians: RemoteHessians | dict[str, HessianAccumulator | torch.Tensor] | None,
        config: ModelQuantConfig,
        on_layer: Callable[[LayerReport], None] | None = None,
        *,
        next_stream: bool = False,
    ) -> list[LayerReport]:
        """:func:`quipsharp.pipeline.quantize_linears` with one task per linear, the costliest first;
        the reports come back in the order of ``names``. ``hessians``: from :meth:`hessians` (merged
        on the cluster), or given here (their means computed here); one object per shared Hessian.
        With ``next_stream`` (:meth:`advance` follows), each linear's ``Ŵ`` is computed as it
        arrives, while the other tasks still run."""
        self._ready()
        self._dense = {}
        ray = self._ray
        with self.times("sending Hessians"):
            order = sorted(names, key=lambda n: -_quantize_cost(block.get_submodule(n)))
            H_refs = self._hessian_refs(hessians, order)  # the costliest linear's mean first: the critical path
            pending: dict[Any, str] = {}
            for name in order:
                full = f"{block_name}.{name}"
                pending[self._quantize.remote(block.get_submodule(name), full, config.layer_config(full),
                                              H_refs[name], self.options.threads)] = name
        del H_refs  # each task holds its own reference
        reports: dict[str, LayerReport] = {}
        waiting = list(pending)
        while waiting:
            ready, waiting = ray.wait(waiting, num_returns=1)
            state, report = self._get(ready[0])
            name = pending[ready[0]]
            full = f"{block_name}.{name}"
            module = block.get_submodule(name)
            q = _empty_quantized_like(module, config.layer_config(full))
            q.load_state_dict(state)
            set_submodule(block, name, q)
            if next_stream and waiting:  # the next stream's Ŵ while the other tasks run (the last: in advance)
                with self.times("dequantizing and sending blocks"):
                    self._dense[name] = (q, dense_weight(q, self._dtype))
            reports[name] = report
            if on_layer is not None:
                on_layer(report)
        return [reports[name] for name in names]

    def _hessian_refs(self, hessians: RemoteHessians | dict[str, HessianAccumulator | torch.Tensor] | None,
                      names: list[str]) -> dict[str, Any]:
        """Each linear's ``E[x xᵀ]`` as an object ref, one object per shared Hessian (None: data-free).
        From :meth:`hessians`: a task per group merges the shards' sums on the cluster (no round trip
        through the driver: the quantization tasks wait on it there); given here: computed and put."""
        if hessians is None:
            return dict.fromkeys(names)
        refs: dict[int, Any] = {}
        out = {}
        if isinstance(hessians, RemoteHessians):
            for name in names:
                parts = hessians.parts[name]
                if id(parts) not in refs:
                    refs[id(parts)] = self._mean.remote(self.options.threads, *parts)
                out[name] = refs[id(parts)]
            return out
        mean = SharedMeans(hessians)
        for name in names:
            H = mean(name)
            if id(H) not in refs:
                refs[id(H)] = self._ray.put(H)
            out[name] = refs[id(H)]
        return out


@contextlib.contextmanager
def ray_cluster(options: RayOptions | None) -> Any:
    """A :class:`RayCluster` for ``options`` (closed on exit), or None when ``options`` is None."""
    if options is None:
        yield None
        return
    cluster = RayCluster(options)  # a remote cluster is joined here; a local one starts in the background
    try:
        yield cluster
    finally:
        cluster.close()
