"""Auto backend choice by measurement, on the user's own device (issue 17).

Under auto (no ``backend=``, no ``use_backend()``/``BITFAST_BACKEND``) the first call of an op for a shape class on a
device runs every usable candidate backend once on a small input of that class and checks it, forward and backward,
against a float64 reference by the tests' criterion: err <= 2 * err(torch's own op in the same dtype) + atol. The
ones that pass are timed (forward + backward) on a representative BiT-sized input and the fastest wins. A backend
that fails is excluded, and a warning names the backend, the op, the class and the error (once per process).

Classes are few: group_norm (dtype, memory format, C/G bucket), weight_standardize (dtype, out dtype, memory
format), weight_standardize_many (dtype, out dtype). Choices go to a JSON file per device under
``$BITFAST_CACHE_DIR``, else ``$XDG_CACHE_HOME/bitfast``, else ``~/.cache/bitfast``, keyed by the device name,
driver, torch, triton and bitfast versions and the build of the kernels, so a second process skips the work. Writes
are atomic (temp file + rename); a file lock lets one process measure while the others on the node wait and read.

``BITFAST_AUTOTUNE``: ``1`` (default) tunes CUDA tensors; ``all`` CPU tensors too; ``0`` keeps the static choice
(``_backend.AUTO_CUDA``, ``cpu`` for CPU tensors). CPU tensors are not tuned by default: the cpu backend is the
GUIDE's rule and beat torch's own ops in every CPU case measured (README), Triton runs there only interpreted, and
a choice by timing a loaded CPU could flip between machines and change the last bits of CPU results (the demo).
"""
import contextlib
import hashlib
import importlib
import importlib.util
import json
import math
import os
import re
import tempfile
import time
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import _disable_current_modes

from bitfast import _backend
from bitfast.ops._common import acc_dtype, empty_like_layout, is_channels_last
from bitfast.version import __version__

MODES = {"0": (), "1": ("cuda",), "all": ("cuda", "cpu")}


def parse_mode(value):
    """The device types BITFAST_AUTOTUNE=value tunes; a clear error for anything else."""
    if value not in MODES:
        raise ValueError(f"BITFAST_AUTOTUNE must be one of {sorted(MODES)}, got {value!r}")
    return MODES[value]


TUNED = parse_mode(os.environ.get("BITFAST_AUTOTUNE") or "1")  # device types auto measures on
CANDIDATES = {"cuda": ("cuda", "triton"), "cpu": ("cpu", "torch", "triton")}  # in static-preference order
CG_BUCKETS = (8, 16, 32)  # C/G upper bounds, then one bucket above: BiT-R50 at 224 has C/G 8, 16, 32, 64
_CG, _CG_LAST = [(b, f"cg<={b}") for b in CG_BUCKETS], f"cg>{CG_BUCKETS[-1]}"
CG_REP = {"cg<=8": (8, 56), "cg<=16": (16, 28), "cg<=32": (32, 14), "cg>32": (64, 7)}  # its (C/G, H = W) layer
GN_EPS, WS_EPS = 1e-5, 1e-10
REPS, BUDGET_S, LOCK_WAIT_S = 5, 0.05, 60.0  # timed repetitions, seconds per candidate, seconds to wait for a lock

_MEMO = {}  # (op, device, class) -> backend name: the per-call lookup
_SEEN = {}  # (device, entry name) -> cache entry, of this process (for info())
_FILES = {}  # (device, cache folder) -> (path, key): the key stats files, so once per process
_WARNED = set()


# ------------------------------------------------------------------------------------------------ classes
# Plain Python on tensor metadata, traced by torch.compile (the comparisons specialise symbolic sizes). They return
# dtypes and bools, cheap to hash on every call; label() turns them into the strings of the cache file.
def _gn_class(x, num_groups):
    cg = x.size(1) // num_groups
    for b, name in _CG:
        if cg <= b:
            return (x.dtype, is_channels_last(x), name)
    return (x.dtype, is_channels_last(x), _CG_LAST)


def _ws_class(w, out_dtype):
    return (w.dtype, out_dtype or w.dtype, is_channels_last(w))


def _many_class(w, out_dtype):  # w: the first weight of the list
    return (w.dtype, out_dtype or w.dtype)


def label(cls):
    """A class as strings: ("float32", "channels_last", "cg<=8")."""
    return tuple(("channels_last" if v else "contiguous") if isinstance(v, bool) else
                 str(v).removeprefix("torch.") if isinstance(v, torch.dtype) else v for v in cls)


# ------------------------------------------------------------------------------------------------ cases
# A case holds the inputs of one forward+backward; truth is [(fp64 reference, torch's own op in the dtype)] per
# output of Op.run. Inputs are drawn from a private generator, in float64, then rounded to the class's dtype.
def _op(name):
    return importlib.import_module(f"bitfast.ops.{name}")  # the module: bitfast.ops re-exports functions by the name


def _vjp(y, dy):
    """y.backward(dy) as the backward of a scalar: the same gradients, but torch's Tensor-gradient path imports sympy
    (~1 s) on first use, more than all of tuning."""
    (y * dy).sum().backward()


def _randn(shape, dev, gen):
    return torch.randn(shape, generator=gen, device=dev, dtype=torch.float64)


def _gn_inputs(cls, dev, gen, shape, G):
    x = _randn(shape, dev, gen).to(getattr(torch, cls[0]))
    x = x.contiguous(memory_format=torch.channels_last) if cls[1] == "channels_last" else x
    acc = acc_dtype(x.dtype)  # weight and bias as the op hands them to the kernels
    w = (1 + 0.5 * _randn(shape[1], dev, gen)).to(acc)
    b = (0.5 * _randn(shape[1], dev, gen)).to(acc)
    return [x, w, b, G, _randn(shape, dev, gen)]


def _gn_dy(case):  # the kernels read dy in x's dtype and layout
    case[4] = empty_like_layout(case[0]).copy_(case[4])
    return case


def _gn_check(cls, dev, gen):
    x, w, b, G, dy = case = _gn_inputs(cls, dev, gen, (2, 2 * CG_REP[cls[2]][0], 5, 7), 2)
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, w, b))
    pre = F.group_norm(x64, G, w64, b64, GN_EPS)
    case[4] = dy = dy.masked_fill(pre.detach().abs() < 1e-3, 0.0)  # there the ReLU mask is decided by rounding
    _vjp(pre.relu(), dy)
    xc = x.detach().contiguous().requires_grad_()  # torch's most accurate path (its CPU NHWC one is E[x^2]-E[x]^2)
    try:
        wc, bc = w.clone().requires_grad_(), b.clone().requires_grad_()
        yc = F.group_norm(xc, G, wc, bc, GN_EPS).relu()
    except RuntimeError:  # no mixed-dtype group_norm on this device: params in x's dtype
        wc, bc = w.to(x.dtype).requires_grad_(), b.to(x.dtype).requires_grad_()
        yc = F.group_norm(xc, G, wc, bc, GN_EPS).relu()
    _vjp(yc, dy.to(x.dtype))
    ref = (pre.relu(), x64.grad, w64.grad, b64.grad)
    return _gn_dy(case), list(zip(ref, (yc, xc.grad, wc.grad, bc.grad)))


def _gn_rep(cls, dev, gen):
    cg, s = CG_REP[cls[2]]
    shape, G = ((16, 32 * cg, s, s), 32) if dev.type == "cuda" else ((2, 8 * cg, max(2, s // 4), max(2, s // 4)), 8)
    return _gn_dy(_gn_inputs(cls, dev, gen, shape, G))


def _gn_run(backend, case):
    x, w, b, G, dy = case
    m = _op("group_norm")
    y, mean, rstd = m._FWD[backend]()(x, w, b, G, GN_EPS, True)
    dx, dw, db = m._BWD[backend]()(dy, x, w, b, mean, rstd, G, True)
    return [("y", y, x), ("dx", dx, x), ("dweight", dw, None), ("dbias", db, None)]


def _weight(shape, cls, dev, gen):
    w = _randn(shape, dev, gen) * (0.05 + torch.rand(shape[0], *[1] * (len(shape) - 1), generator=gen, device=dev,
                                                   dtype=torch.float64))
    w = w.to(getattr(torch, cls[0]))
    return w.contiguous(memory_format=torch.channels_last) if len(cls) > 2 and cls[2] == "channels_last" else w


def _ws_truth(w, out, dy):
    """[(fp64 truth, timm-style composite in w's dtype)] for y and dw of one weight; dy fp64."""
    w64 = w.detach().double().requires_grad_()
    r = w64.reshape(w.shape[0], -1)
    mean = r.mean(1, keepdim=True)
    y64 = ((r - mean) / torch.sqrt((r - mean).square().mean(1, keepdim=True) + WS_EPS)).reshape(w.shape)
    _vjp(y64, dy)
    wc = w.detach().clone().requires_grad_()
    yc = F.batch_norm(wc.reshape(1, w.shape[0], -1), None, None, training=True, momentum=0.0, eps=WS_EPS)
    yc = yc.reshape(w.shape).to(out)
    _vjp(yc, dy.to(out))
    return [(y64, yc), (w64.grad, wc.grad)]


def _ws_case(cls, dev, gen, shapes):
    out = getattr(torch, cls[1])
    ws = [_weight(s, cls, dev, gen) for s in shapes]
    dys = [_randn(s, dev, gen) for s in shapes]
    return ws, (None if out == ws[0].dtype else out), dys


def _ws_check(cls, dev, gen):
    (w,), out, (dy,) = _ws_case(cls, dev, gen, [(8, 4, 3, 3)])
    truth = _ws_truth(w, out or w.dtype, dy)
    return (w, out, torch.empty_like(w, dtype=out or w.dtype).copy_(dy)), truth


def _ws_rep(cls, dev, gen):
    (w,), out, (dy,) = _ws_case(cls, dev, gen, [(512, 256, 3, 3) if dev.type == "cuda" else (32, 16, 3, 3)])
    return w, out, torch.empty_like(w, dtype=out or w.dtype).copy_(dy)


def _ws_run(backend, case):
    w, out, dy = case
    m = _op("weight_standardize")
    y, mean, rstd = m._FWD[backend]()(w, WS_EPS, out)
    return [("y", y, w), ("dw", m._BWD[backend]()(dy, w, mean, rstd), w)]


MANY_CHECK = [(8, 4, 3, 3), (6, 3, 1, 1), (4, 2, 3, 3)]
MANY_REP = {"cuda": [(256, 64, 1, 1), (64, 64, 3, 3), (256, 256, 3, 3), (1024, 256, 1, 1), (512, 512, 3, 3),
                     (2048, 512, 1, 1)], "cpu": [(16, 8, 3, 3), (32, 16, 1, 1), (8, 8, 3, 3)]}


def _many_dys(ws, out, dys):
    return ws, out, [torch.empty_like(w, dtype=out or w.dtype).copy_(dy) for w, dy in zip(ws, dys)]


def _many_check(cls, dev, gen):
    ws, out, dys = _ws_case(cls, dev, gen, MANY_CHECK)
    ws[0] = ws[0].contiguous(memory_format=torch.channels_last)  # the list may mix layouts
    truth = [t for w, dy in zip(ws, dys) for t in _ws_truth(w, out or w.dtype, dy)]
    return _many_dys(ws, out, dys), truth


def _many_rep(cls, dev, gen):
    return _many_dys(*_ws_case(cls, dev, gen, MANY_REP[dev.type]))


def _many_run(backend, case):
    ws, out, dys = case
    m = _op("weight_standardize_many")
    ys, mean, rstd = m._FWD[backend]()(ws, WS_EPS, out)
    dws = m._BWD[backend]()(dys, ws, mean, rstd)
    return [o for i, (w, y, dw) in enumerate(zip(ws, ys, dws)) for o in ((f"y[{i}]", y, w), (f"dw[{i}]", dw, w))]


@dataclass(frozen=True)
class Op:
    cls: Callable  # sample -> class: a tuple of dtypes, a bool (channels_last) and a bucket name; label() -> strings
    check: Callable  # (class, device, generator) -> (case, truth)
    rep: Callable  # (class, device, generator) -> case at a representative size, for timing
    run: Callable  # (backend, case) -> [(name, output, tensor whose layout it must have, or None)]
    atol: float  # relative to max(1, |reference|), as in tests/


OPS = {"group_norm": Op(_gn_class, _gn_check, _gn_rep, _gn_run, 1e-5),
       "weight_standardize": Op(_ws_class, _ws_check, _ws_rep, _ws_run, 1e-6),
       "weight_standardize_many": Op(_many_class, _many_check, _many_rep, _many_run, 1e-6)}
TUNE_DTYPES = ("float32", "bfloat16", "float16")
TUNE_WS = (("float32", "float32"), ("float32", "bfloat16"), ("float32", "float16"), ("bfloat16", "bfloat16"),
           ("float16", "float16"))  # (weight, out): fp32 weights under autocast write bf16/fp16


def all_classes():
    """Every (op, class) `python -m bitfast --tune` measures."""
    fmts = ("contiguous", "channels_last")
    return ([("group_norm", (d, f, b)) for d in TUNE_DTYPES for f in fmts for b in CG_REP]
            + [("weight_standardize", p + (f,)) for p in TUNE_WS for f in fmts]
            + [("weight_standardize_many", p) for p in TUNE_WS])


# ------------------------------------------------------------------------------------------------ choosing
def choose(op, sample):
    """The backend auto runs `op` with. sample: (x, num_groups) for group_norm, (w, out_dtype) for the WS ops."""
    return _choice(op, sample[0].device, OPS[op].cls(*sample))


def _choice(op, device, cls):
    name = _MEMO.get((op, device, cls))
    if name is None:
        scls = label(cls)
        entry = _SEEN[(str(device), entry_name(op, scls))] = _lookup_or_tune(op, device, scls)
        name = _MEMO[(op, device, cls)] = entry["backend"]
    return name


# What torch.compiler.assume_constant_result(_choice) does, without importing torch._dynamo (~1 s) with bitfast:
# torch.compile calls _choice while tracing and puts the name in the graph as a constant (no graph break).
# tests/test_autotune.py compiles with fullgraph=True, so a torch that drops this marker fails there.
_choice._dynamo_marked_constant = True


def _candidates(op, device_type, dtype):
    return [b for b in CANDIDATES[device_type] if _usable(b, device_type)
            and not (op == "group_norm" and b == "cuda" and dtype == "float64")]  # CUDA GN kernels: fp32/16/bf16


def _usable(name, device_type):
    try:
        return _backend.usable_why(name, device_type) is None
    except KeyError:  # a name bitfast does not know (a stale cache entry)
        return False


def _lookup_or_tune(op, dev, cls):
    cands = _candidates(op, dev.type, cls[0])
    if not cands:  # nothing to measure: the static choice, which warns about its torch fallback
        return {"backend": _backend._auto(op, dev.type), "static": True}
    path, key = cache_file(dev)
    name = entry_name(op, cls)
    entry = _valid(_read(path, key).get(name), cands)
    if entry is None and dev.type == "cuda" and torch.cuda.is_current_stream_capturing():
        _warn_once(("capture", op, cls), f"bitfast: autotune cannot measure {op} ({' '.join(cls)}) during CUDA graph "
                   "capture; using the static choice (run one step before capturing to tune)")
        return {"backend": _backend._auto(op, dev.type), "static": True}
    if entry is None:
        with _lock(path):  # one process measures; the others wait here, then find its entry
            entries = _read(path, key)
            entry = _valid(entries.get(name), cands)
            if entry is None:
                entry = entries[name] = measure(op, dev, cls, cands)
                _write(path, key, entries)
    _warn_excluded(op, cls, dev, entry)
    return entry


def _valid(entry, cands):
    """A cached entry, if it is well formed and was measured over the backends usable now."""
    ok = (isinstance(entry, dict) and entry.get("candidates") == cands and isinstance(entry.get("excluded"), dict)
          and isinstance(entry.get("us"), dict) and entry.get("backend") in cands + ["torch"])
    return entry if ok else None


def measure(op, dev, cls, cands=None):
    """Check every candidate on a small case, time those that pass, return the cache entry."""
    spec = OPS[op]
    cands = _candidates(op, dev.type, cls[0]) if cands is None else cands
    with _measuring(dev):
        gen = torch.Generator(dev).manual_seed(0)  # private: tuning never moves the user's RNG streams
        case, truth = spec.check(cls, dev, gen)
        excluded = {b: why for b in cands if (why := check(spec, b, case, truth, dev)) is not None}
        passed = [b for b in cands if b not in excluded]
        us = {}
        if len(passed) > 1:
            rep = spec.rep(cls, dev, gen)
            for b in passed:
                us[b] = round(1e6 * time_backend(spec, b, rep, dev, min(us.values(), default=math.inf) / 1e6), 2)
    backend = min(passed, key=us.get) if us else (passed[0] if passed else "torch")
    return {"backend": backend, "candidates": cands, "us": us, "excluded": excluded}


@contextlib.contextmanager
def _measuring(dev):
    """Real kernels on real tensors whatever the caller is inside: no autocast (torch's own op would run in fp32),
    grad on (the reference needs autograd), no inference mode, no tracing/fake dispatch modes."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(_disable_current_modes())
        stack.enter_context(torch.inference_mode(False))
        stack.enter_context(torch.enable_grad())
        stack.enter_context(torch.autocast(dev.type, enabled=False))
        if dev.type == "cuda":
            stack.enter_context(torch.cuda.device(dev))
        yield


def _err(a, ref):
    return (a.detach().double() - ref.detach()).abs().max().item() if a.numel() else 0.0


def check(spec, backend, case, truth, dev):
    """None if `backend` passes the criterion on `case`, else what went wrong (one line)."""
    for t in case[0] if isinstance(case[0], list) else case[:1]:  # NaN blocks the outputs may reuse: unwritten shows
        torch.full((t.numel() + 64,), float("nan"), dtype=t.dtype, device=dev)
    try:
        outs = spec.run(backend, case)
    except Exception as e:  # any failure excludes the backend; the message says which
        return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:300]}"
    for (name, out, like), (ref, own) in zip(outs, truth):
        if out.shape != ref.shape or (like is not None and out.stride() != like.stride()):
            return f"{name}: got shape {tuple(out.shape)} strides {out.stride()}, expected {tuple(ref.shape)}" + (
                f" strides {like.stride()}" if like is not None else "")
        if not torch.isfinite(out).all():
            return f"{name}: non-finite values (unwritten output?)"
        e, eo = _err(out, ref), _err(own, ref)
        atol = spec.atol * max(1.0, ref.abs().max().item())
        if not e <= 2 * eo + atol:
            return f"{name}: max error {e:.3g} > 2 * torch's {eo:.3g} + {atol:.3g}"
    return None


def time_backend(spec, backend, rep, dev, best):
    """Seconds per call of `backend` on the representative case `rep`. Tests replace it with nominal costs: the
    real kernels' timings on a shared 2-core CPU swing enough to flip cpu against torch."""
    return _time(lambda: spec.run(backend, rep), dev, best)


def _time(fn, dev, best):
    """Fastest seconds per call of fn over a few repetitions; stops once fn is far slower than `best` (an
    interpreted Triton kernel: one call of it takes as long as all the rest of the tuning)."""
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    if dev.type == "cuda":
        fn()  # warm-up: Triton compiles for this size here
        sync()
    times, calls, spent = [], 1, 0.0
    while len(times) < REPS:
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        sync()
        dt = time.perf_counter() - t0
        spent += dt
        times.append(dt / calls)
        if min(times) > 10 * best or spent > BUDGET_S:  # 10x: a hiccup of a loaded machine must not decide
            break
        calls = max(1, min(50, int(1e-3 / times[-1])))  # ~1 ms per repetition: launch and sync jitter average out
    return min(times)


def _warn_once(key, msg):
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(msg, stacklevel=3)


def _warn_excluded(op, cls, dev, entry):
    where = f"{op} ({' '.join(cls)}) on {_device_name(dev)}"
    for b, why in entry["excluded"].items():
        _warn_once((op, cls, str(dev), b), f"bitfast: autotune excluded backend {b!r} for {where}: {why}")
    if len(entry["excluded"]) == len(entry["candidates"]):
        _warn_once((op, cls, str(dev)), f"bitfast: no candidate passed the check for {where}; using the slow "
                   "pure-torch backend")


# ------------------------------------------------------------------------------------------------ cache
def cache_dir():
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.environ.get("BITFAST_CACHE_DIR") or os.path.join(base, "bitfast")


def entry_name(op, cls):
    return " ".join((op,) + cls)


def _device_name(dev):
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        import platform

        return platform.processor() or platform.machine() or "cpu"


def _driver(dev):
    if dev.type != "cuda":
        return "-"
    try:
        with open("/proc/driver/nvidia/version") as f:  # "NVRM version: NVIDIA UNIX ... Kernel Module  580.65.06 ..."
            found = re.search(r"\s(\d+\.\d+(?:\.\d+)?)\s", f.readline())
        return found.group(1) if found else "unknown"
    except OSError:
        return f"cuda {torch.version.cuda}"


def _build():
    """Size and mtime of the compiled kernels and the Triton sources: a rebuild of the same version re-measures."""
    compiled = _backend.compiled_why("cpu") is None
    files = [getattr(importlib.import_module("bitfast._C"), "__file__", "")] if compiled else []
    spec = importlib.util.find_spec("bitfast.kernels")
    for d in (spec.submodule_search_locations or []) if spec else []:
        files += sorted(os.path.join(d, n) for n in os.listdir(d) if n.endswith(".py"))
    stats = [(os.path.basename(p), os.stat(p).st_size, os.stat(p).st_mtime_ns) for p in files if os.path.exists(p)]
    return hashlib.sha1(repr(stats).encode()).hexdigest()[:12]


def _triton_version():
    try:
        import triton

        return triton.__version__
    except ImportError:
        return "none"


def cache_key(dev):
    return {"device": _device_name(dev), "driver": _driver(dev), "torch": torch.__version__,
            "triton": _triton_version(), "bitfast": __version__, "build": _build()}


def cache_file(dev):
    """(path, key) of the cache file for device `dev` (a torch.device)."""
    found = _FILES.get((str(dev), cache_dir()))
    if found is None:
        key = cache_key(dev)
        digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        slug = re.sub(r"[^A-Za-z0-9]+", "_", key["device"]).strip("_")[:40]
        found = _FILES[(str(dev), cache_dir())] = (os.path.join(cache_dir(), f"autotune-{slug}-{digest}.json"), key)
    return found


def _read(path, key):
    """The entries of the cache file, or {} when it is missing, unreadable or someone else's."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (FileNotFoundError, NotADirectoryError):
        return {}
    except (OSError, ValueError) as e:  # ValueError: bad JSON or bad UTF-8
        _warn_once(("read", path), f"bitfast: ignoring unreadable autotune cache {path} ({e}); measuring again")
        return {}
    if not isinstance(data, dict) or data.get("key") != key or not isinstance(data.get("entries"), dict):
        return {}  # another version's or program's file: measure again and replace it
    return data["entries"]


def _write(path, key, entries):
    tmp = None
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".autotune-", suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({"key": key, "entries": entries}, f, indent=1, sort_keys=True)
        os.replace(tmp, path)  # atomic: readers see the old file or the new one, never half of one
    except OSError as e:
        _warn_once(("write", path), f"bitfast: cannot write the autotune cache {path} ({e}); choices are kept for "
                   "this process only (set BITFAST_CACHE_DIR to a writable folder)")
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


@contextlib.contextmanager
def _lock(path):
    """An exclusive flock on path + '.lock', waited for up to LOCK_WAIT_S. Without fcntl or a writable folder, or
    after the wait, the block runs unlocked: processes then measure the same thing and the last write wins."""
    try:
        import fcntl

        os.makedirs(os.path.dirname(path), exist_ok=True)
        f = open(path + ".lock", "a")
    except (ImportError, OSError):
        yield
        return
    with f:  # closing the file releases the lock, also when the holder dies
        deadline = time.monotonic() + LOCK_WAIT_S
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError:
                if time.monotonic() > deadline:
                    break
                time.sleep(0.02)
        yield


# ------------------------------------------------------------------------------------------------ reports
def _indexed(device):
    """torch.device(device), with the current GPU's index for a bare "cuda" (as tensors carry)."""
    dev = torch.device(device)
    return torch.device("cuda", torch.cuda.current_device()) if dev.type == "cuda" and dev.index is None else dev


def tune_all(device=None):
    """Measure every class of every op on `device` (default: cuda if there is a GPU, else cpu), replacing cached
    entries. Returns (path, {entry name: entry})."""
    dev = _indexed(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    path, key = cache_file(dev)
    with _lock(path):
        entries = _read(path, key)
        for op, cls in all_classes():
            cands = _candidates(op, dev.type, cls[0])
            if cands:
                entries[entry_name(op, cls)] = _SEEN[(str(dev), entry_name(op, cls))] = measure(op, dev, cls, cands)
        _write(path, key, entries)
    return path, entries


def cached(device):
    """(path, entries) for `device`: the cache file's entries plus those this process holds."""
    dev = _indexed(device)
    path, key = cache_file(dev)
    entries = dict(_read(path, key))
    entries.update({name: e for (d, name), e in _SEEN.items() if d == str(dev) and "us" in e})
    return path, entries


def table(entries):
    """Lines of a table: class, choice, microseconds per forward+backward, excluded backends and why."""
    lines = [f"{'op':24} {'class':34} {'choice':7} {'us per fwd+bwd':28} excluded"]
    order = {entry_name(op, cls): i for i, (op, cls) in enumerate(all_classes())}
    for name in sorted(entries, key=lambda n: (order.get(n, len(order)), n)):
        e = entries[name]
        op, cls = name.split(" ", 1)
        us = "  ".join(f"{b} {t:.4g}" for b, t in e.get("us", {}).items()) or "(one candidate passed)"
        bad = "; ".join(f"{b}: {why}" for b, why in e.get("excluded", {}).items())
        lines.append(f"{op:24} {cls:34} {e.get('backend', '?'):7} {us:28} {bad}")
    return lines
