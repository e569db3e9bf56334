"""Timing, bandwidth and result-file helpers shared by every benchmark under bench/.

Timing (all times in milliseconds, summarized by `Stats`: median, quartiles, min/max over repeats)

    DEVICE, ON_GPU, QUICK         the device benchmarks run on; QUICK = BITFAST_BENCH_QUICK=1, default on CPU
    sync(device)                  wait for queued GPU work (no-op on CPU)
    sample_ms(fn, device, inner)  one sample: ms per call of `fn`, averaged over `inner` back-to-back calls
                                  (CUDA events on a GPU, perf_counter on the CPU)
    measure(fn, device, warmup=2, repeats=5, inner=1) -> Stats
    alternate({name: fn}, device, warmup, rounds, inner) -> {name: Stats}
                                  warms every fn up, then takes one sample of each per round, rotating the order
                                  every round, so clock/thermal drift hits all candidates alike
    kernel_ms(fn, device) -> Stats  triton.testing.do_bench on a GPU (flushes L2 between calls), else measure()
    copy_gbps(device, nbytes=None)  measured device-to-device copy bandwidth (2 * nbytes moved), cached
    gbps(nbytes, ms)              effective bandwidth in GB/s (1e9 bytes/s)

Results: `record(suite, name, stats, **fields)` builds a dict; `write_records([...])` merges them into
bench/results/<device>_<YYYY-MM-DD>.json (or $BITFAST_BENCH_RESULTS/...), replacing records with the same
(suite, name). `python -m bench.report` renders bench/REPORT.md from those files.

Result file schema (version 1):

    {"schema": 1,
     "env": environment(),           # device, gpu_count, torch, triton, cuda, cudnn, python, bitfast, git, date...
     "records": [record, ...]}

    record keys, all optional except suite and name:
      suite        "models", "scaling", "ddp", "max_batch", or a kernel suite ("group_norm", ...)
      name         unique within the suite (e.g. the pytest id)
      params       dict of the setting: shapes, dtype, layout, backend/impl... (free-form, shown in tables)
      median_ms, q1_ms, q3_ms, min_ms, max_ms, n     from Stats.as_dict()
      img_per_s    images per second (model suites)
      peak_mem_bytes, max_batch                      memory (model suites, GPU)
      bytes        minimum bytes a kernel must move (GUIDE §6: GN fwd 2T, bwd 3T)  -> bandwidth table
      gbps         effective GB/s (else derived from bytes / median_ms)
      copy_gbps    copy_gbps() measured in the same process; the report shows gbps / copy_gbps
      skipped      reason, when a case could not run (out of memory, ...)
    Kernel benches that use pytest-benchmark's `benchmark` fixture can instead put bytes / gbps / copy_gbps in
    benchmark.extra_info and save with --benchmark-json into bench/results/; the report reads both formats.
"""
import datetime
import fcntl
import json
import os
import platform
import re
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
QUICK = os.environ.get("BITFAST_BENCH_QUICK", "0" if ON_GPU else "1") == "1"
RESULTS_DIR = Path(os.environ.get("BITFAST_BENCH_RESULTS", Path(__file__).parent / "results"))
SCHEMA = 1
SESSION = []  # every record written in this process (conftest prints a summary from it)


@dataclass
class Stats:
    median_ms: float
    q1_ms: float
    q3_ms: float
    min_ms: float
    max_ms: float
    n: int

    @classmethod
    def from_samples(cls, samples):
        s = np.asarray(samples, dtype=np.float64)
        if s.size == 0 or not np.all(np.isfinite(s)):
            raise ValueError(f"samples must be a non-empty list of finite times, got {samples!r}")
        q1, med, q3 = np.percentile(s, [25, 50, 75])
        return cls(float(med), float(q1), float(q3), float(s.min()), float(s.max()), int(s.size))

    @property
    def iqr_pct(self):  # spread: interquartile range relative to the median
        return 100.0 * (self.q3_ms - self.q1_ms) / self.median_ms if self.median_ms > 0 else float("nan")

    def as_dict(self):
        return asdict(self)


def sync(device=DEVICE):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def sample_ms(fn, device=DEVICE, inner=1):
    """Milliseconds per call of fn(), averaged over `inner` back-to-back calls."""
    if torch.device(device).type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / inner
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - t0) * 1e3 / inner


def measure(fn, device=DEVICE, warmup=2, repeats=5, inner=1):
    for _ in range(warmup):
        fn()
    sync(device)
    return Stats.from_samples([sample_ms(fn, device, inner) for _ in range(repeats)])


def alternate(fns, device=DEVICE, warmup=2, rounds=5, inner=1):
    """{name: fn} -> {name: Stats}; one sample of each fn per round, the order rotated each round."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    names = list(fns)
    for name in names:
        for _ in range(warmup):
            fns[name]()
    sync(device)
    samples = {n: [] for n in names}
    for r in range(rounds):
        for i in range(len(names)):
            name = names[(i + r) % len(names)]
            samples[name].append(sample_ms(fns[name], device, inner))
    return {n: Stats.from_samples(s) for n, s in samples.items()}


def kernel_ms(fn, device=DEVICE, warmup_ms=25, rep_ms=100):
    """Stats of one kernel call: do_bench (CUDA events, L2 flushed) on a GPU, perf_counter repeats on the CPU."""
    if torch.device(device).type != "cuda":
        return measure(fn, device, warmup=2, repeats=7)
    from triton.testing import do_bench

    try:
        times = do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="all")
        return Stats.from_samples(times)
    except (AssertionError, TypeError, ValueError):  # older triton: no return_mode="all"
        q = do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.0, 0.25, 0.5, 0.75, 1.0])
        return Stats(q[2], q[1], q[3], q[0], q[4], 0)


def gbps(nbytes, ms):
    return nbytes / (ms * 1e-3) / 1e9


_COPY = {}


def copy_gbps(device=DEVICE, nbytes=None):
    """Device-to-device copy bandwidth in GB/s (read + write = 2 * nbytes), far bigger than L2, cached."""
    device = torch.device(device)
    nbytes = nbytes or (512 << 20 if device.type == "cuda" else 64 << 20)
    key = (str(device), nbytes)
    if key not in _COPY:
        src = torch.randn(nbytes // 4, device=device)
        dst = torch.empty_like(src)
        _COPY[key] = gbps(2 * nbytes, kernel_ms(lambda: dst.copy_(src), device).median_ms)
        del src, dst
    return _COPY[key]


def device_name(device=DEVICE):
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return "cpu: " + line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "cpu: " + (platform.processor() or platform.machine())


def _git_commit():
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def environment(device=DEVICE):
    """What a reader needs to reproduce a number: device, versions, bitfast backends, mode."""
    import bitfast
    from bitfast import _backend

    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    dev = torch.device(device)
    return {
        "device": device_name(dev),
        "device_type": dev.type,
        "gpu_count": torch.cuda.device_count() if ON_GPU else 0,
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "python": platform.python_version(),
        "bitfast": getattr(bitfast, "__version__", None),
        "git": _git_commit(),
        "backends": {op: _backend.resolve(op, None, dev.type) for op in ("group_norm", "weight_standardize")},
        "quick": QUICK,
        "cpu_heap": os.environ.get("BITFAST_BENCH_HEAP"),  # set by bench/conftest.py when it tunes glibc
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def results_path(device=DEVICE, results_dir=None, date=None):
    """bench/results/<device slug>_<YYYY-MM-DD>.json, e.g. nvidia-h100-80gb-hbm3_2025-01-31.json, cpu_..."""
    dev = torch.device(device)
    slug = "cpu" if dev.type == "cpu" else re.sub(r"[^a-z0-9]+", "-", device_name(dev).lower()).strip("-")
    date = date or datetime.date.today().isoformat()
    return Path(results_dir or RESULTS_DIR) / f"{slug}_{date}.json"


def record(suite, name, stats=None, **fields):
    rec = {"suite": str(suite), "name": str(name)}
    if stats is not None:
        rec.update(stats.as_dict())
    rec.update(fields)
    return rec


def write_records(records, path=None, env=None):
    """Merge `records` into the JSON result file (same (suite, name) replaced); returns its path."""
    for r in records:
        if "suite" not in r or "name" not in r:
            raise ValueError(f"records need 'suite' and 'name' keys, got {sorted(r)}")
    path = Path(path or results_path())
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = os.open(path.parent, os.O_RDONLY)  # flock on the folder: several processes may write the same file
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        old = []
        if path.exists():
            try:
                data = json.loads(path.read_text())
                old = data.get("records", []) if data.get("schema") == SCHEMA else []
            except (json.JSONDecodeError, AttributeError):
                old = []
        new_keys = {(r["suite"], r["name"]) for r in records}
        merged = [r for r in old if (r.get("suite"), r.get("name")) not in new_keys] + list(records)
        doc = {"schema": SCHEMA, "env": env or environment(), "records": merged}
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc, indent=1, default=str) + "\n")
        os.replace(tmp, path)
    finally:
        os.close(lock)
    SESSION.extend(records)
    return path
