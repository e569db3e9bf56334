"""The loop: batch_split == full batch, MixUp, kill-and-resume equality, SIGTERM, NaN stop, outputs."""
import json
import os
import signal
import types

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from bitfast.train import config as C
from bitfast.train import loop
from bitfast.train.dist import World


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The CI/dev machines share 2 cores between jobs; 2 OpenMP threads under contention are ~10x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny(num_classes=5, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.GroupNorm(2, 8), nn.ReLU(), nn.Conv2d(8, 16, 3, 2, 1),
                         nn.GroupNorm(4, 16), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, num_classes))


def faulty(model, at, what):
    """Hooks `model` so that its training forward number `at` (0-based) crashes, signals, or returns NaN."""
    calls = [0]

    def pre(module, args):
        if module.training:
            calls[0] += 1
            if calls[0] - 1 == at and what == "crash":
                raise RuntimeError("simulated crash")
            if calls[0] - 1 == at and what == "sigterm":
                os.kill(os.getpid(), signal.SIGTERM)

    def post(module, args, out):
        return out * float("nan") if module.training and calls[0] - 1 == at and what == "nan" else out

    model.register_forward_pre_hook(pre)
    model.register_forward_hook(post)
    return model


def state(model, rank_batch, rank_split, mixup):
    r = C.Recipe("transfer", 100, 5, 10, 8, True, True, [2, 4, 6, 8, 10], 0.003, 0.0, mixup, rank_batch, 1,
                 rank_batch, rank_split)
    cfg = C.make_config("transfer", seed=int(np.random.default_rng().integers(1 << 30)))
    return types.SimpleNamespace(cfg=cfg, recipe=r, world=World(), ddp=model, fwd=model, model=model,
                                 autocast=lambda: torch.autocast("cpu", enabled=False), scaler=None)


def grads(model):
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("mixup", [0.0, 0.4])
def test_batch_split_gives_full_batch_gradient(mixup):
    n = 24
    x = torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8)
    y = torch.randint(0, 5, (n,))
    model = tiny(seed=int(torch.randint(0, 1000, ())))
    S = state(model, n, 1, mixup)
    loss_full, _ = loop.forward_backward(S, x, y, step=3)
    g_full = grads(model)
    model.zero_grad()
    S.recipe.rank_split = 4
    loss_split, _ = loop.forward_backward(S, x, y, step=3)
    assert loss_split == pytest.approx(loss_full, rel=1e-5)
    for a, b in zip(g_full, grads(model)):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)


def test_mixup_one_lambda_per_batch_and_label_mixing():
    n, seed, step = 16, int(np.random.default_rng().integers(1 << 30)), 5
    lam = loop.mixup_lambda(seed, step, 0.1)
    assert 0 <= lam <= 1 and lam == loop.mixup_lambda(seed, step, 0.1)  # same on every rank and micro-batch
    assert len({loop.mixup_lambda(seed, s, 0.1) for s in range(20)}) == 20
    assert loop.mixup_lambda(seed, step, 0.0) == 1.0
    x = torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8)
    y = torch.randint(0, 5, (n,))
    model = tiny(seed=3)
    S = state(model, n, 2, 0.1)
    S.cfg.seed = seed
    loop.forward_backward(S, x, y, step)
    g = grads(model)
    # Reference: mixed images against mixed one-hot targets (soft-label cross-entropy).
    model.zero_grad()
    perm = loop.mixup_perm(seed, step, 0, n)
    assert sorted(perm.tolist()) == list(range(n))
    xf = x.float() / 127.5 - 1
    target = lam * F.one_hot(y, 5).float() + (1 - lam) * F.one_hot(y[perm], 5).float()
    logits = model(lam * xf + (1 - lam) * xf[perm])
    (-(target * logits.log_softmax(1)).sum(1).mean()).backward()
    for a, b in zip(g, grads(model)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def cfg_for(out, **kw):
    base = dict(data="fashion-mnist-small:5-9", examples_per_class=6, batch=20, steps=12, resolution="10,8",
                mixup=0.2, eval_every=0, ckpt_every=4, out=str(out), progress=False, seed=11)
    return C.make_config("transfer", **{**base, **kw})


def final_weights(out):
    return torch.load(os.path.join(out, "last.pt"), weights_only=True)["model"]


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    summary = loop.train(cfg_for(out, eval_every=5), model=tiny())  # eval_every does not change the weights
    return out, summary


def test_run_outputs(reference):
    out, summary = reference
    assert summary["steps"] == 12 and summary["eval_images"] == 1000 and 0 <= summary["top1"] <= summary["top5"] <= 1
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    evals = [r["step"] for r in rows if r["kind"] == "eval"]
    assert evals == [5, 10, 12] and any(r["kind"] == "train" for r in rows)
    assert os.path.getsize(os.path.join(out, "plot.png")) > 1000
    assert json.load(open(os.path.join(out, "summary.json")))["top1"] == summary["top1"]


def test_kill_and_resume_is_bitwise_identical(reference, tmp_path):
    # A planned stop at step 3, then a crash during step 9 (checkpoints every 4), then a resume that starts
    # from a *different* init, to prove that everything comes from the checkpoint.
    assert loop.train(cfg_for(tmp_path, stop_after=3), model=tiny()) == {"stopped": "stop_after", "step": 3}
    with pytest.raises(RuntimeError, match="simulated crash"):
        loop.train(cfg_for(tmp_path), model=faulty(tiny(), at=9 - 3, what="crash"))
    assert torch.load(tmp_path / "last.pt", weights_only=True)["step"] == 8
    summary = loop.train(cfg_for(tmp_path), model=tiny(seed=99))
    assert_same_weights(final_weights(reference[0]), final_weights(tmp_path))
    assert summary["top1"] == reference[1]["top1"]
    steps = [json.loads(line)["step"] for line in open(tmp_path / "metrics.jsonl")]
    assert steps == sorted(steps)  # lines after the checkpoint were dropped, not duplicated


def test_sigterm_saves_and_resumes(reference, tmp_path):
    result = loop.train(cfg_for(tmp_path), model=faulty(tiny(), at=6, what="sigterm"))
    assert result == {"stopped": "SIGTERM", "step": 7}
    assert torch.load(tmp_path / "last.pt", weights_only=True)["step"] == 7
    assert signal.getsignal(signal.SIGTERM) is not None  # handler restored
    with pytest.raises(ValueError, match="lr: 0.003 -> 0.5"):  # resuming with other settings is refused
        loop.train(cfg_for(tmp_path, lr=0.5), model=tiny())
    loop.train(cfg_for(tmp_path), model=tiny(seed=5))
    assert_same_weights(final_weights(reference[0]), final_weights(tmp_path))


def test_nan_loss_stops_with_step_and_checkpoint(tmp_path):
    with pytest.raises(loop.NonFiniteLoss, match="at step 6 ") as e:
        loop.train(cfg_for(tmp_path), model=faulty(tiny(), at=6, what="nan"))
    assert "last.pt" in str(e.value)
    ck = torch.load(tmp_path / "last.pt", weights_only=True)
    assert ck["step"] == 6 and all(torch.isfinite(v).all() for v in ck["model"].values())


def test_corrupt_images_do_not_stop_a_run(tmp_path):
    try:
        from test_train_data import corrupt, make_folder
    except ImportError:
        from tests.test_train_data import corrupt, make_folder
    root = make_folder(str(tmp_path / "data"))
    bad = corrupt(root)
    cfg = C.make_config("transfer", data=root, batch=8, steps=6, resolution="12,10", out=str(tmp_path / "run"),
                        progress=False, eval_every=0)
    summary = loop.train(cfg, model=tiny(3))
    assert summary["steps"] == 6 and summary["eval_images"] == 9
    assert sorted(s.split(" (")[0] for s in summary["skipped_images"]) == sorted(bad)


def test_bf16_channels_last_and_batch_split_run_on_cpu(tmp_path):
    cfg = cfg_for(tmp_path, precision="bf16", channels_last=True, batch_split=2, steps=3, examples_per_class=2)
    summary = loop.train(cfg, model=tiny())
    assert summary["steps"] == 3 and 0 <= summary["top1"] <= 1
    with pytest.raises(ValueError, match="fp16"):
        loop.train(cfg_for(tmp_path / "b", precision="fp16"), model=tiny())


def test_zoo_model_resume_is_bitwise_identical(tmp_path):
    """The same with bitfast's own GN/WS model (its CPU kernels must be deterministic too)."""
    kw = dict(model="bit_tiny", batch=8, steps=6, ckpt_every=2, resolution="18,16", examples_per_class=3,
              mixup=0.3)
    loop.train(cfg_for(tmp_path / "a", **kw))
    loop.train(cfg_for(tmp_path / "b", stop_after=3, **kw))
    assert torch.load(tmp_path / "b" / "last.pt", weights_only=True)["step"] == 3
    loop.train(cfg_for(tmp_path / "b", **kw))
    assert_same_weights(final_weights(tmp_path / "a"), final_weights(tmp_path / "b"))
    assert os.path.exists(tmp_path / "b" / "model.pt")


def test_transfer_loads_backbone_and_starts_from_a_zero_head(tmp_path):
    from bitfast import models
    src = models.create("bit_tiny", num_classes=5)
    with torch.no_grad():
        for p in src.parameters():
            p.add_(torch.randn_like(p))
    models.save(src, tmp_path / "up.pt")
    cfg = C.make_config("transfer", model="bit_tiny", weights=str(tmp_path / "up.pt"))
    for k in (5, 7):  # same class count as the file (the head is still new) and a different one
        model = loop.build_model(cfg, k)
        sd, ref = model.state_dict(), src.state_dict()
        assert sd["head.fc.weight"].shape[0] == k and not sd["head.fc.weight"].any() and not sd["head.fc.bias"].any()
        assert all(torch.equal(sd[n], ref[n]) for n in ref if not n.startswith("head."))


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_cli_signal_with_workers_checkpoints_and_exits(tmp_path, sig):
    """A real signal from outside to the process group, DataLoader workers included: checkpoint, clean exit."""
    import subprocess
    import sys
    import time
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "bitfast.train.cli", "transfer", "--model", "bit_tiny", "--data",
           "fashion-mnist-small:5-9", "--examples-per-class", "4", "--batch", "8", "--steps", "100000",
           "--resolution", "18,16", "--workers", "2", "--out", str(out), "--no-progress", "log_every=1"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(sys.path))
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "metrics.jsonl").exists() or \
            not (out / "metrics.jsonl").read_text().count("\n") >= 2:
        assert p.poll() is None and time.time() < deadline, p.communicate()
        time.sleep(0.2)
    os.killpg(p.pid, sig)  # to the whole group, workers included, as Ctrl-C in a terminal or a batch scheduler
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == 128 + sig, stdout[-2000:] + stderr[-2000:]
    assert f"stopped by {signal.Signals(sig).name}" in stdout and "Traceback" not in stderr
    ck = torch.load(out / "last.pt", weights_only=True)
    assert ck["step"] >= 2 and ck["config"]["steps"] == 100000


def test_progress_plain_lines_off_a_terminal(tmp_path, capsys):
    """Without a terminal (a log file, CI) progress is rate-limited plain lines, not tqdm redraws; the last step
    always prints, and every logged step still reaches metrics.jsonl."""
    from bitfast.train import report

    metrics = report.Metrics(str(tmp_path), tensorboard=False)
    p = report.Progress(metrics, total=40, start=0, log_every=5, desc="transfer", line_every=3600, tty=False)
    for step in range(1, 41):
        p.update(step, loss_sum=2.0 * 8, n=8, lr=0.003)
    p.close()
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("[transfer]")]
    assert len(lines) == 2 and "step 5/40" in lines[0] and "step 40/40" in lines[1], lines
    assert "loss 2.0000" in lines[1] and "eta 0:00" in lines[1] and "\r" not in "".join(lines)
    rows = report.read_metrics(metrics.path)
    assert [r["step"] for r in rows] == list(range(5, 41, 5))
    assert report.Progress(None, 40, 0, 5, "x", tty=False).lines is False  # other ranks print nothing


def test_compile_trains_like_eager(tmp_path):
    """--compile (inductor on the CPU, bitfast's custom ops inside the graph, one weight_standardize_many per
    step) follows the eager run: same data, same steps, weights equal to float tolerance, plain state_dict keys."""
    kw = dict(model="bit_tiny", batch=8, steps=3, ckpt_every=3, resolution="18,16", examples_per_class=3, mixup=0.0)
    loop.train(cfg_for(tmp_path / "eager", **kw))
    from torch._dynamo.utils import counters

    counters.clear()
    summary = loop.train(cfg_for(tmp_path / "compiled", compile=True, **kw))
    assert summary["steps"] == 3 and counters["stats"]["unique_graphs"] > 0  # it did compile
    assert not counters["graph_break"], dict(counters["graph_break"])
    a, b = final_weights(tmp_path / "eager"), final_weights(tmp_path / "compiled")
    assert a.keys() == b.keys() and not any(k.startswith("_orig_mod") for k in b)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")
