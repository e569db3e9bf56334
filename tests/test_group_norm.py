"""GroupNorm(+ReLU): fp64 criterion fwd+bwd on every usable backend and both memory formats, the large-offset input,
gradcheck, opcheck, torch.compile, poisoned outputs, determinism of dweight/dbias, modules, edge cases, bad input.

Criterion (GUIDE §5): err(op in dtype) <= 2 * err(torch's group_norm(+relu) in the same dtype) + atol, err = max abs
error against a float64 autograd reference computed from the same (rounded) inputs. torch's comparator always runs
on the contiguous copy (its most accurate path: its channels_last CPU kernel uses E[x^2] - E[x]^2). Triton runs under
TRITON_INTERPRET=1 on the CPU (slow): its cases are small and fp32/fp16 only (the interpreter's bf16 casts are wrong).
"""
import os
import random

import pytest
import torch
import torch.nn.functional as F
from torch.library import opcheck

import bitfast
from bitfast import _backend
from bitfast.nn import GroupNorm, GroupNormAct, StdConv2d
from bitfast.ops import group_norm

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
CASES = [(b, d) for d in DEVICES for b in bitfast.BACKENDS if _backend.usable_why(b, d) is None]
NATIVE = [c for c in CASES if c[0] in ("cpu", "cuda")]


def interp(backend, device):
    return backend == "triton" and device == "cpu"


def err(a, ref):
    return (a.double() - ref).abs().max().item() if a.numel() else 0.0


def poison(t):
    """Free a NaN block of t's size so the next allocation of that size likely reuses it: catches unwritten outputs."""
    torch.full((t.numel() + 64,), float("nan"), dtype=t.dtype, device=t.device)


def gn(x, G, w, b, eps, relu):
    y = F.group_norm(x, G, w, b, eps)
    return y.relu() if relu else y


def make_x(shape, dtype, device, offset=0.0, channels_last=False):
    x = (offset + torch.randn(shape, dtype=torch.float64)).to(device=device, dtype=dtype)
    if channels_last and x.dim() in (4, 5):
        x = x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    return x


def run_criterion(backend, device, shape, G, dtype, channels_last, relu=True, affine=True, offset=0.0, eps=1e-5):
    C = shape[1]
    x = make_x(shape, dtype, device, offset, channels_last)
    w = (1 + 0.5 * torch.randn(C, device=device)) if affine else None
    b = 0.5 * torch.randn(C, device=device) if affine else None
    # fp64 truth from the same rounded inputs
    leaves64 = [t.detach().double().requires_grad_() if t is not None else None for t in (x, w, b)]
    pre64 = F.group_norm(leaves64[0], G, leaves64[1], leaves64[2], eps)
    y64 = pre64.relu() if relu else pre64
    dy = torch.randn(shape, dtype=torch.float64, device=device)
    if relu:  # no gradient where z ~ 0: there the ReLU mask is decided by rounding (in torch's op as in ours)
        dy = dy.masked_fill(pre64.detach().abs() < 1e-3, 0.0)
    y64.backward(dy)
    # torch's own op in the same dtype on the contiguous input; fp32 params where torch takes mixed dtypes
    lc = [t.detach().contiguous().clone().requires_grad_() if t is not None else None for t in (x, w, b)]
    try:
        yc = gn(lc[0], G, lc[1], lc[2], eps, relu)
    except RuntimeError:  # no mixed-dtype group_norm on this device: params in x's dtype
        lc = [lc[0]] + [t.detach().to(dtype).requires_grad_() if t is not None else None for t in lc[1:]]
        yc = gn(lc[0], G, lc[1], lc[2], eps, relu)
    yc.backward(dy.to(dtype))
    # op under test
    lt = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, w, b)]
    poison(x)
    yt = group_norm(lt[0], G, lt[1], lt[2], eps, "relu" if relu else None, backend=backend)
    assert yt.dtype == dtype and yt.shape == x.shape and yt.stride() == x.stride()
    yt.backward(dy.to(dtype))
    assert lt[0].grad.stride() == x.stride()
    names = ("y", "dx", "dweight", "dbias")
    for name, ours, comp, ref in zip(names, (yt, lt[0].grad) + tuple(t.grad for t in lt[1:] if t is not None),
                                     (yc, lc[0].grad) + tuple(t.grad for t in lc[1:] if t is not None),
                                     (y64, leaves64[0].grad) + tuple(t.grad for t in leaves64[1:] if t is not None)):
        assert torch.isfinite(ours).all(), f"{name}: non-finite values (unwritten output?)"
        # fp32 accumulation costs a few ulps of the partial sums (torch's CPU kernel sums in fp64): ~1e-5 relative
        atol = 1e-5 * max(1.0, ref.abs().max().item())
        e, ec = err(ours, ref), err(comp, ref)
        assert e <= 2 * ec + atol, (f"{name}: err {e:.3g} > 2 * torch err {ec:.3g} + {atol:.3g} "
                                    f"({backend}, {shape}, G={G}, {dtype}, channels_last={channels_last})")
    if relu:  # exact zeros where the reference is clearly negative before the ReLU
        assert (yt[pre64.detach() < -1e-2] == 0).all()


def random_shape():
    """A fresh odd shape each run: N in 1..3, G in {1, 4, 32}, C/G in {1, 2, 4, 8}, H, W in 1..20, and groups of 1
    or >= 8 elements (2..7 elements can be so ill-conditioned that any fp32 result is mostly rounding)."""
    while True:
        G, cg, H, W = random.choice([1, 4, 32]), random.choice([1, 2, 4, 8]), random.randint(1, 20), random.randint(1, 20)
        if cg * H * W == 1 or cg * H * W >= 8:
            return (random.randint(1, 3), G * cg, H, W), G


# (shape, G): scaled BiT layers (C/G = 2, 8, 16), C/G = 1, H = W = 1, 13x17, N = 1, 2-D, 5-D, several NHWC row
# blocks and cache chunks (3, 64, 72, 72), NCHW groups over one 4096-element chunk.
SHAPES = [((2, 64, 14, 14), 32), ((2, 256, 7, 7), 32), ((2, 512, 4, 4), 32), ((1, 32, 13, 17), 32),
          ((3, 256, 1, 1), 32), ((4, 48), 3), ((2, 16, 3, 4, 5), 4), ((3, 32, 40, 40), 8), ((3, 64, 72, 72), 32),
          ((5, 32, 9, 9), 8)]
TINY = [((2, 8, 5, 7), 4), ((1, 8, 24, 24), 1)]  # the second one: several Triton row blocks / NCHW chunks


@pytest.mark.parametrize("backend,device", CASES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_criterion_fwd_bwd(backend, device, channels_last):
    dtypes = [torch.float32, torch.float16] if interp(backend, device) else [torch.float32, torch.bfloat16,
                                                                              torch.float16]
    shapes = TINY if interp(backend, device) else SHAPES + [random_shape()]
    for i, (shape, G) in enumerate(shapes):
        for dtype in dtypes:
            run_criterion(backend, device, shape, G, dtype, channels_last, relu=i % 3 != 2, affine=i % 4 != 3)


@pytest.mark.parametrize("backend,device", CASES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_large_offset(backend, device, channels_last):
    """x = 1000 + N(0, 1) normalises as well as N(0, 1) (no ReLU: its mask flips on the inputs' own rounding)."""
    shape = (2, 16, 9, 9) if interp(backend, device) else (2, 64, 28, 28)
    run_criterion(backend, device, shape, 8, torch.float32, channels_last, relu=False, offset=1000.0)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_gradcheck_fp64(backend, channels_last):
    x = make_x((2, 6, 3, 4), torch.float64, "cpu", channels_last=channels_last).requires_grad_()
    w = torch.randn(6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, requires_grad=True)
    for act in (None, "relu"):
        assert torch.autograd.gradcheck(lambda *t: group_norm(t[0], 3, t[1], t[2], 1e-5, act, backend=backend),
                                        (x, w, b))


@pytest.mark.parametrize("backend,device", [c for c in CASES if not interp(*c)])
def test_opcheck(backend, device):
    for cl in (False, True):
        x = make_x((2, 8, 5, 5), torch.float32, device, channels_last=cl)
        w, b = torch.randn(8, device=device), torch.randn(8, device=device)
        opcheck(torch.ops.bitfast.group_norm_fwd, (x, w, b, 4, 1e-5, True, backend))
        y, mean, rstd = torch.ops.bitfast.group_norm_fwd(x, w, b, 4, 1e-5, True, backend)
        opcheck(torch.ops.bitfast.group_norm_bwd, (torch.randn_like(y), x, w, b, mean, rstd, 4, True, backend))
        opcheck(torch.ops.bitfast.group_norm_fwd, (x, None, None, 4, 1e-5, False, backend))


def test_compile_fullgraph_preact_block():
    """GN+ReLU -> StdConv -> GN+ReLU -> StdConv (a BiT pre-activation unit) compiles with no graph break."""
    torch.manual_seed(0)
    device = DEVICES[-1]
    net = torch.nn.Sequential(GroupNormAct(4, 16), StdConv2d(16, 16, 3, padding=1), GroupNormAct(4, 16),
                              StdConv2d(16, 32, 1)).to(device)
    x = make_x((2, 16, 8, 8), torch.float32, device, channels_last=True).requires_grad_()
    compiler = "inductor" if device == "cuda" else "aot_eager"  # inductor on the CPU compiles too slowly
    ye = net(x)
    ye.square().sum().backward()
    ge = [p.grad.clone() for p in net.parameters()] + [x.grad.clone()]
    net.zero_grad()
    x.grad = None
    yc = torch.compile(net, fullgraph=True, backend=compiler)(x)
    yc.square().sum().backward()
    torch.testing.assert_close(yc, ye)
    for a, e in zip([p.grad for p in net.parameters()] + [x.grad], ge):
        torch.testing.assert_close(a, e)


@pytest.mark.parametrize("backend,device", [c for c in CASES if c[0] != "torch"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_dweight_dbias_deterministic(backend, device, channels_last):
    shape = (3, 8, 24, 24) if interp(backend, device) else (8, 64, 40, 40)
    x = make_x(shape, torch.float32, device, channels_last=channels_last)
    dy = make_x(shape, torch.float32, device, channels_last=channels_last)
    w0, b0 = 1 + torch.randn(shape[1], device=device), torch.randn(shape[1], device=device)
    grads = []
    for _ in range(2):
        w, b = w0.clone().requires_grad_(), b0.clone().requires_grad_()
        group_norm(x, 4, w, b, act="relu", backend=backend).backward(dy)
        grads.append((w.grad, b.grad))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


def test_cpu_twin_param_slice_is_the_cuda_one():
    """dweight/dbias sum n in slices, then the slices, in the same order on every backend: the constants agree."""
    import re
    from pathlib import Path

    src = Path(__file__).resolve().parents[1] / "csrc"
    cuda = re.search(r"#define BITFAST_GN_PARAM_SLICE (\d+)", (src / "group_norm.cu").read_text())
    cpu = re.search(r"constexpr int64_t kParamSlice = (\d+);", (src / "group_norm_cpu.cpp").read_text())
    assert cuda and cpu and cuda.group(1) == cpu.group(1)


@pytest.mark.parametrize("channels_last", [False, True])
def test_cpu_param_grads_over_three_slices(channels_last):
    run_criterion("cpu", "cpu", (33, 8, 3, 2), 4, torch.float32, channels_last)  # 16 + 16 + 1 samples


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("shape,G", [((3, 64, 20, 20), 16), ((6, 2048, 7, 7), 32)])
def test_cpu_bitwise_same_for_any_thread_count(channels_last, shape, G):
    """The C++ kernels fix every summation order by the shape: 1 thread (whole samples per thread) and several
    threads (blocks of a sample chunk in parallel) give bit-identical outputs and gradients. At 4 threads the
    second shape runs channels_last in balanced cache chunks of 3 + 3 samples (5 + 1 before they were balanced)."""
    from bitfast import _C

    x = make_x(shape, torch.float32, "cpu", channels_last=channels_last)
    dy = make_x(shape, torch.float32, "cpu", channels_last=channels_last)
    w, b = torch.randn(shape[1]), torch.randn(shape[1])
    old, outs = torch.get_num_threads(), []
    try:
        for nt in (1, max(2, old), 4):
            torch.set_num_threads(nt)  # bitfast._C shares torch's OpenMP runtime
            y, mean, rstd = _C.group_norm_fwd(x, w, b, G, 1e-5, True)
            outs.append((y, mean, rstd) + tuple(_C.group_norm_bwd(dy, x, w, b, mean, rstd, G, True)))
    finally:
        torch.set_num_threads(old)
    assert all(torch.equal(a, c) for o in outs[1:] for a, c in zip(outs[0], o))


@pytest.mark.parametrize("backend,device", NATIVE)
@pytest.mark.parametrize("channels_last", [False, True])
def test_native_outputs_fully_written(backend, device, channels_last):
    """Call bitfast._C directly after poisoning, on shapes where every element is nonzero in the reference."""
    from bitfast import _C
    from bitfast.ops.group_norm import group_norm_bwd_ref, group_norm_fwd_ref

    for shape, G in [((2, 32, 6, 6), 8), ((1, 24, 5, 3), 3)]:
        x = make_x(shape, torch.float32, device, channels_last=channels_last)
        w, b = torch.rand(shape[1], device=device) + 0.5, torch.randn(shape[1], device=device)
        for out in (x, torch.empty(shape[0], G, device=device)):
            poison(out)
        y, mean, rstd = _C.group_norm_fwd(x, w, b, G, 1e-5, False)
        yr, mr, rr = group_norm_fwd_ref(x, w, b, G, 1e-5, False)
        dy = make_x(shape, torch.float32, device, channels_last=channels_last)
        poison(x)
        dx, dw, db = _C.group_norm_bwd(dy, x, w, b, mean, rstd, G, False)
        ref = (yr, mr, rr) + group_norm_bwd_ref(dy, x, w, b, mr, rr, G, False)
        for ours, r in zip((y, mean, rstd, dx, dw, db), ref):
            assert torch.isfinite(ours).all()
            torch.testing.assert_close(ours, r, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend,device", CASES)
def test_modules_drop_in(backend, device):
    torch.manual_seed(0)
    ref = torch.nn.GroupNorm(4, 16).to(device)
    with torch.no_grad():
        ref.weight.normal_()
        ref.bias.normal_()
    ours = GroupNorm(4, 16, backend=backend).to(device)
    ours.load_state_dict(ref.state_dict())
    assert set(ours.state_dict()) == {"weight", "bias"}
    act = GroupNormAct(4, 16, backend=backend).to(device)
    act.load_state_dict(ref.state_dict())
    x = make_x((2, 16, 5, 5), torch.float32, device, channels_last=True)
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(act(x), ref(x).relu(), rtol=1e-5, atol=1e-5)
    assert ours(x).is_contiguous(memory_format=torch.channels_last)
    plain = GroupNorm(4, 16, affine=False, backend=backend).to(device)
    torch.testing.assert_close(plain(x), F.group_norm(x, 4), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend,device", [c for c in CASES if not interp(*c)])
def test_autocast_keeps_activation_dtype(backend, device):
    x = make_x((2, 16, 4, 4), torch.bfloat16, device, channels_last=True).requires_grad_()
    m = GroupNormAct(4, 16, backend=backend).to(device)
    with torch.autocast(device, dtype=torch.bfloat16):
        y = m(x)
    assert y.dtype == torch.bfloat16 and y.is_contiguous(memory_format=torch.channels_last)
    y.float().sum().backward()
    assert x.grad.dtype == torch.bfloat16 and m.weight.grad.dtype == torch.float32


@pytest.mark.parametrize("backend,device", CASES)
def test_empty_batch(backend, device):
    x = torch.randn(0, 8, 4, 4, device=device, requires_grad=True)
    w = torch.ones(8, device=device, requires_grad=True)
    y = group_norm(x, 4, w, None, act="relu", backend=backend)
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad.shape == x.shape and torch.equal(w.grad, torch.zeros(8, device=device))


def test_bad_input_names_the_argument():
    x = torch.randn(2, 6, 3, 3)
    with pytest.raises(ValueError, match="num_groups"):
        group_norm(x, 4)
    with pytest.raises(ValueError, match="num_groups"):
        group_norm(x, 0)
    with pytest.raises(ValueError, match="weight"):
        group_norm(x, 3, torch.ones(5))
    with pytest.raises(ValueError, match="bias"):
        group_norm(x, 3, torch.ones(6), torch.ones(6, 1))
    with pytest.raises(TypeError, match="x"):
        group_norm(x.long(), 3)
    with pytest.raises(TypeError, match="weight"):
        group_norm(x, 3, torch.ones(6, dtype=torch.int32))
    with pytest.raises(TypeError, match="weight"):
        group_norm(x.half(), 3, torch.ones(6, dtype=torch.float64))
    with pytest.raises(ValueError, match="weight"):
        group_norm(x, 3, torch.ones(6, device="meta"))
    with pytest.raises(ValueError, match="x"):
        group_norm(torch.randn(6), 3)
    with pytest.raises(ValueError, match="act"):
        group_norm(x, 3, act="gelu")


def test_native_checks_do_not_crash():
    """bitfast._C's own checks (the last line of defence under the Python layer) raise instead of segfaulting."""
    from bitfast import _C

    x = torch.randn(2, 6, 3, 3)
    w = torch.ones(6)
    with pytest.raises(RuntimeError, match="num_groups"):
        _C.group_norm_fwd(x, w, None, 4, 1e-5, False)
    with pytest.raises(RuntimeError, match="weight"):
        _C.group_norm_fwd(x, torch.ones(5), None, 3, 1e-5, False)
    with pytest.raises(RuntimeError, match="weight"):
        _C.group_norm_fwd(x, torch.ones(6, dtype=torch.float64), None, 3, 1e-5, False)
    with pytest.raises(RuntimeError, match="x"):
        _C.group_norm_fwd(x.int(), None, None, 3, 1e-5, False)
    with pytest.raises(RuntimeError, match="channels_last"):
        _C.group_norm_fwd(x.transpose(2, 3), None, None, 3, 1e-5, False)
    y, mean, rstd = _C.group_norm_fwd(x, w, None, 3, 1e-5, False)
    with pytest.raises(RuntimeError, match="mean/rstd"):
        _C.group_norm_bwd(y, x, w, None, mean[:1], rstd, 3, False)
    with pytest.raises(RuntimeError, match="dy"):
        _C.group_norm_bwd(y[:1], x, w, None, mean, rstd, 3, False)


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_properties(0).total_memory < 40e9,
                    reason="needs a CUDA GPU with >= 40 GB (2^31+ elements in bf16)")
@pytest.mark.parametrize("backend", [b for b in ("cuda", "triton") if _backend.usable_why(b, "cuda") is None])
@pytest.mark.parametrize("channels_last", [False, True])
def test_more_than_2_pow_31_elements(backend, channels_last):
    """64-bit indexing: the last sample of a > 2^31-element tensor is normalised like a small tensor holding it."""
    shape = (2, 32, 8192, 4100)  # 2 * 32 * 8192 * 4100 = 2.15e9 > 2^31
    x = torch.randn(shape, dtype=torch.bfloat16, device="cuda")
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = group_norm(x, 32, act="relu", backend=backend)
    tail = group_norm(x[1:].contiguous(), 32, act="relu", backend="torch")
    torch.testing.assert_close(y[1:], tail, rtol=2e-2, atol=2e-2)


# ------------------------------------------------------------------------- regressions (issues 11 and 16)
@pytest.mark.parametrize("backend,device", CASES)
@pytest.mark.parametrize("make", [
    lambda: torch.randn(4, 64, 1, 1).to(memory_format=torch.channels_last),  # BiT's last stage at a small crop
    lambda: torch.randn(1, 10, 3, 1).transpose(2, 3),  # a size-1 dim in another position
    lambda: torch.randn(2, 8, 1, 5).to(memory_format=torch.channels_last),
    lambda: torch.randn(3, 8, 5, 1).to(memory_format=torch.channels_last),
])
def test_backward_accepts_size_one_spatial_dims_in_any_layout(backend, device, make):
    """Regression: the bindings compared raw strides of dy and x, which differ in size-1 dimensions, and raised
    'dy must have the same memory layout as x' for valid inputs."""
    x = make().to(device).requires_grad_()
    G = 2 if x.shape[1] % 4 else 4
    y = group_norm(x, G, act="relu", backend=backend)
    dy = torch.randn_like(y)
    y.backward(dy)
    x64 = x.detach().double().requires_grad_()
    F.group_norm(x64, G).relu().backward(dy.double())
    assert err(x.grad, x64.grad) < 1e-4


@pytest.mark.parametrize("backend,device", CASES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_relu_keeps_nan_like_torch(backend, device, channels_last):
    """Regression: Triton's ReLU was tl.maximum(z, 0), which turns NaN into 0; torch, cpu and CUDA keep NaN."""
    x = make_x((2, 8, 4, 4), torch.float32, device, channels_last=channels_last)
    x[0, 1, 2, 3] = float("nan")  # poisons group 0 of sample 0 only
    y = group_norm(x, 4, act="relu", backend=backend)
    ref = F.group_norm(x, 4).relu()
    assert torch.equal(y.isnan(), ref.isnan()) and y.isnan().any()
    assert err(y[1], ref[1].double()) < 1e-5


def test_num_groups_must_not_be_a_bool():
    """Regression: bool is an int subclass, so num_groups=True passed validation as 1 group."""
    with pytest.raises(ValueError, match="num_groups=True"):
        group_norm(torch.randn(2, 4, 3, 3), True)


# ------------------------------------------------------------------------- Triton tile paths (issue 13)
TRITON = [c for c in CASES if c[0] == "triton"]


@pytest.mark.parametrize("backend,device", TRITON)
@pytest.mark.parametrize("shape,G", [
    ((2, 6, 5, 5), 2),  # NCHW: the group in one tile, with a masked channel row (C/G = 3)
    ((1, 4, 70, 70), 1),  # NCHW: several channel tiles, ragged statistics pieces; several position tiles backward
    ((1, 2, 100, 100), 1),  # NCHW: several position tiles forward too
    ((1, 4, 40, 40), 1),  # NCHW: a group of 16-warp programs (the others above take 32: > 64 KB of fp32)
    ((2, 64, 3, 3), 2),  # NCHW: 32 channels x 9 positions, rows of a tile masked at the end of each channel
])
def test_triton_nchw_tiles(backend, device, shape, G):
    from bitfast.kernels import group_norm as tgn

    D, S = shape[1] // G, shape[2] * shape[3]
    fwd, bwd = tgn._nchw_blocks(D, S, 4), tgn._nchw_blocks(D, S, 8, "bwd")  # the shapes reach the paths named
    assert fwd[2] == bwd[2] == (shape[2] < 40)
    assert fwd[3] == bwd[3] == {70: 32, 100: 32, 40: 16}.get(shape[2], 8)
    run_criterion(backend, device, shape, G, torch.float32, False, relu=True)
    run_criterion(backend, device, shape, G, torch.float32, False, relu=False, offset=1000.0)


@pytest.mark.parametrize("backend,device", TRITON)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_nhwc_l2_chunks(backend, device, dtype, monkeypatch):
    """NHWC in several sample chunks (the L2 knob lowered, as the CUDA emulator's small-L2 builds do): uneven
    balanced chunks forward (2 + 2 + 1 samples in fp32) and one sample per chunk backward, two row blocks each."""
    from bitfast.kernels import group_norm as tgn

    shape, G = (5, 16, 24, 24), 4
    monkeypatch.setattr(tgn, "L2_BYTES", 90000)  # 9216-element samples: fp32 2+2+1 / 1 each, fp16 3+2 / 2+2+1
    assert [tgn.chunk_samples(5, 16 * 576, e) for e in (4, 8, 2)] == [2, 1, 3]
    assert -(-576 // tgn._nhwc_blocks(16)[0]) == 2  # row blocks per sample
    run_criterion(backend, device, shape, G, dtype, True, relu=True)
    run_criterion(backend, device, shape, G, dtype, True, relu=False, affine=False, offset=1000.0 if
                  dtype == torch.float32 else 0.0)
    x = make_x(shape, torch.float32, device, channels_last=True)
    dy = make_x(shape, torch.float32, device, channels_last=True)
    w, b = 1 + torch.randn(16, device=device), torch.randn(16, device=device)
    y, mean, rstd = tgn.group_norm_fwd(x, w, b, G, 1e-5, True)
    outs = [tgn.group_norm_bwd(dy, x, w, b, mean, rstd, G, True) for _ in range(2)]
    monkeypatch.setattr(tgn, "L2_BYTES", 1 << 30)  # one chunk: the same sums in the same order, bitwise
    one = tgn.group_norm_bwd(dy, x, w, b, mean, rstd, G, True)
    assert torch.equal(tgn.group_norm_fwd(x, w, b, G, 1e-5, True)[0], y)
    assert all(torch.equal(a, c) for o in outs for a, c in zip(o, one))


def test_triton_chunks_mirror_cuda():
    """The Triton NHWC chunks are the CUDA ones (csrc/group_norm.cu chunk_samples; bench/budget.py mirrors it)."""
    pytest.importorskip("triton")
    from bench import budget
    from bitfast.kernels import group_norm as tgn

    if "BITFAST_GN_L2_BYTES" not in os.environ:
        assert tgn.L2_BYTES == budget.CUDA_CONSTANTS["BITFAST_GN_L2_BYTES"]
    for N, C, H in [(64, 64, 56), (256, 256, 56), (64, 2048, 7), (1, 64, 56), (128, 512, 28)]:
        for nb in (2, 4):
            assert tgn.chunk_samples(N, C * H * H, nb) == budget.chunk_samples(N, H * H, C, nb)
    assert tgn.chunk_samples(64, 64 * 56 * 56, 2) == 32  # 62 + 2 balanced into 32 + 32
    assert tgn.PARAM_SLICE == budget.CUDA_CONSTANTS["BITFAST_GN_PARAM_SLICE"]


@pytest.mark.parametrize("backend,device", TRITON)
@pytest.mark.parametrize("channels_last", [False, True])
def test_triton_param_grads_slices(backend, device, channels_last, monkeypatch):
    """dweight/dbias over slices of n, then the slices: 17 samples (16 + 1), and 5 in slices of 2 (2 + 2 + 1)."""
    from bitfast.kernels import group_norm as tgn

    run_criterion(backend, device, (17, 8, 3, 2), 4, torch.float32, channels_last)
    monkeypatch.setattr(tgn, "PARAM_SLICE", 2)
    run_criterion(backend, device, (5, 8, 4, 4), 4, torch.float32, channels_last, relu=False)
