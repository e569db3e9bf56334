"""torchrun with 2 gloo processes: same weights as one process (global batch fixed), exact eval, rank-0 writes."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

try:
    from test_train_data import make_folder
except ImportError:  # tests/ as a package
    from tests.test_train_data import make_folder

SCRIPT = textwrap.dedent("""
    import json, sys, torch, torch.nn as nn
    from bitfast.train import make_config, train
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.GroupNorm(2, 8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(8, 3))
    cfg = make_config("transfer", data=sys.argv[1], out=sys.argv[2], batch=8, batch_split=2, steps=6,
                      resolution="12,10", eval_every=3, ckpt_every=2, progress=False, lr=0.05)
    summary = train(cfg, model=model)
    import os
    if os.environ.get("RANK", "0") == "0":
        json.dump(summary, open(sys.argv[2] + "/result.json", "w"))
""")


def run(script, data, out, nproc):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(sys.path))
    cmd = [sys.executable, script, data, out]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] + cmd[1:]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return json.load(open(os.path.join(out, "result.json"))), p


def test_two_gloo_ranks_match_one_process(tmp_path):
    data = make_folder(str(tmp_path / "data"), n_train=(7, 6, 5), n_eval=(3, 3, 3))  # 9 eval images: 5 + 4
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    one, _ = run(str(script), data, str(tmp_path / "one"), 1)
    two, p = run(str(script), data, str(tmp_path / "two"), 2)
    assert "terminate called" not in p.stderr
    assert two["eval_images"] == one["eval_images"] == 9  # exact: nothing padded or dropped
    assert two["top1"] == one["top1"] and two["eval_loss"] == pytest.approx(one["eval_loss"], rel=1e-4)
    w1 = torch.load(tmp_path / "one" / "last.pt", weights_only=True)
    w2 = torch.load(tmp_path / "two" / "last.pt", weights_only=True)
    assert w2["recipe"]["rank_batch"] == 4 and w2["recipe"]["world_size"] == 2 and w1["recipe"]["rank_split"] == 2
    for k, v in w1["model"].items():
        torch.testing.assert_close(w2["model"][k], v, rtol=1e-4, atol=1e-6)
    steps = [json.loads(line)["step"] for line in open(tmp_path / "two" / "metrics.jsonl")]
    assert steps == sorted(steps)
    kinds = [(json.loads(line)["kind"], json.loads(line)["step"]) for line in open(tmp_path / "two" / "metrics.jsonl")]
    assert len(kinds) == len(set(kinds))  # rank 0 alone writes: no duplicated lines
