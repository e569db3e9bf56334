"""The sm_90 kernel budget (bench/budget.py; every number PREDICTED from ptxas and a traffic model): no hot kernel
may spill or fall below 2 blocks of 256 threads per SM, and no path may move more than 1.15x the minimum DRAM
bytes, except the known misses listed in bench/budget.py (which may not get worse). Also shows that the check
fails on a planted regression, and that the Python mirror of the CUDA launch arithmetic matches csrc/."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import budget

ROOT = Path(__file__).resolve().parents[1]
NVCC = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")
needs_nvcc = pytest.mark.skipif(not NVCC.exists(), reason="no CUDA toolkit (nvcc)")

# A kernel that keeps LIVE floats alive across a loop: LIVE=160 needs > 128 registers (one 256-thread block per
# SM); LIVE=64 under -maxrregcount=32 must spill.
PLANTED = r"""
__global__ void planted(const float* __restrict__ x, float* y, int n) {
  float v[LIVE];
#pragma unroll
  for (int k = 0; k < LIVE; ++k) v[k] = x[threadIdx.x + k * 256];
  float s = 0.f;
#pragma unroll 1
  for (int i = 0; i < n; ++i)
#pragma unroll
    for (int k = 0; k < LIVE; ++k) s = s * v[k] + v[(k + 1) % LIVE];
  y[threadIdx.x] = s;
}
"""


@needs_nvcc
@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: bench/gpu_check.sh's budget stage runs it")
def test_budget_holds_except_known_misses(tmp_path):
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the real compiler, not the interpreter
    r = subprocess.run([sys.executable, "-m", "bench.budget", str(tmp_path / "budget")], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    import json

    report = json.loads((tmp_path / "budget.json").read_text())
    assert report["predicted"] and report["failures"] == []
    assert {m["known"] for m in report["misses"]} <= {True}
    names = {k["name"] for k in report["kernels"] if k["hot"]}
    assert "nhwc_bwd_sums<__nv_bfloat16, 8, true>" in names and "_nhwc_bwd_sums" in names
    assert len(report["paths"]) == len(report["shapes"]) * 3 * 2 * 2 * 2  # shapes x N x layouts x dirs x backends


def _planted(tmp_path, live, *flags):
    src = tmp_path / f"planted{live}.cu"
    src.write_text(PLANTED)
    (k,) = budget.nvcc_kernels(src, [f"-DLIVE={live}", *flags], cwd=tmp_path).items()
    return {"backend": "cuda", "name": k[0], "hot": True, **k[1],
            "blocks_per_sm": budget.blocks_per_sm(k[1]["regs"], k[1]["smem"], 256)}


@needs_nvcc
def test_planted_spill_and_occupancy_regressions_fail(tmp_path):
    spills = _planted(tmp_path, 64, "-maxrregcount=32")
    fat = _planted(tmp_path, 160)
    assert spills["spill_st"] > 0 and fat["regs"] > 128 and fat["blocks_per_sm"] == 1, (spills, fat)
    bad = budget.failures(budget.misses({"kernels": [spills, fat], "paths": []}), known={})
    assert any("cuda:planted" in b and "spill_bytes" in b for b in bad), bad
    assert any("cuda:planted" in b and "min_threads_per_sm" in b for b in bad), bad


def test_worse_known_miss_and_stale_known_miss_fail():
    key = ("cuda nhwc fwd", "max_bytes_ratio")
    known = {key: 1.2}
    worse = budget.misses({"kernels": [], "paths": [{"backend": "cuda", "layout": "nhwc", "direction": "fwd",
                                                     "bytes_ratio": 1.3}]})
    assert budget.failures(worse, known) == [f"worse {key}: 1.3, known miss 1.2"]
    assert "now meets its threshold" in budget.failures({}, known)[0]
    assert budget.failures({key: 1.2}, known) == []


def test_cuda_launch_mirror_matches_source():
    src = (ROOT / "csrc" / "group_norm.cu").read_text()
    for name, value in budget.CUDA_CONSTANTS.items():
        m = re.search(rf"(?:constexpr int(?:64_t)? {name} = |#define {name} )\(?(\d+)(?:ll)?(?: << (\d+))?", src)
        assert m, f"{name} not found in csrc/group_norm.cu: update bench/budget.py's mirror"
        assert int(m.group(1)) << int(m.group(2) or 0) == value, name
    # the host arithmetic the mirror follows (if these lines change, change cuda_launches/chunk_samples too)
    assert "const int64_t ns = per > 0 ? kL2Bytes / per : a.N;" in src and "return (a.N + chunks - 1) / chunks;" in src
    assert "chunk_samples(a, sizeof(T))" in src and "chunk_samples(a, 2 * sizeof(T))" in src
    assert "CT = CV < 32 ? int(CV) : 32;" in src and "R = int64_t(kRowsPerThread) * TR;" in src
    blocks = dict.fromkeys(["nhwc_moments<__nv_bfloat16, 8>", "nhwc_group_stats<__nv_bfloat16>",
                            "nhwc_normalize<__nv_bfloat16, 8, true>", "nhwc_bwd_sums<__nv_bfloat16, 8, true>",
                            "nhwc_bwd_group", "nhwc_bwd_dx<__nv_bfloat16, 8, true>", "param_grads"], 1)
    # issue 13's review: 256 x 56^2 at N=256 is 54 launches forward, 112 backward; 64 x 56^2 at N=64 was 62 + 2
    # samples (a 26-block tail), balanced into 32 + 32
    assert len(budget.cuda_launches("nhwc", 256, 56, 256, "fwd", blocks)) == 54
    assert len(budget.cuda_launches("nhwc", 256, 56, 256, "bwd", blocks)) == 113  # + param_reduce
    grids = [g for k, g, _ in budget.cuda_launches("nhwc", 64, 56, 64, "fwd", blocks) if "moments" in k]
    assert grids == [32 * 13, 32 * 13]
    # param_grads: slices of 16 samples over blocks of 256 channels, then one sum over the slices (none for N <= 16)
    assert "param_slices(a.N)" in src and "return (N + kParamSlice - 1) / kParamSlice;" in src
    assert budget.cuda_param_grads(256, 512) == [("param_grads", 32, 8 * 16 * 512), ("param_reduce", 2, 8 * 512)]
    assert budget.cuda_param_grads(16, 64) == [("param_grads", 1, 8 * 64)]
    # NCHW: 46 KB of each group in shared memory (half each for x and dy), at most 4 blocks per SM with it
    assert "kNchwCacheBytes / (tensors * pack_bytes)" in src
    (k, grid, b, bps), *_ = budget.cuda_launches("nchw", 256, 56, 256, "bwd", {"nchw_bwd<__nv_bfloat16, 8, true>": 6})
    assert bps == 4 and b == 256 * 256 * 56 * 56 * 2 * 3 + 8 * 256 * 32  # the uncached rest (28 MB) stays in L2


def test_traffic_model():
    assert budget.reread(10e6, 10e6) == 0.0  # fits: the re-read is an L2 hit
    assert budget.reread(50e6, 50e6) == 1.0  # the set alone overflows L2
    assert budget.reread(30e6, 20e6) == pytest.approx(0.5)  # the last half of the re-read was evicted by writes
    assert budget.reread_streaming(39e6) == 0.0 and budget.reread_streaming(41e6) == 1.0  # evict-first writes
    assert budget.blocks_per_sm(183, 16384, 256) == 1 and budget.blocks_per_sm(128, 0, 256) == 2
    assert budget.blocks_per_sm(32, 0, 256) == 8 and budget.blocks_per_sm(32, 0, 128) == 16


def test_measure_writes_measured_beside_predicted(tmp_path):
    """The GPU stage's code path, on the CPU backend at a tiny shape (bench/gpu_check.sh budget runs it on CUDA)."""
    import json

    p = budget.path_row("cpu", "nhwc", "bwd", 64, 4, 2, 1, [("k", 132, 4096)], {"k": 1})
    (tmp_path / "b.json").write_text(json.dumps({"paths": [p]}))
    assert budget.measure(tmp_path / "b", device="cpu") == 0
    (row,) = json.loads((tmp_path / "b-measured.json").read_text())["paths"]
    assert row["measured_ms"] > 0 and row["designed_bytes"] == 4096 and row["gbps"] > 0
