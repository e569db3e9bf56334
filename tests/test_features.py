"""features_only backbones: shapes and channels for every zoo name (meta device), equality with the classification
model's activations after loading an official-layout .npz, checkpoint loading into truncated backbones,
channels_last, the fused WS path and torch.compile, bad arguments."""
import logging

import numpy as np
import pytest
import torch

import bitfast
from bitfast import models
from bitfast.models.resnetv2 import ZOO

CL = torch.channels_last
ALL = (0, 1, 2, 3, 4)


def numel(m):
    return sum(p.numel() for p in m.parameters())


def images(n, size, seed=None):
    g = torch.Generator().manual_seed(seed if seed is not None else torch.seed() % 2**31)
    return torch.rand(n, 3, size, size, generator=g) * 2 - 1  # pixels in [-1, 1]


def rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def randomize(model, seed):
    """Non-trivial GN affine and head too (fresh init has GN weight 1, bias 0 and a zero head)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if p.dim() == 1:
                r = 0.2 * r + (1 if name.endswith("weight") else 0)
            p.copy_(r)
    return model


@pytest.mark.parametrize("name", models.list_models())
def test_every_zoo_name_on_meta(name):
    arch = ZOO[name]
    c0 = int(64 * arch.width)
    chans = [c0] + [4 * c0 * 2**i for i in range(4)]
    with torch.device("meta"):
        m = models.create(name, features_only=True)
    assert m.out_indices == (1, 2, 3, 4) and m.feature_info.channels() == chans[1:]
    assert m.feature_info.reduction() == [4, 8, 16, 32]
    assert [f["module"] for f in m.feature_info] == ["stages.0", "stages.1", "stages.2", "norm"]
    assert m.head is None and not any(k.startswith("head") for k in m.state_dict())
    if name != next(n for n in ZOO if ZOO[n] == arch):
        return  # same architecture as an earlier name: the forward below would prove nothing new
    # Shapes come from the topology, which the four norm/conv variants share (tests/test_models.py); the BN+plain
    # one runs on meta tensors in a fraction of the time, since GN/WS on meta go through Python reference kernels.
    with torch.device("meta"):
        full = models.create(name, features_only=True, out_indices=ALL, norm="bn", conv="plain").eval()
    feats = full(torch.empty(1, 3, 224, 224, device="meta"))
    assert full.feature_info.channels() == chans and full.feature_info.reduction() == [2, 4, 8, 16, 32]
    assert [tuple(f.shape) for f in feats] == [(1, c, 224 // s, 224 // s) for c, s in zip(chans, [2, 4, 8, 16, 32])]


def test_numbering_and_truncation():
    clf = models.create("bit_tiny")
    short = models.create("bit_tiny", features_only=True, out_indices=(0, 2))
    assert short.feature_info.channels() == [16, 128] and short.feature_info.reduction() == [2, 8]
    assert len(short.stages) == 2 and short.norm is None and short.head is None  # later stages are not built
    assert numel(short) == numel(clf.stem) + numel(clf.stages[:2])
    x = images(2, 40)
    feats = short(x)
    assert [tuple(f.shape) for f in feats] == [(2, 16, 20, 20), (2, 128, 5, 5)]
    assert [tuple(f.shape) for f in clf.forward_intermediates(x)] == [
        (2, 16, 20, 20), (2, 64, 10, 10), (2, 128, 5, 5), (2, 256, 3, 3), (2, 512, 2, 2)]


def official_npz(path, arch, num_classes, seed):
    """Random weights written key by key in the official BiT layout (GUIDE §4; HWIO kernels), with numpy only."""
    rng = np.random.default_rng(seed)
    a = {}

    def conv(scope, cin, cout, k):
        a[f"resnet/{scope}/standardized_conv2d/kernel"] = rng.standard_normal((k, k, cin, cout), dtype=np.float32)

    def gn(scope, c):
        a[f"resnet/{scope}group_norm/gamma"] = 1 + 0.2 * rng.standard_normal(c, dtype=np.float32)
        a[f"resnet/{scope}group_norm/beta"] = 0.2 * rng.standard_normal(c, dtype=np.float32)

    c0 = cin = int(64 * arch.width)
    conv("root_block", 3, c0, 7)
    for b, depth in enumerate(arch.depths):
        cmid, cout = c0 * 2**b, 4 * c0 * 2**b
        for u in range(depth):
            s, c = f"block{b + 1}/unit{u + 1:02d}", cin if u == 0 else cout
            if u == 0:
                conv(f"{s}/a/proj", c, cout, 1)
            for unit, ci, co, k in (("a", c, cmid, 1), ("b", cmid, cmid, 3), ("c", cmid, cout, 1)):
                gn(f"{s}/{unit}/", ci)  # pre-activation: GN on the conv's input
                conv(f"{s}/{unit}", ci, co, k)
        cin = cout
    gn("", cin)
    a["resnet/head/conv2d/kernel"] = 0.01 * rng.standard_normal((1, 1, cin, num_classes), dtype=np.float32)
    a["resnet/head/conv2d/bias"] = rng.standard_normal(num_classes, dtype=np.float32)
    np.savez(path, **a)


def stage_activations(clf):
    """Forward hooks on the classification model: stem conv, last block of each stage, final GN+ReLU."""
    acts = {}
    mods = [clf.stem.conv] + [s.blocks[-1] for s in clf.stages] + [clf.norm]
    for i, m in enumerate(mods):
        m.register_forward_hook(lambda mod, inp, out, i=i: acts.__setitem__(i, out.detach()))
    return acts


def test_bit_m_r50x1_features_equal_classifier_activations(tmp_path, caplog):
    path = tmp_path / "BiT-M-R50x1.npz"
    official_npz(path, ZOO["BiT-M-R50x1"], 21843, seed=int(torch.seed() % 2**31))
    clf = models.create("BiT-M-R50x1", num_classes=21843, weights=path)
    with caplog.at_level(logging.WARNING, logger="bitfast.models"):
        feat = models.create("BiT-M-R50x1", features_only=True, out_indices=ALL, weights=path)
    assert not caplog.records  # the file's 21843-class head is skipped, not "reset" or "unexpected"
    acts = stage_activations(clf)
    x = images(2, 64)
    for train in (False, True):  # eval: per-conv cached WS; train: the fused multi-tensor WS path
        clf.train(train), feat.train(train)
        with torch.set_grad_enabled(train):
            logits, feats = clf(x), feat(x)
        want = [acts[0], acts[1], acts[2], acts[3], acts[5]]  # acts[4] (raw stage 4) precedes the final norm
        assert [tuple(f.shape) for f in feats] == [(2, 64, 32, 32), (2, 256, 16, 16), (2, 512, 8, 8),
                                                   (2, 1024, 4, 4), (2, 2048, 2, 2)]
        for i, (f, w) in enumerate(zip(feats, want)):
            assert torch.equal(f, w), f"feature {i} (train={train})"
        assert torch.equal(feats[-1].mean((2, 3)), clf.features(x).detach())
        assert logits.abs().max() > 0 and not torch.equal(acts[4], acts[5])


def test_truncated_backbones_load_every_format(tmp_path):
    clf = randomize(models.create("bit_tiny", num_classes=21843), seed=1).eval()
    models.save_npz(clf, tmp_path / "a.npz")
    torch.save(models.to_timm_state_dict(clf), tmp_path / "timm.pth")
    models.save(clf, tmp_path / "native.pt")
    acts = stage_activations(clf)
    x = images(2, 48)
    with torch.no_grad():
        clf(x)
    for file in ("a.npz", "timm.pth", "native.pt"):
        for idx in ((1, 2, 3, 4), (0, 2)):
            m = models.create("bit_tiny", features_only=True, out_indices=idx, weights=tmp_path / file).eval()
            with torch.no_grad():
                feats = m(x)
            assert all(torch.equal(f, acts[5 if i == 4 else i]) for f, i in zip(feats, idx)), (file, idx)
            with torch.no_grad():
                assert all(map(torch.equal, clf.forward_intermediates(x, idx), feats))
    models.save(m, tmp_path / "backbone.pt")  # a native backbone file rebuilds the backbone
    assert models.load(tmp_path / "backbone.pt").feature_info.channels() == [16, 128]
    with pytest.raises(ValueError, match="missing"):  # skipping the head does not hide a wrong architecture
        models.create("bit_small", features_only=True, weights=tmp_path / "a.npz")


def test_channels_last_fused_ws_and_compile():
    torch.manual_seed(0)
    ref = randomize(models.create("bit_tiny", features_only=True, out_indices=(0, 2, 4)), seed=2).train()
    x = images(2, 48)

    def run(model, inp):
        feats = model(inp)
        grads = torch.autograd.grad(sum(f.square().mean() for f in feats), list(ref.parameters()))
        return feats, grads

    f_ref, g_ref = run(ref, x)
    assert ref.fused_ws and [f.shape[1] for f in f_ref] == [16, 128, 512]
    ref.fused_ws = False  # per-conv WS: the fused multi-tensor path must give the same maps and gradients
    f_per, g_per = run(ref, x)
    ref.fused_ws = True
    torch.testing.assert_close(f_per, f_ref, rtol=0, atol=0)
    torch.testing.assert_close(g_per, g_ref, rtol=1e-6, atol=1e-7)
    ref.to(memory_format=CL)
    f_cl, g_cl = run(ref, x.contiguous(memory_format=CL))
    assert all(f.is_contiguous(memory_format=CL) for f in f_cl)
    assert max(map(rel_err, f_cl, f_ref)) < 1e-4 and max(map(rel_err, g_cl, g_ref)) < 1e-3
    torch._dynamo.reset()
    compiled = torch.compile(ref, fullgraph=True, backend="aot_eager")  # fullgraph: a graph break is an error
    f_c, g_c = run(compiled, x.contiguous(memory_format=CL))
    torch.testing.assert_close(f_c, f_cl, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_c, g_cl, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bad", [(1, 5), (-1,), (2, 1), (1, 1), (), (True,), (1.0,), "1"])
def test_bad_out_indices_name_the_argument(bad):
    with pytest.raises(ValueError, match="out_indices"):
        models.create("bit_tiny", features_only=True, out_indices=bad)


def test_backbone_misuse_is_a_clear_error():
    short = models.create("bit_tiny", features_only=True, out_indices=(1, 2))
    with pytest.raises(ValueError, match="out_indices"):
        short.forward_features(images(1, 32))
    with pytest.raises(ValueError, match="out_indices"):
        short.forward_intermediates(images(1, 32), out_indices=(3,))
    with pytest.raises(ValueError, match="head"):
        short.reset_head(10)
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        short(torch.randn(1, 4, 32, 32))
