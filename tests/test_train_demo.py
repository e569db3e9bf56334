"""The CLI surface and the built-in demo, end to end at a reduced size."""
import json
import os

import pytest
import torch

from bitfast.train import cli


@pytest.fixture
def one_thread():
    """The CI/dev machines share 2 cores between jobs; 2 OpenMP threads under contention are ~10x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_bare_command_suggests_the_demo(capsys):
    assert cli.main([]) == 0
    out = capsys.readouterr().out
    assert "bitfast-train demo" in out and "transfer" in out


def test_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["transfer", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--model", "--weights", "--data", "--out", "--examples-per-class", "--seed", "--batch",
                 "--batch-split", "--lr", "--steps", "--resolution", "--mixup", "--precision", "--channels-last",
                 "--compile", "--backend", "--eval-every", "--workers", "--dry-run", "--paper-res", "--no-flip",
                 "--no-crop", "--resume"):
        assert flag in out, flag


def test_dry_run_prints_the_rule_behind_each_value(capsys):
    argv = ["transfer", "--model", "bit_tiny", "--data", "fashion-mnist-small:5-9", "--examples-per-class", "10",
            "--dry-run"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "resize 160 -> crop 128" in out and "28x28 < 96x96" in out
    assert "50 examples < 20,000" in out and "end 500 steps" in out and "no MixUp" in out
    assert "lr           0.003" in out and "global batch 512" in out
    assert cli.main(argv + ["--lr", "0.01", "--steps", "50", "batch_split=4"]) == 0
    out = capsys.readouterr().out
    assert "[--lr 0.01]" in out and "end 50 steps" in out and "4 micro-batch(es) of 128" in out


def test_bad_input_is_one_clear_line(capsys, tmp_path):
    assert cli.main(["transfer", "--data", str(tmp_path / "missing"), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "error: data:" in err and "missing" in err and "Traceback" not in err
    assert cli.main(["transfer", "--data", "fashion-mnist-small", "--examples-per-class", "900", "--dry-run"]) == 2
    assert "examples_per_class=900" in capsys.readouterr().err


def test_demo_end_to_end_reduced(tmp_path, capsys, one_thread):
    out = str(tmp_path / "demo")
    assert cli.main(["demo", "--quick", "--no-progress", "--workers", "0", "--out", out]) == 0
    text = capsys.readouterr().out
    assert "transfer (HyperRule)" in text and "from scratch" in text
    result = json.load(open(os.path.join(out, "demo.json")))
    for v in (result["upstream_top1"], *result["transfer_top1"], *result["scratch_top1"]):
        assert 0.0 <= v <= 1.0
    assert result["eval_images"] == 1000 and result["seeds"] == [0]
    assert result["upstream_top1"] > 0.35  # 5 classes: chance is 0.2; upstream trains on 3,000 images
    for stage in ("upstream", "transfer/seed0", "scratch/seed0"):
        for f in ("model.pt", "last.pt", "metrics.jsonl", "summary.json", "plot.png"):
            assert os.path.exists(os.path.join(out, stage, f)), (stage, f)
    up = json.load(open(os.path.join(out, "upstream", "config.json")))
    tr = json.load(open(os.path.join(out, "transfer", "seed0", "config.json")))
    sc = json.load(open(os.path.join(out, "scratch", "seed0", "config.json")))
    assert up["config"]["data"].endswith(":0-4") and tr["config"]["data"].endswith(":5-9")
    assert tr["config"]["weights"].endswith(os.path.join("upstream", "model.pt")) and sc["config"]["weights"] is None
    assert tr["recipe"]["dataset_size"] == 50 and tr["recipe"]["mixup"] == 0.0
    assert tr["recipe"] == sc["recipe"]  # the same recipe; only the starting weights differ
    # Re-running the finished demo resumes every stage at its end: no training, same numbers.
    assert cli.main(["demo", "--quick", "--no-progress", "--workers", "0", "--out", out]) == 0
    again = json.load(open(os.path.join(out, "demo.json")))
    assert again["transfer_top1"] == result["transfer_top1"] and again["scratch_top1"] == result["scratch_top1"]
