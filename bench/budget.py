"""Kernel budget for sm_90, computed on a CPU: every number here is PREDICTED (ptxas + a traffic model), not measured.

    python -m bench.budget [OUT_PREFIX]     # -> bench/results/budget-sm90.{json,md} and the tables on stdout
    python -m bench.budget --measure PREFIX # GPU: time each path of PREFIX.json -> PREFIX-measured.{json,md}

Per kernel (CUDA: nvcc -Xptxas -v, flags as setup.py; Triton: compile-only launches through
tests/triton_compile_check.py's stand-in driver, ptxas -v re-run on each kernel's PTX with Triton's own flags):
registers, spill bytes, static + dynamic shared memory, and blocks per SM from them. Per GN layer shape of
BiT-R50x1 at 224 px (derived from bitfast.models), batch 64/128/256, bf16, NCHW and NHWC, per path
(backend x layout x direction): launches per op call, waves of the widest launch on 132 SMs, and the DRAM bytes the
design moves against the minimum (forward 2T: read x, write y; backward 3T: read x, dy, write dx).

Traffic model (one formula, `reread`): a kernel pair that reads a set of X bytes and later re-reads it (NHWC:
moments/bwd_sums then normalize/bwd_dx over one sample chunk; NCHW: one block's two passes over its group, where the
set is the group of every block resident at once) gets the re-read from L2 while its reuse distance fits in
L2_REUSE_BYTES. Under LRU the reuse distance of the element re-read at fraction b of the second pass is X + b*W, W
the bytes the second pass writes over the set (y: X, dx: X/2 when X counts x and dy); the fraction of the re-read
that misses is clamp((X + W - L2) / W, 0, 1) (all of it when X > L2). Workspace writes (partials, sdz/sdzxm,
mean/rstd) count as DRAM writes (dirty lines are written back); their reads come from L2. CUDA NHWC chunks mirror
chunk_samples() in csrc/group_norm.cu (CUDA_CONSTANTS, checked against the source by tests/test_budget.py); Triton
NHWC chunks the same way (kernels/group_norm.py chunk_samples; the model reads each chunk off the launcher's own
grids), and a Triton NCHW group that fits one register tile is read once. Not modelled: occupancy beyond the
threshold, DRAM page effects, the WS kernels' bytes (weights are ~50 MB per step in all).

CUDA specifics: y and dx are written with streaming stores (__stcs, st.global.cs: "evict-first" in L1 and L2, PTX
ISA), so the written lines are evicted before any line of the re-read set and do not count against it: the
re-read of X misses only when X alone exceeds L2_REUSE_BYTES (`reread_streaming`; the GPU stage will show whether
that holds). NCHW keeps the first kNchwCacheBytes (46 KB) of each group's x (bwd: x and dy, half each) in
dynamic shared memory for the output pass; only the rest is re-read, and that 47 KB per block also caps blocks
per SM at 4 (the path's blocks and waves use it).

Predicted fraction of copy bandwidth (`copy_frac`): minimum bytes / copy bandwidth divided by the predicted time
sum over launches of bytes / copy bandwidth * ceil(waves) / waves (an SM-quantized last wave) + LAUNCH_GAP_S per
launch (dependent kernels in one stream drain and refill the GPU) + PARAM_GRADS_S_PER_N per step of param_grads's
serial loop over n (`serial_loop`; CUDA: one slice of n, then the slices). Not priced, so copy_frac is an upper bound: one resident block per SM (no overlap of one
block's reduction with another's loads), the scalar 2-byte loads of NCHW when S % 8 != 0, idle warps when D < 8.
"""
import hashlib
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# The thresholds (one table; a measured GPU run may revise them) and the misses of today's kernels.
THRESHOLDS = {"spill_bytes": 0, "min_threads_per_sm": 512, "max_bytes_ratio": 1.15}  # 512 = 2 blocks of 256
# (kernel or path, metric) -> the predicted value today. The test fails if a value gets worse, if a miss appears
# that is not listed, or if a listed one now meets its threshold (delete it then).
KNOWN_MISSES = {  # predicted on 2026-12-02 from the kernels of 724b061 + balanced NHWC chunks (issue 13 item 2: remove)
}

SM90 = {"sms": 132, "regs": 65536, "smem": 228 * 1024, "smem_per_block_reserved": 1024, "threads": 2048,
        "blocks": 32, "warps": 64}
MODEL = {"l2_reuse_bytes": 40e6,  # of H100's 50 MB L2: what a streaming re-read can count on (an assumption)
         "copy_bytes_per_s": 3.0e12,  # H100 SXM device copy, read + write (~90% of 3.35 TB/s HBM; assumption)
         "launch_gap_s": 2e-6,
         "param_grads_s_per_n": 50e-9}  # its serial loop over n: dependent L2 loads (issue 13's review: 10-20 us at 256)
BATCHES, DTYPE_BYTES, GROUPS = (64, 128, 256), 2, 32  # bf16
# csrc/group_norm.cu host constants mirrored here (the test reads them from the source).
CUDA_CONSTANTS = {"kThreads": 256, "kRowsPerThread": 8, "BITFAST_GN_L2_BYTES": 24 << 20, "BITFAST_GN_PARAM_SLICE": 16,
                  "kNchwCacheBytes": 46 << 10}
NVCC_FLAGS = ["-O3", "--expt-relaxed-constexpr", "-arch=sm_90", "-DBITFAST_WITH_CUDA=1", "-Icsrc"]


# ------------------------------------------------------------------------------------------------ ptxas
def parse_ptxas(log):
    """ptxas -v output -> {mangled name: {regs, spill_st, spill_ld, smem}}."""
    out, name = {}, None
    for line in log.splitlines():
        if m := re.search(r"Compiling entry function '(\S+)'", line):
            name = m.group(1)
            out[name] = {"regs": 0, "spill_st": 0, "spill_ld": 0, "smem": 0}
        elif name and (m := re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)):
            out[name].update(spill_st=int(m.group(1)), spill_ld=int(m.group(2)))
        elif name and (m := re.search(r"Used (\d+) registers", line)):
            out[name]["regs"] = int(m.group(1))
            s = re.search(r"(\d+) bytes smem", line)
            out[name]["smem"] = int(s.group(1)) if s else 0
    return out


def short_name(mangled):
    """Demangled, without namespace and parameters: nhwc_bwd_sums<__nv_bfloat16, 8, true>."""
    full = subprocess.run(["c++filt", mangled], capture_output=True, text=True).stdout.strip()
    full = re.sub(r"^void ", "", full).replace("bitfast::(anonymous namespace)::", "")
    depth = 0
    for i, ch in enumerate(full):  # cut at the parameter list: the first '(' outside template brackets
        depth += (ch == "<") - (ch == ">")
        if ch == "(" and depth == 0:
            return full[:i]
    return full


def nvcc_kernels(src, extra=(), cwd=ROOT):
    """Compile one .cu for sm_90 as setup.py does -> {short name: budget}."""
    nvcc = os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")
    with tempfile.TemporaryDirectory() as tmp:
        r = subprocess.run([nvcc, *NVCC_FLAGS, *extra, "-Xptxas", "-v", "-c", str(src), "-o", f"{tmp}/k.o"],
                           cwd=cwd, capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"nvcc failed on {src}:\n{r.stderr[-3000:]}")
    return {short_name(k): dict(v, threads=256) for k, v in parse_ptxas(r.stderr).items()}


def blocks_per_sm(regs, smem, threads):
    """Resident blocks on one sm_90 SM: registers are allocated per warp in units of 256 (8 per thread), from four
    16K-register partitions; each block also reserves 1 KB of shared memory."""
    warps = -(-threads // 32)
    per_warp = -(-max(regs, 1) * 32 // 256) * 256
    by_regs = 4 * (SM90["regs"] // 4 // per_warp) // warps
    by_smem = SM90["smem"] // (-(-(smem + SM90["smem_per_block_reserved"]) // 128) * 128)
    return min(by_regs, by_smem, SM90["threads"] // threads, SM90["blocks"], SM90["warps"] // warps)


# ------------------------------------------------------------------------------------------------ Triton
def triton_kernels(shapes, weight_shapes):
    """Compile-only launches of the Triton GN/WS launchers on CPU tensors of the model's shapes.
    -> ({kernel key: budget}, {(layout, C, H, N, direction): [(kernel key, grid), ...]})."""
    import importlib.util

    import torch

    spec = importlib.util.spec_from_file_location("tcc", ROOT / "tests" / "triton_compile_check.py")
    tcc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tcc)
    kernels, launches, current = {}, {}, []

    def on_compile(name, grid, k):
        key = f"{name}[w{k.metadata.num_warps}:{hashlib.sha1(k.asm['ptx'].encode()).hexdigest()[:8]}]"
        if key not in kernels:
            kernels[key] = {"name": name, "ptx": k.asm["ptx"], "threads": 32 * k.metadata.num_warps,
                            "dyn_smem": int(k.metadata.shared)}
        current.append((key, int(math.prod(grid))))

    tcc.attach(90, on_compile)
    from bitfast.kernels import group_norm as gn
    from bitfast.kernels import weight_standardize as ws

    for C, H in sorted({(c, h) for c, h, _ in shapes}):
        w, b = torch.zeros(C), torch.zeros(C)
        for N in BATCHES:
            for layout in ("nchw", "nhwc"):
                x = torch.empty(N, C, H, H, dtype=torch.bfloat16)
                x = x.contiguous(memory_format=torch.channels_last) if layout == "nhwc" else x
                current.clear()
                _, mean, rstd = gn.group_norm_fwd(x, w, b, GROUPS, 1e-5, True)
                launches[(layout, C, H, N, "fwd")] = list(current)
                current.clear()
                gn.group_norm_bwd(x, x, w, b, mean, rstd, GROUPS, True)
                launches[(layout, C, H, N, "bwd")] = list(current)
    weights = [torch.empty(s) for s in weight_shapes]  # fp32 weights, bf16 out: autocast training
    current.clear()
    ys, mean, rstd = ws.weight_standardize_many_fwd(weights, 1e-10, torch.bfloat16)
    ws.weight_standardize_many_bwd(ys, weights, mean, rstd)
    launches["ws_many"] = list(current)
    with ThreadPoolExecutor(2) as pool:
        for k, v in zip(kernels, pool.map(_ptxas_triton, [v.pop("ptx") for v in kernels.values()])):
            kernels[k].update(v)
    return kernels, launches


def _ptxas_triton(ptx):
    """Registers/spills of one Triton PTX, with the flags Triton's make_cubin passes to its own ptxas."""
    from triton import knobs

    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "k.ptx").write_text(ptx)
        cmd = [knobs.nvidia.ptxas.path, "-lineinfo", "-v", "--regAllocOptLevel=2", "--gpu-name=sm_90a",  # as Triton
               f"{tmp}/k.ptx", "-o", f"{tmp}/k.o"]
        r = subprocess.run(cmd, capture_output=True, text=True, check=True)
    (v,) = parse_ptxas(r.stderr).values()
    return v


# ------------------------------------------------------------------------------------------------ shapes
def _meta_model():
    import torch

    import bitfast
    from bitfast.models import resnetv2

    with torch.device("meta"), bitfast.use_backend("torch"):
        return resnetv2.create("BiT-M-R50x1")


def model_shapes():
    """([(C, H, count)] of the GroupNorm inputs of BiT-R50x1 at 224 px (hooks on a meta-device forward),
    [its StdConv2d weight shapes])."""
    import torch

    model, seen = _meta_model(), Counter()
    for m in model.modules():
        if isinstance(m, torch.nn.GroupNorm):
            m.register_forward_pre_hook(lambda mod, a: seen.update([(a[0].shape[1], a[0].shape[2])]))
    import bitfast

    with torch.no_grad(), bitfast.use_backend("torch"):
        model(torch.empty(1, 3, 224, 224, device="meta"))
    return sorted((c, h, n) for (c, h), n in seen.items()), [tuple(m.weight.shape) for m in model.std_convs()]


# ------------------------------------------------------------------------------------------------ launches
def cuda_tiles(S, C, V=8):
    """Tiles in csrc/group_norm.cu -> (B row blocks per sample, CB channel tiles)."""
    CV = C // V
    CT = min(CV, 32)
    R = CUDA_CONSTANTS["kRowsPerThread"] * (CUDA_CONSTANTS["kThreads"] // CT)
    return -(-S // R), -(-CV // CT)


def chunk_samples(N, S, C, nbytes):
    """csrc/group_norm.cu chunk_samples: samples whose nbytes-per-element tensors fit the 24 MB L2 budget, balanced
    over the chunks that takes."""
    cap = max(1, min(N, CUDA_CONSTANTS["BITFAST_GN_L2_BYTES"] // (S * C * nbytes)))
    return -(-N // -(-N // cap))


def reread(X, W, l2=None):
    """Fraction of a re-read of X bytes that misses L2 when the second pass writes W bytes (module docstring)."""
    l2 = MODEL["l2_reuse_bytes"] if l2 is None else l2
    return 1.0 if X > l2 else min(1.0, max(0.0, (X + W - l2) / W))


def reread_streaming(X, l2=None):
    """reread() when the second pass writes with streaming (evict-first) stores: only X itself can overflow L2."""
    l2 = MODEL["l2_reuse_bytes"] if l2 is None else l2
    return 1.0 if X > l2 else 0.0


def cuda_launches(layout, C, H, N, direction, blocks):
    """CUDA launches of one op call -> [(kernel, grid, DRAM bytes[, blocks per SM])]; blocks: kernel -> blocks per
    SM from ptxas, overridden in the 4th field where dynamic shared memory allows fewer."""
    S, D, E, G = H * H, C // GROUPS, DTYPE_BYTES, GROUPS
    V = 8 if layout == "nhwc" else math.gcd(S, 8)  # with_vec: 16-byte NHWC packs; NCHW: the widest dividing S
    T = "__nv_bfloat16"
    if layout == "nchw":
        k = f"nchw_{direction}<{T}, {V}, true>"
        sets = 1 if direction == "fwd" else 2  # x, or x and dy
        # nchw_cache_packs(): kNchwCacheBytes for all sets, whole packs; the rest of each group is re-read
        pack = V * E
        cached = min(D * S // V, CUDA_CONSTANTS["kNchwCacheBytes"] // (sets * pack)) * pack  # per tensor
        bps = min(blocks[k], blocks_per_sm(0, 128 + sets * cached, 256))  # (static smem <= 128 B)
        X = min(N * G, bps * SM90["sms"]) * sets * (D * S * E - cached)  # uncached parts of the resident groups
        main = (k, N * G, N * C * S * E * (sets + 1) + N * G * sets * (D * S * E - cached) * reread_streaming(X)
                + 8 * N * G, bps)
        return [main] if direction == "fwd" else [main, *cuda_param_grads(N, C)]
    B, CB = cuda_tiles(S, C)
    out, nb = [], (1 if direction == "fwd" else 2)
    ns_max = chunk_samples(N, S, C, nb * E)
    for n0 in range(0, N, ns_max):
        ns = min(ns_max, N - n0)
        X, part = ns * S * C * E * nb, 8 * ns * B * C
        if direction == "fwd":
            out += [(f"nhwc_moments<{T}, 8>", ns * B * CB, X + part),
                    (f"nhwc_group_stats<{T}>", -(-ns * G // 8), 8 * ns * G),
                    (f"nhwc_normalize<{T}, 8, true>", ns * B * CB, X * (1 + reread_streaming(X)))]
        else:
            out += [(f"nhwc_bwd_sums<{T}, 8, true>", ns * B * CB, X + part),
                    ("nhwc_bwd_group", -(-ns * G // 8), 8 * ns * (C + G)),
                    (f"nhwc_bwd_dx<{T}, 8, true>", ns * B * CB, X * (reread_streaming(X) + 0.5))]
    return out + (cuda_param_grads(N, C) if direction == "bwd" else [])


def cuda_param_grads(N, C):
    """csrc/group_norm.cu param_grads over P = ceil(N / kParamSlice) slices of n, then param_reduce over the slices
    (P > 1); each writes its (P, C) or (C,) dweight and dbias rows."""
    P, cb = -(-N // CUDA_CONSTANTS["BITFAST_GN_PARAM_SLICE"]), -(-C // 256)
    return [("param_grads", cb * P, 8 * P * C)] + ([("param_reduce", cb, 8 * C)] if P > 1 else [])


def serial_loop(kernel, N):
    """Iterations of a kernel's serial loop of dependent L2 loads over n (param_grads's; 0 for the others)."""
    if kernel in ("param_grads", "_param_grads"):  # CUDA: one slice of n (Triton: the same slices, PARAM_SLICE)
        return min(N, CUDA_CONSTANTS["BITFAST_GN_PARAM_SLICE"])
    if kernel in ("param_reduce", "_param_reduce"):  # CUDA: the slices (Triton: _param_grads over the slices)
        return -(-N // CUDA_CONSTANTS["BITFAST_GN_PARAM_SLICE"])
    return N if "param" in kernel else 0


def triton_bytes(layout, C, H, N, direction, calls, kernels):
    """[(kernel, grid, DRAM bytes, blocks per SM)] of the Triton launches of one op call: the same model. NCHW: a
    group that fits one tile (kernels/group_norm.py _nchw_blocks) is read once, from registers; a larger one is
    re-read from L2. NHWC: sample chunks as CUDA's (the launches are the launcher's own; each chunk's ns is read off
    its grid). Outputs are streaming stores in both layouts, so the re-read misses only where the re-read set
    outgrows L2. dweight/dbias: _param_grads over slices of n, then (P > 1) over the slices ("_param_reduce")."""
    from bitfast.kernels import group_norm as gn

    S, D, E, nb = H * H, C // GROUPS, DTYPE_BYTES, (1 if direction == "fwd" else 2)
    X, T = N * C * S * E * nb, N * C * S * E
    br, bc = gn._nhwc_blocks(C)
    NB, NCB = -(-S // br), -(-C // bc)
    out = []
    for key, grid in calls:
        name = kernels[key]["name"]
        ns = grid // (NB * NCB) if name.startswith("_nhwc") and "group" not in name else grid // GROUPS
        Xc = ns * S * C * E * nb  # the chunk's x (and dy)
        if name in ("_nchw_fwd", "_nchw_bwd"):
            if gn._nchw_blocks(D, S, nb * E)[2]:  # ONE: x (and dy) read once
                b = X + T + 8 * N * (GROUPS if direction == "fwd" else C)
            else:  # the groups of all resident programs; y/dx are streaming stores (as CUDA's)
                res = min(grid, kernels[key]["blocks_per_sm"] * SM90["sms"]) * nb * D * S * E
                b = X * (1 + reread_streaming(res)) + T + 8 * N * (GROUPS if direction == "fwd" else C)
        elif name in ("_nhwc_moments", "_nhwc_bwd_sums"):
            b = Xc + 8 * ns * NB * C
        elif name == "_nhwc_normalize":  # y and dx: streaming stores (cache_modifier ".cs"), as CUDA's
            b = Xc * (1 + reread_streaming(Xc))
        elif name == "_nhwc_bwd_dx":
            b = Xc * (reread_streaming(Xc) + 0.5)
        elif name == "_param_grads":  # over P slices of n into (P, C) rows, then (P > 1) a second launch over them
            P = -(-N // gn.PARAM_SLICE)
            name = "_param_reduce" if any(k == "_param_grads" for k, *_ in out) else name
            b = 8 * C * (P if name == "_param_grads" and P > 1 else 1)
        else:  # _nhwc_group_stats, _nhwc_bwd_group: workspace writes only
            b = {"_nhwc_group_stats": 8 * ns * GROUPS, "_nhwc_bwd_group": 8 * ns * (C + GROUPS)}[name]
        out.append((name, grid, b, kernels[key]["blocks_per_sm"]))
    return out


# ------------------------------------------------------------------------------------------------ report
def path_row(backend, layout, direction, C, H, N, count, launches, blocks):
    """One path's budget; launches [(kernel, grid, bytes)], blocks: kernel -> blocks per SM."""
    T = N * C * H * H * DTYPE_BYTES
    need = (2 if direction == "fwd" else 3) * T
    bw, t, waves = MODEL["copy_bytes_per_s"], 0.0, []
    for k, grid, b, *bps in launches:  # bps: a launch's own blocks per SM (CUDA NCHW's shared-memory cache)
        w = grid / ((bps[0] if bps else blocks[k]) * SM90["sms"])
        t += b / bw * math.ceil(w) / w + MODEL["launch_gap_s"] + serial_loop(k, N) * MODEL["param_grads_s_per_n"]
        if "group" not in k and "param" not in k:  # waves of the element-wise tile kernels only
            waves.append(round(w, 2))
    total = sum(l[2] for l in launches)
    return {"backend": backend, "layout": layout, "direction": direction, "C": C, "H": H, "N": N, "layers": count,
            "launches": len(launches), "waves_max": max(waves), "waves_min": min(waves),
            "designed_bytes": int(total), "min_bytes": need, "bytes_ratio": round(total / need, 3),
            "copy_frac": round(need / bw / t, 3), "pred_time_s": t}


def build():
    shapes, weight_shapes = model_shapes()
    src = [ROOT / "csrc" / "group_norm.cu", ROOT / "csrc" / "weight_standardize.cu"]
    with ThreadPoolExecutor(3) as pool:  # the two nvcc runs overlap the Triton compiles
        cu = [pool.submit(nvcc_kernels, s) for s in src]
        tk, tl = triton_kernels(shapes, weight_shapes)
        cuda = {**cu[0].result(), **cu[1].result()}
    for k in list(cuda.values()) + list(tk.values()):
        k["smem"] = k.get("smem", 0) + k.get("dyn_smem", 0)
        k["blocks_per_sm"] = blocks_per_sm(k["regs"], k["smem"], k["threads"])
    cblocks = {n: k["blocks_per_sm"] for n, k in cuda.items()}
    paths, hot = [], {"many_fwd_kernel<float, __nv_bfloat16>", "many_bwd_kernel<float, __nv_bfloat16>"}
    for C, H, count in shapes:
        for N in BATCHES:
            for layout in ("nchw", "nhwc"):
                for d in ("fwd", "bwd"):
                    ls = cuda_launches(layout, C, H, N, d, cblocks)
                    hot |= {l[0] for l in ls}
                    paths.append(path_row("cuda", layout, d, C, H, N, count, ls, cblocks))
                    ls = triton_bytes(layout, C, H, N, d, tl[(layout, C, H, N, d)], tk)
                    tb = {tk[key]["name"]: tk[key]["blocks_per_sm"] for key, _ in tl[(layout, C, H, N, d)]}
                    paths.append(path_row("triton", layout, d, C, H, N, count, ls, tb))
    kernels = [dict(backend="cuda", name=n, hot=n in hot, **k) for n, k in sorted(cuda.items())]
    kernels += [dict(backend="triton", name=k.pop("name"), variant=key, hot=True, **k) for key, k in tk.items()]
    return {"predicted": True, "what": "sm_90 budget from ptxas and a traffic model (bench/budget.py); not measured",
            "device": SM90, "model": MODEL, "thresholds": THRESHOLDS, "shapes": shapes, "kernels": kernels,
            "paths": paths}


def misses(report):
    """{(kernel or path, metric): predicted value} where a hot kernel or a path misses THRESHOLDS (worst case)."""
    out = {}

    def worst(key, value, higher_is_worse):
        old = out.get(key)
        out[key] = value if old is None else (max if higher_is_worse else min)(old, value)

    for k in report["kernels"]:
        if not k["hot"]:
            continue
        name = f"{k['backend']}:{k['name']}"
        if k["spill_st"] + k["spill_ld"] > THRESHOLDS["spill_bytes"]:
            worst((name, "spill_bytes"), k["spill_st"] + k["spill_ld"], True)
        if k["blocks_per_sm"] * k["threads"] < THRESHOLDS["min_threads_per_sm"]:
            worst((name, "min_threads_per_sm"), k["blocks_per_sm"] * k["threads"], False)
    for p in report["paths"]:
        if p["bytes_ratio"] > THRESHOLDS["max_bytes_ratio"]:
            worst((f"{p['backend']} {p['layout']} {p['direction']}", "max_bytes_ratio"), p["bytes_ratio"], True)
    return out


def failures(found, known=None):
    """What the test objects to: a miss not in KNOWN_MISSES, one worse than listed, or a listed one now fixed."""
    known, bad = KNOWN_MISSES if known is None else known, []
    for key, v in sorted(found.items()):
        if key not in known:
            bad.append(f"new miss {key}: {v} (threshold {THRESHOLDS[key[1]]})")
        elif (v < known[key]) if key[1] == "min_threads_per_sm" else (v > known[key] + 1e-9):
            bad.append(f"worse {key}: {v}, known miss {known[key]}")
    bad += [f"known miss {key} now meets its threshold: delete it from KNOWN_MISSES" for key in known
            if key not in found]
    return bad


# ------------------------------------------------------------------------------------------------ output
def _rng(vals, fmt="{}"):
    lo, hi = min(vals), max(vals)
    return fmt.format(lo) if lo == hi else f"{fmt.format(lo)}–{fmt.format(hi)}"


def summary(report):
    """Per path (backend, layout, direction): the README table rows."""
    rows, hot = [], [k for k in report["kernels"] if k["hot"]]
    for backend in ("cuda", "triton"):
        for layout in ("nchw", "nhwc"):
            for d in ("fwd", "bwd"):
                ps = [p for p in report["paths"] if (p["backend"], p["layout"], p["direction"]) == (backend, layout, d)]
                names = _path_kernels(backend, layout, d)
                ks = [k for k in hot if k["backend"] == backend and any(k["name"].startswith(n) for n in names)]
                rows.append([backend, layout, d, _rng([k["regs"] for k in ks]),
                             _rng([k["spill_st"] + k["spill_ld"] for k in ks]),
                             _rng([k["blocks_per_sm"] for k in ks]), _rng([p["launches"] for p in ps]),
                             _rng([p["waves_max"] for p in ps], "{:g}"), _rng([p["waves_min"] for p in ps], "{:g}"), _rng([p["bytes_ratio"] for p in ps], "{:.2f}"),
                             _rng([p["copy_frac"] for p in ps], "{:.2f}"), _model_total(ps, "bytes"),
                             _model_total(ps, "time")])
    return rows


def _model_total(ps, what):
    """Over all GN layers of R50x1 (each shape times its layer count), per batch: designed bytes / minimum, or the
    fraction of copy bandwidth (minimum bytes / copy bandwidth over the predicted time)."""
    out = []
    for N in BATCHES:
        q = [p for p in ps if p["N"] == N]
        need = sum(p["layers"] * p["min_bytes"] for p in q)
        if what == "bytes":
            out.append(sum(p["layers"] * p["designed_bytes"] for p in q) / need)
        else:
            out.append(need / MODEL["copy_bytes_per_s"] / sum(p["layers"] * p["pred_time_s"] for p in q))
    return " / ".join(f"{v:.2f}" for v in out)


def _path_kernels(backend, layout, d):
    """Kernel name prefixes of a path (the ones its launches use)."""
    table = {("cuda", "nchw", "fwd"): ["nchw_fwd<__nv_bfloat16"], ("cuda", "nchw", "bwd"): ["nchw_bwd<__nv_bfloat16", "param_grads", "param_reduce"],
             ("cuda", "nhwc", "fwd"): ["nhwc_moments<__nv_bfloat16", "nhwc_group_stats<__nv_bfloat16", "nhwc_normalize<__nv_bfloat16"],
             ("cuda", "nhwc", "bwd"): ["nhwc_bwd_sums<__nv_bfloat16", "nhwc_bwd_group", "nhwc_bwd_dx<__nv_bfloat16", "param_grads", "param_reduce"],
             ("triton", "nchw", "fwd"): ["_nchw_fwd"], ("triton", "nchw", "bwd"): ["_nchw_bwd", "_param_grads"],
             ("triton", "nhwc", "fwd"): ["_nhwc_moments", "_nhwc_group_stats", "_nhwc_normalize"],
             ("triton", "nhwc", "bwd"): ["_nhwc_bwd_sums", "_nhwc_bwd_group", "_nhwc_bwd_dx", "_param_grads"]}
    return table[(backend, layout, d)]


def _table(head, rows):
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] +
                     ["| " + " | ".join(str(c) for c in r) + " |" for r in rows])


def markdown(report):
    by_name = {}
    for k in report["kernels"]:
        if k["hot"]:  # Triton: several specializations per kernel, summarized
            by_name.setdefault((k["backend"], k["name"]), []).append(k)
    k_rows = [[b, f"`{n}`", len(ks), _rng([k["regs"] for k in ks]), _rng([k["spill_st"] + k["spill_ld"] for k in ks]),
               _rng([k["smem"] for k in ks]), ks[0]["threads"], _rng([k["blocks_per_sm"] for k in ks])]
              for (b, n), ks in by_name.items()]
    p_rows = [[p["backend"], p["layout"], p["direction"], f"{p['C']}×{p['H']}²", p["N"], p["launches"],
               f"{p['waves_max']:g} / {p['waves_min']:g}", f"{p['bytes_ratio']:.2f}", f"{p['copy_frac']:.2f}"]
              for p in report["paths"]]
    miss = [[f"`{m['what']}`", m["metric"], m["value"], THRESHOLDS[m["metric"]], "known" if m["known"] else "NEW"]
            for m in report["misses"]]
    return "\n\n".join([
        "# Kernel budget, sm_90 (PREDICTED from ptxas and a traffic model; nothing here is measured)",
        f"Model: {report['model']}; thresholds: {report['thresholds']}. See bench/budget.py for the traffic model.",
        "## Per path (BiT-R50x1 GN layers at 224 px, bf16, batch 64/128/256)",
        _table(["backend", "layout", "dir", "regs", "spill B", "blocks/SM", "launches", "waves, widest", "waves, narrowest",
                "bytes ÷ min", "copy frac", "R50x1 bytes ÷ min (N=64/128/256)", "R50x1 copy frac"], summary(report)),
        "## Misses of the thresholds", _table(["kernel / path", "metric", "predicted", "threshold", ""], miss),
        "## Hot kernels", _table(["backend", "kernel", "variants", "regs", "spill B", "smem B", "threads", "blocks/SM"], k_rows),
        "## Per shape (waves: widest / narrowest launch on 132 SMs)",
        _table(["backend", "layout", "dir", "C×H²", "N", "launches", "waves", "bytes ÷ min", "copy frac"], p_rows)])


def measure(prefix, device="cuda"):
    """On a GPU: time every path of the report at PREFIX.json (CUDA events, bench/_timing.kernel_ms) and write
    PREFIX-measured.{json,md}: measured ms and GB/s (minimum bytes / time) beside the predicted ms and bytes. The
    files are rewritten after every path, so a run cut off by gpu_check's time limit keeps what it measured."""
    import torch

    import importlib

    from bench import _timing as T

    gn = importlib.import_module("bitfast.ops.group_norm")  # the module: bitfast.ops.group_norm is also the function

    report, copy, rows = json.loads(Path(f"{prefix}.json").read_text()), T.copy_gbps(device), []
    meta = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
            "measured": True, "paths_planned": len(report["paths"])}
    for p in report["paths"]:
        x = torch.randn(p["N"], p["C"], p["H"], p["H"], device=device, dtype=torch.bfloat16)
        x = x.contiguous(memory_format=torch.channels_last) if p["layout"] == "nhwc" else x
        w, b = torch.randn(p["C"], device=device), torch.randn(p["C"], device=device)
        fwd, bwd = gn._FWD[p["backend"]](), gn._BWD[p["backend"]]()
        y, mean, rstd = fwd(x, w, b, GROUPS, 1e-5, True)
        ms = T.kernel_ms((lambda: fwd(x, w, b, GROUPS, 1e-5, True)) if p["direction"] == "fwd" else
                         (lambda: bwd(y, x, w, b, mean, rstd, GROUPS, True)), device).median_ms
        rows.append(dict(p, measured_ms=ms, predicted_ms=p["pred_time_s"] * 1e3, copy_gbps=copy,
                         gbps=T.gbps(p["min_bytes"], ms), measured_copy_frac=T.gbps(p["min_bytes"], ms) / copy))
        md = _save_measured(prefix, meta, rows)
    print(md if rows else "no paths")
    return 0


def _save_measured(prefix, meta, rows):
    Path(f"{prefix}-measured.json").write_text(json.dumps({**meta, "paths": rows}, indent=1) + "\n")
    md = _table(["backend", "layout", "dir", "C×H²", "N", "launches", "bytes ÷ min (pred.)", "ms pred.", "ms meas.",
                 "GB/s (min bytes)", "copy frac pred.", "copy frac meas."],
                [[r["backend"], r["layout"], r["direction"], f"{r['C']}×{r['H']}²", r["N"], r["launches"],
                  r["bytes_ratio"], f"{r['predicted_ms']:.4f}", f"{r['measured_ms']:.4f}", f"{r['gbps']:.0f}",
                  r["copy_frac"], f"{r['measured_copy_frac']:.2f}"] for r in rows])
    Path(f"{prefix}-measured.md").write_text(f"# Budget vs measurement on {meta['device']} "
                                             f"({len(rows)} of {meta['paths_planned']} paths)\n\n{md}\n")
    return md


def main(prefix=None):
    prefix = Path(prefix or ROOT / "bench" / "results" / "budget-sm90")
    report = build()
    found = misses(report)
    report["misses"] = [{"what": w, "metric": m, "value": v, "known": (w, m) in KNOWN_MISSES}
                        for (w, m), v in sorted(found.items())]
    report["failures"] = failures(found)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{prefix}.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    md = markdown(report)
    Path(f"{prefix}.md").write_text(md + "\n")
    print(md)
    print("\n".join(["", f"wrote {prefix}.json, {prefix}.md"] + [f"FAIL: {f}" for f in report["failures"]]))
    return 1 if report["failures"] else 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--measure"]:  # bench/gpu_check.sh's budget stage
        sys.exit(measure(sys.argv[2] if len(sys.argv) > 2 else ROOT / "bench" / "results" / "budget-sm90"))
    sys.exit(main(*sys.argv[1:]))
