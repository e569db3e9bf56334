"""BiT ResNet-v2 models: zoo param counts, architecture vs a spec-literal reference, variants, layouts, backends,
torch.compile. Small models only (bit_tiny); big ones are built on the meta device."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import bitfast
from bitfast import _backend, models
from bitfast.models.resnetv2 import ZOO

CL = torch.channels_last

# GUIDE §4 table (1000-class head), in millions, rounded to 2 decimals.
GUIDE_M = {"50x1": 25.55, "50x3": 217.32, "101x1": 44.54, "101x3": 387.93, "152x2": 236.34, "152x4": 936.53}


def count_params(depths, width, num_classes=1000, in_chans=3):
    """Closed-form count of the BiT ResNet-v2 (GN/BN weight+bias, bias-free convs, 1x1 head with bias)."""
    c0 = int(64 * width)
    n, cin = 7 * 7 * in_chans * c0, c0
    for i, d in enumerate(depths):
        cmid, cout = c0 * 2**i, 4 * c0 * 2**i
        for j in range(d):
            c = cin if j == 0 else cout
            n += 2 * c + c * cmid + 2 * cmid + 9 * cmid * cmid + 2 * cmid + cmid * cout
            n += c * cout if j == 0 else 0  # projection
        cin = cout
    return n + 2 * cin + cin * num_classes + num_classes


def numel(m):
    return sum(p.numel() for p in m.parameters())


def randomize(model, seed):
    """Non-trivial weights everywhere (GN/BN affine and head too), so every parameter affects the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype)
            if p.dim() == 1 and name.endswith("weight"):
                p.copy_(1 + 0.2 * r)
            elif p.dim() == 1:
                p.copy_(0.2 * r)
            else:
                p.copy_(r * (2.0 / p[0].numel()) ** 0.5)
    return model


def images(n=2, size=64, seed=None, chans=3):
    g = torch.Generator().manual_seed(seed if seed is not None else torch.seed() % 2**31)
    return torch.rand(n, chans, size, size, generator=g) * 2 - 1  # pixels in [-1, 1]


@pytest.mark.parametrize("name", models.list_models())
def test_param_counts_every_zoo_name(name):
    arch = ZOO[name]
    with torch.device("meta"):
        m = models.create(name)
        m10 = models.create(name, num_classes=10, in_chans=1)
    assert numel(m) == count_params(arch.depths, arch.width)
    assert numel(m10) == count_params(arch.depths, arch.width, 10, in_chans=1)
    for key, millions in GUIDE_M.items():
        if name.endswith(f"R{key}") or name.startswith(f"resnetv2_{key}"):
            assert round(numel(m) / 1e6, 2) == millions


def test_zoo_names_and_list_models():
    names = models.list_models()
    for s in "SM":
        for k in GUIDE_M:
            assert f"BiT-{s}-R{k}" in names and f"resnetv2_{k}_bit" in names and f"resnetv2_{k}" in names
    assert models.list_models("BiT-M-*") == [n for n in names if n.startswith("BiT-M-")]
    assert {"bit_tiny", "bit_small", "bit_r26x1"} <= set(names)
    assert all(ZOO[n].width < 1 for n in ("bit_tiny", "bit_small"))


def test_variants_share_topology():
    with torch.device("meta"):
        ms = {(n, c): models.create("bit_small", norm=n, conv=c) for n in models.NORMS for c in models.CONVS}
    shapes = {k: {n: p.shape for n, p in m.named_parameters()} for k, m in ms.items()}
    ref = shapes[("gn", "ws")]
    assert all(s == ref for s in shapes.values())
    assert len(ms[("gn", "ws")].std_convs()) == 1 + 3 * 8 + 4  # stem + 3 per block + 4 projections
    assert ms[("bn", "plain")].std_convs() == [] and ms[("gn", "plain")].std_convs() == []
    assert isinstance(ms[("bn", "ws")].stages[0].blocks[0].norm1, nn.BatchNorm2d)


def ref_logits(model, x, groups):
    """GUIDE §4 written out with F.* from the parameters alone (fp64): catches wrong stride placement,
    projection input, stem padding or head."""
    P = {k: v.double() for k, v in model.state_dict().items()}

    def conv(name, x, stride=1):
        w = P[name + ".weight"]
        v, mu = torch.var_mean(w, dim=(1, 2, 3), keepdim=True, unbiased=False)
        return F.conv2d(x, (w - mu) / torch.sqrt(v + 1e-10), stride=stride, padding=w.shape[-1] // 2)

    def gn_relu(name, x):
        return F.relu(F.group_norm(x, groups, P[name + ".weight"], P[name + ".bias"], 1e-5))

    x = conv("stem.conv", x.double(), 2)
    x = F.max_pool2d(F.pad(x, (1, 1, 1, 1), value=0.0), 3, 2)
    for i, d in enumerate(model.config["depths"]):
        for j in range(d):
            p, s = f"stages.{i}.blocks.{j}", (2 if i > 0 and j == 0 else 1)
            a = gn_relu(p + ".norm1", x)
            short = conv(p + ".downsample.conv", a, s) if j == 0 else x
            y = conv(p + ".conv1", a)
            y = conv(p + ".conv2", gn_relu(p + ".norm2", y), s)
            x = conv(p + ".conv3", gn_relu(p + ".norm3", y)) + short
    f = gn_relu("norm", x).mean((2, 3))
    return f, f @ P["head.fc.weight"][:, :, 0, 0].T + P["head.fc.bias"]


def rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def test_architecture_matches_spec_reference():
    m = randomize(models.create("bit_tiny", num_classes=7), seed=1).eval()
    x = images(2, 61)  # odd size: exercises the stem padding and stride rounding
    f_ref, y_ref = ref_logits(m, x, groups=8)
    with torch.no_grad():
        f, y = m.features(x), m(x)
    assert f.shape == (2, 512) and y.shape == (2, 7)
    assert rel_err(f, f_ref) < 1e-4 and rel_err(y, y_ref) < 1e-4
    # the -inf-padded maxpool (a common mistake) must be distinguishable from BiT's zero pad
    m.stem.pad, m.stem.pool = nn.Identity(), nn.MaxPool2d(3, 2, padding=1)
    with torch.no_grad():
        assert rel_err(m(x), y_ref) > 1e-3


def test_shapes_dtypes_and_zero_head():
    m = models.create("bit_tiny", num_classes=5)
    x = images(3, 32)
    y, f = m(x), m.features(x)
    assert y.shape == (3, 5) and y.dtype == torch.float32 and f.shape == (3, m.num_features)
    assert torch.count_nonzero(y) == 0  # zero-initialized head (BiT transfer)
    assert torch.count_nonzero(f) > 0
    y.sum().backward()
    assert m.head.fc.weight.grad.abs().sum() > 0
    m.reset_head(11, zero=False)
    assert m(x).shape == (3, 11) and m(x).abs().sum() > 0 and m.config["num_classes"] == 11
    md = models.create("bit_tiny", num_classes=4, in_chans=1, zero_head=False).double()
    assert md(images(1, 28, chans=1).double()).dtype == torch.float64
    with torch.autocast("cpu", dtype=torch.bfloat16):
        yb = m(x)
    assert yb.dtype == torch.bfloat16 and torch.isfinite(yb).all()


@pytest.mark.parametrize("kw, arg", [(dict(norm="ln"), "norm"), (dict(conv="std"), "conv"),
                                     (dict(num_classes=0), "num_classes"), (dict(groups=5), "groups")])
def test_bad_arguments_name_the_argument(kw, arg):
    with pytest.raises(ValueError, match=arg):
        models.create("bit_small", **kw)


def test_bad_name_and_input():
    with pytest.raises(ValueError, match="name"):
        models.create("BiT-X-R50x1")
    m = models.create("bit_tiny")
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        m(torch.randn(2, 4, 32, 32))


@pytest.mark.parametrize("norm", models.NORMS)
@pytest.mark.parametrize("conv", models.CONVS)
def test_variants_forward_backward(norm, conv):
    m = randomize(models.create("bit_tiny", num_classes=3, norm=norm, conv=conv), seed=2)
    x = images(4, 32)
    y = m(x)
    assert y.shape == (4, 3) and torch.isfinite(y).all()
    y.square().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())
    if norm == "bn":  # train mode updated running stats; eval uses them
        assert m.norm.num_batches_tracked.item() == 1
        assert torch.isfinite(m.eval()(x)).all()


def test_channels_last_end_to_end():
    ref = randomize(models.create("bit_tiny", num_classes=6), seed=3)
    cl = randomize(models.create("bit_tiny", num_classes=6), seed=3).to(memory_format=CL)
    not_cl = []

    def hook(mod, inp, out):
        if out.dim() == 4 and not out.is_contiguous(memory_format=CL):
            not_cl.append(type(mod).__name__)

    for mod in cl.modules():
        if not isinstance(mod, (nn.Sequential, models.ResNetV2)):
            mod.register_forward_hook(hook)
    x = images(2, 64)
    y = cl(x.to(memory_format=CL))
    assert not not_cl, f"modules that dropped channels_last: {sorted(set(not_cl))}"
    y_ref = ref(x)
    assert rel_err(y, y_ref) < 1e-4
    y.square().sum().backward()
    y_ref.square().sum().backward()
    for (n, p), q in zip(cl.named_parameters(), ref.parameters()):
        assert rel_err(p.grad, q.grad) < 1e-3, n


def _skip_unless_usable(name, device):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA GPU visible")
    why = _backend.usable_why(name, device)
    if why is not None:
        pytest.skip(f"backend {name!r} unavailable: {why}")


@pytest.mark.parametrize("backend, device", [("torch", "cpu"), ("cpu", "cpu"), ("cuda", "cuda"), ("triton", "cuda")])
def test_identical_logits_across_backends(backend, device):
    _skip_unless_usable(backend, device)
    m = randomize(models.create("bit_tiny", num_classes=10), seed=4).to(device)
    x = images(2, 48).to(device)
    out = {}
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):  # fp32 means fp32 on a GPU too
        for b in ("torch", backend):
            m.zero_grad()
            with bitfast.use_backend(b):
                y = m(x)
                y.square().sum().backward()
            out[b] = (y.detach(), m.stem.conv.weight.grad.clone(), m.norm.weight.grad.clone())
        _, y_ref = ref_logits(m, x, groups=8)
    assert rel_err(out[backend][0], y_ref) < 1e-4  # both against fp64, not only against each other
    for a, b in zip(out[backend], out["torch"]):
        assert rel_err(a, b) < 1e-4


@pytest.mark.parametrize("norm, conv", [("gn", "ws"), ("bn", "plain")])
def test_compile_block_fullgraph(norm, conv):
    torch._dynamo.reset()
    m = randomize(models.create("bit_tiny", norm=norm, conv=conv), seed=5)
    block = m.stages[1].blocks[0]  # stride-2 block with projection
    x = torch.randn(2, 64, 8, 8, requires_grad=True)
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")  # fullgraph: a graph break is an error
    y = compiled(x)
    (gx,) = torch.autograd.grad(y.square().sum(), x)
    y_ref = block(x)
    (gx_ref,) = torch.autograd.grad(y_ref.square().sum(), x)
    assert y.shape == (2, 128, 4, 4)
    assert rel_err(y, y_ref) < 1e-5 and rel_err(gx, gx_ref) < 1e-5


def test_fused_ws_matches_per_layer_ws():
    """The model's one-launch weight_standardize_many path gives the same logits and gradients as per-conv WS."""
    torch.manual_seed(0)
    m = models.create("bit_tiny", num_classes=5, zero_head=False).train()
    x = torch.randn(2, 3, 48, 48)
    assert m.fused_ws
    y1 = m(x)
    g1 = torch.autograd.grad(y1.square().sum(), list(m.parameters()))
    m.fused_ws = False
    y2 = m(x)
    g2 = torch.autograd.grad(y2.square().sum(), list(m.parameters()))
    torch.testing.assert_close(y1, y2, rtol=0, atol=0)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
