"""Input throughput: JPEG decode + augmentation in images/s per CPU core (README "Input throughput").

Photographs shipped with scikit-image (astronaut, chelsea, coffee, motorcycle, rocket, retina, Hubble deep field,
camera), each resized to the area of an ImageNet-21k image (~400x350, aspect kept) and re-encoded as quality-90
JPEGs. Every path turns the same encoded bytes, with the same per-image seeds, into the uint8 (3, C, C) tensor a
DataLoader worker hands to the training loop; one torch thread, so the rate is per core.

    augmentation  inception224  upstream: Inception crop (area 5-100%, big_vision) -> 224, + flip
                  transfer480   BiT-HyperRule: squash-resize to 512x512 -> random crop 480, + flip
    path          pil           Pillow decode + Pillow resize: the loader before issue 14 (--decode pil)
                  pil-draft     as pil, with Pillow's JPEG draft (DCT-domain 1/2, 1/4, 1/8 scaling) where the
                                decoded image stays at least as large as the resize needs
                  pil+u8        Pillow decode + uint8 resize on the tensor (torch's antialiased bilinear,
                                channels-last AVX2)
                  fast          torchvision.io.decode_jpeg (libjpeg-turbo) + the same uint8 resize: the
                                loader's default (--decode fast)
                  gpu           nvjpeg decode + resize on the GPU (--decode gpu; CUDA only)

All paths of one augmentation are timed alternately in one process (bench/_timing.alternate). Each row records
images/s (wall clock), images per CPU-second of the thread (time.thread_time: the rate of one core, little moved
by other jobs on shared cores), their ratios to pil, and the largest pixel difference to pil's output. The table is printed at the end of
the module; the records go to the result JSON (suite "data").
"""
import contextlib
import functools
import io
import os
import time

import numpy as np
import pytest
import torch
from PIL import Image

from bench import _timing as T
from bitfast.train import data as D
from bitfast.train import decode

skimage_data = pytest.importorskip("skimage.data")

PHOTOS = ("astronaut", "chelsea", "coffee", "motorcycle_left", "rocket", "retina", "hubble_deep_field", "camera")
AREA = 400 * 350  # a typical ImageNet-21k image
AUGS = {"inception224": dict(crop=224), "transfer480": dict(resize=512, crop=480)}
CROP_AREA = 0.05  # the upstream default (--crop-area)
SEEDS, ROUNDS = (1, 3) if T.QUICK else (4, 15)  # seeds per photo; timing rounds
GPU = torch.cuda.is_available()


@functools.lru_cache(maxsize=None)
def photos():
    """[JPEG bytes]: the photographs at ~AREA pixels, quality 90 (read from scikit-image's files, never fetched)."""
    out, where = [], os.path.dirname(skimage_data.__file__)
    for name in PHOTOS:
        path = next(os.path.join(where, name + e) for e in (".png", ".jpg")
                    if os.path.isfile(os.path.join(where, name + e)))
        with Image.open(path) as im:
            img = im.convert("RGB")
        s = (AREA / (img.width * img.height)) ** 0.5
        img = img.resize((round(img.width * s), round(img.height * s)), Image.LANCZOS)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return tuple(out)


def augment(img, seed, aug):
    rng = np.random.default_rng(seed)
    if aug == "inception224":
        return D.inception_transform(img, rng, 224, scale=(CROP_AREA, 1.0))
    return D.train_transform(img, rng, 512, 480)


def draft_size(raw, seed, aug):
    """The smallest size the draft may reduce to: the resize's input must stay at least its output."""
    with Image.open(io.BytesIO(raw)) as im:
        w, h = im.size
    if aug == "inception224":
        box = D.inception_box(w, h, np.random.default_rng(seed), (CROP_AREA, 1.0))  # the same first draws
        return -(-224 * w // (box[2] - box[0])), -(-224 * h // (box[3] - box[1]))
    return 512, 512


def pil_draft(raw, seed, aug):
    im = Image.open(io.BytesIO(raw))
    w = im.width
    im.draft("RGB", draft_size(raw, seed, aug))  # no-op unless a 1/2^k scale keeps the size
    if im.width == w:
        return augment(D.to_rgb(im), seed, aug)
    raise NotImplementedError("draft reduced the image: rescale the crop box")  # never at i21k sizes (counted)


PATHS = {
    "pil": lambda raw, seed, aug: augment(decode.from_bytes(raw, "pil"), seed, aug),
    "pil-draft": pil_draft,
    "pil+u8": lambda raw, seed, aug: augment(decode.to_tensor(decode.from_bytes(raw, "pil")), seed, aug),
    "fast": lambda raw, seed, aug: augment(decode.from_bytes(raw, "fast"), seed, aug),
}
if GPU:
    PATHS["gpu"] = lambda raw, seed, aug: augment(decode.from_bytes(raw, "gpu"), seed, aug)


def draft_reduces(raw, seed, aug):
    with Image.open(io.BytesIO(raw)) as im:
        size = im.size
        im.draft("RGB", draft_size(raw, seed, aug))
        return im.size != size


@pytest.fixture(scope="module")
def table(request):
    rows = []
    yield rows
    if rows:
        lines = [f"# Input throughput: decode + augment, images/s per core ({T.device_name(torch.device('cpu'))}, "
                 f"1 torch thread, {len(PHOTOS)} photos ~400x350 q90, {'quick' if T.QUICK else 'full'} mode)", "",
                 "| augmentation | path | images/s (wall, 1 thread) | × pil | images per CPU-second | × pil | "
                 "max abs diff vs pil | note |", "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['aug']} | {r['path']} | {r['img_per_s']:.0f} | {r['ratio']:.2f} | {r['img_per_cpu_s']:.0f} | "
                  f"{r['cpu_ratio']:.2f} | {r['max_diff']} | {r['note']} |" for r in rows]
        capture = request.config.pluginmanager.get_plugin("capturemanager")  # shown without -s too
        with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
            print("\n" + "\n".join(lines))


def compare(aug, calls, n, notes, table):
    """Time {path: call() -> [uint8 (3, C, C) tensors]} alternately with one torch thread; `n` images per call.
    Adds a row per path to the table and records (suite "data") with the ratios and the largest pixel difference
    to the pil path's output."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ref = calls["pil"]()
        diffs = {}
        for name, call in calls.items():
            out = call()
            assert all(o.shape == r.shape and o.dtype == torch.uint8 and o.device.type == "cpu"
                       for o, r in zip(out, ref)) and len(out) == n, name
            diffs[name] = max(int((o.int() - r.int()).abs().max()) for o, r in zip(out, ref))
        cpu_s = dict.fromkeys(calls, 0.0)

        def timed(name, call):  # also the thread's CPU time: what a core spends, whatever else shares the cores
            t0 = time.thread_time()
            call()
            cpu_s[name] += time.thread_time() - t0

        fns = {name: functools.partial(timed, name, call) for name, call in calls.items()}
        stats = T.alternate(fns, torch.device("cuda" if GPU else "cpu"), warmup=1, rounds=ROUNDS)
    finally:
        torch.set_num_threads(old)
    per_cpu_s = {name: n * (ROUNDS + 1) / cpu_s[name] for name in calls}
    records = []
    for name, st in stats.items():
        row = dict(aug=aug, path=name, img_per_s=n / st.median_ms * 1e3, ratio=stats["pil"].median_ms / st.median_ms,
                   img_per_cpu_s=per_cpu_s[name], cpu_ratio=per_cpu_s[name] / per_cpu_s["pil"],
                   max_diff=diffs[name], note=notes.get(name, ""))
        table.append(row)
        records.append(T.record("data", f"{aug}/{name}", st, img_per_s=row["img_per_s"], speedup_vs_pil=row["ratio"],
                                img_per_cpu_s=row["img_per_cpu_s"], cpu_speedup_vs_pil=row["cpu_ratio"],
                                max_abs_diff_vs_pil=row["max_diff"],
                                params=dict(aug=aug, path=name, images=n, threads=1)))
    T.write_records(records)
    return diffs


@pytest.mark.parametrize("aug", list(AUGS))
def test_decode_augment_throughput(aug, table):
    items = [(raw, 1000 * p + k) for p, raw in enumerate(photos()) for k in range(SEEDS)]
    reduced = sum(draft_reduces(raw, seed, aug) for raw, seed in items)
    notes = {"pil": "current loader (--decode pil)", "fast": "default (--decode fast)",
             "pil-draft": f"draft reduced {reduced}/{len(items)} images",
             "pil+u8": "Pillow decode, uint8 tensor resize",
             "gpu": "--decode gpu (one image per call)"}
    calls = {name: (lambda fn=fn: [fn(raw, seed, aug) for raw, seed in items]) for name, fn in PATHS.items()}
    diffs = compare(aug, calls, len(items), notes, table)
    assert diffs["pil-draft"] == 0 if not reduced else True


def test_loader_view_and_collate_throughput(tmp_path, table):
    """What a DataLoader worker runs for a batch: read the files of an ImageFolder, decode, augment (View), collate."""
    from bitfast.train import config as C
    for k, raw in enumerate(photos()):
        for split in ("train", "test"):
            os.makedirs(tmp_path / split / f"c{k % 2}", exist_ok=True)
            (tmp_path / split / f"c{k % 2}" / f"{k}.jpg").write_bytes(raw)
    train, _ = D.open_data(str(tmp_path))
    batch = [(i, D.aug_seed(0, i * SEEDS + k)) for i in range(len(train)) for k in range(SEEDS)]
    for aug, mode, res in (("inception224", "upstream", None), ("transfer480", "transfer", "512,480")):
        calls = {}
        for m in ("pil", "fast") + (("gpu",) if GPU else ()):
            r = C.resolve(C.make_config(mode, decode=m, resolution=res), len(train), train.image_hw(), 2)
            view = D.View(train, r, upstream=mode == "upstream")
            calls[m] = lambda view=view: list(D.collate([view[item] for item in batch])[0])
        compare(f"{aug} loader", calls, len(batch), {"fast": "View + collate, files read"}, table)
