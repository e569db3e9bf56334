"""--decode (bitfast/train/decode.py): the fast path against Pillow on photographs, corrupt bytes, the GPU path.

Photographs: scikit-image's shipped files resized to ~400x350 and re-encoded as quality-90 JPEGs (as in
bench/test_data.py). Tolerances, measured here and stated in README "Input throughput": the decode is identical
(the same libjpeg-turbo); squash resizes, the transfer crop and the eval crop are within 1 level of Pillow; the
Inception crop is within 1 level away from the crop box's edges, where Pillow's filter reads pixels outside the
box (the tensor path resizes the cropped box), with a mean difference under 0.1 level.
"""
import io
import os

import numpy as np
import pytest
import torch
from PIL import Image

from bitfast.train import config as C
from bitfast.train import data as D
from bitfast.train import decode

try:
    import skimage.data as skimage_data
except ImportError:  # GPU machines have no scikit-image: the nvjpeg test runs on synthetic pictures there
    skimage_data = None
PHOTOS = ("astronaut", "chelsea", "coffee", "motorcycle_left", "rocket", "retina", "hubble_deep_field", "camera")


def _photo_bytes(name, area=400 * 350):
    where = os.path.dirname(skimage_data.__file__)
    path = next(os.path.join(where, name + e) for e in (".png", ".jpg")
                if os.path.isfile(os.path.join(where, name + e)))
    with Image.open(path) as im:
        img = im.convert("RGB") if name != "camera" else im.convert("L")  # one grayscale JPEG
    s = (area / (img.width * img.height)) ** 0.5
    img = img.resize((round(img.width * s), round(img.height * s)), Image.LANCZOS)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture(scope="module")
def photos():
    if skimage_data is None:
        pytest.skip("scikit-image is not installed (install.sh installs it)")
    return [_photo_bytes(n) for n in PHOTOS]


@pytest.fixture(scope="module")
def any_photos():
    """The photographs, or where scikit-image is missing, smooth random pictures with edges (350x400, q90)."""
    if skimage_data is not None:
        return [_photo_bytes(n) for n in PHOTOS]
    out, rng = [], np.random.default_rng(0)
    yy, xx = np.mgrid[0:350, 0:400] / 50.0
    for _ in range(4):
        f = rng.uniform(0.2, 2, (3, 2))
        img = 127 + 100 * np.sin(f[:, :1, None] * xx + f[:, 1:, None] * yy) + rng.normal(0, 8, (3, 350, 400))
        img[:, 100:200, 150:260] = rng.uniform(0, 255, (3, 1, 1))  # a flat patch: sharp edges for the IDCT
        buf = io.BytesIO()
        Image.fromarray(img.clip(0, 255).astype(np.uint8).transpose(1, 2, 0)).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def _diff(a, b):
    return (a.int() - b.int()).abs()


def test_fast_decode_gives_pillows_pixels(photos):
    for raw in photos:
        pil = decode.from_bytes(raw, "pil")
        fast = decode.from_bytes(raw, "fast")
        assert isinstance(fast, torch.Tensor) and fast.dtype == torch.uint8 and fast.shape == (3, pil.height, pil.width)
        assert torch.equal(fast, torch.from_numpy(np.array(pil)).permute(2, 0, 1))


@pytest.mark.parametrize("aug", ["transfer", "eval-center", "eval-squash", "no-crop"])
def test_fast_resize_crops_match_pillow_within_one_level(photos, aug):
    for p, raw in enumerate(photos):
        for seed in range(3):
            outs = []
            for mode in ("pil", "fast"):
                img = decode.from_bytes(raw, mode)
                rng = np.random.default_rng(seed)
                if aug == "transfer":
                    outs.append(D.train_transform(img, rng, 512, 480))
                elif aug == "no-crop":
                    outs.append(D.train_transform(img, rng, 160, 128, random_crop=False))
                else:
                    outs.append(D.eval_transform(img, 224, 256 if aug == "eval-center" else None))
            assert outs[0].shape == outs[1].shape and outs[1].is_contiguous()
            assert int(_diff(*outs).max()) <= 1, (PHOTOS[p], seed)


def test_inception_crop_same_box_and_pixels_within_stated_tolerance(photos):
    means = []
    for p, raw in enumerate(photos):
        pil, fast = decode.from_bytes(raw, "pil"), decode.from_bytes(raw, "fast")
        for seed in range(12):
            box = D.inception_box(pil.width, pil.height, np.random.default_rng(seed), (0.05, 1.0))
            a = D.inception_transform(pil, np.random.default_rng(seed), 224, flip=False, scale=(0.05, 1.0))
            b = D.inception_transform(fast, np.random.default_rng(seed), 224, flip=False, scale=(0.05, 1.0))
            d = _diff(a, b)
            # Pillow's taps reach ~max(1, box/224) source pixels past the box: that many output pixels per edge
            # (plus one) may differ more; inside them the two agree within 1 level.
            m = int(np.ceil(224 / min(box[2] - box[0], box[3] - box[1]))) + 1
            assert int(d[:, m:-m, m:-m].max()) <= 1, (PHOTOS[p], seed, box)
            means.append(float(d.float().mean()))
            # flips: the same draw, the same mirror
            fa = D.inception_transform(pil, np.random.default_rng(seed), 224, scale=(0.05, 1.0))
            fb = D.inception_transform(fast, np.random.default_rng(seed), 224, scale=(0.05, 1.0))
            assert torch.equal(fa, a) == torch.equal(fb, b) and int(_diff(fa, fb)[:, m:-m, m:-m].max()) <= 1
    assert np.mean(means) < 0.1 and max(means) < 0.5


def test_view_draws_the_same_crops_in_every_mode(tmp_path, photos):
    """The View's random crop geometry depends on the seed only: pil and fast agree on every sample."""
    for c in range(2):
        os.makedirs(tmp_path / "train" / f"c{c}")
        os.makedirs(tmp_path / "test" / f"c{c}")
        for k, raw in enumerate(photos[c * 4:(c + 1) * 4]):
            (tmp_path / "train" / f"c{c}" / f"{k}.jpg").write_bytes(raw)
            (tmp_path / "test" / f"c{c}" / f"{k}.jpg").write_bytes(raw)
    train, test = D.open_data(str(tmp_path))
    for mode_cfg in ("transfer", "upstream"):
        cfg = C.make_config(mode_cfg, resolution="160,128")
        views = {m: D.View(train, C.resolve(C.make_config(mode_cfg, resolution="160,128", decode=m), 8, (350, 400), 2),
                           upstream=mode_cfg == "upstream") for m in ("pil", "fast")}
        assert C.resolve(cfg, 8, (350, 400), 2).decode == "fast"  # the default
        for i in range(len(train)):
            seed = D.aug_seed(0, i)
            (a, la, ea), (b, lb, eb) = views["pil"][(i, seed)], views["fast"][(i, seed)]
            assert ea is None and eb is None and la == lb and a.shape == b.shape == (3, 128, 128)
            assert float(_diff(a, b).float().mean()) < 0.5
        ev = D.View(test, C.resolve(cfg, 8, (350, 400), 2))
        assert ev[(0, None)][0].shape == (3, 128, 128)


def test_corrupt_bytes_are_skipped_and_counted_in_fast_mode(tmp_path, photos):
    raw = photos[0]
    for c in ("a", "b"):
        os.makedirs(tmp_path / "train" / c)
        os.makedirs(tmp_path / "val" / c)
        (tmp_path / "train" / c / "ok.jpg").write_bytes(raw)
        (tmp_path / "val" / c / "ok.jpg").write_bytes(raw)
    (tmp_path / "train" / "a" / "truncated.jpg").write_bytes(raw[:len(raw) // 2])
    (tmp_path / "train" / "a" / "noeoi.jpg").write_bytes(raw[:-2])
    (tmp_path / "train" / "b" / "garbage.jpg").write_bytes(b"\xff\xd8\xff" + b"not a jpeg" * 50)
    (tmp_path / "train" / "b" / "empty.jpg").write_bytes(b"")
    train, _ = D.open_data(str(tmp_path))
    for m in ("pil", "fast"):
        view = D.View(train, C.resolve(C.make_config("upstream", decode=m), 8, (350, 400), 2), upstream=True)
        x, y, bad = D.collate([view[(i, D.aug_seed(0, i))] for i in range(len(train))])
        assert x.shape == (2, 3, 224, 224) and len(bad) == 4, (m, bad)
        assert sorted(os.path.basename(b.split(" (")[0]) for b in bad) == ["empty.jpg", "garbage.jpg", "noeoi.jpg",
                                                                          "truncated.jpg"]
        assert all("ValueError" in b or "Error" in b for b in bad)


def test_fast_falls_back_to_pillow_for_png_cmyk_and_arrays(photos):
    rgb = decode.from_bytes(photos[1], "pil")
    for fmt, img in (("PNG", rgb), ("JPEG", rgb.convert("CMYK"))):
        buf = io.BytesIO()
        img.save(buf, fmt)
        ref = decode.from_bytes(buf.getvalue(), "pil")
        out = decode.from_bytes(buf.getvalue(), "fast")
        assert torch.equal(out, torch.from_numpy(np.array(ref)).permute(2, 0, 1)), fmt
    src = D.ArraySource(np.zeros((1, 28, 28), np.uint8), [0], ["a"], "arrays")
    assert isinstance(decode.load(src, 0, "fast"), Image.Image)  # nothing to decode: Pillow as before


def test_decode_flag_and_gpu_without_cuda():
    from bitfast.train import cli
    help_text = cli.parser()._subparsers._group_actions[0].choices["upstream"].format_help()
    assert "--decode" in help_text
    args = cli.parser().parse_args(["upstream", "--decode", "pil"])
    assert cli.config_from_args(args).decode == "pil"
    with pytest.raises(ValueError, match="decode"):
        C.make_config("upstream", decode="nvjpeg")
    if not torch.cuda.is_available():
        r = C.resolve(C.make_config("upstream", decode="gpu"), 8, (350, 400), 2)
        with pytest.raises(ValueError, match="needs a CUDA device"):
            D.View(D.ArraySource(np.zeros((1, 8, 8), np.uint8), [0], ["a"], "x"), r)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: the nvjpeg path is tested on a GPU only")
def test_gpu_decode_matches_the_cpu_path(any_photos):
    for raw in any_photos:
        cpu, gpu = decode.from_bytes(raw, "fast"), decode.from_bytes(raw, "gpu")
        assert gpu.is_cuda and gpu.shape == cpu.shape
        # nvjpeg's IDCT and chroma upsampling are not libjpeg-turbo's: a few levels apart
        assert float(_diff(gpu.cpu(), cpu).float().mean()) < 1.5
        for seed in range(3):
            a = D.train_transform(cpu, np.random.default_rng(seed), 512, 480)
            b = D.train_transform(gpu, np.random.default_rng(seed), 512, 480)
            assert b.device.type == "cpu" and b.shape == a.shape and float(_diff(a, b).float().mean()) < 2.0
            a = D.inception_transform(cpu, np.random.default_rng(seed), 224, scale=(0.05, 1.0))
            b = D.inception_transform(gpu, np.random.default_rng(seed), 224, scale=(0.05, 1.0))
            assert b.device.type == "cpu" and float(_diff(a, b).float().mean()) < 2.0
