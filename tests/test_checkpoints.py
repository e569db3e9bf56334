"""Checkpoint IO: official-layout .npz (written here from known tensors), timm / bit_pytorch state_dicts,
native files, and the error cases. The optional timm test compares logits with timm's independent BiT."""
import logging
import pickle
import zipfile

import numpy as np
import pytest
import torch

from bitfast import models

TINY = "bit_tiny"  # depths (1, 1, 1, 1), width 1/4, GN 8 groups


def randomize(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.2 * r if (p.dim() == 1 and name.endswith("weight")) else r * (2.0 / p[0].numel()) ** 0.5)
    return model


def images(n=2, size=40):
    return torch.rand(n, 3, size, size) * 2 - 1


def same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def official_arrays(depths, c0, num_classes, seed):
    """An official-layout BiT npz built by hand from GUIDE §4 (independent of save_npz), plus the OIHW tensors
    each key must land in."""
    rng = np.random.default_rng(seed)
    arrays, expect = {}, {}

    def conv(key, torch_key, kh, cin, cout):
        a = rng.standard_normal((kh, kh, cin, cout)).astype(np.float32)  # HWIO
        arrays["resnet/" + key] = a
        expect[torch_key] = torch.from_numpy(a).permute(3, 2, 0, 1)

    def gn(scope, torch_mod, c):
        for leaf, p in (("gamma", "weight"), ("beta", "bias")):
            a = rng.standard_normal(c).astype(np.float32)
            arrays[f"resnet/{scope}group_norm/{leaf}"] = a
            expect[f"{torch_mod}.{p}"] = torch.from_numpy(a)

    conv("root_block/standardized_conv2d/kernel", "stem.conv.weight", 7, 3, c0)
    cin = c0
    for i, d in enumerate(depths):
        cmid, cout = c0 * 2**i, 4 * c0 * 2**i
        for j in range(d):
            u, t = f"block{i + 1}/unit{j + 1:02d}/", f"stages.{i}.blocks.{j}."
            c = cin if j == 0 else cout
            gn(u + "a/", t + "norm1", c)
            conv(u + "a/standardized_conv2d/kernel", t + "conv1.weight", 1, c, cmid)
            gn(u + "b/", t + "norm2", cmid)
            conv(u + "b/standardized_conv2d/kernel", t + "conv2.weight", 3, cmid, cmid)
            gn(u + "c/", t + "norm3", cmid)
            conv(u + "c/standardized_conv2d/kernel", t + "conv3.weight", 1, cmid, cout)
            if j == 0:
                conv(u + "a/proj/standardized_conv2d/kernel", t + "downsample.conv.weight", 1, c, cout)
        cin = cout
    gn("", "norm", cin)
    conv("head/conv2d/kernel", "head.fc.weight", 1, cin, num_classes)
    arrays["resnet/head/conv2d/bias"] = rng.standard_normal(num_classes).astype(np.float32)
    expect["head.fc.bias"] = torch.from_numpy(arrays["resnet/head/conv2d/bias"])
    return arrays, expect


def write_npz(path, arrays):
    with open(path, "wb") as f:
        np.savez(f, **arrays)
    return path


@pytest.fixture
def official(tmp_path):
    arrays, expect = official_arrays((1, 1, 1, 1), 16, 10, seed=int(torch.randint(0, 2**31, ())))
    return write_npz(tmp_path / "BiT-tiny.npz", arrays), arrays, expect


def test_load_handwritten_official_npz(official):
    path, arrays, expect = official
    m = models.create(TINY, num_classes=10)
    report = models.load_npz(m, path)
    assert report == models.LoadReport([], [], [], False)
    sd = m.state_dict()
    assert set(expect) == set(sd)  # every tensor of the model comes from the file
    for k, t in expect.items():
        assert torch.equal(sd[k], t), k


@pytest.mark.parametrize("norm, conv", [("gn", "ws"), ("bn", "plain"), ("gn", "plain"), ("bn", "ws")])
def test_npz_round_trip(tmp_path, norm, conv):
    a = randomize(models.create(TINY, num_classes=10, norm=norm, conv=conv), seed=int(torch.randint(0, 999, ())))
    if norm == "bn":
        a(images(4))  # train-mode forward fills the running stats
    path = tmp_path / "m.npz"  # save_npz writes exactly this path
    models.save_npz(a, path)
    with np.load(path, allow_pickle=False) as f:
        keys = set(f.files)
        cv = "standardized_conv2d" if conv == "ws" else "conv2d"
        assert f[f"resnet/root_block/{cv}/kernel"].shape == (7, 7, 3, 16)  # HWIO
        assert f["resnet/head/conv2d/kernel"].shape == (1, 1, 512, 10)
        assert f"resnet/block2/unit01/a/proj/{cv}/kernel" in keys
    b = models.create(TINY, num_classes=10, norm=norm, conv=conv)
    assert not same_state(a, b)
    models.load_npz(b, path)
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa if not k.endswith("num_batches_tracked"))
    x = images()
    assert torch.equal(a.eval()(x), b.eval()(x))


def test_head_class_mismatch_zero_inits_with_message(official, caplog):
    path, _, expect = official
    m = randomize(models.create(TINY, num_classes=3), seed=0)
    with caplog.at_level(logging.WARNING, logger="bitfast.models"):
        report = models.load_npz(m, path)
    assert report.head_reset and not report.missing and not report.mismatched
    assert "10 classes" in caplog.text and "3" in caplog.text
    assert torch.count_nonzero(m.head.fc.weight) == 0 and torch.count_nonzero(m.head.fc.bias) == 0
    assert torch.equal(m.stem.conv.weight, expect["stem.conv.weight"])
    assert m(images()).shape == (2, 3)


def test_missing_unexpected_misshaped_keys_are_named(tmp_path, official):
    _, arrays, _ = official
    bad = dict(arrays)
    del bad["resnet/block3/unit01/b/group_norm/gamma"]
    bad["resnet/block9/unit01/a/group_norm/beta"] = np.ones(4, np.float32)
    bad["resnet/block1/unit01/c/standardized_conv2d/kernel"] = np.ones((1, 1, 16, 63), np.float32)
    path = write_npz(tmp_path / "bad.npz", bad)
    m = models.create(TINY, num_classes=10)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(ValueError) as e:
        models.load_npz(m, path)
    msg = str(e.value)
    assert str(path) in msg
    assert "missing (1): resnet/block3/unit01/b/group_norm/gamma" in msg
    assert "unexpected (1): resnet/block9/unit01/a/group_norm/beta" in msg
    assert "resnet/block1/unit01/c/standardized_conv2d/kernel: (63, 16, 1, 1) vs model (64, 16, 1, 1)" in msg
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())  # strict: nothing copied
    report = models.load_npz(m, path, strict=False)
    assert len(report.missing) == len(report.unexpected) == len(report.mismatched) == 1
    assert torch.equal(m.stem.conv.weight, torch.from_numpy(arrays["resnet/root_block/standardized_conv2d/kernel"])
                       .permute(3, 2, 0, 1))  # the rest did load


def test_bad_npz_files_give_clear_errors(tmp_path, official):
    good, arrays, _ = official
    data = good.read_bytes()
    m = models.create(TINY, num_classes=10)
    cases = {
        "truncated.npz": data[: len(data) // 2],
        "garbage.npz": bytes(np.random.default_rng().integers(0, 256, 4096, dtype=np.uint8)),
        "text.npz": b"hello, not weights\n",
        "pickle.npz": pickle.dumps({"resnet/x": 1}),
    }
    for name, blob in cases.items():
        (tmp_path / name).write_bytes(blob)
    # a bit flipped inside a stored member: the zip directory is intact, the CRC check fails on read
    flipped = bytearray(data)
    with zipfile.ZipFile(good) as z:
        info = z.getinfo(z.namelist()[0])
    assert info.file_size > 4000  # so header_offset + 400 lies in its data (zip + npy headers are < 300 bytes)
    flipped[info.header_offset + 400] ^= 0xFF
    (tmp_path / "flipped.npz").write_bytes(bytes(flipped))
    np.save(tmp_path / "single.npy", np.ones(3))
    np.savez(tmp_path / "foreign.npz", weights=np.ones(3), labels=np.arange(3))
    np.savez(tmp_path / "objects.npz", **{"resnet/group_norm/gamma": np.array([{"a": 1}], dtype=object)})
    np.savez(tmp_path / "ints.npz", **{**arrays, "resnet/group_norm/gamma": np.ones(512, np.int64)})
    for name in [*cases, "flipped.npz", "single.npy", "foreign.npz", "objects.npz", "ints.npz"]:
        path = tmp_path / name
        with pytest.raises(ValueError) as e:
            models.load_npz(m, path)
        assert str(path) in str(e.value), (name, str(e.value))
    with pytest.raises(FileNotFoundError):
        models.load_npz(m, tmp_path / "nope.npz")


def to_bit_pytorch_keys(sd):
    """bitfast/timm keys -> big_transfer bit_pytorch keys, written out independently of the loader's table."""
    out = {}
    for k, v in sd.items():
        p = k.split(".")
        if k.startswith("stem.conv"):
            k = "root.conv." + p[-1]
        elif k.startswith("stages."):
            unit = f"body.block{int(p[1]) + 1}.unit{int(p[3]) + 1:02d}."
            leaf = "downsample." + p[-1] if p[4] == "downsample" else p[4].replace("norm", "gn") + "." + p[-1]
            k = unit + leaf
        elif k.startswith("norm."):
            k = "head.gn." + p[-1]
        elif k.startswith("head.fc."):
            k = "head.conv." + p[-1]
        out["module." + k] = v
    return out


def test_timm_and_bit_pytorch_state_dicts(tmp_path):
    a = randomize(models.create(TINY, num_classes=10), seed=1)
    sd = models.to_timm_state_dict(a)
    assert "stages.0.blocks.0.downsample.conv.weight" in sd and sd["head.fc.weight"].shape == (10, 512, 1, 1)
    for src in (sd, to_bit_pytorch_keys(sd), {**sd, "head.fc.weight": sd["head.fc.weight"][:, :, 0, 0]}):
        b = models.create(TINY, num_classes=10)
        b.load_state_dict(models.from_timm_state_dict(src), strict=True)
        assert same_state(a, b)
    torch.save({"state_dict": to_bit_pytorch_keys(sd)}, tmp_path / "bit.pth")
    torch.save(sd, tmp_path / "timm.pth")
    for f in ("bit.pth", "timm.pth"):
        assert same_state(a, models.create(TINY, num_classes=10, weights=tmp_path / f))
    with pytest.raises(ValueError, match="sd"):
        models.from_timm_state_dict({"features.0.weight": torch.ones(1)})
    with pytest.raises(ValueError, match="sd"):
        models.from_timm_state_dict([1, 2])


def test_native_save_load_keeps_config(tmp_path):
    a = randomize(models.create("bit_tiny", num_classes=4, norm="bn", conv="ws", in_chans=1, ws_eps=1e-8), seed=2)
    a(torch.randn(4, 1, 32, 32))  # running stats
    path = tmp_path / "m.pt"
    models.save(a, path)
    b = models.load(path)
    assert b.config == a.config and same_state(a, b)
    x = torch.randn(2, 1, 32, 32)
    assert torch.equal(a.eval()(x), b.eval()(x))
    c = models.create("bit_tiny", num_classes=9, norm="bn", in_chans=1, weights=path)  # head resized
    assert torch.equal(c.stem.conv.weight, a.stem.conv.weight) and torch.count_nonzero(c.head.fc.weight) == 0
    with pytest.raises(ValueError, match="norm"):
        models.create("bit_tiny", num_classes=4, in_chans=1, weights=path)  # GN model, BN file


def test_rgb_npz_into_other_in_chans(tmp_path):
    """An RGB .npz loads into a 1- or 5-channel model: the stem is adapted (reported), the rest is loaded as is.
    With a plain-conv stem, gray g gives exactly what the RGB model gives on (g, g, g)."""
    rgb = randomize(models.create("bit_tiny", num_classes=4, conv="plain"), seed=3).eval()
    path = tmp_path / "rgb.npz"
    models.save_npz(rgb, path)
    gray = models.create("bit_tiny", num_classes=4, conv="plain", in_chans=1).eval()
    report = models.load_npz(gray, path)
    assert report.stem_adapted and not (report.missing or report.unexpected or report.mismatched)
    g = torch.rand(2, 1, 40, 40) * 2 - 1
    torch.testing.assert_close(gray(g), rgb(g.expand(-1, 3, -1, -1)), rtol=1e-5, atol=1e-5)
    five = models.create("bit_tiny", num_classes=4, conv="plain", in_chans=5, weights=path)
    w = rgb.stem.conv.weight
    assert torch.allclose(five.stem.conv.weight[:, 3:], w[:, :2] * 0.6) and five(torch.rand(1, 5, 40, 40)).shape == (1, 4)
    ws_path = tmp_path / "ws.npz"  # a WS stem loads too (equal up to a scale per filter, see adapt_stem)
    models.save_npz(randomize(models.create("bit_tiny", num_classes=4), seed=4), ws_path)
    assert models.load_npz(models.create("bit_tiny", num_classes=4, in_chans=1), ws_path).stem_adapted
    with pytest.raises(ValueError, match=r"\(O, 3, kh, kw\)"):
        models.adapt_stem(torch.ones(8, 2, 3, 3), 1)


class NotAllowed:  # weights_only=True must refuse to unpickle arbitrary classes
    pass


def test_native_bad_files(tmp_path):
    good = tmp_path / "good.pt"
    models.save(models.create(TINY), good)
    (tmp_path / "trunc.pt").write_bytes(good.read_bytes()[:1000])
    torch.save({"format": "bitfast.resnetv2", "x": NotAllowed()}, tmp_path / "code.pt")
    torch.save({"a": torch.ones(2)}, tmp_path / "plain.pt")
    for name in ("trunc.pt", "code.pt", "plain.pt"):
        with pytest.raises(ValueError) as e:
            models.load(tmp_path / name)
        assert str(tmp_path / name) in str(e.value)


def test_create_with_npz_weights(official):
    path, _, expect = official
    m = models.create(TINY, num_classes=10, weights=path)
    assert torch.equal(m.head.fc.weight, expect["head.fc.weight"])  # matching head is loaded, not zeroed


def test_logits_match_timm(tmp_path):
    """Same weights through an npz into timm's independent BiT (its own npz reader and modules)."""
    timm = pytest.importorskip("timm", reason="optional: timm not installed (pip install timm)")
    a = randomize(models.create("BiT-M-R50x1", num_classes=1000, ws_eps=1e-8), seed=3).eval()  # timm's eps
    path = tmp_path / "r50.npz"
    models.save_npz(a, path)
    t = timm.create_model("resnetv2_50x1_bit", pretrained=False, num_classes=1000).eval()
    t.load_pretrained(str(path))
    x = torch.rand(2, 3, 96, 96) * 2 - 1
    with torch.no_grad():
        ya, yt = a(x), t(x)
        diff = (ya - yt).abs().max().item()
        print(f"\nmax abs logit diff bitfast vs timm (R50x1, npz): {diff:.3e} (max |logit| {yt.abs().max():.3f})")
        assert diff <= 1e-4 * yt.abs().max().item()
        t.load_state_dict(models.to_timm_state_dict(a), strict=True)  # and the state_dict route both ways
        assert (t(x) - ya).abs().max().item() <= 1e-4 * yt.abs().max().item()
        b = models.create("BiT-M-R50x1", num_classes=1000, ws_eps=1e-8)
        b.load_state_dict(models.from_timm_state_dict(t.state_dict()), strict=True)
        assert same_state(a, b)
