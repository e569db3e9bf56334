"""Small datasets shipped with bitfast, for the demo and the tests. Nothing is downloaded.

fashion_mnist_small.npz is a class-balanced subset of Fashion-MNIST (Xiao, Rasul & Vollgraf 2017,
Zalando Research, MIT licence; see README.md here): 600 train + 200 test 28x28 grayscale images per class.
When the Debian package `dataset-fashion-mnist` is installed, the full 60k/10k set is used instead
(source="auto") or on request (source="full").
"""
import gzip
import os

import numpy as np

PACKAGED = os.path.join(os.path.dirname(__file__), "fashion_mnist_small.npz")
DEBIAN_DIR = os.environ.get("BITFAST_FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ("t-shirt/top", "trouser", "pullover", "dress", "coat",
                         "sandal", "shirt", "sneaker", "bag", "ankle boot")
_IDX_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
              "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}


def read_idx(path):
    """A gzipped IDX file (ubyte data only) as a numpy array; a clear error if it is damaged."""
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise ValueError(f"read_idx: cannot read {path}: {e}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"read_idx: {path} is not a ubyte IDX file")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    start = 4 + 4 * ndim
    if len(raw) - start != int(np.prod(dims)):
        raise ValueError(f"read_idx: {path} is truncated ({len(raw) - start} bytes for shape {dims})")
    return np.frombuffer(raw, np.uint8, offset=start).reshape(dims)


def read_idx_split(directory, split):
    images, labels = (os.path.join(directory, f) for f in _IDX_FILES[split])
    x, y = read_idx(images), read_idx(labels)
    if len(x) != len(y):
        raise ValueError(f"read_idx_split: {len(x)} images but {len(y)} labels in {directory}")
    return x, y


def debian_available():
    return all(os.path.exists(os.path.join(DEBIAN_DIR, f)) for pair in _IDX_FILES.values() for f in pair)


def resolve_source(source="auto"):
    """'auto' -> 'full' when the Debian package is installed, else 'small'."""
    if source not in ("auto", "full", "small"):
        raise ValueError(f"source must be 'auto', 'full' or 'small', got {source!r}")
    if source == "auto":
        return "full" if debian_available() else "small"
    if source == "full" and not debian_available():
        raise FileNotFoundError(f"source='full' needs the Debian package dataset-fashion-mnist "
                                f"(files under {DEBIAN_DIR}); install it or use source='small'")
    return source


def load_fashion_mnist(split="train", source="auto", classes=None):
    """Fashion-MNIST as (x uint8 (N, 28, 28), y int64 (N,)).

    split: "train" or "test". source: "auto", "full" (Debian package) or "small" (shipped subset).
    classes: optional list of original class ids to keep; labels are renumbered 0..len(classes)-1
    in the given order.
    """
    if split not in _IDX_FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if resolve_source(source) == "full":
        x, y = read_idx_split(DEBIAN_DIR, split)
    else:
        with np.load(PACKAGED, allow_pickle=False) as z:
            x, y = z[f"{split}_x"], z[f"{split}_y"]
    y = y.astype(np.int64)
    if classes is not None:
        classes = [int(c) for c in classes]
        bad = [c for c in classes if not 0 <= c < 10]
        if bad or len(set(classes)) != len(classes):
            raise ValueError(f"classes must be distinct ids in 0..9, got {classes}")
        keep = np.isin(y, classes)
        remap = np.full(10, -1, np.int64)
        remap[classes] = np.arange(len(classes))
        x, y = x[keep], remap[y[keep]]
    return np.ascontiguousarray(x), y
