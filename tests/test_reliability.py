"""Runs that never lie and never lose work (issue 16): the NaN guard, image decoding, one run per --out, atomic
outputs, resumed metrics, SIGTERM, one-line errors, resume with equivalent settings."""
import errno
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from bitfast.train import checkpoint as ck
from bitfast.train import cli
from bitfast.train import config as C
from bitfast.train import data as D
from bitfast.train import loop

try:
    from test_train_data import corrupt, make_folder, recipe
    from test_train_loop import cfg_for, one_thread, tiny  # noqa: F401 (one_thread: an autouse fixture)
except ImportError:
    from tests.test_train_data import corrupt, make_folder, recipe
    from tests.test_train_loop import cfg_for, one_thread, tiny  # noqa: F401


def rows(out):
    """metrics.jsonl without the timing columns (img/s differs between any two runs)."""
    return [{k: v for k, v in json.loads(ln).items() if k != "img_s"} for ln in open(os.path.join(out, "metrics.jsonl"))]


def weights(path):
    return torch.load(path, weights_only=True)["model"]


def all_finite(sd):
    return all(torch.isfinite(v).all() for v in sd.values() if v.is_floating_point())


def last_good(message):
    """The checkpoint path and step named by a NonFiniteLoss message."""
    path, step = message.split("Last good checkpoint: ")[1].split(" (step ")
    return path, int(step.split(")")[0])


# 1. The NaN guard keeps a good checkpoint.

def test_nan_gradient_with_finite_loss_stops_before_the_update(tmp_path):
    model, calls = tiny(), [0]

    def poison(grad):  # the 6th backward: finite loss, NaN gradient
        calls[0] += 1
        return grad * float("nan") if calls[0] == 6 else grad
    next(model.parameters()).register_hook(poison)
    with pytest.raises(loop.NonFiniteLoss, match="at step 5 ") as e:
        loop.train(cfg_for(tmp_path, ckpt_every=1), model=model)
    path, step = last_good(str(e.value))
    ckpt = torch.load(path, weights_only=True)
    assert step == ckpt["step"] == 5 and all_finite(ckpt["model"])


def test_update_that_overflows_the_weights_keeps_the_last_finite_checkpoint(tmp_path, monkeypatch):
    real_step, calls = torch.optim.SGD.step, [0]

    def step(self, *a, **k):  # the 7th update overflows (as a huge lr does) although its gradients were finite
        out = real_step(self, *a, **k)
        calls[0] += 1
        if calls[0] == 7:
            with torch.no_grad():
                self.param_groups[0]["params"][0].mul_(float("inf"))
        return out
    monkeypatch.setattr(torch.optim.SGD, "step", step)
    with pytest.raises(loop.NonFiniteLoss, match="update of step 6 .* made the weights non-finite") as e:
        loop.train(cfg_for(tmp_path, ckpt_every=4), model=tiny())
    path, step = last_good(str(e.value))
    ckpt = torch.load(path, weights_only=True)
    assert step == ckpt["step"] == 4 and all_finite(ckpt["model"])
    assert not os.path.exists(path + ".tmp")


def test_a_non_finite_state_is_never_written(tmp_path):
    import types
    model = tiny()
    with torch.no_grad():
        next(model.parameters())[0] = float("nan")
    S = types.SimpleNamespace(world=loop.dist.World(), model=model, opt=torch.optim.SGD(model.parameters(), lr=1),
                              cfg=C.make_config(out=str(tmp_path)))
    with pytest.raises(RuntimeError, match="refusing to overwrite"):
        ck.save_run(S, 3)
    assert os.listdir(tmp_path) == []


# 2. Images are decoded right or skipped.

def folder_with(tmp_path, files):
    root = make_folder(str(tmp_path / "data"), n_train=(2, 2), n_eval=(1, 1))
    for name, img in files.items():
        img.save(os.path.join(root, "train", "class_0", name))
    return root, D.open_data(root)[0]


def test_16_bit_and_float_images_are_scaled_or_skipped(tmp_path):
    a16 = np.random.default_rng().integers(0, 65536, (12, 14)).astype(np.uint16)
    af = np.random.default_rng().random((12, 14), dtype=np.float32)
    root, train = folder_with(tmp_path, {"deep.png": Image.fromarray(a16), "float.tif": Image.fromarray(af),
                                         "hdr.tif": Image.fromarray(af * 4)})  # float outside [0, 1]: no scale known
    path = {os.path.basename(p): i for i, p in enumerate(train.paths)}
    with Image.open(train.paths[path["deep.png"]]) as im:
        assert im.mode in D.SIXTEEN_BIT
    got = np.asarray(train.load(path["deep.png"]))
    assert got.shape == (12, 14, 3) and np.abs(got[..., 0] - a16 / 257.0).max() <= 0.5
    got = np.asarray(train.load(path["float.tif"]))
    assert np.abs(got[..., 1] - af * 255).max() <= 0.5
    x, _, err = D.View(train, recipe())[(path["hdr.tif"], 1)]
    assert x is None and "outside [0, 1]" in err


def test_symlink_loop_lists_each_file_once(tmp_path):
    root = make_folder(str(tmp_path))
    os.symlink(".", os.path.join(root, "train", "class_0", "loop"))  # cat/loopdir -> . (41 copies before)
    sub = os.path.join(root, "train", "class_1", "sub")
    os.makedirs(sub)
    Image.fromarray(np.zeros((20, 20), np.uint8)).save(os.path.join(sub, "a.png"))
    os.symlink("..", os.path.join(sub, "up"))  # a loop through the parent
    train, _ = D.open_data(root)
    assert len(train) == 16 and len(set(map(os.path.realpath, train.paths))) == 16
    assert np.bincount(train.labels).tolist() == [6, 6, 4]


def test_empty_class_folder_is_refused_in_train_and_reported_in_eval(tmp_path):
    root = make_folder(str(tmp_path))
    os.makedirs(os.path.join(root, "val", "class_3"))  # eval may lack a class: reported, not fatal
    with pytest.raises(ValueError, match="classes not in the training set"):
        D.open_data(root)
    os.makedirs(os.path.join(root, "train", "class_3"))
    with pytest.raises(ValueError, match="1 class folder.* hold no images: class_3"):
        D.open_data(root)
    Image.fromarray(np.zeros((20, 20), np.uint8)).save(os.path.join(root, "train", "class_3", "a.png"))
    shutil.rmtree(os.path.join(root, "val", "class_1"))
    os.makedirs(os.path.join(root, "val", "class_1"))
    assert D.open_data(root)[1].empty == ["class_1", "class_3"]


def test_all_eval_images_unreadable_fails_clearly(tmp_path):
    root = make_folder(str(tmp_path / "data"), n_eval=(1, 1, 1))
    for dirpath, _, files in os.walk(os.path.join(root, "val")):
        for f in files:
            open(os.path.join(dirpath, f), "wb").write(os.urandom(64))
    cfg = C.make_config(data=root, batch=4, steps=2, resolution="12,10", out=str(tmp_path / "run"), progress=False)
    with pytest.raises(ValueError, match="none of the 3 eval images .* could be read"):
        loop.train(cfg, model=tiny(3))


def test_huge_images_are_skipped_and_a_failing_transform_too(tmp_path, monkeypatch):
    root = make_folder(str(tmp_path))
    train, _ = D.open_data(root)
    v = D.View(train, recipe())
    monkeypatch.setattr(D, "MAX_PIXELS", 100)  # the 20x24 test images now count as huge
    x, _, err = v[(1, 5)]
    assert x is None and "pixel limit" in err
    monkeypatch.undo()

    def boom(*a, **k):
        raise MemoryError("as PIL does for --resolution 60000")
    monkeypatch.setattr(D, "train_transform", boom)
    x, _, err = v[(1, 5)]
    assert x is None and "MemoryError" in err


def test_a_bad_image_is_warned_about_once(tmp_path, capsys):
    root = make_folder(str(tmp_path / "data"))
    bad = corrupt(root)
    cfg = C.make_config(data=root, batch=8, steps=6, resolution="12,10", out=str(tmp_path / "run"), progress=False,
                        eval_every=0)
    summary = loop.train(cfg, model=tiny(3))  # 48 samples of 15 images: each bad one is drawn about 3 times
    out = capsys.readouterr().out
    assert [out.count(f"skipped unreadable image {b} ") for b in bad] == [1, 1]
    assert len(summary["skipped_images"]) == 2


# 3. One run per --out.

def test_one_run_per_out_directory(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'w'); "
                               "fcntl.flock(f, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(600)",
                               str(out / ".lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        with pytest.raises(ValueError, match="another bitfast-train run is using this directory"):
            loop.train(cfg_for(out, steps=2), model=tiny())
    finally:
        holder.kill()  # the kernel drops a dead process's flock
        holder.wait()
    fd = ck.lock_run_dir(str(out))  # a live lock in this process, as a second run in it would see
    with pytest.raises(ValueError, match="another bitfast-train run"):
        ck.lock_run_dir(str(out))
    os.close(fd)
    assert loop.train(cfg_for(out, steps=2), model=tiny())["steps"] == 2
    with open(out / ".lock") as f:  # released when the run ends
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)


# 4. Every output is atomic; a resumed run's metrics equal an uninterrupted run's.

def test_stale_tmp_files_are_removed(tmp_path):
    for name in ("last.pt.tmp", "model.pt.tmp", "summary.json.tmp"):
        (tmp_path / name).write_bytes(b"half a file")
    loop.train(cfg_for(tmp_path, steps=2), model=tiny())
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]


def test_no_space_left_keeps_the_last_checkpoint_and_says_so(tmp_path, monkeypatch, capsys):
    real_save, calls = torch.save, [0]

    def save(obj, f, *a, **k):  # the second checkpoint hits a full disk half-way
        calls[0] += 1
        if calls[0] == 2:
            f.write(b"x" * 100)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *a, **k)
    monkeypatch.setattr(torch, "save", save)
    out = tmp_path / "run"
    rc = cli.main(["transfer", "--model", "bit_tiny", "--data", "fashion-mnist-small:5-9", "--examples-per-class",
                   "2", "--batch", "4", "--steps", "4", "--resolution", "12,10", "--out", str(out), "--no-progress",
                   "ckpt_every=2", "eval_every=0"])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and err == f"bitfast-train: error: {out / 'last.pt'}: No space left on device"
    assert torch.load(out / "last.pt", weights_only=True)["step"] == 2 and not (out / "last.pt.tmp").exists()


def test_resumed_metrics_equal_an_uninterrupted_run(tmp_path):
    """Stops at a step that is an eval step, inside a train-loss window, then a kill during the resumed run's
    first eval: the rows (timings aside) are still those of one uninterrupted run."""
    kw = dict(steps=12, eval_every=3, ckpt_every=2, log_every=5)
    loop.train(cfg_for(tmp_path / "a", **kw), model=tiny())
    b = tmp_path / "b"
    assert loop.train(cfg_for(b, stop_after=6, **kw), model=tiny())["step"] == 6
    killed = tiny(seed=4)

    def crash(module, args):
        if not module.training:
            raise RuntimeError("killed during an eval")
    hook = killed.register_forward_pre_hook(crash)
    with pytest.raises(RuntimeError, match="killed during an eval"):
        loop.train(cfg_for(b, **kw), model=killed)  # the redone eval at 6
    hook.remove()
    loop.train(cfg_for(b, **kw), model=tiny(seed=5))
    assert rows(b) == rows(tmp_path / "a")
    assert [r["step"] for r in rows(b) if r["kind"] == "eval"] == [3, 6, 9, 12]


# 5. SIGTERM is honoured within a bound.

SLOW_STEP = """
import sys, time, torch
from bitfast.train import config as C, loop
sys.path.insert(0, sys.argv[2])
from test_train_loop import tiny
model = tiny()
model.register_forward_pre_hook(lambda m, a: (print("slow step", flush=True), time.sleep(120)) if m.training else None)
loop.train(C.make_config(data="fashion-mnist-small:5-9", examples_per_class=2, batch=4, steps=3, resolution="10,8",
                         out=sys.argv[1], progress=False, stop_timeout=2), model=model)
"""


def test_sigterm_during_a_long_step_exits_within_the_bound(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(sys.path))
    p = subprocess.Popen([sys.executable, "-c", SLOW_STEP, str(tmp_path), os.path.dirname(__file__)], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while "slow step" not in p.stdout.readline():
        assert p.poll() is None, p.communicate()
    t0 = time.time()
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    took = time.time() - t0
    assert p.returncode == 143 and took < 2 + 3, (p.returncode, took, err)
    assert "still running 2 s after SIGTERM" in err and "Traceback" not in err


def test_sigterm_during_the_final_eval_stops_non_zero_and_resumes(tmp_path):
    model, sent = tiny(), [False]

    def term(module, args):
        if not module.training and not sent[0]:
            sent[0] = True
            os.kill(os.getpid(), signal.SIGTERM)
    model.register_forward_pre_hook(term)
    result = loop.train(cfg_for(tmp_path, steps=4), model=model)
    assert result == {"stopped": "SIGTERM", "step": 4} and cli.exit_code(result) == 143
    assert torch.load(tmp_path / "last.pt", weights_only=True)["step"] == 4 and not (tmp_path / "summary.json").exists()
    assert loop.train(cfg_for(tmp_path, steps=4), model=tiny())["eval_images"] == 1000


# 6. One clear line for every bad input.

@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("inputs")
    (d / "afile").write_text("x")
    (d / "random.pt").write_bytes(b"\x13" + os.urandom(4000))  # not a zip (PK) nor a pickle (0x80) header
    from bitfast import models
    model = models.create("bit_tiny", num_classes=10)
    with torch.no_grad():
        next(model.parameters())[0] = float("nan")
    models.save(model, d / "nan.pt")
    return d


BAD = [  # (flags, what the one line must say)
    (["ckpt_every=0"], "--ckpt-every must be >= 1"),
    (["ckpt_every=-1"], "--ckpt-every must be >= 1"),
    (["eval_every=-1"], "--eval-every must be >= 0"),
    (["--lr", "1e308"], "--lr must be a finite number"),
    (["--lr", "nan"], "--lr must be a finite number"),
    (["--mixup", "nan"], "--mixup must be a finite number"),
    (["--seed", "-1"], "--seed must be"),
    (["--workers", "-1"], "--workers must be >= 0"),
    (["--device", "tpu"], "--device must be auto, cpu, cuda"),
    (["--backend", "cuda"], "--backend cuda: "),
    (["--backend", "tpu"], "--backend tpu: not one of"),
    (["--resolution", "60000"], "--resolution must be at most 4096"),
    (["--weights", "{d}"], "is a directory, not a weights file"),
    (["--weights", "{d}/random.pt"], "not a weights file (it starts with bytes 13"),
    (["--weights", "{d}/nan.pt"], "the weights hold nan or inf values"),
    (["--out", "{d}/afile"], "--out {d}/afile: is a file, not a directory"),
    (["--out", "{d}/afile/run"], "cannot use it as the run directory (Not a directory)"),
]


@pytest.mark.parametrize("flags,says", BAD, ids=[" ".join(f) for f, _ in BAD])
def test_bad_input_gets_one_clear_line(flags, says, files, tmp_path, capsys, monkeypatch):
    if "--backend" in flags and torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    monkeypatch.delenv("BITFAST_DEBUG", raising=False)
    flags = [f.format(d=files) for f in flags]
    out = [] if "--out" in flags else ["--out", str(tmp_path / "run")]
    rc = cli.main(["transfer", "--model", "bit_tiny", "--data", "fashion-mnist-small:5-9", "--examples-per-class", "2",
                   "--batch", "4", "--steps", "2", "--resolution", "12,10", "--no-progress", *out, *flags])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and err.startswith("bitfast-train: error: "), err
    assert says.format(d=files) in err and "pickled" not in err


def test_read_only_out_and_debug_traceback(tmp_path, monkeypatch, capsys):
    def read_only(*a, **k):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), a[0])
    monkeypatch.setattr(ck.os, "open", read_only)
    argv = ["transfer", "--data", "fashion-mnist-small", "--out", str(tmp_path / "ro")]
    assert cli.main(argv) == 2
    assert capsys.readouterr().err.strip().endswith("cannot use it as the run directory (Read-only file system)")
    monkeypatch.setenv("BITFAST_DEBUG", "1")
    with pytest.raises(ValueError, match="Read-only"):
        cli.main(argv)


# 7. Resume accepts equivalent settings and refuses real changes.

def test_resume_accepts_equivalent_settings(tmp_path, monkeypatch):
    from bitfast import models
    monkeypatch.chdir(tmp_path)
    os.makedirs("w")
    models.save(models.create("bit_tiny", num_classes=10), "w/pre.pt")
    kw = dict(model="bit_tiny", examples_per_class=2, batch=4, steps=4, out=str(tmp_path / "run"), progress=False,
              eval_every=0)
    first = C.make_config(data="fashion-mnist-small:5-9", resolution="12,10", weights="w/pre.pt", stop_after=2, **kw)
    assert loop.train(first)["step"] == 2
    os.makedirs("elsewhere")
    monkeypatch.chdir("elsewhere")
    same = dict(data="fashion-mnist-small:5,6,7,8,9", resolution="12x10", weights="../w/../w/pre.pt", lr=0.003, **kw)
    with pytest.raises(ValueError, match=r"lr: 0.003 -> 0.004\)"):
        loop.train(C.make_config(**{**same, "lr": 0.004}))
    with pytest.raises(ValueError, match=r"crop: 10 -> 9\)"):
        loop.train(C.make_config(**{**same, "resolution": "12,9"}))
    assert loop.train(C.make_config(**same))["steps"] == 4


def test_resume_compares_the_upstream_schedule():
    cfg = C.make_config("upstream", data="x", epochs=2, warmup=1)
    r = C.resolve(cfg, 1000, (28, 28), 5)
    state = {"resolved": ck.resolved(cfg), "recipe": dict(vars(r)), "config": {}}
    assert ck.settings_mismatch(state, cfg, r) == []
    other = C.make_config("upstream", data="x", epochs=2, warmup=1, schedule="bit-l")
    assert [k for k, _, _ in ck.settings_mismatch(state, other, r)] == ["schedule"]
