"""Model-level benchmarks: BiT ResNet-v2 train steps (forward + backward + SGD) and inference, in images/s.

Every setting (model, task, eager/compile, precision, layout) is one test. Inside it, all candidates are built
side by side and timed alternately (see _timing.alternate), so they share the process, the GPU clocks and the
input batch, which is synthetic and resident on the device:

    norm x conv   GN+WS, GN+plain, BN+WS, BN+plain (paper Table 4/5, same topology and parameter count)
    impl          bitfast   : bitfast's kernels (auto backend: cuda/triton on a GPU, C++ on the CPU)
                  torch     : the same modules pinned to bitfast's pure-torch reference backend
                  composite : the timm-style composite a user would otherwise write: torch's group_norm then a
                              separate ReLU, and WS recomputed with F.batch_norm on the weight every call
                  nn        : BN+plain has no bitfast op: it is the plain torch.nn BN ResNet baseline

torch.compile settings use bitfast and composite only (the pure-torch reference is an opaque custom op there).
On a GPU: R50x1 at 224, bf16 autocast, channels_last and NCHW, eager and compile, plus peak memory per variant
and the largest batch that fits; R101x3 / R152x4 headline candidates where memory allows. On the CPU (quick
mode): bit_tiny at 64 px, fp32 NCHW, eager; GPU-only cases skip with a reason.
"""
import gc
import math
import time
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bitfast.nn as bnn
from bench import _timing as T
from bitfast.models import create

R50 = "resnetv2_50x1_bit"
VARIANTS = (("gn", "ws"), ("gn", "plain"), ("bn", "ws"), ("bn", "plain"))
HEADLINE = (("gn", "ws", "bitfast"), ("gn", "ws", "composite"), ("bn", "plain", "nn"))
NUM_CLASSES = 1000
pytestmark = pytest.mark.usefixtures("cpu_threads")
CAP_BATCH = 2048  # R50 at 224: batch 2048 keeps the largest activation (N*256*56*56) below 2**31 elements


# ------------------------------------------------------------------------------ timm-style composite baseline
class CompositeGroupNormAct(nn.GroupNorm):
    """torch's group_norm then a separate ReLU; under autocast torch runs group_norm in fp32."""

    def forward(self, x):
        y = F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        return F.relu(y, inplace=True) if getattr(self, "act", None) == "relu" else y


class CompositeStdConv2d(nn.Conv2d):
    """WS the timm way: F.batch_norm over each output channel's (Cin*kh*kw) weights, recomputed every call."""

    def forward(self, x):
        w = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None, training=True, momentum=0.0,
                         eps=self.eps).reshape_as(self.weight)
        return self._conv_forward(x, w, self.bias)


def set_impl(model, impl):
    """Make `model` (built with bitfast modules) run as `impl`: bitfast, torch, composite or nn."""
    for m in model.modules():
        if impl == "torch" and isinstance(m, (bnn.GroupNorm, bnn.StdConv2d)):
            m.backend = "torch"  # a module attribute, so torch.compile specializes on it
        elif impl == "composite" and isinstance(m, bnn.GroupNorm):
            m.__class__ = CompositeGroupNormAct  # swap the class: same parameters, eps and act, no copies
        elif impl == "composite" and isinstance(m, bnn.StdConv2d):
            m.__class__ = CompositeStdConv2d
    return model


# ---------------------------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class Setting:
    model: str
    task: str  # "train" (forward + backward + SGD step) or "infer"
    mode: str  # "eager" or "compile"
    precision: str  # "bf16" (autocast) or "fp32"
    layout: str  # "channels_last" or "nchw"
    res: int
    batch: int
    gpu: bool  # a GPU case (skipped on the CPU) or a CPU case (skipped on a GPU)
    headline_only: bool = False

    @property
    def id(self):
        return f"{self.model}-{self.task}-{self.mode}-{self.precision}-{self.layout}"


def configs(mode, headline_only=False):
    """(norm, conv, impl) candidates of one setting; BN+plain once, as it has no bitfast op."""
    if headline_only:
        return list(HEADLINE)
    impls = ("bitfast", "torch", "composite") if mode == "eager" else ("bitfast", "composite")
    return [(n, c, i) for n, c in VARIANTS for i in (("nn",) if (n, c) == ("bn", "plain") else impls)]


def label(cfg):
    return "-".join(cfg)


def _settings():
    q = T.QUICK
    out = [Setting(R50, task, mode, "bf16", layout, 224, (32 if q else 128) * (1 if task == "train" else 2), True)
           for mode in ("eager", "compile") for task in ("train", "infer") for layout in ("channels_last", "nchw")]
    out += [Setting("resnetv2_101x3_bit", "train", "eager", "bf16", "channels_last", 224, 8 if q else 32, True, True),
            Setting("resnetv2_152x4_bit", "train", "eager", "bf16", "channels_last", 224, 4 if q else 16, True, True)]
    small, res, b = ("bit_tiny", 32, 4) if q else ("bit_small", 128, 16)
    out += [Setting(small, task, "eager", "fp32", "nchw", res, b * (1 if task == "train" else 2), False)
            for task in ("train", "infer")]
    return out


SETTINGS = _settings()


def skip_reason(s):
    if s.gpu and not T.ON_GPU:
        if s.mode == "compile":
            return "torch.compile is benchmarked on a GPU only: compiling is too slow for a 2-core CPU"
        return "needs a CUDA GPU (bf16 autocast, channels_last/NCHW, BiT sizes)"
    if not s.gpu and T.ON_GPU:
        return "CPU case (fp32, small model); the GPU runs the R50x1 cases"
    return None


# ------------------------------------------------------------------------------------------ build and step
def build(cfg, s, device=T.DEVICE):
    """-> (model, callable, optimizer or None) for one candidate, on `device`, in the setting's layout."""
    norm, conv, impl = cfg
    torch.manual_seed(0)  # every impl of one norm x conv starts from the same weights
    with torch.device(device):  # allocate parameters on the device directly (R152x4: 0.9 G parameters)
        model = create(s.model, num_classes=NUM_CLASSES, norm=norm, conv=conv, zero_head=False)
    set_impl(model, impl)
    if s.layout == "channels_last":
        model = model.to(memory_format=torch.channels_last)
    model.train(s.task == "train")
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9) if s.task == "train" else None
    fn = torch.compile(model) if s.mode == "compile" else model
    return model, fn, opt


def make_data(s, batch=None, res=None, device=T.DEVICE):
    batch, res = batch or s.batch, res or s.res
    x = torch.randn(batch, 3, res, res, device=device).clamp_(-1, 1)  # BiT input range
    if s.layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    return x, torch.randint(0, NUM_CLASSES, (batch,), device=device)


def make_step(fn, opt, x, y, s):
    amp = dict(device_type=x.device.type, dtype=torch.bfloat16, enabled=s.precision == "bf16")
    if s.task == "train":
        def step():
            with torch.autocast(**amp):
                loss = F.cross_entropy(fn(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss.detach()
    else:
        def step():
            with torch.inference_mode(), torch.autocast(**amp):
                return fn(x)
    return step


def state_bytes(model, opt):
    ts = list(model.parameters()) + list(model.buffers())
    if opt is not None:
        ts += [v for st in opt.state.values() for v in st.values() if torch.is_tensor(v)]
    return sum(t.numel() * t.element_size() for t in ts)


def peak_mem(step, model, opt, x, y):
    """Bytes one candidate needs alone: its weights, buffers and optimizer state, the batch, and the peak of
    one step's transient memory (activations, gradients, workspaces). GPU only (None on the CPU)."""
    if x.device.type != "cuda":
        return None
    T.sync(x.device)
    torch.cuda.reset_peak_memory_stats(x.device)
    base = torch.cuda.memory_allocated(x.device)
    step()
    T.sync(x.device)
    transient = torch.cuda.max_memory_allocated(x.device) - base
    return transient + state_bytes(model, opt) + x.nbytes + y.nbytes


def is_oom(e):
    msg = str(e)
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in msg or "ALLOC_FAILED" in msg


def free_memory():
    gc.collect()
    if T.ON_GPU:
        torch.cuda.empty_cache()


def raise_compile_limits():
    """Every candidate is its own nn.Module instance: let dynamo keep a graph for each instead of falling back."""
    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), 256))


def timing_plan(s):
    """(warmup calls, rounds, calls per sample)."""
    if not T.ON_GPU:
        return 1, 5, 1
    return (3, 3, 2) if T.QUICK else (3, 7, 3)


def run_setting(s, cfgs, batch=None, res=None, built=None):
    """Build (or reuse `built`), warm up, measure peak memory, time alternately. -> (records, outputs, built)."""
    built = built if built is not None else {}
    batch, res = batch or s.batch, res or s.res
    x, y = make_data(s, batch, res)
    warmup, rounds, inner = timing_plan(s)
    steps, extra, records, outs = {}, {}, [], {}
    for cfg in cfgs:
        name = label(cfg)
        try:
            if name not in built:
                built[name] = build(cfg, s)
            model, fn, opt = built[name]
            step = make_step(fn, opt, x, y, s)
            t0 = time.perf_counter()
            step()  # first call: compiles under torch.compile, allocates optimizer state
            T.sync()
            extra[name] = {"first_call_s": round(time.perf_counter() - t0, 3)}
            extra[name]["peak_mem_bytes"] = peak_mem(step, model, opt, x, y)
            steps[name] = step
        except RuntimeError as e:
            if not (T.ON_GPU and is_oom(e)):
                raise
            steps.pop(name, None)
        if name not in steps:  # out of memory: free it outside the except block (its traceback holds tensors)
            built.pop(name, None)
            model = fn = opt = step = None  # noqa: F841 (drop the last references before freeing)
            free_memory()
            records.append(T.record("models", f"{s.id}/{name}", params=_params(s, cfg, batch, res),
                                    skipped=f"out of memory at batch {batch}"))
    stats = T.alternate(steps, warmup=warmup - 1, rounds=rounds, inner=inner) if steps else {}
    for cfg in cfgs:
        name = label(cfg)
        if name in stats:
            outs[name] = steps[name]()
            st = stats[name]
            records.append(T.record("models", f"{s.id}/{name}", st, params=_params(s, cfg, batch, res),
                                    img_per_s=batch / (st.median_ms * 1e-3), **extra[name]))
    return records, outs, built


def _params(s, cfg, batch, res):
    return dict(model=s.model, task=s.task, mode=s.mode, precision=s.precision, layout=s.layout, res=res,
                batch=batch, norm=cfg[0], conv=cfg[1], impl=cfg[2])


def check_measured(records, outs):
    """Each measured candidate ran: positive finite throughput, finite outputs/losses."""
    for r in records:
        if "skipped" not in r:
            assert r["median_ms"] > 0 and math.isfinite(r["img_per_s"]) and r["img_per_s"] > 0, r
    for name, out in outs.items():
        assert torch.isfinite(out.float()).all(), f"{name}: non-finite output"


def print_table(records, ref="bn-plain-nn"):
    base = {r["name"].rsplit("/", 1)[0]: r["img_per_s"] for r in records if r["name"].endswith(ref) and "img_per_s" in r}
    for r in records:
        if "img_per_s" in r:
            ratio = r["img_per_s"] / base.get(r["name"].rsplit("/", 1)[0], float("nan"))
            print(f"{r['name']:<70} {r['img_per_s']:10.1f} img/s  IQR {_iqr_pct(r):5.1f}%  x{ratio:.2f} vs BN+plain")
        else:
            print(f"{r['name']:<70} skipped: {r['skipped']}")


def _iqr_pct(r):
    return 100.0 * (r["q3_ms"] - r["q1_ms"]) / r["median_ms"]


# ------------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("s", SETTINGS, ids=[s.id for s in SETTINGS])
def test_throughput(s):
    why = skip_reason(s)
    if why:
        pytest.skip(why)
    torch.backends.cudnn.benchmark = True
    if s.mode == "compile":
        torch._dynamo.reset()
        raise_compile_limits()
    records, outs, built = run_setting(s, configs(s.mode, s.headline_only))
    del built
    free_memory()
    T.write_records(records)
    print_table(records)
    check_measured(records, outs)
    if not outs:
        pytest.skip(f"no candidate fits at batch {s.batch}")
    for cfg in configs(s.mode, s.headline_only):  # on the CPU and for R50x1 every candidate must have run
        assert label(cfg) in outs or s.headline_only, f"{label(cfg)} did not run"


def largest_batch(fits, start=32, cap=CAP_BATCH):
    """Largest batch b <= cap with fits(b), assuming fits is monotone: doubling, then bisection to ~1/16.
    -> (batch, capped); batch 0 if even `start` does not fit."""
    if start < 1 or cap < start:
        raise ValueError(f"need 1 <= start <= cap, got start={start}, cap={cap}")
    ok, b = 0, start
    while b <= cap and fits(b):
        ok, b = b, b * 2
    bad = b
    if b > cap:  # every doubling fitted: try the cap itself
        if ok == cap or fits(cap):
            return cap, True
        bad = cap
    while bad - ok > max(1, ok // 16):  # invariant: ok fits (or is 0), bad does not
        mid = (ok + bad) // 2
        ok, bad = (mid, bad) if fits(mid) else (ok, mid)
    return ok, False


def test_largest_batch_search():
    """The search the GPU test uses, against a random hidden limit (runs everywhere, instantly)."""
    for _ in range(50):
        limit = int(torch.randint(1, 5000, ()).item())
        calls = []
        b, capped = largest_batch(lambda n: calls.append(n) or n <= limit, start=32, cap=2048)
        if limit >= 2048:
            assert (b, capped) == (2048, True)
        else:
            assert not capped and b <= limit and limit - b <= max(1, b // 16), (limit, b)
        assert len(calls) < 30


MAX_BATCH = [("gn", "ws", "bitfast"), ("gn", "plain", "bitfast"), ("bn", "ws", "bitfast"), ("bn", "plain", "nn"),
             ("gn", "ws", "composite")]


@pytest.mark.parametrize("cfg", MAX_BATCH, ids=[label(c) for c in MAX_BATCH])
def test_max_batch(cfg):
    """Largest R50x1 train batch at 224 (bf16, channels_last, eager) that fits on the GPU, per candidate."""
    if not T.ON_GPU:
        pytest.skip("memory limits are measured on a GPU only (CPU memory is shared and swaps)")
    torch.backends.cudnn.benchmark = True
    s = Setting(R50, "train", "eager", "bf16", "channels_last", 224, 0, True)
    model, fn, opt = build(cfg, s)

    def two_steps(b):
        x, y = make_data(s, batch=b)
        try:
            step = make_step(fn, opt, x, y, s)
            step(), step()
            T.sync()
            return True
        except RuntimeError as e:
            if not is_oom(e):
                raise
            opt.zero_grad(set_to_none=True)
            return False

    def fits(b):
        ok = two_steps(b)
        free_memory()  # after two_steps returned: its batch, activations and traceback are gone
        return ok

    best, capped = largest_batch(fits, start=32 if T.QUICK else 128, cap=256 if T.QUICK else CAP_BATCH)
    total = torch.cuda.get_device_properties(T.DEVICE).total_memory
    T.write_records([T.record("max_batch", f"{R50}-224/{label(cfg)}", params=_params(s, cfg, best, 224),
                              max_batch=best, capped=capped, total_mem_bytes=total)])
    print(f"{label(cfg)}: largest batch {best}{' (cap)' if capped else ''}")
    assert best > 0, f"{label(cfg)}: not even the smallest batch fits"
