"""Benchmark session setup: Triton's CPU interpreter switch (before anything imports triton, as in tests/),
cudnn.benchmark for every candidate alike, and a short summary of the model results at the end."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _steady_cpu_heap():
    """CPU runs: keep freed memory in glibc's heap instead of returning it to the OS. Otherwise every call's
    outputs (tens of MB) are fresh pages, and on the shared VMs the page faults cost more than the kernels and
    flip from run to run (WS forward measured 0.9x to 3.0x timm in back-to-back runs). All candidates share the
    allocator, so this removes OS noise, not anyone's cost. Same as MALLOC_TRIM_THRESHOLD_ and
    MALLOC_MMAP_THRESHOLD_ set before start; BITFAST_BENCH_MALLOC=0 leaves glibc's defaults."""
    if torch.cuda.is_available() or os.environ.get("BITFAST_BENCH_MALLOC", "1") == "0":
        return None
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (macOS, musl): nothing to tune
        return None
    m_trim_threshold, m_mmap_threshold = -1, -3
    ok = libc.mallopt(m_trim_threshold, 2**31 - 1) == 1 and libc.mallopt(m_mmap_threshold, 32 * 2**20) == 1
    return "glibc: trim threshold 2 GiB, mmap threshold 32 MiB" if ok else None


CPU_HEAP = _steady_cpu_heap()
if CPU_HEAP:
    os.environ["BITFAST_BENCH_HEAP"] = CPU_HEAP  # recorded in every result's environment
torch.backends.cudnn.benchmark = True


def pytest_report_header(config):
    from bench import _timing as T

    mode = "quick" if T.QUICK else "full"
    heap = f"; heap kept ({CPU_HEAP})" if CPU_HEAP else ""
    return (f"bitfast bench: {T.device_name()} ({mode} mode; BITFAST_BENCH_QUICK=0/1{heap}), "
            f"results -> {T.results_path()}")


def pytest_terminal_summary(terminalreporter):
    from bench import _timing as T
    from bench.report import headline_lines

    if T.SESSION:
        terminalreporter.section("bitfast model benchmarks")
        for line in headline_lines(T.SESSION) or ["(no headline setting measured in this run)"]:
            terminalreporter.write_line(line)
        terminalreporter.write_line(f"results: {T.results_path()}  (render: python -m bench.report)")


@pytest.fixture
def cpu_threads():
    """CPU quick mode runs with BITFAST_BENCH_THREADS torch threads (default 1): on a shared 2-core machine
    OpenMP threads that wait for busy cores make steps 5-10x slower and the spread huge."""
    from bench import _timing as T

    old = torch.get_num_threads()
    if not T.ON_GPU and T.QUICK:
        torch.set_num_threads(int(os.environ.get("BITFAST_BENCH_THREADS", "1")))
    yield torch.get_num_threads()
    torch.set_num_threads(old)
