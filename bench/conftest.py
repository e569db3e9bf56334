"""Benchmark session setup: Triton's CPU interpreter switch (before anything imports triton, as in tests/),
cudnn.benchmark for every candidate alike, and a short summary of the model results at the end."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
torch.backends.cudnn.benchmark = True


def pytest_report_header(config):
    from bench import _timing as T

    mode = "quick" if T.QUICK else "full"
    return f"bitfast bench: {T.device_name()} ({mode} mode; BITFAST_BENCH_QUICK=0/1), results -> {T.results_path()}"


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
