"""Issue 14: the upstream recipe as the paper and big_vision state it, and the few-shot linear evaluator."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from bitfast import models
from bitfast.train import checkpoint as ck
from bitfast.train import cli
from bitfast.train import config as C
from bitfast.train import data as D
from bitfast.train import fewshot as FS
from bitfast.train import loop

ILSVRC = 1_281_167


def test_warmup_is_5000_steps_capped_only_at_the_first_decay():
    r = C.resolve(C.make_config("upstream"), ILSVRC, (256, 256), 1000)  # BiT-S: batch 4096, 312 steps/epoch
    assert r.supports == [5000, 9360, 18720, 24960, 28080]  # was 2808 (a tenth of the run)
    assert "warmup 5000" in r.why["supports"] and "capped" not in r.why["supports"].split(";")[-1].split("(")[0]
    old = C.resolve(C.make_config("upstream", warmup_cap="tenth"), ILSVRC, (256, 256), 1000)
    assert old.supports[0] == 2808
    short = C.resolve(C.make_config("upstream", batch=64), 6400, (28, 28), 10)  # 100 steps/epoch: decay at 3000
    assert short.supports[:2] == [3000, 3000] and "capped at 3000" in short.why["supports"]
    assert loop.lr_at(2999, short.supports, 1.0) < 1.0 and loop.lr_at(3001, short.supports, 1.0) == pytest.approx(0.1)


def test_sigmoid_multi_hot_targets_and_head_bias_minus_10():
    logits = torch.randn(3, 6)
    y = torch.tensor([[0, 4, -1], [2, -1, -1], [1, 3, 5]])  # multi-label, padded with -1
    t = torch.zeros(3, 6)
    for i, row in enumerate(y.tolist()):
        t[i, [c for c in row if c >= 0]] = 1
    want = torch.nn.functional.binary_cross_entropy_with_logits(logits, t, reduction="sum")
    assert torch.allclose(loop.loss_sum(logits, y, "sigmoid"), want)
    assert torch.allclose(loop.loss_sum(logits, y[:, 0], "sigmoid"),  # single label == one-hot
                          torch.nn.functional.binary_cross_entropy_with_logits(
                              logits, torch.eye(6)[y[:, 0]], reduction="sum"))
    assert D.label_tensor([[0, 4], 2, [1, 3, 5]]).tolist() == [[0, 4, -1], [2, -1, -1], [1, 3, 5]]
    assert C.resolve(C.make_config("upstream", loss="sigmoid"), 10_000, (28, 28), 5).head_bias == -10.0
    assert C.resolve(C.make_config("upstream"), 10_000, (28, 28), 5).head_bias == 0.0
    assert C.resolve(C.make_config("upstream", loss="sigmoid", head_bias=-3), 10_000, (28, 28), 5).head_bias == -3
    cfg = C.make_config("upstream", model="bit_tiny", loss="sigmoid")
    model = loop.build_model(cfg, 21843, head_bias=-10.0)
    assert torch.all(model.head.fc.bias == -10)
    with torch.no_grad():  # 21,843-way sigmoid: ~1 + 10 per image at the start, not ~15,000
        per_image = loop.loss_sum(model(torch.rand(2, 3, 16, 16) * 2 - 1), torch.tensor([3, 7]), "sigmoid") / 2
    assert 5 < float(per_image) < 20


def test_weight_decay_1e4_on_conv_kernels_only_by_default():
    r = C.resolve(C.make_config("upstream"), 10_000, (28, 28), 5)
    assert (r.weight_decay, r.wd_on) == (1e-4, "kernels")
    model = models.create("bit_tiny", num_classes=5)
    decay, rest = loop.param_groups(model, 1e-4, "kernels")
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 1e-4 and rest["weight_decay"] == 0.0
    assert all(p.ndim == 4 for p in decay["params"]) and "head.fc.weight" in {names[id(p)] for p in decay["params"]}
    assert {names[id(p)] for p in rest["params"]} >= {"head.fc.bias", "norm.weight", "norm.bias"}
    assert len(decay["params"]) + len(rest["params"]) == len(list(model.parameters()))
    (one,) = loop.param_groups(model, 1e-4, "all")
    assert one["weight_decay"] == 1e-4 and len(one["params"]) == len(list(model.parameters()))
    assert C.resolve(C.make_config("transfer"), 10_000, (28, 28), 5).wd_on == "all"  # transfer: unchanged


def test_upstream_eval_resizes_the_short_side_then_crops_the_centre():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (200, 300, 3), np.uint8))  # 300 wide
    r = C.resolve(C.make_config("upstream"), 10_000, (200, 300), 5)
    assert (r.resize, r.crop, r.eval_crop) == (256, 224, "center")
    out = D.eval_transform(img, 224, 256)
    ref = np.asarray(img.resize((384, 256), Image.BILINEAR))[16:240, 80:304]
    assert out.shape == (3, 224, 224) and np.array_equal(out.permute(1, 2, 0).numpy(), ref)
    squash = C.resolve(C.make_config("upstream", eval_crop="squash"), 10_000, (200, 300), 5)
    view = D.View(D.ArraySource(np.asarray(img)[None], [0], ["a"], "one"), squash, upstream=True)
    assert np.array_equal(view[(0, None)][0].numpy(), D.eval_transform(img, 224).numpy())


def _folder(root, classes=3, per=6):
    for c in range(classes):
        os.makedirs(root / "train" / f"c{c}", exist_ok=True)
        for i in range(per):
            Image.new("RGB", (12, 10), (40 * c, 7 * i, 0)).save(root / "train" / f"c{c}" / f"{i}.png")


def test_minival_is_held_out_of_train_with_a_fixed_seed(tmp_path):
    _folder(tmp_path)
    train, val = D.open_data(str(tmp_path), minival=5)
    again_train, again_val = D.open_data(str(tmp_path), minival=5)
    assert len(val) == 5 and len(train) == 13 and "minival" in val.name
    assert [val.describe(i) for i in range(5)] == [again_val.describe(i) for i in range(5)]
    assert not {train.describe(i) for i in range(13)} & {val.describe(i) for i in range(5)}
    with pytest.raises(FileNotFoundError, match="neither test/ nor val/"):  # transfer: no minival
        D.open_data(str(tmp_path))
    assert cli.main(["upstream", "--data", str(tmp_path), "--minival", "18", "--dry-run"]) == 2
    cfg = C.make_config("upstream", data="x")
    r = C.resolve(cfg, 1000, (28, 28), 5)
    state = {"resolved": ck.resolved(cfg), "recipe": dict(vars(r)), "config": {}}
    other = C.make_config("upstream", data="x", minival=500)
    assert [k for k, _, _ in ck.settings_mismatch(state, other, r)] == ["minival"]


def test_inception_crop_area_flag(monkeypatch):
    assert C.resolve(C.make_config("upstream"), 10_000, (28, 28), 5).crop_area == 0.05  # big_vision
    r = C.resolve(C.make_config("upstream", crop_area=0.08), 10_000, (28, 28), 5)  # torchvision
    seen = []
    monkeypatch.setattr(D, "inception_transform", lambda img, rng, crop, flip, scale: seen.append(scale))
    D.View(D.ArraySource(np.zeros((1, 8, 8), np.uint8), [0], ["a"], "z"), r, upstream=True)._transform(
        Image.new("RGB", (8, 8)), 1)
    assert seen == [(0.08, 1.0)]
    monkeypatch.undo()
    rng = np.random.default_rng(0)
    img = Image.fromarray(np.arange(100 * 100, dtype=np.uint8).reshape(100, 100))
    for _ in range(20):  # the crop always covers at least 5% of the image: never a flat tile of one pixel
        assert len(np.unique(D.inception_transform(img.convert("RGB"), rng, 8, scale=(0.05, 1.0)).numpy())) > 4


def test_new_settings_are_compared_on_resume_and_shown_by_dry_run(capsys):
    cfg = C.make_config("upstream", data="x")
    r = C.resolve(cfg, 100_000, (28, 28), 5)
    state = {"resolved": ck.resolved(cfg), "recipe": dict(vars(r)), "config": {}}
    for k, v in dict(wd_on="all", loss="sigmoid", eval_crop="squash", crop_area=0.08, head_bias=-2.0).items():
        other = C.make_config("upstream", data="x", **{k: v})
        assert k in [d for d, _, _ in ck.settings_mismatch(state, other, C.resolve(other, 100_000, (28, 28), 5))]
    old = {k: v for k, v in vars(r).items() if k not in ("loss", "head_bias", "wd_on", "eval_crop", "crop_area")}
    tr = C.make_config("transfer", data="x")  # a transfer checkpoint from before these keys resumes
    rt = C.resolve(tr, 1000, (28, 28), 5)
    old_t = {k: v for k, v in vars(rt).items() if k not in ("loss", "head_bias", "wd_on", "eval_crop", "crop_area")}
    assert ck.settings_mismatch({"resolved": ck.resolved(tr), "recipe": old_t, "config": {}}, tr, rt) == []
    assert {k for k, _, _ in ck.settings_mismatch({"resolved": ck.resolved(cfg), "recipe": old, "config": {}},
                                                   cfg, r)} == {"wd_on", "eval_crop", "crop_area"}
    assert cli.main(["upstream", "--data", "fashion-mnist:0-4", "--batch", "16", "--loss", "sigmoid",
                     "--dry-run"]) == 0
    out = capsys.readouterr().out
    for text in ("warmup 5000,", "head bias    -10", "wd on        kernels", "crop area    0.05-1",
                 "resize short side 256, central crop 224", "loss         sigmoid"):
        assert text in out
    assert cli.main(["upstream", "--data", "fashion-mnist:0-4", "--crop-area", "0", "--dry-run"]) == 2
    assert "--crop-area must be" in capsys.readouterr().err


def test_lsr_fits_separable_features():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 16)) * 5
    y, yt = np.repeat(np.arange(4), 5), np.repeat(np.arange(4), 50)
    acc = FS.lsr_accuracy(centres[y] + rng.normal(size=(20, 16)), y, centres[yt] + rng.normal(size=(200, 16)), yt, 4)
    assert acc > 0.95
    assert FS.lsr_accuracy(rng.normal(size=(20, 16)), y, rng.normal(size=(200, 16)), yt, 4) < 0.5


def test_fewshot_of_upstream_features_beats_random_init(tmp_path, capsys):
    """bit_tiny, 16 px, 100 steps of sigmoid upstream on the shipped Fashion-MNIST, logged every 50 steps; then
    the standalone command on its model.pt, last.pt and a random-init model (measured: 50/60/65/68% against
    34/44/52/59% for 1/5/10/25 shots)."""
    out = tmp_path / "up"
    cfg = C.make_config("upstream", model="bit_tiny", data="fashion-mnist:0-9", out=str(out), batch=64,
                        resolution="20,16", steps=100, workers=0, progress=False, loss="sigmoid", eval_every=0,
                        lr=0.1, fewshot_data="fashion-mnist:0-9", fewshot_every=50)
    summary = loop.train(cfg)
    rows = [json.loads(ln) for ln in open(out / "metrics.jsonl")]
    assert [r["step"] for r in rows if r["kind"] == "fewshot"] == [50, 100]
    torch.manual_seed(0)
    models.save(models.create("bit_tiny", num_classes=10), str(tmp_path / "random.pt"))
    res = {}
    for name, w in (("trained", out / "model.pt"), ("ckpt", out / "last.pt"), ("random", tmp_path / "random.pt")):
        assert cli.main(["fewshot", "--weights", str(w), "--data", "fashion-mnist:0-9", "--resolution", "16",
                         "--out", str(tmp_path / f"{name}.json")]) == 0
        res[name] = json.load(open(tmp_path / f"{name}.json"))["top1"]
    assert res["trained"] == res["ckpt"] == summary["fewshot"]
    for k in ("1", "5", "10", "25"):
        assert res["trained"][k] > res["random"][k] + 0.03, (res, k)
    assert "25-shot" in capsys.readouterr().out
    assert cli.main(["fewshot", "--weights", str(tmp_path / "none.pt"), "--data", "fashion-mnist"]) == 2


def test_checkpoints_by_time_keep_the_last_k(tmp_path):
    kw = dict(model="bit_tiny", data="fashion-mnist:0-1", batch=8, steps=6, resolution="12,10", workers=0,
              eval_every=0, progress=False, ckpt_every=100)
    loop.train(C.make_config(out=str(tmp_path / "a"), ckpt_minutes=1e-9, keep_ckpts=2, **kw))  # due at every step
    names = sorted(n for n in os.listdir(tmp_path / "a") if n.startswith("ckpt-"))
    assert names == ["ckpt-00000005.pt", "ckpt-00000006.pt"]
    assert os.path.samefile(tmp_path / "a" / "last.pt", tmp_path / "a" / names[-1])
    assert ck.load(str(tmp_path / "a" / names[0]))["step"] == 5
    loop.train(C.make_config(out=str(tmp_path / "b"), **kw))
    assert not [n for n in os.listdir(tmp_path / "b") if n.startswith("ckpt-")]
    a, b = (torch.load(tmp_path / d / "last.pt", weights_only=True)["model"] for d in "ab")
    assert all(torch.equal(a[k], b[k]) for k in a)  # saving more often changes nothing computed
    assert cli.main(["transfer", "--data", "x", "--ckpt-minutes", "0", "--dry-run"]) == 2
