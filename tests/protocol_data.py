"""Small local ImageFolders for the protocol tests: learnable synthetic tasks and a Fashion-MNIST export."""
import os

import numpy as np
from PIL import Image


def make_task(root, n_train=20, n_test=9, classes=3, size=16, seed=None):
    """ROOT/{train,test}/c<k>/*.png: class k is a colour tint plus noise (learnable in a few steps)."""
    rng = np.random.default_rng(seed)
    tints = rng.integers(0, 256, (classes, 3))
    for split, n in (("train", n_train), ("test", n_test)):
        for i in range(n):
            c = i % classes
            img = np.clip(tints[c] + rng.normal(0, 40, (size, size, 3)), 0, 255).astype(np.uint8)
            d = os.path.join(root, split, f"c{c}")
            os.makedirs(d, exist_ok=True)
            Image.fromarray(img).save(os.path.join(d, f"{i}.png"))
    return root


def export_fashion_mnist(root, classes=(5, 6, 7), n_train=20, n_test=10):
    """The first images of the shipped Fashion-MNIST subset as an ImageFolder with train/ and test/."""
    from bitfast import datasets
    for split, n in (("train", n_train), ("test", n_test)):
        x, y = datasets.load_fashion_mnist(split, "small", list(classes))
        for c in range(len(classes)):
            d = os.path.join(root, split, datasets.FASHION_MNIST_CLASSES[classes[c]])
            os.makedirs(d, exist_ok=True)
            for j, i in enumerate(np.flatnonzero(y == c)[:n]):
                Image.fromarray(x[i]).save(os.path.join(d, f"{j}.png"))
    return root


def smooth_image(rng, size=64):
    """A random smooth colour image: upsampled 6x6 noise plus a bright rectangle (distinct per draw)."""
    base = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize((size, size), Image.BICUBIC)
    x = np.asarray(base, np.float32)
    (y0, x0), (h, w) = rng.integers(0, size // 2, 2), rng.integers(size // 6, size // 2, 2)
    x[y0:y0 + h, x0:x0 + w] = 0.5 * x[y0:y0 + h, x0:x0 + w] + 0.5 * rng.integers(0, 256, 3)
    return Image.fromarray(x.astype(np.uint8))


def plant_duplicates(root, n_ref=40, n_new=6, seed=None):
    """ROOT/reference/*.png and ROOT/query/*: six near-copies of reference images (2 resized, 2 cropped,
    2 JPEG-recompressed) and n_new unrelated images. Returns {query path: reference path} of the planted ones."""
    import io
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(root, "reference", "a"), exist_ok=True)
    os.makedirs(os.path.join(root, "query", "a"), exist_ok=True)
    refs = []
    for i in range(n_ref):
        refs.append(os.path.join(root, "reference", "a", f"r{i}.png"))
        smooth_image(rng).save(refs[-1])
    planted = {}
    for j, i in enumerate(rng.choice(n_ref, 6, replace=False)):
        img = Image.open(refs[i]).convert("RGB")
        if j < 2:
            img = img.resize((48, 48), Image.BILINEAR)  # a smaller copy
        elif j < 4:
            img = img.crop((3, 3, 61, 61))  # ~10% of the side cropped off
        else:
            buf = io.BytesIO()
            img.save(buf, "JPEG", quality=30)
            img = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
        path = os.path.join(root, "query", "a", f"dup{j}.png")
        img.save(path)
        planted[path] = refs[i]
    for j in range(n_new):
        smooth_image(rng).save(os.path.join(root, "query", "a", f"new{j}.png"))
    return planted
