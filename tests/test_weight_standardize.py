"""Weight standardization: fp64 criterion fwd+bwd on every usable backend, gradcheck, opcheck, torch.compile,
timm's formula, the StdConv2d eval cache, the multi-tensor op, edge cases and bad input.

Criterion (GUIDE §5): err(op in dtype) <= 2 * err(timm-style composite in the same dtype) + atol, err = max abs error
against a float64 autograd reference. Triton runs under TRITON_INTERPRET=1 on CPU (slow): its cases are small and
fp32/fp16 only (the interpreter's bf16 casts are wrong).
"""
import pytest
import torch
import torch.nn.functional as F
from torch.library import opcheck

import bitfast
from bitfast import _backend
from bitfast.nn import StdConv2d
from bitfast.ops import weight_standardize, weight_standardize_many

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
CASES = [(b, d) for d in DEVICES for b in bitfast.BACKENDS if _backend.usable_why(b, d) is None]


def slow_interp(backend, device):
    return backend == "triton" and device == "cpu"


def timm_ws(w, eps):
    """timm's StdConv2d weight: batch_norm over the (1, O, K) view in training mode, no running stats."""
    return F.batch_norm(w.reshape(1, w.shape[0], -1), None, None, training=True, momentum=0.0,
                        eps=eps).reshape_as(w)


def ws64(w, eps):
    """fp64 ground truth by autograd: (w64 leaf in w's shape, y64)."""
    w64 = w.detach().double().requires_grad_()
    r = w64.reshape(w.shape[0], -1)
    mean = r.mean(1, keepdim=True)
    var = (r - mean).square().mean(1, keepdim=True)
    return w64, ((r - mean) / torch.sqrt(var + eps)).reshape(w.shape)


def err(a, ref):
    return (a.double() - ref).abs().max().item()


def poison(t):
    """Free a NaN block of t's size so the next allocation of that size likely reuses it: catches unwritten outputs."""
    torch.full((t.numel() + 64,), float("nan"), dtype=t.dtype, device=t.device)


def make_w(shape, dtype, device, offset=0.0, channels_last=False):
    w = (offset + torch.randn(shape, dtype=torch.float64) * (0.05 + torch.rand(shape[0], 1, 1, 1,
                                                                               dtype=torch.float64)))
    w = w.to(device=device, dtype=dtype)
    return w.contiguous(memory_format=torch.channels_last) if channels_last else w


def run_criterion(backend, device, w, out_dtype, eps=1e-10):
    w64, y64 = ws64(w, eps)
    dy = torch.randn(w.shape, dtype=torch.float64, device=device)
    y64.backward(dy)
    # composite in the same dtype (its output cast to out_dtype, like autocast does after timm's WS)
    wc = w.detach().clone().requires_grad_()
    yc = timm_ws(wc, eps).to(out_dtype or w.dtype)
    yc.backward(dy.to(yc.dtype))
    # op under test
    wt = w.detach().clone().requires_grad_()
    poison(wt)
    yt = weight_standardize(wt, eps, out_dtype=out_dtype, backend=backend)
    assert yt.dtype == (out_dtype or w.dtype) and yt.shape == w.shape and yt.stride() == w.stride()
    yt.backward(dy.to(yt.dtype))
    assert wt.grad.dtype == w.dtype
    for name, ours, comp, ref in (("y", yt, yc, y64), ("dw", wt.grad, wc.grad, w64.grad)):
        atol = 1e-6 * ref.abs().max().item()
        e, ec = err(ours, ref), err(comp, ref)
        assert e <= 2 * ec + atol, f"{name}: err {e:.3g} > 2 * composite err {ec:.3g} + {atol:.3g}"


# Shapes (O, Cin/groups, kh, kw): scaled BiT 3x3, 1x1 with Cin=3, depthwise, 13x17 kernel, O=1.
SHAPES = [(64, 32, 3, 3), (8, 3, 1, 1), (16, 1, 3, 3), (4, 3, 13, 17), (1, 20, 1, 1)]
TINY = [(4, 8, 3, 3), (3, 3, 1, 1)]


def criterion_params():
    out = []
    for backend, device in CASES:
        interp = slow_interp(backend, device)
        dtypes = [torch.float32, torch.float16] + ([] if interp else [torch.bfloat16])
        for shape in (TINY if interp else SHAPES):
            for dtype in dtypes:
                out.append((backend, device, shape, dtype))
    return out


@pytest.mark.parametrize("backend,device,shape,dtype", criterion_params())
def test_criterion_fwd_bwd(backend, device, shape, dtype):
    run_criterion(backend, device, make_w(shape, dtype, device), None)


@pytest.mark.parametrize("backend,device", CASES)
def test_criterion_layouts_out_dtypes_offset(backend, device):
    shape = TINY[0] if slow_interp(backend, device) else (32, 16, 3, 3)
    outs = [torch.float16] if slow_interp(backend, device) else [torch.float16, torch.bfloat16]
    run_criterion(backend, device, make_w(shape, torch.float32, device, channels_last=True), None)
    for out_dtype in outs:  # fp32 master weight written straight to the autocast dtype
        run_criterion(backend, device, make_w(shape, torch.float32, device), out_dtype)
    run_criterion(backend, device, make_w(shape, torch.float32, device, offset=1000.0), None)  # |mean| >> std


@pytest.mark.parametrize("backend", [b for b, d in CASES if d == "cpu" and b != "triton"])  # interpreter: ~30 s
def test_gradcheck_fp64(backend):
    for shape in [(3, 2, 3, 3), (2, 5, 1, 1)]:
        w = make_w(shape, torch.float64, "cpu").requires_grad_()
        assert torch.autograd.gradcheck(lambda t: weight_standardize(t, 1e-5, backend=backend), (w,))
    ws = [make_w(s, torch.float64, "cpu").requires_grad_() for s in [(3, 2, 3, 3), (2, 1, 1, 1), (4, 2, 1, 3)]]
    assert torch.autograd.gradcheck(lambda *t: weight_standardize_many(list(t), 1e-5, backend=backend), ws)


@pytest.mark.parametrize("backend,device", CASES)
def test_opcheck(backend, device):
    w = make_w((4, 3, 3, 3), torch.float32, device).requires_grad_()
    wc = make_w((3, 2, 1, 1), torch.float32, device, channels_last=True).requires_grad_()
    opcheck(torch.ops.bitfast.weight_standardize_fwd, (w, 1e-10, None, backend))
    y, mean, rstd = (t.detach() for t in torch.ops.bitfast.weight_standardize_fwd(w, 1e-10, torch.float16, backend))
    opcheck(torch.ops.bitfast.weight_standardize_bwd, (torch.randn_like(y), w.detach(), mean, rstd, backend))
    opcheck(torch.ops.bitfast.weight_standardize_many_fwd, ([w, wc], 1e-10, None, backend))
    ys, mean, rstd = torch.ops.bitfast.weight_standardize_many_fwd([w, wc], 1e-10, None, backend)
    dys = [torch.randn_like(y.detach()) for y in ys]
    opcheck(torch.ops.bitfast.weight_standardize_many_bwd,
            (dys, [w.detach(), wc.detach()], mean.detach(), rstd.detach(), backend))


def test_compile_fullgraph_stdconv_block():
    # aot_eager traces through dynamo + AOTAutograd + the fake impls (what a graph break would need); inductor's C++
    # codegen costs ~30 s on a 2-core CPU, so it is used only with a GPU.
    compiler = "inductor" if torch.cuda.is_available() else "aot_eager"
    torch._dynamo.reset()
    net = torch.nn.Sequential(StdConv2d(3, 8, 3, padding=1), torch.nn.ReLU(), StdConv2d(8, 8, 1, eps=1e-8))
    x = torch.randn(2, 3, 9, 9)
    y = net(x)
    y.square().sum().backward()
    grads = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    yc = torch.compile(net, fullgraph=True, backend=compiler)(x)
    yc.square().sum().backward()
    torch.testing.assert_close(yc, y)
    for p, g in zip(net.parameters(), grads):
        torch.testing.assert_close(p.grad, g)
    ws = [p for p in net.parameters() if p.dim() == 4]
    many = torch.compile(lambda t: weight_standardize_many(t, 1e-10), fullgraph=True, backend=compiler)
    for a, w in zip(many(ws), ws):
        torch.testing.assert_close(a, weight_standardize(w, 1e-10))


@pytest.mark.parametrize("cin,cout,k,groups", [(16, 32, 3, 1), (16, 32, 3, 4), (16, 16, 3, 16), (3, 8, 1, 1)],
                         ids=["dense", "grouped", "depthwise", "1x1-cin3"])
def test_equals_timm_formula_eps_1e8(cin, cout, k, groups):
    conv = StdConv2d(cin, cout, k, padding=k // 2, groups=groups, eps=1e-8)
    x = torch.randn(2, cin, 7, 7)
    w = conv.weight.detach()
    torch.testing.assert_close(weight_standardize(w, 1e-8), timm_ws(w, 1e-8), rtol=1e-5, atol=1e-6)
    expect = F.conv2d(x, timm_ws(w, 1e-8), None, 1, k // 2, 1, groups)
    torch.testing.assert_close(conv(x), expect, rtol=1e-4, atol=1e-5)
    assert list(conv.state_dict()) == ["weight"]  # timm StdConv2d keys (bias=False)


def test_eval_cache_invalidated_on_weight_change(monkeypatch):
    calls = []
    real = bitfast.ops.weight_standardize
    monkeypatch.setattr(bitfast.ops, "weight_standardize", lambda *a, **k: calls.append(1) or real(*a, **k))
    conv = StdConv2d(4, 6, 3, padding=1).eval()
    x = torch.randn(1, 4, 5, 5)

    def expect():
        return F.conv2d(x, timm_ws(conv.weight.detach(), 1e-10), None, 1, 1)

    with torch.no_grad():
        y1 = conv(x)
        n = len(calls)
        torch.testing.assert_close(conv(x), y1)
        assert len(calls) == n, "eval mode with unchanged weights must reuse the cached standardized weight"
        conv.weight.mul_(-2.0).add_(0.5)  # in-place change (optimizer step): new version
        torch.testing.assert_close(conv(x), expect())
        conv.load_state_dict({"weight": torch.randn(6, 4, 3, 3)})
        torch.testing.assert_close(conv(x), expect())
        conv.weight = torch.nn.Parameter(torch.randn(6, 4, 3, 3))  # a new tensor
        torch.testing.assert_close(conv(x), expect())
        for _ in range(30):  # replaced twice between forwards: the allocator may hand the cached tensor's address
            conv.weight = torch.nn.Parameter(torch.randn(6, 4, 3, 3))  # (and version 0) to the newest weight
            conv.weight = torch.nn.Parameter(torch.randn(6, 4, 3, 3))
            torch.testing.assert_close(conv(x), expect())
    conv.train()
    y = conv(x)
    y.sum().backward()  # training mode: fresh standardization with autograd
    assert conv.weight.grad is not None and torch.isfinite(conv.weight.grad).all()


@pytest.mark.parametrize("backend,device", CASES)
def test_many_matches_per_layer_bitwise(backend, device):
    interp = slow_interp(backend, device)
    shapes = [(4, 3, 3, 3), (0, 2, 1, 1), (3, 5, 1, 1), (2, 1, 3, 3)] if interp else \
        [(64, 3, 7, 7), (32, 64, 1, 1), (16, 1, 3, 3), (0, 4, 1, 1), (48, 16, 3, 3), (8, 3, 1, 1)]
    ws = [make_w(s, torch.float32, device, channels_last=(i == 2)) for i, s in enumerate(shapes)]
    dys = [torch.randn(s, device=device, dtype=torch.float16) for s in shapes]
    for out_dtype in [None, torch.float16]:
        a, b, c = ([w.clone().requires_grad_() for w in ws] for _ in range(3))
        ya = weight_standardize_many(a, 1e-10, out_dtype, backend=backend)  # eager fast path
        yb = [weight_standardize(w, 1e-10, out_dtype, backend=backend) for w in b]
        yc = torch.ops.bitfast.weight_standardize_many_fwd(c, 1e-10, out_dtype, backend)[0]  # what compile runs
        for ys in (ya, yb, yc):
            torch.autograd.backward(ys, [d.to(y.dtype) for d, y in zip(dys, ys)])
        for i in range(len(ws)):
            assert ya[i].stride() == yb[i].stride() and torch.equal(ya[i], yb[i]), f"y[{i}] differs"
            assert torch.equal(a[i].grad, b[i].grad), f"grad[{i}] differs"
            assert torch.equal(yc[i], ya[i]) and torch.equal(c[i].grad, a[i].grad), f"custom op [{i}] differs"
        if interp:
            break


@pytest.mark.filterwarnings("ignore:overflow encountered in cast")  # the fp16 grad (~1e5) in the interpreter
@pytest.mark.parametrize("backend,device", CASES)
def test_constant_weight_is_finite(backend, device):
    for dtype in [torch.float32, torch.float16]:
        w = torch.full((3, 4, 3, 3), 0.37, dtype=dtype, device=device).requires_grad_()
        y = weight_standardize(w, 1e-10, backend=backend)
        y.backward(torch.randn_like(y))
        assert torch.isfinite(y).all() and y.abs().max().item() < 0.05  # ~0: the row equals its mean
        if dtype == torch.float32:  # the true grad is ~rstd = 1e5: beyond fp16's range
            assert torch.isfinite(w.grad).all()


@pytest.mark.parametrize("backend,device", [c for c in CASES if not slow_interp(*c)])
def test_row_of_2_pow_20(backend, device):
    K = 2**20 + 3  # > 2^20 elements per output channel, not a multiple of any block
    w = (3.0 + torch.randn(2, K, 1, 1, device=device)).requires_grad_()
    y = weight_standardize(w, 1e-10, backend=backend)
    dy = torch.randn_like(y)
    y.backward(dy)
    w64, y64 = ws64(w, 1e-10)
    y64.backward(dy.double())
    assert err(y, y64) < 1e-4 and err(w.grad, w64.grad) < 1e-4


@pytest.mark.parametrize("backend,device", [c for c in CASES if slow_interp(*c)])
def test_triton_interpreter_long_row(backend, device):
    """The Triton loop over several BLOCKs (the >= 2^20 case above runs on compiled Triton only)."""
    w = (3.0 + torch.randn(1, 3 * 1024 + 7, device=device))
    _w64, y64 = ws64(w, 1e-10)
    assert err(weight_standardize(w, 1e-10, backend=backend), y64) < 1e-5


@pytest.mark.parametrize("backend,device", CASES)
def test_empty_weight(backend, device):
    w = torch.randn(0, 3, 3, 3, device=device)
    assert weight_standardize(w, backend=backend).shape == (0, 3, 3, 3)
    assert weight_standardize_many([], backend=backend) == []


def test_bad_input_names_the_argument():
    with pytest.raises(ValueError, match="w must have at least 2"):
        weight_standardize(torch.randn(5))
    with pytest.raises(TypeError, match="w must be float32"):
        weight_standardize(torch.ones(2, 3, dtype=torch.int32))
    with pytest.raises(TypeError, match="w must be a torch.Tensor"):
        weight_standardize([[1.0, 2.0]])
    with pytest.raises(TypeError, match="out_dtype"):
        weight_standardize(torch.randn(2, 3), out_dtype=torch.int8)
    with pytest.raises(ValueError, match="eps"):
        weight_standardize(torch.randn(2, 3), eps=-1.0)
    with pytest.raises(ValueError, match="4-D"):
        bitfast.ops.std_conv2d(torch.randn(1, 3, 4, 4), torch.randn(3, 3, 3))
    gpu = torch.cuda.is_available()  # ask for the backend that cannot run on these tensors
    with pytest.raises(bitfast.BackendUnavailable, match="cpu" if gpu else "cuda"):
        weight_standardize(torch.randn(2, 3, device="cuda" if gpu else "cpu"), backend="cpu" if gpu else "cuda")
    with pytest.raises(TypeError, match="weights must be a list"):
        weight_standardize_many(torch.randn(2, 3))
    with pytest.raises(ValueError, match=r"weights\[1\]"):
        weight_standardize_many([torch.randn(2, 3), torch.randn(2, 3, dtype=torch.float64)])
    with pytest.raises(ValueError, match=r"weights\[0\] must have at least 2"):
        weight_standardize_many([torch.randn(3)])
    with pytest.raises(TypeError, match=r"weights\[1\] must be float32"):
        weight_standardize_many([torch.randn(2, 3), torch.ones(2, 3, dtype=torch.int64)])


def test_non_dense_weight_is_copied_not_misread():
    w = torch.randn(6, 4, 3, 3).transpose(2, 3)  # neither contiguous nor channels_last
    torch.testing.assert_close(weight_standardize(w, 1e-8), timm_ws(w, 1e-8), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(weight_standardize_many([w], 1e-8)[0], timm_ws(w, 1e-8), rtol=1e-5, atol=1e-6)


def test_standardize_conv_weights_feeds_a_model():
    """One multi-tensor call at the start of forward feeds every conv; grads equal the per-layer path's."""
    from bitfast.ops.weight_standardize_many import standardize_conv_weights

    convs = [StdConv2d(3, 8, 3, padding=1), StdConv2d(8, 8, 1, eps=1e-8), StdConv2d(8, 4, 3, padding=1, groups=4)]
    x = torch.randn(2, 3, 6, 6)

    def forward(std_ws):
        h = x
        for conv, w in zip(convs, std_ws):
            h = torch.relu(conv(h, w))
        return h.square().sum()

    forward(standardize_conv_weights(convs)).backward()
    many = [c.weight.grad.clone() for c in convs]
    for c in convs:
        c.weight.grad = None
    forward([None] * len(convs)).backward()  # each StdConv2d standardizes its own weight
    for c, g in zip(convs, many):
        assert torch.equal(c.weight.grad, g)


@pytest.mark.parametrize("backend,device", CASES)
@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_many_with_a_weight_of_no_elements_per_channel(backend, device, where):
    """Regression: an (8, 0, 3, 3) weight (output channels, no elements) in the list corrupted the heap on the CPU
    ('double free or corruption') and made the CUDA/Triton kernels read and write outside the buffers: its rows
    were counted but owned by no table entry, so they were given to the neighbouring weight."""
    ws = [torch.randn(6, 4, 3, 3, device=device), torch.randn(5, 7, device=device)]
    ws.insert({"first": 0, "middle": 1, "last": 2}[where], torch.randn(8, 0, 3, 3, device=device))
    ws = [w.requires_grad_() for w in ws]
    ys = weight_standardize_many(ws, 1e-10, backend=backend)
    assert [y.shape for y in ys] == [w.shape for w in ws]
    sum((y * torch.arange(y.numel(), device=device).view_as(y).sin()).sum() for y in ys).backward()
    for w, y in zip(ws, ys):
        if w.numel() == 0:
            assert w.grad.shape == w.shape
            continue
        w1 = w.detach().clone().requires_grad_()
        y1 = weight_standardize(w1, 1e-10, backend=backend)
        (y1 * torch.arange(y1.numel(), device=device).view_as(y1).sin()).sum().backward()
        torch.testing.assert_close(y, y1, rtol=0, atol=0)
        torch.testing.assert_close(w.grad, w1.grad, rtol=0, atol=0)


@pytest.mark.parametrize("backend,device", [c for c in CASES if c[0] == "triton"])
def test_triton_launchers_run_on_the_tensors_device(backend, device, monkeypatch):
    """Regression: the Triton launchers launched on the current CUDA device and its stream, not on x.device's, so
    tensors on cuda:1 while cuda:0 is current got the wrong stream or an illegal address. Every launcher must enter
    bitfast.kernels._common.on_device with its input (a no-op for CPU tensors)."""
    from bitfast.kernels import _common

    seen = []
    real = _common.on_device
    monkeypatch.setattr(_common, "on_device", lambda t: seen.append(t.device) or real(t))
    w = torch.randn(4, 3, 3, 3, device=device, requires_grad=True)
    weight_standardize(w, backend=backend).sum().backward()
    weight_standardize_many([w, w.detach() * 2], backend=backend)[0].sum().backward()
    x = torch.randn(2, 8, 3, 3, device=device, requires_grad=True)
    bitfast.ops.group_norm(x, 4, backend=backend).sum().backward()
    assert len(seen) == 6 and all(d == torch.device(device) for d in seen)


def test_many_table_is_cached_and_captured_tables_are_kept(monkeypatch):
    """The WS-many item table is built once per distinct table and kept with its staging tensor, so a copy captured
    in a CUDA graph replays from bytes that never change; entries used while capturing are never evicted (the
    capture itself needs a GPU: bench/gpu_check.sh's models-compile stage)."""
    from bitfast.kernels import weight_standardize as k

    monkeypatch.setattr(k, "_TABLES", {})
    monkeypatch.setattr(k, "_CAPTURED", set())
    dev = torch.device("cpu")
    first = k._device_table([0, 0, 0, 9, 0, 4], dev)
    assert k._device_table([0, 0, 0, 9, 0, 4], dev) is first  # a hit: no new copy
    k._CAPTURED.add((str(dev), (0, 0, 0, 9, 0, 4)))  # as if used during a capture
    for i in range(k._MAX_TABLES + 3):
        k._device_table([i, 0, 0, 9, 0, 4], dev)
    assert k._device_table([0, 0, 0, 9, 0, 4], dev) is first and len(k._TABLES) <= k._MAX_TABLES + 1
