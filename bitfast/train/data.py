"""Data: image sources (ImageFolder trees, built-in arrays), BiT transforms, few-shot, and a resumable sampler.

Randomness lives in the sampler, not in the workers: every training sample comes as (index, aug_seed), where
aug_seed is a pure function of (run seed, position in the sample stream). So crops and flips do not depend on
the number of workers or ranks, and a resumed run replays exactly the same images in the same order.

    train: squash-resize to (R, R) -> random crop C -> random flip          (transfer, GUIDE §4)
           Inception crop C -> random flip                                  (upstream)
    eval : squash-resize to (C, C)                                          (transfer)
           resize the short side to R -> central crop C                      (upstream, big_vision)
Labels are an int, or a list of class indices (multi-label); collate pads lists into (N, L) with -1.
Images leave the workers as uint8 (3, C, C); the loop scales them to [-1, 1] on the device.
"""
import math
import os
import re
import signal
import warnings

import numpy as np
import torch
from PIL import Image

from bitfast import datasets
from bitfast.train import decode

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
BUILTIN = {"fashion-mnist": "auto", "fashion-mnist-small": "small", "fashion-mnist-full": "full"}
MAX_PIXELS = 50_000_000  # larger images are skipped: decoding one takes >150 MB per worker (README: Training)
SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I")  # 16-bit PNG/TIFF gray ("I": 32-bit ints, checked)


def to_rgb(im):
    """A PIL image -> 8-bit RGB. 16-bit gray is scaled by 255/65535 and float gray from [0, 1] (convert("RGB")
    would clip both: 16-bit to near white, float to black). ValueError (a counted skip) when no honest 8-bit
    version exists: a float image outside [0, 1], a 32-bit one beyond 16 bits, too many pixels."""
    check_pixels(im)
    if im.mode not in SIXTEEN_BIT + ("F",):
        return im.convert("RGB")  # forces decoding, so truncated files fail here; gray -> 3 channels
    a = np.asarray(im, np.float64)
    top = 1.0 if im.mode == "F" else 65535.0
    if not np.isfinite(a).all() or a.min() < 0 or a.max() > top:
        raise ValueError(f"mode {im.mode} image with values in [{a.min():g}, {a.max():g}], outside [0, {top:g}]: "
                         "its 8-bit scale is unknown")
    return Image.fromarray(np.rint(a * (255.0 / top)).astype(np.uint8), "L").convert("RGB")


def check_pixels(im):
    if im.width * im.height > MAX_PIXELS:
        raise ValueError(f"{im.width}x{im.height} is over the {MAX_PIXELS:,}-pixel limit")


def _open(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # MAX_PIXELS decides, in to_rgb
        return Image.open(path)


def _list_images(top):
    """Image files under `top` (sorted by directory), following symlinks but entering each real directory once:
    a link loop such as cat/loop -> . would otherwise list every file again at each level."""
    found, seen = [], set()
    for dirpath, dirs, files in os.walk(top, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        found.append((dirpath, sorted(f for f in files if f.lower().endswith(IMAGE_EXTENSIONS))))
    return [os.path.join(d, f) for d, files in sorted(found) for f in files]


class ArraySource:
    """In-memory uint8 images (N, H, W) or (N, H, W, 3) with int labels."""
    in_memory = True

    def __init__(self, x, y, classes, name):
        self.x, self.labels, self.classes, self.name = x, np.asarray(y, np.int64), list(classes), name

    def __len__(self):
        return len(self.labels)

    def describe(self, i):
        return f"{self.name}[{i}]"

    def load(self, i):
        return Image.fromarray(self.x[i]).convert("RGB")

    def raw(self, i):  # no encoded bytes: decode.load takes load(i) in every mode
        return None

    def image_hw(self):
        return tuple(self.x.shape[1:3])


class FolderSource:
    """An ImageFolder-style directory: <root>/<class>/<image>. Files are listed, not opened, at start."""
    in_memory = False

    def __init__(self, root, classes=None, cache=None, write_cache=True):
        """cache: a file for the listing (e.g. <out>/folder_index.npz), reused while the root's and the class
        folders' mtimes are unchanged (adding or removing a file in a class folder changes its mtime; a change
        deeper down, in a subfolder of a class, is not seen: delete the cache then)."""
        train = classes is None  # the training tree defines the classes; an eval tree may lack some
        if not os.path.isdir(root):
            raise FileNotFoundError(f"data: {root} is not a directory")
        found = sorted(d.name for d in os.scandir(root) if d.is_dir() and not d.name.startswith("."))
        if classes is None:
            classes = found
        extra = sorted(set(found) - set(classes))
        if extra:
            raise ValueError(f"data: {root} has classes not in the training set: {extra[:5]}")
        self.root, self.classes, self.name = root, list(classes), root
        stamp = repr([os.path.realpath(root), os.stat(root).st_mtime_ns] +
                     [(c, os.stat(os.path.join(root, c)).st_mtime_ns) for c in found])
        if not (cache and self._read_cache(cache, stamp)):
            self.paths, labels, self.empty = [], [], []
            for label, cls in enumerate(self.classes):
                d = os.path.join(root, cls)
                files = _list_images(d) if os.path.isdir(d) else []
                if not files and os.path.isdir(d):
                    self.empty.append(cls)
                self.paths += files
                labels += [label] * len(files)
            self.labels = np.asarray(labels, np.int64)
            if cache and write_cache and self.paths:
                from bitfast.train.checkpoint import atomic_write
                os.makedirs(os.path.dirname(os.path.abspath(cache)), exist_ok=True)
                atomic_write(cache, lambda f: np.savez(f, stamp=np.asarray(stamp), labels=self.labels,
                                                       paths=np.asarray(self.paths, dtype=str),
                                                       empty=np.asarray(self.empty, dtype=str)))
        if not self.paths:
            raise ValueError(f"data: no images ({', '.join(IMAGE_EXTENSIONS)}) under {root}/<class>/")
        if self.empty and train:  # a class without examples can never be learned, yet it gets a head output
            raise ValueError(f"data: {len(self.empty)} class folder(s) under {root} hold no images: "
                             f"{', '.join(self.empty[:5])}; add images or remove the folder(s)")

    def _read_cache(self, cache, stamp):
        try:
            with np.load(cache, allow_pickle=False) as z:
                if str(z["stamp"]) != stamp:
                    return False
                self.paths, self.labels, self.empty = z["paths"].tolist(), z["labels"], z["empty"].tolist()
                return True
        except (OSError, ValueError, KeyError):  # missing or unreadable: list the folder again
            return False

    def __len__(self):
        return len(self.paths)

    def describe(self, i):
        return self.paths[i]

    def load(self, i):
        with _open(self.paths[i]) as im:
            return to_rgb(im)

    def raw(self, i):
        with open(self.paths[i], "rb") as f:
            return f.read()

    def image_hw(self, sample=64):
        """Median (H, W) over up to `sample` evenly spaced files (headers only)."""
        sizes = []
        for i in np.linspace(0, len(self) - 1, min(sample, len(self))).astype(int):
            try:
                with _open(self.paths[i]) as im:
                    sizes.append((im.height, im.width))
            except Exception:  # a corrupt file here is counted later, when it is loaded
                continue
        if not sizes:
            raise ValueError(f"data: none of the sampled images under {self.root} could be opened")
        return tuple(int(v) for v in np.median(np.asarray(sizes), axis=0))


def _parse_classes(text):
    """'5-9' -> [5..9]; '0,2,4' -> [0, 2, 4]."""
    if not re.fullmatch(r"\d+(-\d+)?(,\d+(-\d+)?)*", text):
        raise ValueError(f"data: class list must look like '5-9' or '0,2,4', got {text!r}")
    out = []
    for part in text.split(","):
        a, _, b = part.partition("-")
        out += list(range(int(a), int(b or a) + 1))
    return out


def canonical_spec(spec):
    """--data as it resolves, for comparing two runs: a built-in name as its source and class list
    ('fashion-mnist:5-9' == 'fashion-mnist-small:5,6,7,8,9' without the Debian package), else the real path."""
    name, _, cls_text = spec.partition(":")
    if name in BUILTIN and not os.path.isdir(spec):
        try:
            classes = _parse_classes(cls_text) if cls_text else list(range(10))
            return f"fashion-mnist-{datasets.resolve_source(BUILTIN[name])}:{','.join(map(str, classes))}"
        except (ValueError, FileNotFoundError):
            return spec
    return os.path.realpath(os.path.expanduser(spec))


class SubsetSource:
    """Items `idx` of another source (a minival held out of train, or the rest of train)."""

    def __init__(self, src, idx, name):
        self.src, self.idx, self.name = src, np.asarray(idx, np.int64), name
        self.labels, self.classes, self.in_memory = src.labels[self.idx], src.classes, src.in_memory

    def __len__(self):
        return len(self.idx)

    def describe(self, i):
        return self.src.describe(int(self.idx[i]))

    def load(self, i):
        return self.src.load(int(self.idx[i]))

    def raw(self, i):
        return self.src.raw(int(self.idx[i]))

    def image_hw(self):
        return self.src.image_hw()


MINIVAL_SEED = 0x4D1  # fixed: the same minival for every run seed


def hold_out(train, n, name):
    """(rest, minival): `n` items of `train` chosen by a fixed seed, for data with no validation split."""
    if not 0 < n < len(train):
        raise ValueError(f"--minival {n}: {name} has no val/ or test/ split, so the eval set is held out of its "
                         f"{len(train):,} training images; give 0 < --minival < {len(train):,}")
    pick = np.random.default_rng(MINIVAL_SEED).permutation(len(train))
    val, rest = np.sort(pick[:n]), np.sort(pick[n:])
    return (SubsetSource(train, rest, f"{train.name} (minus minival)"),
            SubsetSource(train, val, f"{train.name} minival ({n:,} held out of train)"))


def open_data(spec, eval_split="auto", exclude=None, minival=0, cache_dir=None, write_cache=True):
    """(train source, eval source) for an ImageFolder root or a built-in name like 'fashion-mnist:5-9'.

    eval_split "auto" takes test/ when there is one (the official split, as the paper reports), else val/.
    exclude: a file of image paths (one per line) to drop from both sources, e.g. dedup's near-duplicates.
    minival > 0 (upstream): data with no eval split gets `minival` training images held out as its eval set.
    A shard pattern ('DIR/train-{0000..0099}.tar') opens as shards.ShardSource; its index is cached in cache_dir."""
    if not spec:
        raise ValueError("data: give --data (an ImageFolder root with train/ and val/ or test/, or one of "
                         f"{', '.join(BUILTIN)}, optionally with ':CLASSES', e.g. fashion-mnist:5-9)")
    from bitfast.train import shards
    if shards.is_shard_spec(spec) and not os.path.isdir(spec):
        if exclude or eval_split != "auto":
            raise ValueError(f"{'exclude' if exclude else 'eval_split'}: not supported for shard data")
        return shards.open_shards(spec, minival, cache_dir, write_cache)
    name, _, cls_text = spec.partition(":")
    if name in BUILTIN and not os.path.isdir(spec):
        if eval_split == "val" or exclude:
            raise ValueError(f"{'eval_split=val' if eval_split == 'val' else 'exclude'}: needs ImageFolder data; "
                             f"the built-in {name} has a test split only and no file paths")
        classes = _parse_classes(cls_text) if cls_text else list(range(10))
        source = datasets.resolve_source(BUILTIN[name])
        names = [datasets.FASHION_MNIST_CLASSES[c] for c in classes if 0 <= c < 10]
        tag = f"fashion-mnist ({'full 60k/10k' if source == 'full' else 'shipped subset'})"
        return tuple(ArraySource(*datasets.load_fashion_mnist(split, source, classes), names, f"{tag} {split}")
                     for split in ("train", "test"))
    train_dir = os.path.join(spec, "train")
    if not os.path.isdir(train_dir):
        raise FileNotFoundError(f"data: {spec!r} is neither a built-in dataset ({', '.join(BUILTIN)}) "
                                "nor a directory with a train/ folder")
    order = ("test", "val") if eval_split == "auto" else (eval_split,)
    eval_dir = next((os.path.join(spec, d) for d in order if os.path.isdir(os.path.join(spec, d))), None)
    cache = (lambda name: os.path.join(cache_dir, name)) if cache_dir else (lambda name: None)
    if eval_dir is None and minival and eval_split == "auto":
        train = FolderSource(train_dir, None, cache("folder_index.npz"), write_cache)
        if exclude:
            drop_listed((train,), exclude)
        return hold_out(train, minival, spec)
    if eval_dir is None:
        raise FileNotFoundError(f"data: {spec} has train/ but neither test/ nor val/" if eval_split == "auto" else
                                f"eval_split: {spec} has no {eval_split}/ folder")
    train = FolderSource(train_dir, None, cache("folder_index.npz"), write_cache)
    sources = train, FolderSource(eval_dir, train.classes, cache("folder_index_eval.npz"), write_cache)
    if exclude:
        drop_listed(sources, exclude)
    return sources


def drop_listed(sources, path):
    """Remove the images listed in file `path` (compared as real paths) from FolderSources, in place."""
    try:
        with open(path) as f:
            listed = {os.path.realpath(ln.strip()) for ln in f if ln.strip() and not ln.startswith("#")}
    except OSError as e:
        raise FileNotFoundError(f"exclude: cannot read {path} ({e.strerror})") from None
    dropped = 0
    for src in sources:
        keep = [i for i, p in enumerate(src.paths) if os.path.realpath(p) not in listed]
        if not keep:
            raise ValueError(f"exclude: {path} removes every image of {src.root}")
        n = len(src.paths) - len(keep)
        src.paths, src.labels, dropped = [src.paths[i] for i in keep], src.labels[keep], dropped + n
        src.name = f"{src.root} (minus {n} excluded)" if n else src.name
    if listed and not dropped:
        raise ValueError(f"exclude: none of the {len(listed)} paths in {path} is an image of the data")


def fewshot_indices(labels, k, seed):
    """K indices per class, chosen by a seeded shuffle (sorted). k=0 keeps everything."""
    labels = np.asarray(labels)
    if k == 0:
        return np.arange(len(labels))
    order = np.random.default_rng(seed).permutation(len(labels))
    picked = []
    for c in np.unique(labels):
        members = order[labels[order] == c]
        if len(members) < k:
            raise ValueError(f"examples_per_class={k} but class {c} has only {len(members)} examples")
        picked.append(members[:k])
    return np.sort(np.concatenate(picked))


# The transforms take a PIL image or a uint8 (3, H, W) tensor (decode.py: --decode); same draws either way.
def train_transform(img, rng, resize, crop, flip=True, random_crop=True):
    op = decode.ops(img)
    if random_crop:
        img = op.resize(img, resize, resize)
        top, left = rng.integers(0, resize - crop + 1, size=2)
        img = op.crop(img, left, top, crop, crop)
    else:
        img = op.resize(img, crop, crop)
    if flip and rng.random() < 0.5:
        img = op.flip(img)
    return op.to_chw(img)


def inception_box(w, h, rng, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """The Inception crop's (left, top, right, bottom) in a w x h image: a random area fraction and aspect ratio,
    10 tries, else the whole image."""
    for _ in range(10):
        area = w * h * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        cw, ch = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            top, left = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
            return left, top, left + cw, top + ch
    return 0, 0, w, h


def inception_transform(img, rng, crop, flip=True, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """Random area/aspect crop resized to crop x crop (Inception preprocessing), then a random flip."""
    op = decode.ops(img)
    box = inception_box(*op.size(img), rng, scale, ratio)
    img = op.resize(img, crop, crop, box=box)
    if flip and rng.random() < 0.5:
        img = op.flip(img)
    return op.to_chw(img)


def eval_transform(img, crop, resize=None):
    """Squash to (crop, crop); or, with `resize`, the short side to `resize` and a central crop (big_vision)."""
    op = decode.ops(img)
    if resize is None:
        return op.to_chw(op.resize(img, crop, crop))
    w, h = op.size(img)
    s = resize / min(w, h)
    w2, h2 = max(crop, round(w * s)), max(crop, round(h * s))
    img = op.resize(img, w2, h2)
    left, top = (w2 - crop) // 2, (h2 - crop) // 2
    return op.to_chw(op.crop(img, left, top, crop, crop))


class View(torch.utils.data.Dataset):
    """Items are (index, aug_seed) pairs from the samplers; aug_seed None means eval."""

    def __init__(self, source, recipe, upstream=False):
        self.source, self.r, self.upstream = source, recipe, upstream
        self.decode = getattr(recipe, "decode", "pil")  # README: Input throughput
        decode.check(self.decode)

    def __len__(self):
        return len(self.source)

    def __getitem__(self, item):
        i, seed = item
        label = self.source.labels[i]
        label = [int(c) for c in label] if isinstance(label, (list, tuple, np.ndarray)) else int(label)
        try:  # decoding and the transform: either may fail on a bad or huge image (MemoryError included)
            return self._transform(decode.load(self.source, i, self.decode), seed), label, None
        except Exception as e:  # skipped and counted by the loop, never fatal
            return None, label, f"{self.source.describe(i)} ({type(e).__name__}: {e})"

    def _transform(self, img, seed):
        if seed is None:
            return eval_transform(img, self.r.crop, self.r.resize if self.r.eval_crop == "center" else None)
        rng = np.random.default_rng(seed)
        if self.upstream and self.r.random_crop:
            return inception_transform(img, rng, self.r.crop, self.r.flip, scale=(self.r.crop_area, 1.0))
        return train_transform(img, rng, self.r.resize, self.r.crop, self.r.flip, self.r.random_crop)


def collate(items):
    """-> x uint8 (N, 3, C, C), y int64 (N,), bad: list of descriptions of skipped images."""
    good = [(x, y) for x, y, err in items if err is None]
    bad = [err for _, _, err in items if err is not None]
    if not good:
        return None, None, bad
    return torch.stack([x for x, _ in good]), label_tensor([y for _, y in good]), bad


def label_tensor(ys):
    """ints -> (N,) int64; lists of class indices (multi-label) -> (N, L) int64 padded with -1."""
    if not any(isinstance(y, list) for y in ys):
        return torch.tensor(ys, dtype=torch.int64)
    ys = [y if isinstance(y, list) else [y] for y in ys]
    out = torch.full((len(ys), max(1, max(map(len, ys)))), -1, dtype=torch.int64)
    for i, y in enumerate(ys):
        out[i, :len(y)] = torch.tensor(y, dtype=torch.int64)
    return out


class StreamSampler:
    """Batches of (source index, aug_seed) for one rank, from an endless seeded stream, starting at `start_step`.

    The stream concatenates epochs; epoch e is a permutation of `indices` seeded by (seed, e). Global step s
    takes stream positions [s*B, (s+1)*B); rank r takes the r-th of `world` equal slices. The sampler
    position in a checkpoint is therefore just the step.
    """

    def __init__(self, indices, batch, rank, world, seed, start_step=0, stop_step=None):
        self.indices, self.batch, self.rank, self.world = np.asarray(indices), batch, rank, world
        self.seed, self.start, self.stop = seed, start_step, stop_step
        self._epoch, self._perm = None, None

    def _perm_for(self, epoch):
        if epoch != self._epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._epoch, self._perm = epoch, self.indices[rng.permutation(len(self.indices))]
        return self._perm

    def batch_at(self, step):
        per = self.batch // self.world
        n, out = len(self.indices), []
        for pos in range(step * self.batch + self.rank * per, step * self.batch + (self.rank + 1) * per):
            out.append((int(self._perm_for(pos // n)[pos % n]), aug_seed(self.seed, pos)))
        return out

    def __iter__(self):
        step = self.start
        while self.stop is None or step < self.stop:
            yield self.batch_at(step)
            step += 1


def aug_seed(seed, pos):
    """Per-sample augmentation seed from (run seed, stream position); stable across processes."""
    return int(np.random.SeedSequence([seed, pos, 0xB17]).generate_state(1, np.uint64)[0])


def eval_batches(n, batch, rank, world):
    """Rank r evaluates items r, r+W, ... exactly once: no padding, so no duplicates and no drops."""
    mine = list(range(rank, n, world))
    return [[(i, None) for i in mine[j:j + batch]] for j in range(0, len(mine), batch)]


def _worker_init(_):
    # Ctrl-C / SIGTERM are for the training process, which checkpoints and then ends its workers; a worker that
    # died on the signal first would turn the clean stop into a "DataLoader worker exited unexpectedly" crash.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def loader(view, batch_sampler, workers, pin):
    spawn = workers and getattr(view, "decode", None) == "gpu"  # CUDA cannot start in a forked worker
    return torch.utils.data.DataLoader(view, batch_sampler=batch_sampler, num_workers=workers, collate_fn=collate,
                                       pin_memory=pin, persistent_workers=False,
                                       worker_init_fn=_worker_init if workers else None,
                                       multiprocessing_context="spawn" if spawn else None)
