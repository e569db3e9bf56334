"""Sharded data: webdataset tar shards (the format of timm/imagenet-22k-wds), packing and a resumable stream.

A sample is the tar members sharing a key (`<key>.jpg` / `.png` / ... and `<key>.cls` holding an int, or
`<key>.json` holding {"label": int or [ints]} for multi-label data). Shards are read with `tarfile`, never with
webdataset's decoders (those unpickle `.pyd` members: loading must never run code); webdataset's TarWriter
writes them (`bitfast-train pack`).

    ShardSource : --data 'DIR/train-{0000..2047}.tar'. Its index (per sample: shard, byte offset and size of the
                  image, labels) comes from one scan of the tar headers, cached as <out>/data_index.npz (checked
                  against the shards' names, sizes and mtimes), so a restart does not re-read 14M headers.
    ShardSampler: the training order. Rank r's steps go round-robin to L = max(1, workers) lanes (the DataLoader
                  gives batch t to worker t % L); lane (r, l) of W*L reads only its own shards: in epoch e the
                  shards permuted by (seed, e), every (W*L)-th from position r*L + l, their samples in file order
                  through a shuffle buffer seeded by (seed, e, r, l). The buffer's choices depend only on sample
                  counts, so the position in the stream is a pure function of the step: resuming at step s
                  replays nothing and skips nothing. Same world size and workers for a resume (checked).
"""
import io
import json
import os
import tarfile

import numpy as np
from PIL import Image

from bitfast.train import data as D
from bitfast.train import decode

INFO = "info.json"
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "ppm", "pgm", "bmp", "tif", "tiff")
SHUFFLE_BUFFER = 10_000


def is_shard_spec(spec):
    return ".tar" in spec


def expand(pattern):
    try:
        import braceexpand  # a dependency of webdataset
    except ImportError:
        raise ValueError("data: shard patterns need webdataset (pip install webdataset)") from None
    paths = [p for part in pattern.split("::") for p in braceexpand.braceexpand(part)]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"data: {len(missing)} of the {len(paths)} shards of {pattern} do not exist, e.g. "
                                f"{missing[0]}")
    return paths


def _key_ext(name):
    base = os.path.basename(name)
    d = base.find(".")
    return (name, "") if d < 0 else (name[:len(name) - len(base) + d], base[d + 1:].lower())


def _label(ext, raw):
    if ext == "cls":
        return int(raw.decode().strip())
    obj = json.loads(raw.decode())
    lab = obj.get("label", obj.get("labels")) if isinstance(obj, dict) else obj
    if isinstance(lab, list):
        return [int(c) for c in lab]
    return int(lab)


def scan(path):
    """[(image offset, size, ext, label or None)] for the samples of one shard, in file order; a truncated or
    corrupt tar keeps the samples before the damage (the rest are missing and counted by the caller)."""
    out, cur, key = [], {}, None

    def flush():
        img = next((e for e in IMAGE_EXTS if e in cur), None)
        lab = cur.get("label")
        out.append((*(cur[img] if img else (-1, 0)), img or "", lab))

    try:
        with tarfile.open(path, "r:") as tf:  # headers only: tarfile seeks over the member data
            for m in tf:
                if not m.isfile():
                    continue
                k, ext = _key_ext(m.name)
                if k != key:
                    if key is not None:
                        flush()
                    key, cur = k, {}
                if ext in IMAGE_EXTS:
                    cur[ext] = (m.offset_data, m.size)
                elif ext in ("cls", "json", "labels.json"):
                    raw = tf.extractfile(m).read()
                    try:
                        cur["label"] = _label(ext, raw)
                    except (ValueError, UnicodeDecodeError, AttributeError, TypeError):
                        cur["label"] = None
            if key is not None:
                flush()
    except (tarfile.TarError, OSError, EOFError):
        if key is not None and cur:
            flush()
    return out


class ShardSource:
    """Training or eval samples of a list of shards; `load(i)` seeks to sample i's image and decodes it."""
    in_memory = False

    def __init__(self, paths, classes, name, cache_dir=None, write_cache=True, cache_name="data_index.npz"):
        self.paths, self.classes, self.name, self.write_cache = list(paths), list(classes), name, write_cache
        self.unlabeled = 0
        self._index(cache_dir, cache_name)

    def subset(self, shard_ids, name):
        """The samples of some of the shards (a minival, or train without it), without re-reading them."""
        new = object.__new__(ShardSource)
        new.__dict__.update(self.__dict__, name=name, paths=[self.paths[s] for s in shard_ids])
        keep = np.isin(self.shard, shard_ids)
        remap = np.full(len(self.paths), -1, np.int32)
        remap[list(shard_ids)] = np.arange(len(shard_ids))
        new.shard, new.offset, new.size, new.ext = remap[self.shard[keep]], self.offset[keep], self.size[keep], \
            self.ext[keep]
        new.labels, new.counts = self.labels[keep], self.counts[list(shard_ids)]
        return new

    def _stamp(self):
        return [[os.path.realpath(p), os.path.getsize(p), int(os.stat(p).st_mtime_ns)] for p in self.paths]

    def _index(self, cache_dir, cache_name):
        stamp = json.dumps(self._stamp())
        cache = os.path.join(cache_dir, cache_name) if cache_dir else None
        if cache and os.path.isfile(cache):
            try:
                with np.load(cache, allow_pickle=False) as z:
                    if str(z["stamp"]) == stamp:
                        self._set(*(z[k] for k in ("shard", "offset", "size", "ext", "flat", "starts", "multi")))
                        return
            except (OSError, ValueError, KeyError):
                pass  # an unreadable cache is rebuilt
        shard, offset, size, ext, flat, starts, multi, missing = [], [], [], [], [], [0], False, 0
        for s, p in enumerate(self.paths):
            for off, sz, e, lab in scan(p):
                labs = [] if lab is None else lab if isinstance(lab, list) else [lab]
                multi |= isinstance(lab, list)
                if lab is None or not e:  # no image or no readable label: cannot be trained on
                    missing += 1
                    continue
                shard.append(s), offset.append(off), size.append(sz), ext.append(e)
                flat += labs
                starts.append(len(flat))
        self.unlabeled = missing
        arrays = (np.asarray(shard, np.int32), np.asarray(offset, np.int64), np.asarray(size, np.int64),
                  np.asarray(ext), np.asarray(flat, np.int64), np.asarray(starts, np.int64), np.asarray(multi))
        self._set(*arrays)
        if cache and self.write_cache:
            from bitfast.train.checkpoint import atomic_write
            os.makedirs(cache_dir, exist_ok=True)
            atomic_write(cache, lambda f: np.savez(f, stamp=np.asarray(stamp), **dict(zip(
                ("shard", "offset", "size", "ext", "flat", "starts", "multi"), arrays))))

    def _set(self, shard, offset, size, ext, flat, starts, multi):
        self.shard, self.offset, self.size, self.ext = shard, offset, size, ext
        self.multi_label = bool(multi)
        if not len(shard):
            raise ValueError(f"data: no labelled image samples in the shards of {self.name}")
        if self.multi_label:
            self.labels = np.empty(len(shard), object)
            for i in range(len(shard)):
                self.labels[i] = flat[starts[i]:starts[i + 1]].tolist()
        else:
            self.labels = flat
        top = int(flat.max()) if len(flat) else -1
        if top >= len(self.classes) or (len(flat) and flat.min() < 0):
            raise ValueError(f"data: {self.name} has labels outside [0, {len(self.classes)}) ({top})")
        self.counts = np.bincount(shard, minlength=len(self.paths))

    def __len__(self):
        return len(self.shard)

    def describe(self, i):
        return f"{self.paths[self.shard[i]]}@{self.offset[i]}"

    def raw(self, i):
        with open(self.paths[self.shard[i]], "rb") as f:
            f.seek(int(self.offset[i]))
            raw = f.read(int(self.size[i]))
        if len(raw) != self.size[i]:
            raise ValueError("truncated shard")
        return raw

    def load(self, i):
        return decode.from_bytes(self.raw(i), "pil")

    def image_hw(self, sample=16):
        sizes = []
        for i in np.linspace(0, len(self) - 1, min(sample, len(self))).astype(int):
            try:
                im = self.load(i)
                sizes.append((im.height, im.width))
            except Exception:
                continue
        if not sizes:
            raise ValueError(f"data: none of the sampled images of {self.name} could be decoded")
        return tuple(int(v) for v in np.median(np.asarray(sizes), axis=0))


def _read_info(paths):
    info_path = os.path.join(os.path.dirname(paths[0]), INFO)
    if not os.path.isfile(info_path):
        raise FileNotFoundError(f"data: {info_path} is missing: it names the classes (bitfast-train pack writes it; "
                                'for other shards write {"classes": [...]} there)')
    with open(info_path) as f:
        info = json.load(f)
    if not isinstance(info, dict) or not isinstance(info.get("classes"), list):
        raise ValueError(f"data: {info_path} has no 'classes' list")
    return info, os.path.dirname(info_path)


def open_shards(pattern, minival=0, cache_dir=None, write_cache=True):
    """(train, eval) ShardSources: eval from info.json's 'test' or 'val' split, else (minival > 0) whole train
    shards held out by a fixed seed until they hold `minival` samples."""
    paths = expand(pattern)
    info, root = _read_info(paths)
    classes = info["classes"]
    splits = info.get("splits", {})
    ev = next((splits[s] for s in ("test", "val") if s in splits), None)
    if ev is not None and not {os.path.realpath(os.path.join(root, p)) for p in ev["shards"]} & \
            {os.path.realpath(p) for p in paths}:
        train = ShardSource(paths, classes, pattern, cache_dir, write_cache)
        return train, ShardSource([os.path.join(root, p) for p in ev["shards"]], classes, f"{root} eval shards",
                                  cache_dir, write_cache, "data_index_eval.npz")
    if not minival:
        raise FileNotFoundError(f"data: {pattern} has no eval split (info.json 'splits' test/val); upstream holds "
                                "out a minival with --minival N")
    train = ShardSource(paths, classes, pattern, cache_dir, write_cache)
    order = np.random.default_rng(D.MINIVAL_SEED).permutation(len(paths))
    held, n = [], 0
    for s in order:
        if n >= minival:
            break
        held.append(int(s))
        n += int(train.counts[s])
    if len(held) == len(paths):
        raise ValueError(f"--minival {minival}: holding it out of {pattern} would take every shard")
    keep = sorted(set(range(len(paths))) - set(held))
    return (train.subset(keep, f"{pattern} (minus minival shards)"),
            train.subset(sorted(held), f"{pattern} minival ({n:,} samples in {len(held)} held-out shards)"))


def buffered_order(n, buf, rng):
    """The order in which a shuffle buffer of `buf` items emits a stream of n items (a function of n only)."""
    out, pool = np.empty(n, np.int64), list(range(min(buf, n)))
    picks = rng.integers(0, max(1, min(buf, n)), size=max(0, n - buf))
    for j, i in enumerate(range(len(pool), n)):
        out[j], pool[picks[j]] = pool[picks[j]], i
    tail = np.asarray(pool, np.int64)
    out[n - len(tail):] = tail[rng.permutation(len(tail))]
    return out


class ShardSampler:
    """Batches of (sample index, aug_seed) for one rank (module docstring); `batch_at(step)` is pure."""

    def __init__(self, source, batch, rank, world, lanes, seed, start_step=0, stop_step=None, buffer=SHUFFLE_BUFFER):
        self.src, self.rank, self.world, self.lanes, self.seed = source, rank, world, max(1, lanes), seed
        self.per, self.buffer, self.start, self.stop = batch // world, buffer, start_step, stop_step
        if len(source.paths) < world * self.lanes:
            raise ValueError(f"data: {len(source.paths)} shard(s) for {world} rank(s) x {self.lanes} worker(s): each "
                             "worker reads its own shards; pack more shards or use fewer --workers")
        starts = np.zeros(len(source.paths) + 1, np.int64)
        starts[1:] = np.cumsum(source.counts)
        self.shard_start, self._epochs = starts, {}

    def _epoch(self, lane, e):
        """(global sample indices of lane `lane` in epoch e, in emission order)."""
        if (lane, e) not in self._epochs:
            shard_perm = np.random.default_rng([self.seed, e, 0x5A]).permutation(len(self.src.paths))  # same on all
            order = shard_perm[self.rank * self.lanes + lane::self.world * self.lanes]
            rng = np.random.default_rng([self.seed, e, self.rank, lane, 0x5B])
            seq = np.concatenate([np.arange(self.shard_start[s], self.shard_start[s + 1]) for s in order])
            if not len(seq):
                raise ValueError("data: a worker's shards hold no samples")
            self._epochs = {k: v for k, v in self._epochs.items() if k[0] != lane or k[1] >= e - 1}
            self._epochs[(lane, e)] = seq[buffered_order(len(seq), self.buffer, rng)]
        return self._epochs[(lane, e)]

    def _take(self, lane, pos, n):
        """n items of lane `lane`'s endless stream from position pos."""
        e, out = 0, []
        while n:
            ep = self._epoch(lane, e)
            if pos >= len(ep):
                pos -= len(ep)
                e += 1
                continue
            part = ep[pos:pos + n]
            out.append(part)
            n -= len(part)
            pos, e = 0, e + 1
        return np.concatenate(out)

    def batch_at(self, step):
        lane, k = step % self.lanes, step // self.lanes
        idx = self._take(lane, k * self.per, self.per)
        pos = (self.rank * self.lanes + lane) << 40  # a stream position unique over all lanes
        return [(int(i), D.aug_seed(self.seed, pos + k * self.per + j)) for j, i in enumerate(idx)]

    def __iter__(self):
        step = self.start
        while self.stop is None or step < self.stop:
            yield self.batch_at(step)
            step += 1


def pack(src, out, shard_size=10_000, progress=True):
    """Write the train and eval splits of `src` (ImageFolder root or built-in name) as shards + info.json."""
    import webdataset as wds
    from tqdm import tqdm

    from bitfast.train.checkpoint import atomic_write, write_json
    if shard_size < 1:
        raise ValueError(f"--shard-size must be >= 1, got {shard_size}")
    train, test = D.open_data(src)
    os.makedirs(out, exist_ok=True)
    splits, bad = {}, []
    bar = tqdm(total=len(train) + len(test), unit="img", disable=not progress, desc="pack")
    for split, s in (("train", train), ("test", test)):
        names, counts = [], []
        for first in range(0, len(s), shard_size):
            name = f"{split}-{len(names):06d}.tar"
            n = [0]

            def write(f, first=first):
                tw = wds.TarWriter(f, encoder=False, mtime=0)
                for i in range(first, min(first + shard_size, len(s))):
                    bar.update(1)
                    try:
                        ext, raw = _sample_bytes(s, i)
                    except Exception as e:  # unreadable files are left out and listed
                        bad.append(f"{s.describe(i)} ({type(e).__name__}: {e})")
                        continue
                    tw.write({"__key__": f"{split}{i:09d}", ext: raw, "cls": str(int(s.labels[i])).encode()})
                    n[0] += 1
                tw.close()
            atomic_write(os.path.join(out, name), write)
            names.append(name)
            counts.append(n[0])
        splits[split] = dict(shards=names, counts=counts, num_samples=int(sum(counts)))
    bar.close()
    write_json(os.path.join(out, INFO), dict(classes=list(train.classes), source=src, splits=splits,
                                             skipped=bad, format="webdataset: <key>.<image ext> + <key>.cls"))
    return splits, bad


def _sample_bytes(src, i):
    if isinstance(src, D.FolderSource):
        path = src.paths[i]
        with D._open(path) as im:  # readable at all? (the bytes are copied, not re-encoded)
            im.verify()
        ext = os.path.splitext(path)[1].lower().lstrip(".")
        with open(path, "rb") as f:
            return {"jpeg": "jpg"}.get(ext, ext), f.read()
    buf = io.BytesIO()
    src.load(i).save(buf, "PNG")
    return "png", buf.getvalue()


def add_parser(sub):
    p = sub.add_parser("pack", help="write an ImageFolder or built-in dataset as webdataset shards + info.json")
    p.add_argument("src", help="ImageFolder root (train/ + test/ or val/) or a built-in name, e.g. fashion-mnist")
    p.add_argument("out", help="directory for train-NNNNNN.tar, test-NNNNNN.tar and info.json")
    p.add_argument("--shard-size", type=int, default=10_000, help="samples per shard (default 10000)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(protocol=main)


def main(args):
    splits, bad = pack(args.src, args.out, args.shard_size, progress=not args.no_progress)
    for k, v in splits.items():
        print(f"{k}: {v['num_samples']:,} samples in {len(v['shards'])} shard(s)")
    if bad:
        print(f"skipped {len(bad)} unreadable image(s), listed in {os.path.join(args.out, INFO)}")
    last = len(splits["train"]["shards"]) - 1
    print(f"train with --data '{os.path.join(args.out, 'train-{%06d..%06d}.tar' % (0, last))}'")
    return 0
