"""kill -9 a real `bitfast-train transfer` at random points (half-way through a checkpoint write, inside an eval,
right after a metrics row, at a random moment of training, half-way through model.pt), resume after each, and
end with the weights, model.pt, metrics and summary of one uninterrupted run."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import torch

# Runs bitfast-train with one kill point armed: the count-th event of that kind SIGKILLs the process.
DRIVER = r"""
import os, signal, sys
from bitfast.train import checkpoint as ck, cli, data as D, report
point, count, seen = sys.argv[1], int(sys.argv[2]), [0]

def hit(before_kill=lambda: None):
    seen[0] += 1
    if seen[0] == count:
        before_kill()
        os.kill(os.getpid(), signal.SIGKILL)

if point.endswith(".pt"):  # the file is half on disk when the kill comes
    real = ck.atomic_write
    def cut(path, write):
        def half(f):
            write(f)
            f.flush()
            hit(lambda: f.truncate(f.tell() // 2))
        return real(path, half if path.endswith(point) else write)
    ck.atomic_write = cut
elif point == "eval":  # the count-th eval image
    get = D.View.__getitem__
    D.View.__getitem__ = lambda self, item: (item[1] is None and hit(), get(self, item))[1]
elif point == "row":  # just after the count-th metrics row
    write = report.Metrics.write
    report.Metrics.write = lambda self, *a, **k: (write(self, *a, **k), hit())
sys.exit(cli.main(sys.argv[3:]))
"""

ARGS = ["transfer", "--model", "bit_tiny", "--data", "fashion-mnist-small:5-9", "--examples-per-class", "4",
        "--batch", "8", "--steps", "16", "--resolution", "20,16", "--mixup", "0.2", "--workers", "0", "--no-progress",
        "eval_every=6", "ckpt_every=4", "log_every=5", "seed=3"]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(sys.path))


def start(out, point="none", count=0):
    return subprocess.Popen([sys.executable, "-c", DRIVER, point, str(count), *ARGS, "--out", str(out)], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def finish(p):
    out, err = p.communicate(timeout=300)
    return p.returncode, out + err


def rows(out):
    return [{k: v for k, v in json.loads(ln).items() if k != "img_s"} for ln in open(out / "metrics.jsonl")]


def assert_whole(out):
    """Whatever a kill left behind: each output is absent or complete, never a part."""
    for name in ("last.pt", "model.pt"):
        if (out / name).exists():
            torch.load(out / name, weights_only=True)
    for name in ("summary.json", "config.json"):
        if (out / name).exists():
            json.load(open(out / name))


def test_kill_at_random_points_then_resume_gives_the_uninterrupted_run(tmp_path):
    rng = np.random.default_rng()
    ref, out = tmp_path / "ref", tmp_path / "run"
    rc, log = finish(start(ref))
    assert rc == 0, log[-3000:]
    # The order makes each armed point certain to come: a run always has checkpoints left when it starts from
    # scratch, three evals (6, 12, final) of 1000 images after a resume from step <= 4, and model.pt at the end.
    plan = [("last.pt", int(rng.integers(1, 3))), ("eval", int(rng.integers(1, 3000))),
            ("row", int(rng.integers(1, 3))), ("time", float(rng.uniform(4, 9))), ("model.pt", 1)]
    kills = []
    for point, count in plan:
        p = start(out, point, count if point != "time" else 0)
        if point == "time":  # a moment nobody chose: startup, a step, a write or an eval
            time.sleep(count)
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
        rc, log = finish(p)
        assert rc in (-9, 0) and "Traceback" not in log, log[-3000:]
        assert rc == -9 or point in ("row", "time"), (point, count, log[-3000:])  # certain kills did happen
        kills.append((point, count, rc))
        assert_whole(out)
    print("kills (point, count, rc):", kills)
    rc, log = finish(start(out))
    assert rc == 0, (kills, log[-3000:])
    for name in ("last.pt", "model.pt"):
        a = torch.load(ref / name, weights_only=True)
        b = torch.load(out / name, weights_only=True)
        sa, sb = (a["model"], b["model"]) if name == "last.pt" else (a["state_dict"], b["state_dict"])
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa), (name, kills)
    assert rows(out) == rows(ref), kills
    sa, sb = (json.load(open(d / "summary.json")) for d in (ref, out))
    assert {k: sa[k] for k in ("top1", "top5", "eval_loss", "eval_images", "steps", "skipped_images")} == \
        {k: sb[k] for k in ("top1", "top5", "eval_loss", "eval_images", "steps", "skipped_images")}
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")] and (out / "plot.png").stat().st_size > 1000
