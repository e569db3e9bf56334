"""GroupNorm(+ReLU) benchmarks (pytest-benchmark): the GN layers of BiT-R50x1, forward and forward+backward, every
bitfast backend side by side with torch nn.GroupNorm+ReLU (eager; torch.compile on a GPU) and nn.BatchNorm2d+ReLU
(cuDNN on a GPU) on the same shape and memory format.

    impl        torch          nn.GroupNorm + ReLU, eager, module in the activation dtype
                torch-compile  the same under torch.compile (GPU only: inductor on the CPU is too slow for CI)
                bn             nn.BatchNorm2d + ReLU, training mode, fp32 params (what a BN ResNet pays)
                bitfast-<b>    bitfast.nn.GroupNormAct with backend b (cpu / cuda / triton; fp32 params)

Effective bandwidth counts the minimum bytes (GUIDE §6): forward 2T (read x, write y), forward+backward 5T (2T, then
read x and dy, write dx), T = x.numel() * itemsize; `copy_frac` is that over a measured device-to-device copy. Each
test's benchmark.extra_info holds bytes, gbps, copy_gbps, copy_frac and speedup_vs_torch (the torch eager test of the
same setting runs first); the records also go to bench/results/ (suite "group_norm", python -m bench.report).

GPU: bf16, batch 64 at 224 px, channels_last and NCHW, times are triton.testing.do_bench medians (L2 flushed).
CPU: fp32, batch 4 at 112 px (quick mode, BITFAST_BENCH_QUICK=1: batch 2 at 112 px, three layers, few rounds),
both memory formats; the Triton interpreter is not benchmarked. CPU target: bitfast-cpu forward+backward >= 1.5x
torch eager, fp32, NCHW and channels_last.
"""
import pytest
import torch

from bench import _timing as T
from bitfast import _backend
from bitfast.nn import GroupNormAct

pytestmark = pytest.mark.usefixtures("cpu_threads")

# (C, H) of the distinct GN layers of BiT-R50x1 at 224 px (pre-activation units; the last is the head's GN).
R50_GN = [(64, 56), (256, 56), (128, 28), (512, 28), (256, 14), (1024, 14), (512, 7), (2048, 7)]
GROUPS = 32
if T.ON_GPU:
    DTYPE, BATCH, SCALE, LAYERS, ROUNDS = torch.bfloat16, 64, 1, R50_GN, 20
elif T.QUICK:
    DTYPE, BATCH, SCALE, LAYERS, ROUNDS = torch.float32, 2, 2, [(64, 56), (512, 28), (2048, 7)], 4
else:
    DTYPE, BATCH, SCALE, LAYERS, ROUNDS = torch.float32, 4, 2, R50_GN, 10

BITFAST = [b for b in ("cpu", "cuda", "triton") if _backend.usable_why(b, T.DEVICE.type) is None
           and not (b == "triton" and not T.ON_GPU)]
IMPLS = ["torch", "torch-compile", "bn"] + [f"bitfast-{b}" for b in BITFAST]
LAYOUTS = ["channels_last", "nchw"]
SETTINGS = [(c, h, d, fmt, impl) for c, h in LAYERS for d in ("fwd", "fwdbwd") for fmt in LAYOUTS for impl in IMPLS]
_TORCH_MS = {}  # (C, H, direction, layout) -> torch eager median, for speedup_vs_torch


def make_module(impl, C):
    if impl.startswith("bitfast-"):
        return GroupNormAct(GROUPS, C, backend=impl.split("-", 1)[1]).to(T.DEVICE)
    if impl == "bn":  # fp32 params with bf16 activations, as under autocast: cuDNN's mixed-precision BN
        return torch.nn.Sequential(torch.nn.BatchNorm2d(C), torch.nn.ReLU()).to(T.DEVICE).train()
    m = torch.nn.Sequential(torch.nn.GroupNorm(GROUPS, C), torch.nn.ReLU()).to(T.DEVICE, DTYPE).train()
    return torch.compile(m) if impl == "torch-compile" else m


def step_fn(module, x, dy, direction):
    params = [p for p in module.parameters() if p.requires_grad]
    if direction == "fwd":
        def fwd():
            with torch.no_grad():
                module(x)
        return fwd

    def fwdbwd():
        torch.autograd.grad(module(x), [x] + params, dy)
    return fwdbwd


def time_stats(fn, benchmark):
    """T.Stats in ms: do_bench on a GPU (pytest-benchmark's own table then holds synced wall-clock rounds too),
    pytest-benchmark's rounds on the CPU."""
    if T.ON_GPU:
        stats = T.kernel_ms(fn)
        benchmark.pedantic(lambda: (fn(), T.sync()), rounds=ROUNDS, iterations=1, warmup_rounds=2)
        return stats
    benchmark.pedantic(fn, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    if benchmark.stats is None:  # --benchmark-disable
        return T.measure(fn, repeats=ROUNDS)
    st = benchmark.stats.stats
    return T.Stats(st.median * 1e3, st.q1 * 1e3, st.q3 * 1e3, st.min * 1e3, st.max * 1e3, st.rounds)


@pytest.mark.parametrize("C,H,direction,layout,impl", SETTINGS,
                         ids=[f"C{c}-H{h}-{d}-{f}-{i}" for c, h, d, f, i in SETTINGS])
def test_group_norm(benchmark, C, H, direction, layout, impl):
    if impl == "torch-compile" and not T.ON_GPU:
        pytest.skip("torch.compile (inductor) is benchmarked on a GPU only: on the CPU it compiles too slowly for CI")
    H = max(1, H // SCALE)
    shape = (BATCH, C, H, H)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = torch.randn(shape, device=T.DEVICE, dtype=DTYPE).contiguous(memory_format=fmt).requires_grad_()
    dy = torch.randn_like(x)
    module = make_module(impl, C)
    fn = step_fn(module, x, dy, direction)
    fn()  # compile / warm up outside the timing
    stats = time_stats(fn, benchmark)
    ms = stats.median_ms
    key = (C, H, direction, layout)
    if impl == "torch":
        _TORCH_MS[key] = ms
    T_bytes = x.numel() * x.element_size()
    nbytes = 2 * T_bytes if direction == "fwd" else 5 * T_bytes
    copy = T.copy_gbps()
    info = {"bytes": nbytes, "gbps": round(T.gbps(nbytes, ms), 2), "copy_gbps": round(copy, 2),
            "copy_frac": round(T.gbps(nbytes, ms) / copy, 3), "median_ms": ms}
    if key in _TORCH_MS:
        info["speedup_vs_torch"] = round(_TORCH_MS[key] / ms, 3)
    benchmark.group = f"gn C{C} H{H} {direction} {layout}"
    benchmark.extra_info.update(info)
    params = {"C": C, "H": H, "N": BATCH, "groups": GROUPS, "direction": direction, "layout": layout, "impl": impl,
              "dtype": str(DTYPE).replace("torch.", "")}
    if "speedup_vs_torch" in info:
        params["speedup_vs_torch"] = info["speedup_vs_torch"]
    T.write_records([T.record("group_norm", f"C{C}-H{H}-{direction}-{layout}-{impl}",
                              stats, params=params, bytes=nbytes, copy_gbps=copy)])
    print(f"group_norm {benchmark.group} {impl}: {ms:.3f} ms, {info['gbps']} GB/s "
          f"({100 * info['copy_frac']:.0f}% of copy), {info.get('speedup_vs_torch', '-')}x torch")
    assert ms > 0
