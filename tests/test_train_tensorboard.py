"""Issue 14 item 4: the TensorBoard events a run writes, read back with tensorboard's own reader, equal metrics.jsonl,
one value per (tag, step), after a stop and a resume too."""
import json
import os

import numpy as np
import pytest

from bitfast.train import loop

try:
    from test_train_loop import cfg_for, one_thread, tiny  # noqa: F401 (one_thread: an autouse fixture)
except ImportError:  # tests/ as a package
    from tests.test_train_loop import cfg_for, one_thread, tiny  # noqa: F401

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402


def tb_scalars(out):
    """{tag: [(step, value), ...]} as TensorBoard shows them (every event file of <out>/tb, purges applied)."""
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
