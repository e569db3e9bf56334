"""Autotune (bitfast.autotune): auto checks every candidate backend against the fp64 criterion, times the ones that
pass and picks the fastest, per (device, class), with a cache on disk.

The mechanism does not depend on CUDA, so it is tested on CPU tensors (autotune.TUNED patched to include "cpu") with
the real cpu, torch and triton (interpreter) backends plus test-only ones: "wrong" is the fastest and wrong, "slow" is
correct and slow. The fixture gives every test an empty cache folder and an empty in-process memo (a new process).
"""
import importlib
import json
import os
import subprocess
import sys
import time
import warnings

import pytest
import torch

import bitfast
from bitfast import _backend, autotune
from bitfast.ops._common import empty_like_layout

GN = importlib.import_module("bitfast.ops.group_norm")
WS = importlib.import_module("bitfast.ops.weight_standardize")
MANY = importlib.import_module("bitfast.ops.weight_standardize_many")
CPU = torch.device("cpu")


# Nominal seconds per call for the real backends: their real timings on a loaded 2-core CI machine are not
# reliably ordered (cpu lost to torch in a CI run), and which one wins is not what these tests test. Test-only
# backends ("slow") are timed for real, so the timing path itself still runs.
NOMINAL_S = {"cpu": 1e-4, "torch": 2e-4, "triton": 1e-1}


def nominal_time(real):
    def timed(spec, backend, rep, dev, best):
        if backend not in NOMINAL_S:
            return real(spec, backend, rep, dev, best)
        spec.run(backend, rep)  # it still runs once on the representative case
        return NOMINAL_S[backend]
    return timed


@pytest.fixture
def tuned(monkeypatch, tmp_path):
    """CPU tensors tuned over cpu and torch, into an empty cache folder, as in a fresh process."""
    monkeypatch.setattr(autotune, "time_backend", nominal_time(autotune.time_backend))
    monkeypatch.setenv("BITFAST_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(autotune, "TUNED", ("cuda", "cpu"))
    monkeypatch.setitem(autotune.CANDIDATES, "cpu", ("cpu", "torch"))
    for name, empty in (("_MEMO", {}), ("_SEEN", {}), ("_WARNED", set())):
        monkeypatch.setattr(autotune, name, empty)
    return tmp_path / "cache"


def new_process():
    for d in (autotune._MEMO, autotune._SEEN, autotune._WARNED):
        d.clear()


def add_backend(monkeypatch, name, impls):
    """A test-only backend: impls = {op module: (fwd, bwd)} with the _C signatures."""
    monkeypatch.setitem(_backend._COMPILED, name, None)  # "compiled", so usable_why() passes it
    for mod, (fwd, bwd) in impls.items():
        monkeypatch.setitem(mod._FWD, name, lambda f=fwd: f)
        monkeypatch.setitem(mod._BWD, name, lambda f=bwd: f)


# "wrong": hands its inputs back as outputs (no work at all), so it is faster than any real kernel and only the
# check keeps it out.
def gn_wrong_fwd(x, w, b, G, eps, relu):
    return x, w.new_zeros(x.shape[0], G), w.new_ones(x.shape[0], G)


def gn_wrong_bwd(dy, x, w, b, mean, rstd, G, relu):
    return dy, w, b


def ws_wrong_fwd(w, eps, out):
    return w.to(out or w.dtype), torch.zeros(w.shape[0]), torch.ones(w.shape[0])


def ws_wrong_bwd(dy, w, mean, rstd):
    return dy.to(w.dtype)


def many_wrong_fwd(ws, eps, out):
    rows = sum(w.shape[0] for w in ws)
    return [w.to(out or w.dtype) for w in ws], torch.zeros(rows), torch.ones(rows)


def many_wrong_bwd(dys, ws, mean, rstd):
    return [dy.to(w.dtype) for dy, w in zip(dys, ws)]


WRONG = {GN: (gn_wrong_fwd, gn_wrong_bwd), WS: (ws_wrong_fwd, ws_wrong_bwd), MANY: (many_wrong_fwd, many_wrong_bwd)}


def slowed(fn, seconds=0.003):
    def run(*args):
        time.sleep(seconds)
        return fn(*args)
    return run


def slow_impls(seconds=0.003):
    return {m: (slowed(m._FWD["cpu"](), seconds), slowed(m._BWD["cpu"](), seconds)) for m in (GN, WS, MANY)}


def samples():
    """(op, sample) for each op: a scaled BiT GN layer (NCHW and channels_last), a 3x3 conv weight, a weight list."""
    x = torch.randn(2, 64, 8, 8)
    w = torch.randn(16, 8, 3, 3)
    return [("group_norm", (x, 32)), ("group_norm", (x.contiguous(memory_format=torch.channels_last), 32)),
            ("weight_standardize", (w, None)), ("weight_standardize_many", (w, None))]


def pick(op, sample):
    return _backend.resolve(op, None, "cpu", sample)


def entry(op, sample):
    return autotune._SEEN[("cpu", autotune.entry_name(op, autotune.label(autotune.OPS[op].cls(*sample))))]


def no_measuring(monkeypatch):
    def fail(*a, **k):
        raise AssertionError("measured although the choice was cached or explicit")
    monkeypatch.setattr(autotune, "measure", fail)


# ------------------------------------------------------------------------------------------------ choosing
def test_wrong_backend_is_excluded_and_warned(tuned, monkeypatch):
    add_backend(monkeypatch, "wrong", WRONG)
    monkeypatch.setitem(autotune.CANDIDATES, "cpu", ("wrong", "cpu", "torch"))
    for op, sample in samples():
        with pytest.warns(UserWarning, match=rf"excluded backend 'wrong' for {op} \(float32 .*\) on .*: (y|dx).*error"):
            assert pick(op, sample) == "cpu"
        e = entry(op, sample)
        assert set(e["excluded"]) == {"wrong"} and set(e["us"]) == {"cpu", "torch"}
    x = samples()[0][1][0].requires_grad_()
    y = bitfast.ops.group_norm(x, 32, act="relu")  # the public op runs the choice: the real GN, not the copy
    torch.testing.assert_close(y, bitfast.ops.group_norm(x, 32, act="relu", backend="torch"))


def test_wrong_backend_would_win_without_the_check(tuned, monkeypatch):
    """The proof that the test above can fail: with the check switched off, the wrong backend is the fastest."""
    add_backend(monkeypatch, "wrong", WRONG)
    monkeypatch.setitem(autotune.CANDIDATES, "cpu", ("cpu", "torch", "wrong"))
    monkeypatch.setattr(autotune, "check", lambda *a: None)
    for op, sample in samples():
        assert pick(op, sample) == "wrong", entry(op, sample)


def test_backward_only_error_is_caught(tuned, monkeypatch):
    cpu_fwd, cpu_bwd = GN._FWD["cpu"](), GN._BWD["cpu"]()

    def bwd(*args):  # forward right, dx off by 1%: what a wrong reduction in the backward kernel looks like
        dx, dw, db = cpu_bwd(*args)
        return dx * 1.01, dw, db

    add_backend(monkeypatch, "wrong", {GN: (cpu_fwd, bwd)})
    monkeypatch.setitem(autotune.CANDIDATES, "cpu", ("wrong", "cpu"))
    with pytest.warns(UserWarning, match="'wrong' for group_norm .*: dx: max error"):
        assert pick(*samples()[0]) == "cpu"


def test_raising_and_unwritten_backends_are_excluded(tuned, monkeypatch):
    def raises(*args):
        raise RuntimeError("no kernel image is available for execution on the device")

    def unwritten(x, w, b, G, eps, relu):
        return empty_like_layout(x), torch.empty(x.shape[0], G), torch.empty(x.shape[0], G)

    add_backend(monkeypatch, "raises", {GN: (raises, GN._BWD["cpu"]())})
    add_backend(monkeypatch, "unwritten", {GN: (unwritten, GN._BWD["cpu"]())})
    monkeypatch.setitem(autotune.CANDIDATES, "cpu", ("raises", "unwritten", "cpu"))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert pick(*samples()[0]) == "cpu"
    text = "\n".join(str(w.message) for w in seen)
    assert "'raises' for group_norm (float32 contiguous cg<=8)" in text and "RuntimeError: no kernel image" in text
    assert "'unwritten' for group_norm" in text


def test_no_candidate_passes_falls_back_to_torch(tuned, monkeypatch):
    add_backend(monkeypatch, "wrong", WRONG)
    monkeypatch.setitem(autotune.CANDIDATES, "cpu", ("wrong",))
    with pytest.warns(UserWarning, match="excluded backend 'wrong'"):
        with pytest.warns(UserWarning, match="no candidate passed the check for group_norm .*pure-torch"):
            assert pick(*samples()[0]) == "torch"


def test_prefers_the_faster_correct_backend(tuned, monkeypatch):
    add_backend(monkeypatch, "slow", slow_impls())
    monkeypatch.setitem(autotune.CANDIDATES, "cpu", ("slow", "torch", "cpu"))  # listed first, measured slower
    for op, sample in samples():
        assert pick(op, sample) == "cpu"
        e = entry(op, sample)
        assert e["excluded"] == {} and e["us"]["slow"] > e["us"]["cpu"]
    new_process()
    add_backend(monkeypatch, "slow", slow_impls(0.03))  # now slower than the pure-torch reference too
    monkeypatch.setitem(autotune.CANDIDATES, "cpu", ("slow", "torch"))
    assert pick(*samples()[0]) == "torch"


@pytest.mark.skipif(_backend.usable_why("triton", "cpu") is not None, reason="needs TRITON_INTERPRET=1")
def test_real_cpu_torch_and_interpreted_triton(tuned, monkeypatch):
    monkeypatch.setitem(autotune.CANDIDATES, "cpu", ("cpu", "torch", "triton"))
    for op, sample in samples()[:3]:
        assert pick(op, sample) == "cpu"  # nominal costs (NOMINAL_S); the interpreter really is far slower
        e = entry(op, sample)
        assert e["excluded"] == {} and set(e["us"]) == {"cpu", "torch", "triton"}, e


def test_correct_kernels_pass_the_check_in_every_class(tuned):
    """No false exclusions: the real cpu and torch backends pass every class --tune measures, and float64."""
    f64 = [("group_norm", ("float64", f, "cg<=8")) for f in ("contiguous", "channels_last")] + [
        ("weight_standardize", ("float64", "float64", "channels_last")), ("weight_standardize_many", ("float64",) * 2)]
    for op, cls in autotune.all_classes() + f64:
        e = autotune.measure(op, CPU, cls, ["cpu", "torch"])
        assert e["excluded"] == {}, (op, cls, e)


def test_explicit_backend_and_use_backend_are_untouched(tuned, monkeypatch):
    no_measuring(monkeypatch)
    x, G = samples()[0][1]
    assert _backend.resolve("group_norm", "torch", "cpu", (x, G)) == "torch"
    with bitfast.use_backend("torch"):
        assert _backend.resolve("group_norm", None, "cpu", (x, G)) == "torch"
        assert _backend.resolve("group_norm", "cpu", "cpu", (x, G)) == "cpu"
        bitfast.ops.group_norm(x, G, act="relu")
        bitfast.ops.weight_standardize_many([torch.randn(4, 2, 3, 3)])
    bitfast.ops.group_norm(x, G, backend="cpu")
    assert autotune._MEMO == {} and not os.path.exists(tuned)


def test_autotune_off_is_the_static_table(tuned, monkeypatch):
    no_measuring(monkeypatch)
    monkeypatch.setattr(autotune, "TUNED", autotune.parse_mode("0"))
    assert pick(*samples()[0]) == "cpu" and pick(*samples()[2]) == "cpu"
    assert autotune.parse_mode("1") == ("cuda",) and autotune.parse_mode("all") == ("cuda", "cpu")
    with pytest.raises(ValueError, match="BITFAST_AUTOTUNE"):
        autotune.parse_mode("yes")


def test_env_var_is_read_at_import():
    code = "from bitfast import autotune; print(autotune.TUNED)"
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "BITFAST_AUTOTUNE": "all"},
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == "('cuda', 'cpu')"  # a bad value raises there: parse_mode, tested above


def test_tuning_leaves_rng_grad_mode_and_autocast_alone(tuned):
    cases = samples()
    state = torch.get_rng_state()
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        for op, sample in cases:
            assert pick(op, sample) == "cpu"
        assert torch.is_inference_mode_enabled() and torch.is_autocast_enabled("cpu")
    assert torch.equal(torch.get_rng_state(), state)


# ------------------------------------------------------------------------------------------------ cache
def cache_path():
    return autotune.cache_file(CPU)[0]


def test_cache_round_trips(tuned, monkeypatch):
    for op, sample in samples():
        pick(op, sample)
    data = json.load(open(cache_path()))
    assert data["key"] == autotune.cache_key(CPU) and len(data["entries"]) == 4
    assert set(data["key"]) == {"device", "driver", "torch", "triton", "bitfast", "build"}
    new_process()
    no_measuring(monkeypatch)
    monkeypatch.setitem(data["entries"]["group_norm float32 contiguous cg<=8"], "backend", "torch")
    json.dump(data, open(cache_path(), "w"))  # a choice only the cache can have made
    assert pick(*samples()[0]) == "torch" and pick(*samples()[1]) == "cpu"


def test_cache_folder_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.delenv("BITFAST_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert autotune.cache_dir() == str(tmp_path / "bitfast")
    monkeypatch.setenv("BITFAST_CACHE_DIR", str(tmp_path / "x"))
    assert autotune.cache_dir() == str(tmp_path / "x")


@pytest.mark.parametrize("content", [b"\x00\xff garbage {", b'{"key": {"device": "cpu"}, "entr',  # truncated
                                     b"[1, 2, 3]", b'{"key": {"device": "another machine"}, "entries": {}}',
                                     b'{"key": null, "entries": []}'])
def test_corrupt_or_foreign_cache_file(tuned, content):
    os.makedirs(tuned)
    with open(cache_path(), "wb") as f:
        f.write(content)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        assert pick(*samples()[0]) == "cpu"
    assert json.load(open(cache_path()))["key"] == autotune.cache_key(CPU)  # replaced by a good file


def test_bad_entries_are_measured_again(tuned, monkeypatch):
    pick(*samples()[0])
    data = json.load(open(cache_path()))
    name = "group_norm float32 contiguous cg<=8"
    for bad in ({"backend": "tpu"}, {"backend": 3}, "cpu", {**data["entries"][name], "candidates": ["cpu"]}):
        new_process()
        data["entries"][name] = bad
        json.dump(data, open(cache_path(), "w"))
        assert pick(*samples()[0]) == "cpu"
        assert json.load(open(cache_path()))["entries"][name]["candidates"] == ["cpu", "torch"]


def test_unwritable_cache_folder_still_chooses(tuned, monkeypatch, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("BITFAST_CACHE_DIR", str(blocker / "cache"))
    with pytest.warns(UserWarning, match="cannot write the autotune cache"):
        assert pick(*samples()[0]) == "cpu"
    assert pick(*samples()[0]) == "cpu"  # remembered in the process


def test_excluded_backend_from_cache_warns_once_per_process(tuned, monkeypatch):
    add_backend(monkeypatch, "wrong", WRONG)
    monkeypatch.setitem(autotune.CANDIDATES, "cpu", ("wrong", "cpu"))
    with pytest.warns(UserWarning, match="excluded backend 'wrong'"):
        pick(*samples()[0])
    new_process()
    no_measuring(monkeypatch)
    with pytest.warns(UserWarning, match="excluded backend 'wrong'"):  # a new process is told again, from the file
        pick(*samples()[0])
    autotune._MEMO.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pick(*samples()[0])


LOCK_SCRIPT = """
import pathlib, sys, time
import torch
from bitfast import _backend, autotune
autotune.TUNED = ("cuda", "cpu")
real = autotune.measure
def measure(*a, **k):
    print("MEASURED", flush=True)
    time.sleep(1.0)  # long enough that the other process asks while this one measures
    return real(*a, **k)
autotune.measure = measure
x = torch.randn(2, 64, 8, 8)
d = pathlib.Path(sys.argv[1])
(d / sys.argv[2]).touch()
while len(list(d.iterdir())) < 2:
    time.sleep(0.01)
print("CHOICE", _backend.resolve("group_norm", None, "cpu", (x, 32)))
"""


def test_two_processes_one_measures(tmp_path):
    (tmp_path / "ready").mkdir()
    env = {**os.environ, "BITFAST_CACHE_DIR": str(tmp_path / "cache"), "TRITON_INTERPRET": "0", "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", LOCK_SCRIPT, str(tmp_path / "ready"), str(i)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    stdout = "".join(o[0] for o in outs)
    assert stdout.count("MEASURED") == 1 and stdout.count("CHOICE cpu") == 2, stdout


# ------------------------------------------------------------------------------------------------ compile
def block(x, w, gw, gb):
    y = bitfast.ops.group_norm(x, 4, gw, gb, act="relu")
    y = bitfast.ops.std_conv2d(y, w, padding=1)
    return y.sum() + sum(v.sum() for v in bitfast.ops.weight_standardize_many([w, 2 * w]))


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_compile_fullgraph_cold_and_warm_cache(tuned, monkeypatch, device):
    dev = autotune._indexed(device)
    args = [torch.randn(2, 8, 6, 6), torch.randn(8, 8, 3, 3), torch.randn(8), torch.randn(8)]
    args = [a.to(dev).requires_grad_() for a in args]

    def run():
        torch._dynamo.reset()
        out = torch.compile(block, fullgraph=True, backend="aot_eager")(*args)
        return out, torch.autograd.grad(out, args)

    out, grads = run()  # cold: measured while tracing
    path = autotune.cache_file(dev)[0]
    assert len(json.load(open(path))["entries"]) == 3
    ref = block(*args)
    torch.testing.assert_close(out, ref)
    for g, r in zip(grads, torch.autograd.grad(ref, args)):
        torch.testing.assert_close(g, r)
    new_process()  # warm: read from the file, in which GN now names torch; the graph must call torch's kernel
    no_measuring(monkeypatch)
    data = json.load(open(path))
    data["entries"]["group_norm float32 contiguous cg<=8"]["backend"] = "torch"
    json.dump(data, open(path, "w"))
    calls = []
    monkeypatch.setitem(GN._FWD, "torch", lambda: (lambda *a: calls.append(1) or GN.group_norm_fwd_ref(*a)))
    out2, grads2 = run()
    assert calls, "the compiled graph did not run the cached choice"
    torch.testing.assert_close(out2, out)


# ------------------------------------------------------------------------------------------------ reports
def test_tune_cli_and_info(tuned, monkeypatch, capsys):
    add_backend(monkeypatch, "wrong", WRONG)
    monkeypatch.setitem(autotune.CANDIDATES, "cpu", ("cpu", "torch", "wrong"))
    from bitfast.__main__ import main

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        main(["--tune", "--device", "cpu"])
    out = capsys.readouterr().out.splitlines()
    rows = [line for line in out if line.split()[:1] in (["group_norm"], ["weight_standardize"],
                                                         ["weight_standardize_many"])]
    assert len(rows) == len(autotune.all_classes()) == 39 and all("wrong: " in r for r in rows)
    entries = json.load(open(cache_path()))["entries"]
    assert len(entries) == 39 and all(e["backend"] != "wrong" and "wrong" in e["excluded"] for e in entries.values())
    new_process()
    report = "\n".join(importlib.import_module("bitfast.info").report())
    assert "cached choices for cpu" in report and "group_norm               bfloat16 channels_last cg<=8" in report
    assert "wrong: y" in report
    for bad in ["tpu", "gpu:x"] + ([] if torch.cuda.is_available() else ["cuda"]):
        with pytest.raises(SystemExit):
            main(["--tune", "--device", bad])
    assert "--device" in capsys.readouterr().err


def test_first_use_cost_on_cpu(tuned):
    """Every class a BiT model touches on CPU tensors (4 GN buckets, WS, WS-many), cpu vs torch, from a cold cache.
    Measured ~0.05 s on the 2-core VM (README); the bound only catches gross regressions (a lazy sympy import)."""
    t0 = time.perf_counter()
    for C, S in ((256, 14), (512, 7), (1024, 4), (2048, 2)):
        pick("group_norm", (torch.randn(1, C, S, S), 32))
    w = torch.randn(64, 64, 3, 3)
    pick("weight_standardize", (w, None))
    pick("weight_standardize_many", (w, None))
    assert time.perf_counter() - t0 < 2.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_tunes_and_checks_both_kernels(monkeypatch, tmp_path):
    monkeypatch.setenv("BITFAST_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(autotune, "_MEMO", {})
    monkeypatch.setattr(autotune, "_SEEN", {})
    x = torch.randn(8, 256, 28, 28, device="cuda", dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    name = _backend.resolve("group_norm", None, "cuda", (x, 32))
    (key, e), = autotune._SEEN.items()
    passed = set(e["candidates"]) - set(e["excluded"])
    assert set(e["candidates"]) == {"cuda", "triton"} and name in (passed or {"torch"}), e
    assert set(e["us"]) == (passed if len(passed) > 1 else set()), e
    print("\n".join(autotune.table({key[1]: e})))
