"""Issue 14 item 4: the TensorBoard events a run writes, read back with tensorboard's own reader, equal metrics.jsonl,
one value per (tag, step), after a stop and a resume too."""
import importlib.util
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from bitfast.train import loop

try:
    from test_train_loop import cfg_for, one_thread, tiny  # noqa: F401 (one_thread: an autouse fixture)
except ImportError:  # tests/ as a package
    from tests.test_train_loop import cfg_for, one_thread, tiny  # noqa: F401

HAVE_TB = importlib.util.find_spec("tensorboard") is not None  # install.sh installs it
pytestmark = pytest.mark.skipif(not HAVE_TB, reason="tensorboard is not installed")


def tb_scalars(out):
    """{tag: [(step, value), ...]} as TensorBoard shows them (every event file of <out>/tb, purges applied)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(os.path.join(str(out), "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def jsonl_scalars(out):
    """metrics.jsonl in the same shape: tag kind/key, values rounded to float32 as TensorBoard stores them."""
    tags = {}
    for row in map(json.loads, open(os.path.join(str(out), "metrics.jsonl"))):
        for k, v in row.items():
            if k not in ("kind", "step") and isinstance(v, (int, float)) and not isinstance(v, bool):
                tags.setdefault(f"{row['kind']}/{k}", []).append((row["step"], float(np.float32(v))))
    return tags


def assert_tb_matches_metrics(out, skip=("train/img_s",)):
    """TensorBoard and metrics.jsonl agree on every tag, step and value (timings: steps only); no step twice."""
    tb, js = tb_scalars(out), jsonl_scalars(out)
    assert sorted(tb) == sorted(js)
    for tag in tb:
        steps = [s for s, _ in tb[tag]]
        assert steps == sorted(set(steps)), (tag, steps)  # no duplicate or out-of-order steps
        assert (steps if tag in skip else tb[tag]) == ([s for s, _ in js[tag]] if tag in skip else js[tag]), tag
    return tb


def test_event_file_equals_metrics_and_a_resume_writes_no_step_twice(tmp_path):
    kw = dict(steps=8, log_every=2, eval_every=4, ckpt_every=4)
    loop.train(cfg_for(tmp_path / "a", **kw), model=tiny())
    tb = assert_tb_matches_metrics(tmp_path / "a")
    assert [s for s, _ in tb["train/loss"]] == [2, 4, 6, 8] and [s for s, _ in tb["eval/top1"]] == [4, 8]
    assert {"train/lr", "eval/loss", "eval/top5", "eval/images"} <= set(tb)
    # Stopped at 4, after its train row and its eval: the resume redoes the eval at 4 and keeps the train row.
    assert loop.train(cfg_for(tmp_path / "b", stop_after=4, **kw), model=tiny())["stopped"] == "stop_after"
    assert_tb_matches_metrics(tmp_path / "b")
    loop.train(cfg_for(tmp_path / "b", **kw), model=tiny())
    assert len(os.listdir(tmp_path / "b" / "tb")) == 2  # one event file per invocation
    assert assert_tb_matches_metrics(tmp_path / "b") == {k: v for k, v in tb.items() if k != "train/img_s"} | {
        "train/img_s": tb_scalars(tmp_path / "b")["train/img_s"]}


KILLED_AFTER_ROW = """
import os, signal, sys
from bitfast.train import cli, report
write, count = report.Metrics.write, int(os.environ.get("KILL_AFTER_ROW", "0"))
def write_then_kill(self, *a, **k):
    write(self, *a, **k)
    if a[1] == count:
        os.kill(os.getpid(), signal.SIGKILL)
report.Metrics.write = write_then_kill
sys.exit(cli.main(sys.argv[1:]))
"""


def test_a_kill_after_the_checkpoint_leaves_tensorboard_equal_to_metrics_after_the_resume(tmp_path):
    """SIGKILL right after the train row of step 6 (checkpoint at 4): the rows before it are in the event file
    (flushed with each row), those after 4 are purged by the resume and written again, once."""
    args = ["transfer", "--model", "bit_tiny", "--data", "fashion-mnist-small:5-9", "--examples-per-class", "2",
            "--batch", "8", "--steps", "8", "--resolution", "12,10", "--workers", "0", "--no-progress",
            "--out", str(tmp_path), "log_every=1", "ckpt_every=4", "eval_every=0"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(sys.path))
    for kill in (6, 0):
        p = subprocess.run([sys.executable, "-c", KILLED_AFTER_ROW, *args], env=dict(env, KILL_AFTER_ROW=str(kill)),
                           capture_output=True, text=True, timeout=300)
        assert p.returncode == (-signal.SIGKILL if kill else 0), p.stdout[-2000:] + p.stderr[-2000:]
    assert "resuming from" in p.stdout and "at step 4" in p.stdout
    tb = assert_tb_matches_metrics(tmp_path)
    assert [s for s, _ in tb["train/loss"]] == list(range(1, 9))
