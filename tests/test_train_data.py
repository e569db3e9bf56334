"""Data: built-in Fashion-MNIST, ImageFolder scan, transforms, few-shot, samplers, corrupt-image skipping."""
import gzip
import os

import numpy as np
import pytest
import torch
from PIL import Image

from bitfast import datasets
from bitfast.train import config as C
from bitfast.train import data as D


def make_folder(root, n_train=(6, 5, 4), n_eval=(3, 2, 4), size=(20, 24), gray_every=3):
    """ImageFolder tree with random RGB and grayscale PNGs of slightly varying sizes."""
    rng = np.random.default_rng()
    for split, counts in (("train", n_train), ("val", n_eval)):
        for c, n in enumerate(counts):
            d = os.path.join(root, split, f"class_{c}")
            os.makedirs(d, exist_ok=True)
            for i in range(n):
                h, w = size[0] + int(rng.integers(0, 4)), size[1] + int(rng.integers(0, 4))
                shape = (h, w) if i % gray_every == 0 else (h, w, 3)
                Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(os.path.join(d, f"{i}.png"))
    return root


def corrupt(root):
    """A garbage .jpg and a truncated .png in the training set; returns their paths."""
    bad1 = os.path.join(root, "train", "class_0", "garbage.jpg")
    with open(bad1, "wb") as f:
        f.write(os.urandom(300))
    good = os.path.join(root, "train", "class_1", "0.png")
    bad2 = os.path.join(root, "train", "class_1", "truncated.png")
    with open(good, "rb") as f:
        raw = f.read()
    with open(bad2, "wb") as f:
        f.write(raw[: len(raw) // 2])
    return bad1, bad2


def recipe(**kw):
    return C.resolve(C.make_config("transfer", resolution="16,12", **kw), 100, (20, 20), 3)


def test_builtin_fashion_mnist_small_and_class_selection():
    x, y = datasets.load_fashion_mnist("train", "small")
    assert x.shape == (6000, 28, 28) and x.dtype == np.uint8 and np.bincount(y).tolist() == [600] * 10
    train, test = D.open_data("fashion-mnist-small:5-9")
    assert len(train) == 3000 and len(test) == 1000 and train.classes[0] == "sandal"
    assert sorted(set(train.labels.tolist())) == [0, 1, 2, 3, 4]
    # Label 0 of the 5-9 view is original class 5: same images as the full view's class 5.
    full, _ = D.open_data("fashion-mnist-small")
    assert np.array_equal(train.x[train.labels == 0], full.x[full.labels == 5])
    train, _ = D.open_data("fashion-mnist-small:7,2")
    assert np.array_equal(train.x[train.labels == 1], full.x[full.labels == 2])
    with pytest.raises(ValueError, match="class list"):
        D.open_data("fashion-mnist-small:five")
    with pytest.raises(FileNotFoundError, match="neither a built-in"):
        D.open_data("/nonexistent/place")


def test_read_idx_rejects_truncated(tmp_path):
    p = tmp_path / "x.gz"
    header = bytes([0, 0, 8, 3]) + (10).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2
    with gzip.open(p, "wb") as f:
        f.write(header + bytes(28 * 28 * 10 - 5))
    with pytest.raises(ValueError, match="truncated"):
        datasets.read_idx(str(p))


def test_folder_scan_grayscale_and_transforms(tmp_path):
    root = make_folder(str(tmp_path))
    train, val = D.open_data(root)
    assert train.classes == ["class_0", "class_1", "class_2"] and len(train) == 15 and len(val) == 9
    assert np.bincount(train.labels).tolist() == [6, 5, 4]
    r = recipe()
    v = D.View(train, r)
    x, label, err = v[(0, 1234)]  # index 0 is grayscale
    assert err is None and x.shape == (3, 12, 12) and x.dtype == torch.uint8
    assert torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])
    # Same seed -> same crop/flip; eval -> plain resize to the crop size.
    assert torch.equal(v[(4, 99)][0], v[(4, 99)][0])
    seeds = [v[(4, s)][0] for s in range(12)]
    assert any(not torch.equal(seeds[0], s) for s in seeds[1:])
    ex = D.View(train, r)[(4, None)][0]
    assert ex.shape == (3, 12, 12)
    nocrop = D.View(train, recipe(no_crop=True, no_flip=True))
    assert torch.equal(nocrop[(4, 5)][0], ex)  # no crop + no flip = the eval transform


def test_flip_is_a_mirror():
    img = Image.fromarray(np.random.default_rng().integers(0, 256, (9, 9, 3), dtype=np.uint8))
    outs = {}
    for s in range(20):
        rng = np.random.default_rng(s)
        out = D.train_transform(img, rng, 9, 9, flip=True, random_crop=True)
        outs[s] = out
    ref = torch.from_numpy(np.array(img)).permute(2, 0, 1)
    flipped = [s for s, o in outs.items() if torch.equal(o, ref.flip(-1))]
    plain = [s for s, o in outs.items() if torch.equal(o, ref)]
    assert flipped and plain and len(flipped) + len(plain) == 20


def test_fewshot_is_seeded_and_balanced():
    labels = np.random.default_rng().integers(0, 7, 500)
    labels[:7 * 12] = np.repeat(np.arange(7), 12)  # at least 12 per class
    a = D.fewshot_indices(labels, 10, seed=3)
    assert np.array_equal(a, D.fewshot_indices(labels, 10, seed=3))
    assert not np.array_equal(a, D.fewshot_indices(labels, 10, seed=4))
    assert np.bincount(labels[a]).tolist() == [10] * 7 and len(set(a.tolist())) == 70
    assert np.array_equal(D.fewshot_indices(labels, 0, seed=3), np.arange(500))
    with pytest.raises(ValueError, match="examples_per_class=1000"):
        D.fewshot_indices(labels, 1000, seed=0)


def test_stream_sampler_ranks_resume_and_epochs():
    n, batch, world = int(np.random.default_rng().integers(30, 60)), 12, 3
    idx = np.random.default_rng().permutation(1000)[:n]
    one = D.StreamSampler(idx, batch, 0, 1, seed=7)
    for step in (0, 1, 5, 11):
        whole = one.batch_at(step)
        parts = sum((D.StreamSampler(idx, batch, r, world, seed=7).batch_at(step) for r in range(world)), [])
        assert parts == whole  # ranks split the global batch, crops (aug seeds) included
    resumed = D.StreamSampler(idx, batch, 0, 1, seed=7, start_step=4, stop_step=6)
    assert list(resumed) == [one.batch_at(4), one.batch_at(5)]
    first_epoch = [i for s in range(n // batch) for i, _ in one.batch_at(s)]
    assert len(set(first_epoch)) == len(first_epoch)  # no repeats inside an epoch
    assert set(i for s in range(3 * n) for i, _ in one.batch_at(s)) == set(idx.tolist())


def test_eval_batches_cover_exactly():
    n, world = int(np.random.default_rng().integers(1, 100)), int(np.random.default_rng().integers(1, 9))
    seen = [i for r in range(world) for b in D.eval_batches(n, 7, r, world) for i, _ in b]
    assert sorted(seen) == list(range(n))


def test_corrupt_images_are_skipped_and_reported(tmp_path):
    root = make_folder(str(tmp_path))
    bad = corrupt(root)
    train, _ = D.open_data(root)
    v = D.View(train, recipe())
    items = [(i, 10 + i) for i in range(len(train))]
    x, y, errs = D.collate([v[it] for it in items])
    assert len(errs) == 2 and len(x) == len(train) - 2 and len(y) == len(x)
    assert sorted(e.split(" (")[0] for e in errs) == sorted(bad)
    assert all("Error" in e for e in errs)
    x, y, errs = D.collate([v[(train.paths.index(bad[0]), 1)]])
    assert x is None and len(errs) == 1
