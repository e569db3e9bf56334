"""Weight-standardization benchmarks: the WS op alone (per layer vs one multi-tensor call) on every conv weight of
a BiT model, and whole StdConv2d layers (forward + backward) against plain convs and the timm-style composite.

All candidates of a setting are timed alternately in one process (_timing.alternate), results go to
bench/results/ under suite "weight_standardize" (python -m bench.report renders them).

    ws_op      R50x1's 53 conv weights (GPU: also R152x4's 155), forward and forward+backward.
               timm      : F.batch_norm on each reshaped weight (+ the cast autocast would add on a GPU)
               <b>-layer : bitfast.ops.weight_standardize per weight, backend b (cpu / cuda / triton)
               <b>-many  : bitfast.ops.weight_standardize_many, one launch per direction
    std_conv   every conv of R50x1 on its own activation shape, forward + backward of weights and inputs.
               conv2d (no WS: the floor), timm, bitfast (StdConv2d), bitfast-many (weights standardized by one
               weight_standardize_many call, then plain convs). ws_overhead_pct = extra time over conv2d.

GPU: fp32 master weights written as bf16 (autocast), convs in bf16 channels_last at 224 px, batch 32.
CPU (quick mode, BITFAST_BENCH_QUICK=1): fp32, R50x1 only, convs at 32 px batch 1; the Triton interpreter is
not benchmarked. The CPU target is the cpu backend >= 2x faster than timm on R50x1's weights.
"""
import pytest
import torch
import torch.nn.functional as F

from bench import _timing as T
from bitfast import _backend
from bitfast.ops import weight_standardize, weight_standardize_many

pytestmark = pytest.mark.usefixtures("cpu_threads")
DEPTHS = {"R50x1": ((3, 4, 6, 3), 1), "R152x4": ((3, 8, 36, 3), 4)}
EPS = 1e-10
OUT_DTYPE = torch.bfloat16 if T.ON_GPU else None  # what autocast would feed the convs
BACKENDS = [b for b in ("cpu", "cuda", "triton")
            if _backend.usable_why(b, T.DEVICE.type) is None and not (b == "triton" and not T.ON_GPU)]


def bit_convs(model, res=224):
    """[(weight shape, input (C, H, W), stride, padding)] for every StdConv2d of a BiT ResNet-v2, in order."""
    depths, wf = DEPTHS[model]
    convs = [((64 * wf, 3, 7, 7), (3, res, res), 2, 3)]
    cin, s = 64 * wf, res // 4  # stem conv /2, then max pool /2
    for i, d in enumerate(depths):
        cmid, cout = 64 * wf * 2**i, 256 * wf * 2**i
        for u in range(d):
            st = 2 if (u == 0 and i > 0) else 1
            if u == 0:
                convs.append(((cout, cin, 1, 1), (cin, s, s), st, 0))  # projection on the pre-activated input
            convs += [((cmid, cin, 1, 1), (cin, s, s), 1, 0), ((cmid, cmid, 3, 3), (cmid, s, s), st, 1),
                      ((cout, cmid, 1, 1), (cmid, s // st, s // st), 1, 0)]
            cin, s = cout, s // st
    return convs


def test_bit_conv_counts():
    assert len(bit_convs("R50x1")) == 53 and len(bit_convs("R152x4")) == 155
    # R50x1: 23.45M conv weights of its 25.55M parameters (the rest: GN affine, the head)
    assert sum(torch.Size(c[0]).numel() for c in bit_convs("R50x1")) == 23_454_912


def timm_ws(w):
    return F.batch_norm(w.reshape(1, w.shape[0], -1), None, None, training=True, momentum=0.0,
                        eps=EPS).reshape_as(w)


def rounds():
    return (5, 1) if T.QUICK else (15, 3)  # (rounds, inner)


WS_SETTINGS = [(m, d) for m in (["R50x1", "R152x4"] if T.ON_GPU else ["R50x1"]) for d in ("fwd", "fwdbwd")]


@pytest.mark.parametrize("model,direction", WS_SETTINGS, ids=[f"{m}-{d}" for m, d in WS_SETTINGS])
def test_ws_op(model, direction):
    ws = [torch.randn(c[0], device=T.DEVICE).mul_(0.05).requires_grad_() for c in bit_convs(model)]
    out_dtype = OUT_DTYPE or ws[0].dtype
    dys = [torch.randn(w.shape, device=T.DEVICE, dtype=out_dtype) for w in ws]
    per_layer = {"timm": lambda: [timm_ws(w).to(out_dtype) for w in ws]}
    for b in BACKENDS:
        per_layer[f"{b}-layer"] = lambda b=b: [weight_standardize(w, EPS, OUT_DTYPE, backend=b) for w in ws]
        per_layer[f"{b}-many"] = lambda b=b: weight_standardize_many(ws, EPS, OUT_DTYPE, backend=b)

    def run(f):
        if direction == "fwd":
            with torch.no_grad():
                return f()
        return torch.autograd.grad(f(), ws, dys)

    cands = {name: (lambda f=f: run(f)) for name, f in per_layer.items()}
    n = sum(w.numel() for w in ws)
    nbytes = n * (4 + out_dtype.itemsize) + (0 if direction == "fwd" else n * (out_dtype.itemsize + 8))
    stats = T.alternate(cands, warmup=1, rounds=rounds()[0], inner=rounds()[1])
    copy = T.copy_gbps()
    base = stats["timm"].median_ms
    records = [T.record("weight_standardize", f"ws_op/{model}/{direction}/{name}", st,
                        params={"model": model, "direction": direction, "impl": name, "weights": len(ws),
                                "numel": n, "out_dtype": str(out_dtype).replace("torch.", ""),
                                "speedup_vs_timm": round(base / st.median_ms, 3)},
                        bytes=nbytes, copy_gbps=copy) for name, st in stats.items()]
    T.write_records(records)
    for name, st in stats.items():
        print(f"ws_op {model} {direction} {name}: {st.median_ms:.3f} ms, {base / st.median_ms:.2f}x timm")
    assert all(s.median_ms > 0 for s in stats.values())


def _conv_setup(res, batch, dtype):
    convs = bit_convs("R50x1", res)
    ws = [torch.randn(c[0], device=T.DEVICE).mul_(0.05).requires_grad_() for c in convs]
    fmt = torch.channels_last if T.ON_GPU else torch.contiguous_format
    xs = [torch.randn((batch, *c[1]), device=T.DEVICE, dtype=dtype).contiguous(memory_format=fmt)
          .requires_grad_(i > 0) for i, c in enumerate(convs)]  # the stem input needs no grad
    return convs, ws, xs


def test_std_conv_fwd_bwd():
    res, batch, dtype = (224, 32, torch.bfloat16) if T.ON_GPU else (32, 1, torch.float32)
    convs, ws, xs = _conv_setup(res, batch, dtype)
    amp = torch.autocast(T.DEVICE.type, dtype=torch.bfloat16, enabled=T.ON_GPU)

    def convs_with(std_ws):
        return [F.conv2d(x, w, None, c[2], c[3]) for x, w, c in zip(xs, std_ws, convs)]

    def step(make_ws):
        with amp:
            ys = convs_with(make_ws())
        leaves = ws + [x for x in xs if x.requires_grad]
        torch.autograd.grad(ys, leaves, [torch.ones_like(y) for y in ys])

    cands = {
        "conv2d": lambda: step(lambda: ws),
        "timm": lambda: step(lambda: [timm_ws(w) for w in ws]),
        "bitfast": lambda: step(lambda: [weight_standardize(w, EPS, OUT_DTYPE) for w in ws]),
        "bitfast-many": lambda: step(lambda: weight_standardize_many(ws, EPS, OUT_DTYPE)),
    }
    stats = T.alternate(cands, warmup=1, rounds=rounds()[0], inner=1)
    floor = stats["conv2d"].median_ms
    records = [T.record("weight_standardize", f"std_conv/R50x1-{res}px-b{batch}/{name}", st,
                        params={"model": "R50x1", "res": res, "batch": batch, "impl": name,
                                "dtype": str(dtype).replace("torch.", ""),
                                "ws_overhead_pct": round(100 * (st.median_ms / floor - 1), 2)})
               for name, st in stats.items()]
    T.write_records(records)
    for name, st in stats.items():
        print(f"std_conv {name}: {st.median_ms:.3f} ms ({100 * (st.median_ms / floor - 1):+.1f}% vs conv2d)")
    assert all(s.median_ms > 0 for s in stats.values())
