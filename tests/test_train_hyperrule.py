"""BiT-HyperRule tables, schedule boundaries, recipe resolution and config overrides."""
import random

import pytest

from bitfast.train import config as C
from bitfast.train import hyperrule as hr


@pytest.mark.parametrize("hw,expect", [((95, 97), (160, 128)), ((28, 28), (160, 128)), ((1, 9215), (160, 128)),
                                       ((96, 96), (512, 480)), ((48, 192), (512, 480)), ((375, 500), (512, 480))])
def test_resolution_table(hw, expect):
    assert hr.resolution(hw)[0] == expect
    paper = hr.resolution(hw, paper=True)[0]
    assert paper == (expect if expect == (160, 128) else (448, 384))


@pytest.mark.parametrize("n,expect", [(1, [100, 200, 300, 400, 500]), (19_999, [100, 200, 300, 400, 500]),
                                      (20_000, [500, 3000, 6000, 9000, 10_000]),
                                      (499_999, [500, 3000, 6000, 9000, 10_000]),
                                      (500_000, [500, 6000, 12_000, 18_000, 20_000]),
                                      (14_197_122, [500, 6000, 12_000, 18_000, 20_000])])
def test_schedule_and_mixup_tables(n, expect):
    supports, why = hr.schedule(n)
    assert supports == expect and f"{n:,}" in why
    assert hr.mixup_alpha(n)[0] == (0.1 if n >= 20_000 else 0.0)


def test_schedule_rejects_empty_dataset():
    with pytest.raises(ValueError, match="dataset_size"):
        hr.schedule(0)


@pytest.mark.parametrize("supports", [[100, 200, 300, 400, 500], [500, 3000, 6000, 9000, 10_000]])
def test_lr_at_boundaries(supports):
    base = random.uniform(1e-3, 1e-1)
    w, d1, d2, d3, end = supports
    assert hr.lr_at(0, supports, base) == 0.0  # linear warmup from 0
    assert hr.lr_at(w // 2, supports, base) == pytest.approx(base * (w // 2) / w)
    assert hr.lr_at(w - 1, supports, base) == pytest.approx(base * (w - 1) / w)
    assert hr.lr_at(w, supports, base) == pytest.approx(base)
    # Official semantics: a decay applies once step is strictly past the support.
    for k, d in enumerate((d1, d2, d3)):
        assert hr.lr_at(d, supports, base) == pytest.approx(base * 0.1 ** k)
        assert hr.lr_at(d + 1, supports, base) == pytest.approx(base * 0.1 ** (k + 1))
    assert hr.lr_at(end - 1, supports, base) == pytest.approx(base * 1e-3)
    assert hr.lr_at(end, supports, base) is None and hr.lr_at(end + 7, supports, base) is None


def test_scale_supports_keeps_shape():
    steps = random.randint(50, 5000)
    s = hr.scale_supports([100, 200, 300, 400, 500], steps)
    assert s[-1] == steps and all(a < b for a, b in zip(s, s[1:]))
    assert s[0] == round(steps / 5) and s[2] == round(3 * steps / 5)
    with pytest.raises(ValueError, match="steps"):
        hr.scale_supports([100, 200, 300, 400, 500], 0)


def test_upstream_schedule():
    spe = random.randint(100, 300)
    s = hr.upstream_supports(spe, epochs=90, warmup=5000)
    assert s[1:] == [round(30 * spe), round(60 * spe), round(80 * spe), 90 * spe]
    assert s[0] == min(5000, 30 * spe)  # capped only where it would reach the first decay (issue 14)
    assert hr.upstream_lr(4096) == pytest.approx(0.48)
    assert hr.upstream_supports(spe, warmup=5000) == s  # bit-m is the default, 90 epochs its default length


def test_upstream_bit_l_schedule_and_scaling():
    spe = random.randint(100, 300)
    s = hr.upstream_supports(spe, warmup=5000, schedule="bit-l")  # paper: 40 epochs, /10 after 10, 23, 30, 37
    assert s[1:] == [10 * spe, 23 * spe, 30 * spe, 37 * spe, 40 * spe]
    half = hr.upstream_supports(spe, epochs=20, warmup=10, schedule="bit-l")
    assert half == [10, round(5 * spe), round(11.5 * spe), 15 * spe, round(18.5 * spe), 20 * spe]
    with pytest.raises(ValueError, match="schedule"):
        hr.upstream_supports(spe, schedule="bit-xl")
    with pytest.raises(ValueError, match="epochs"):
        hr.upstream_supports(spe, epochs=0)
    r = C.resolve(C.make_config("upstream", schedule="bit-l"), 4096 * 2000, (256, 256), 1000)
    assert r.supports == [5000, 20_000, 46_000, 60_000, 74_000, 80_000]
    assert "bit-l" in r.why["supports"] and "10/23/30/37 of 40" in r.why["supports"]


def test_resolve_transfer_reasons_and_overrides():
    cfg = C.make_config("transfer", data="x")
    r = C.resolve(cfg, 1020, (500, 375), 102)  # Flowers-102 sized
    assert (r.resize, r.crop, r.supports, r.lr, r.mixup, r.weight_decay) == (512, 480, [100, 200, 300, 400, 500],
                                                                               0.003, 0.0, 0.0)
    assert "96x96" in r.why["resolution"] and "1,020" in r.why["supports"]
    r = C.resolve(C.make_config("transfer", paper_res=True), 50_000, (32, 32), 10)
    assert (r.resize, r.crop, r.mixup, r.steps) == (160, 128, 0.1, 10_000)
    cfg = C.make_config("transfer", lr=0.01, mixup=0.2, steps=1000, resolution="64,56", no_flip=True)
    r = C.resolve(cfg, 1020, (500, 375), 102)
    assert (r.lr, r.mixup, r.resize, r.crop, r.flip, r.steps) == (0.01, 0.2, 64, 56, False, 1000)
    assert r.why["lr"] == "--lr 0.01" and "--steps 1000" in r.why["supports"]
    assert "lr" in C.describe(r) and "--lr 0.01" in C.describe(r)


@pytest.mark.parametrize("batch,split,world,expect", [(512, 1, 1, (512, 1)), (512, 8, 1, (512, 8)),
                                                      (512, 8, 2, (256, 4)), (512, 8, 8, (64, 1)),
                                                      (512, 2, 16, (32, 1)), (512, 3, 1, (512, 4))])
def test_batch_is_global_whatever_the_world_size(batch, split, world, expect):
    r = C.resolve(C.make_config("transfer", batch=batch, batch_split=split), 1000, (64, 64), 10, world)
    assert (r.rank_batch, r.rank_split) == expect
    assert r.rank_batch * r.world_size == batch and r.micro_batch * r.rank_split == r.rank_batch
    assert r.micro_batch <= batch // split


def test_batch_not_divisible_by_world():
    with pytest.raises(ValueError, match="batch=512 must be divisible"):
        C.resolve(C.make_config("transfer"), 1000, (64, 64), 10, world_size=3)


def test_overrides_and_validation():
    cfg = C.make_config("transfer", overrides=["lr=0.05", "ckpt-every=7", "no_flip=true", "mixup=none", "steps=9"])
    assert (cfg.lr, cfg.ckpt_every, cfg.no_flip, cfg.mixup, cfg.steps) == (0.05, 7, True, None, 9)
    with pytest.raises(ValueError, match="unknown key 'lrr'"):
        C.make_config("transfer", overrides=["lrr=1"])
    with pytest.raises(ValueError, match="override batch='abc': expected int"):
        C.make_config("transfer", overrides=["batch=abc"])
    with pytest.raises(ValueError, match="precision"):
        C.make_config("transfer", precision="fp8")
    with pytest.raises(ValueError, match="resolution"):
        C.make_config("transfer", resolution="128,160")
    with pytest.raises(ValueError, match="preset"):
        C.make_config("finetune")
