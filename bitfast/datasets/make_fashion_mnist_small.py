"""Rebuild fashion_mnist_small.npz from the Debian package `dataset-fashion-mnist`.

    apt-get install dataset-fashion-mnist
    python -m bitfast.datasets.make_fashion_mnist_small

Keeps 600 train and 200 test images per class, chosen with seed 0 (about 3.5 MB compressed).
"""
import numpy as np

from bitfast.datasets import DEBIAN_DIR, PACKAGED, read_idx_split

TRAIN_PER_CLASS, TEST_PER_CLASS, SEED = 600, 200, 0


def _subsample(y, per_class, rng):
    # Sorted indices per class: keeps the original Fashion-MNIST order inside the subset.
    return np.concatenate([np.sort(rng.choice(np.flatnonzero(y == c), per_class, replace=False))
                           for c in range(10)])


def main():
    rng = np.random.default_rng(SEED)
    x, y = read_idx_split(DEBIAN_DIR, "train")
    xt, yt = read_idx_split(DEBIAN_DIR, "test")
    tr, te = _subsample(y, TRAIN_PER_CLASS, rng), _subsample(yt, TEST_PER_CLASS, rng)
    np.savez_compressed(PACKAGED, train_x=x[tr], train_y=y[tr], test_x=xt[te], test_y=yt[te])
    print(f"wrote {PACKAGED}: {len(tr)} train, {len(te)} test")


if __name__ == "__main__":
    main()
