"""bench/report.py renders REPORT.md from result files (bitfast schema and pytest-benchmark JSON), and the
_timing helpers it relies on (Stats, merging writes) do what their docstrings say. Synthetic, random numbers."""
import json
import random
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `bench` is a folder of the repo, not installed

from bench import _timing as T  # noqa: E402
from bench import report  # noqa: E402

R50 = "resnetv2_50x1_bit"
SETTING = f"{R50}-train-eager-bf16-channels_last"


def _stats(ms):
    return T.Stats.from_samples([ms * random.uniform(0.97, 1.03) for _ in range(7)])


def _model_record(cand, img_per_s, batch=128, suite="models", setting=SETTING):
    st = _stats(batch / img_per_s * 1e3)
    norm, conv, impl = cand.split("-")
    return T.record(suite, f"{setting}/{cand}", st, img_per_s=batch / (st.median_ms * 1e-3),
                    params=dict(model=R50, batch=batch, norm=norm, conv=conv, impl=impl),
                    peak_mem_bytes=random.randint(5, 30) << 30, first_call_s=0.5)


def _env(device, date, device_type="cuda"):
    return {"device": device, "device_type": device_type, "date": date, "torch": "2.11.0", "triton": "3.6.0",
            "cuda": "13.0", "quick": False}


def _synthetic(tmp_path):
    bn, main, comp = (random.uniform(1000, 3000) for _ in range(3))
    recs = [_model_record("bn-plain-nn", bn), _model_record("gn-ws-bitfast", main),
            _model_record("gn-ws-composite", comp), _model_record("gn-ws-torch", comp / 2)]
    recs += [_model_record(c, random.uniform(500, 2000), batch=64, suite="scaling", setting=f"res/{r}")
             for r in (128, 224) for c in ("bn-plain-nn", "gn-ws-bitfast")]
    nbytes, copy, kms = random.randint(1, 9) << 27, random.uniform(2000, 3000), random.uniform(0.2, 2.0)
    recs.append(T.record("group_norm", "fwd/N32-C256-56x56", T.Stats(kms, kms, kms, kms, kms, 5),
                         params={"dtype": "bf16"}, bytes=nbytes, copy_gbps=copy))
    recs.append(T.record("max_batch", f"{R50}-224/gn-ws-bitfast", max_batch=1234, capped=False))
    recs.append(T.record("models", f"resnetv2_152x4_bit-train-eager-bf16-channels_last/bn-plain-nn",
                         skipped="out of memory at batch 16"))
    gpu = tmp_path / "nvidia-h100_2030-01-02.json"
    T.write_records(recs, path=gpu, env=_env("NVIDIA H100 80GB HBM3", "2030-01-02T10:00:00Z"))
    T.SESSION.clear()  # the conftest of bench/ would print these; keep the global clean
    return dict(bn=bn, main=main, comp=comp, nbytes=nbytes, copy=copy, kms=kms, gpu=gpu)


def test_report_renders_ratios_bandwidth_memory(tmp_path):
    v = _synthetic(tmp_path)
    recs = {r["name"]: r for r in json.loads(v["gpu"].read_text())["records"]}
    r_bn = recs[f"{SETTING}/gn-ws-bitfast"]["img_per_s"] / recs[f"{SETTING}/bn-plain-nn"]["img_per_s"]
    r_co = recs[f"{SETTING}/gn-ws-bitfast"]["img_per_s"] / recs[f"{SETTING}/gn-ws-composite"]["img_per_s"]
    # an older file of the same GPU must not be reported, a CPU file must be
    old = _env("NVIDIA H100 80GB HBM3", "2029-01-01T00:00:00Z")
    (tmp_path / "nvidia-h100_2029-01-01.json").write_text(json.dumps(
        {"schema": 1, "env": old, "records": [_model_record("bn-plain-nn", 1.0, setting="OLDSETTING")]}))
    T.write_records([_model_record("bn-plain-nn", 50.0, setting="bit_tiny-train-eager-fp32-nchw")],
                    path=tmp_path / "cpu_2030-01-02.json", env=_env("cpu: test", "2030-01-02", "cpu"))
    T.SESSION.clear()
    (tmp_path / "broken.json").write_text("{not json")
    out, png = tmp_path / "REPORT.md", tmp_path / "report.png"
    text = report.render([tmp_path], out, png)

    assert out.read_text() == text
    assert text.index("## NVIDIA H100 80GB HBM3") < text.index("## cpu: test")  # GPUs first
    assert "OLDSETTING" not in text and "nvidia-h100_2029-01-01.json" in text  # older file only named
    headline = next(line for line in text.splitlines() if line.startswith(f"- {SETTING}"))
    assert f"{r_bn:.2f}x BN+plain" in headline and f"{r_co:.2f}x the timm-style composite" in headline
    want = "met" if r_bn >= 0.9 else f"short by {100 * (0.9 - r_bn) / 0.9:.0f}% of the target"
    assert f"target >= 0.9x: {want}" in headline
    gb = v["nbytes"] / (v["kms"] * 1e-3) / 1e9
    kernel_row = next(line for line in text.splitlines() if "fwd/N32-C256-56x56" in line)
    assert f"{gb:.1f}" in kernel_row and f"{100 * gb / v['copy']:.0f}%" in kernel_row
    assert "| 1234 |" in text and "out of memory at batch 16" in text
    peak = recs[f"{SETTING}/gn-ws-torch"]["peak_mem_bytes"] / 2**30
    assert f"{peak:.2f}" in text
    assert "res/224" in text
    try:
        import matplotlib  # noqa: F401
        assert png.exists() and png.read_bytes()[:4] == b"\x89PNG" and "![" in text
    except ImportError:
        assert not png.exists()


def test_report_reads_pytest_benchmark_json(tmp_path):
    med = random.uniform(1e-4, 1e-3)
    doc = {"machine_info": {"gpu": "Some GPU"}, "datetime": "2030-01-01T00:00:00",
           "benchmarks": [{"group": "group_norm", "name": "test_gn[bf16]", "params": {"C": 256},
                           "stats": {"median": med, "q1": med * 0.9, "q3": med * 1.1, "min": med * 0.8,
                                     "max": med * 1.3, "rounds": 10},
                           "extra_info": {"bytes": 1 << 28, "copy_gbps": 2500.0}}]}
    (tmp_path / "pytest-benchmark.json").write_text(json.dumps(doc))
    text = report.render([tmp_path], tmp_path / "R.md", None)
    row = next(line for line in text.splitlines() if "test_gn[bf16]" in line)
    gb = (1 << 28) / med / 1e9
    assert f"{med * 1e3:.4g}" in row and f"{gb:.1f}" in row and f"{100 * gb / 2500:.0f}%" in row
    assert "## Some GPU" in text


def test_report_without_results(tmp_path):
    text = report.render([tmp_path], tmp_path / "R.md", tmp_path / "p.png")
    assert "No result files found" in text and not (tmp_path / "p.png").exists()


def test_stats_and_merging_writes(tmp_path):
    xs = [random.uniform(1, 10) for _ in range(9)]
    st = T.Stats.from_samples(xs)
    q1, med, q3 = np.percentile(xs, [25, 50, 75])
    assert (st.median_ms, st.q1_ms, st.q3_ms, st.min_ms, st.max_ms, st.n) == pytest.approx(
        (med, q1, q3, min(xs), max(xs), 9))
    with pytest.raises(ValueError, match="samples"):
        T.Stats.from_samples([])
    path = tmp_path / "r.json"
    env = _env("x", "2030")
    T.write_records([T.record("s", "a", st, v=1), T.record("s", "b", v=2)], path=path, env=env)
    T.write_records([T.record("s", "a", v=3)], path=path, env=env)
    T.SESSION.clear()
    recs = {r["name"]: r for r in json.loads(path.read_text())["records"]}
    assert recs["a"]["v"] == 3 and "median_ms" not in recs["a"] and recs["b"]["v"] == 2
    with pytest.raises(ValueError, match="suite"):
        T.write_records([{"name": "no suite"}], path=path, env=env)


def test_results_path_names_device_and_date(tmp_path):
    p = T.results_path("cpu", tmp_path, "2030-01-02")
    assert p == tmp_path / "cpu_2030-01-02.json"
