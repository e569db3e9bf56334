"""Issue 14 item 1: webdataset shards (pack, index cache, the resumable per-lane stream, bad samples, multi-label)."""
import io
import json
import os
import shutil

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from bitfast.train import cli
from bitfast.train import config as C
from bitfast.train import data as D
from bitfast.train import loop
from bitfast.train import shards as SH


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    out = tmp_path_factory.mktemp("packed")
    assert cli.main(["pack", "fashion-mnist:0-4", str(out), "--shard-size", "250", "--no-progress"]) == 0
    return out


def pattern(d, n=12):
    return os.path.join(str(d), "train-{000000..%06d}.tar" % (n - 1))


def test_pack_writes_classes_counts_and_the_same_images(packed):
    info = json.load(open(packed / "info.json"))
    assert info["classes"][:2] == ["t-shirt/top", "trouser"] and len(info["classes"]) == 5
    assert info["splits"]["train"]["counts"] == [250] * 12 and info["splits"]["test"]["num_samples"] == 1000
    train, test = D.open_data(pattern(packed))
    ref, _ = D.open_data("fashion-mnist:0-4")
    assert isinstance(train, SH.ShardSource) and len(train) == 3000 and len(test) == 1000
    assert np.array_equal(train.labels, ref.labels)
    for i in (0, 1234, 2999):
        assert np.array_equal(np.asarray(train.load(i)), np.asarray(ref.load(i)))


def test_stream_is_a_pure_function_of_the_step_and_each_lane_reads_its_own_shards(packed):
    src, _ = D.open_data(pattern(packed))
    world, lanes, batch = 2, 3, 40
    per_lane = {}
    for rank in range(world):
        s = SH.ShardSampler(src, batch, rank, world, lanes, seed=7, buffer=100)
        steps = [s.batch_at(t) for t in range(60)]
        resumed = SH.ShardSampler(src, batch, rank, world, lanes, seed=7, start_step=23, stop_step=60, buffer=100)
        assert list(resumed) == steps[23:]  # resume at step 23: the same stream, nothing skipped or repeated
        for lane in range(lanes):
            per_lane[rank, lane] = s._epoch(lane, 0)
            mine = {int(src.shard[i]) for t in range(lane, 60, lanes) for i, _ in steps[t]
                    if i in set(per_lane[rank, lane].tolist())}
            assert len(mine) == 2  # 12 shards / (2 ranks x 3 lanes) per epoch
    epoch0 = np.concatenate(list(per_lane.values()))
    assert sorted(epoch0.tolist()) == list(range(3000))  # one epoch: every sample once, over all lanes
    other = SH.ShardSampler(src, batch, 0, world, lanes, seed=8, buffer=100)
    assert other.batch_at(0) != SH.ShardSampler(src, batch, 0, world, lanes, seed=7, buffer=100).batch_at(0)
    with pytest.raises(ValueError, match="--workers"):
        SH.ShardSampler(src, batch, 0, 4, 4, seed=0)


def _run(data, out, **kw):
    kw = {**dict(model="bit_tiny", batch=16, resolution="20,16", steps=6, eval_every=0, progress=False), **kw}
    cfg = C.make_config("upstream", data=data, out=str(out), **kw)
    return loop.train(cfg)


def test_resume_on_shards_equals_an_uninterrupted_run(packed, tmp_path):
    data = pattern(packed)
    _run(data, tmp_path / "a", workers=2)
    assert _run(data, tmp_path / "b", workers=2, stop_after=2)["stopped"] == "stop_after"
    _run(data, tmp_path / "b", workers=2)
    a, b = (torch.load(tmp_path / d / "last.pt", weights_only=True)["model"] for d in "ab")
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows = [[r for r in map(json.loads, open(tmp_path / d / "metrics.jsonl")) if r["kind"] == "train"] for d in "ab"]
    assert [r["loss"] for r in rows[0]] == [r["loss"] for r in rows[1]]
    with pytest.raises(ValueError, match="same world size and --workers"):
        _run(data, tmp_path / "b", workers=1)


def _write_shard(path, samples):
    with open(path, "wb") as f:
        tw = wds.TarWriter(f, encoder=False, mtime=0)
        for s in samples:
            tw.write(s)
        tw.close()


def _png(v):
    buf = io.BytesIO()
    Image.new("RGB", (12, 12), (v, 255 - v, 9)).save(buf, "PNG")
    return buf.getvalue()


def test_corrupt_samples_are_skipped_and_counted_and_multi_label_lists_work(tmp_path):
    d = tmp_path / "ml"
    d.mkdir()
    good = [{"__key__": f"s{i:03d}", "png": _png(i * 20), "json": json.dumps({"label": [i % 3, 3]}).encode()}
            for i in range(8)]
    bad = {"__key__": "s100", "png": b"not a png at all", "json": b'{"label": [1]}'}
    unlabeled = {"__key__": "s101", "png": _png(3), "json": b"{oops"}
    _write_shard(d / "train-0.tar", good[:4] + [bad, unlabeled])
    _write_shard(d / "train-1.tar", good[4:])
    raw = open(d / "train-1.tar", "rb").read()
    open(d / "train-2.tar", "wb").write(raw[:2500])  # truncated: the samples before the damage are kept
    _write_shard(d / "test-0.tar", good)
    json.dump({"classes": ["a", "b", "c", "d"], "splits": {"test": {"shards": ["test-0.tar"]}}},
              open(d / "info.json", "w"))
    src, ev = D.open_data(str(d / "train-{0..2}.tar"), cache_dir=str(tmp_path / "c"))
    assert src.multi_label and len(ev) == 8 and 0 < len(SH.scan(d / "train-2.tar")) < 4
    assert len(src) == 9 + len(SH.scan(d / "train-2.tar"))  # the unlabelled sample is not indexed
    assert src.unlabeled == 1 and {tuple(x) for x in src.labels} <= {(0, 3), (1, 3), (2, 3), (1,)}
    view = D.View(src, C.resolve(C.make_config("upstream", resolution="20,16"), len(src), (12, 12), 4), True)
    x, y, errs = D.collate([view[(i, 1)] for i in range(len(src))])
    assert len(errs) == 1 and "UnidentifiedImageError" in errs[0] and y.shape[1] == 2 and (y[:, 1] == 3).all()
    out = _run(str(d / "train-{0..2}.tar"), tmp_path / "run", workers=0, loss="sigmoid", batch=len(src), steps=2)
    assert len(out["skipped_images"]) == 1 and "train-0.tar@" in out["skipped_images"][0]


def test_the_index_is_cached_next_to_the_run(packed, tmp_path, monkeypatch):
    data = str(tmp_path / "s")
    shutil.copytree(packed, data)
    D.open_data(pattern(data), cache_dir=str(tmp_path / "run"))
    assert os.path.isfile(tmp_path / "run" / "data_index.npz")
    monkeypatch.setattr(SH, "scan", lambda p: pytest.fail("re-scanned despite a valid cache"))
    train, _ = D.open_data(pattern(data), cache_dir=str(tmp_path / "run"))
    assert len(train) == 3000
    os.utime(os.path.join(data, "train-000003.tar"), ns=(1, 1))  # a changed shard: the cache is stale
    with pytest.raises(pytest.fail.Exception):
        D.open_data(pattern(data), cache_dir=str(tmp_path / "run"))


def test_minival_from_held_out_shards_and_clear_errors(packed, tmp_path):
    d = tmp_path / "nosplit"
    d.mkdir()
    for i in range(12):
        shutil.copy(packed / f"train-{i:06d}.tar", d)
    json.dump({"classes": json.load(open(packed / "info.json"))["classes"]}, open(d / "info.json", "w"))
    train, ev = D.open_data(pattern(d), minival=600)
    assert (len(train), len(ev)) == (2250, 750) and "minival" in ev.name  # 3 whole shards of 250
    again = D.open_data(pattern(d), minival=600)[1]
    assert again.paths == ev.paths
    with pytest.raises(FileNotFoundError, match="--minival"):
        D.open_data(pattern(d))
    with pytest.raises(FileNotFoundError, match="do not exist"):
        D.open_data(str(d / "train-{000000..000012}.tar"))
    assert cli.main(["upstream", "--data", str(tmp_path / "x-{0..3}.tar"), "--dry-run"]) == 2


def test_the_imagefolder_listing_is_cached_next_to_the_run(tmp_path, monkeypatch):
    root = tmp_path / "data"
    for split, n in (("train", 4), ("val", 2)):
        for c in ("cat", "dog"):
            os.makedirs(root / split / c)
            for i in range(n):
                Image.new("RGB", (10, 10), (i * 30, 0, 0)).save(root / split / c / f"{i}.png")
    run = str(tmp_path / "run")
    first = D.open_data(str(root), cache_dir=run)
    assert os.path.isfile(os.path.join(run, "folder_index.npz")) and os.path.isfile(
        os.path.join(run, "folder_index_eval.npz"))
    real = D._list_images
    monkeypatch.setattr(D, "_list_images", lambda top: pytest.fail("walked despite a valid cache"))
    again = D.open_data(str(root), cache_dir=run)
    for a, b in zip(first, again):
        assert a.paths == b.paths and np.array_equal(a.labels, b.labels)
    Image.new("RGB", (10, 10)).save(root / "train" / "dog" / "new.png")  # the class folder's mtime changes
    os.utime(root / "train" / "dog", ns=(1, 1))
    walked = []
    monkeypatch.setattr(D, "_list_images", lambda top: walked.append(top) or real(top))
    train, _ = D.open_data(str(root), cache_dir=run)
    assert len(train) == 9 and walked


def test_ci_proof_upstream_on_shards_with_sigmoid_and_fewshot_monitoring(tmp_path):
    """Issue 14 item 6 at CPU scale: the shipped Fashion-MNIST subset packed into shards, 200 steps of upstream
    from scratch on them with the sigmoid loss (head bias -10) and few-shot monitoring every 100 steps: the loss
    falls (measured 9.08 -> 2.00), and the few-shot accuracy of the pre-logits ends above the random-init model's."""
    from bitfast import models

    shards = tmp_path / "shards"
    assert cli.main(["pack", "fashion-mnist", str(shards), "--shard-size", "1000", "--no-progress"]) == 0
    out = tmp_path / "up"
    summary = _run(pattern(shards, len(list(shards.glob("train-*.tar")))), out, steps=200, batch=64, loss="sigmoid",
                   lr=0.1, workers=0, fewshot_data="fashion-mnist", fewshot_every=100)
    rows = [json.loads(ln) for ln in open(out / "metrics.jsonl")]
    losses = [r["loss"] for r in rows if r["kind"] == "train"]
    assert losses[-1] < 0.7 * losses[0], losses
    assert [r["step"] for r in rows if r["kind"] == "fewshot"] == [100, 200]
    torch.manual_seed(0)
    models.save(models.create("bit_tiny", num_classes=10), str(tmp_path / "random.pt"))
    assert cli.main(["fewshot", "--weights", str(tmp_path / "random.pt"), "--data", "fashion-mnist", "--resolution",
                     "16", "--out", str(tmp_path / "random.json")]) == 0
    random = json.load(open(tmp_path / "random.json"))["top1"]
    print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f}; few-shot trained {summary['fewshot']} random {random}")
    for k in ("1", "5", "10", "25"):  # measured: 44/66/67/70% against 34/44/52/59%
        assert summary["fewshot"][k] > random[k] + 0.03, (summary["fewshot"], random)
