"""A/B two builds of bitfast's C++ CPU kernels in one process, calls alternating, for changes of a few percent.

    cp bitfast/_C*.so /tmp/old.so                   # before the change
    ... edit csrc/, python setup.py build_ext --inplace ...
    python -m bench.ab_native /tmp/old.so bitfast/_C*.so [--threads 1] [--reps 300]

Separate processes (or runs minutes apart) on a shared machine differ by more than the change being measured;
alternating calls in one process share clocks, caches and neighbours. Prints, per GroupNorm(+ReLU) shape of
BiT-R50x1 (batch 8 or --batch, fp32, both layouts) and for weight standardization of R50x1's 53 weights, the median over
pairs of time(A) / time(B): above 1 means B is faster. Run it A/A first (one file twice) for the noise floor:
on the 2-core dev VM about 1% for NCHW and small shapes, up to 10% for 256x56x56 channels_last, whose timings are
bimodal (where the outputs land). Run it with the glibc heap kept (MALLOC_TRIM_THRESHOLD_=
2147483647 MALLOC_MMAP_THRESHOLD_=33554432) or page faults swamp the kernels (see bench/conftest.py).
"""
import argparse
import importlib.machinery
import importlib.util
import os
import sys
import time

import torch

GN_SHAPES = [(256, 56), (512, 28), (1024, 14), (2048, 7)]


def load(path, name):
    """Load the extension at `path` as module `name`. RTLD_LOCAL keeps its symbols private, so the second build's
    calls do not bind to the first build's functions."""
    sys.setdlopenflags(os.RTLD_NOW | os.RTLD_LOCAL)
    loader = importlib.machinery.ExtensionFileLoader(name, path)
    module = importlib.util.module_from_spec(importlib.util.spec_from_file_location(name, path, loader=loader))
    loader.exec_module(module)
    return module


def _timed(f):
    t0 = time.perf_counter()
    f()
    return time.perf_counter() - t0


def ratio(fa, fb, reps):
    """Median over `reps` back-to-back pairs of time(fa) / time(fb), after a warm-up. The order flips every pair:
    the second call of a pair inherits the first one's warm caches and freed buffers (worth up to 14% here)."""
    for _ in range(5):
        fa(), fb()
    r = []
    for i in range(reps):
        if i % 2:
            tb, ta = _timed(fb), _timed(fa)
        else:
            ta, tb = _timed(fa), _timed(fb)
        r.append(ta / tb)
    return sorted(r)[reps // 2]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("a", help="build A (e.g. the old _C .so)")
    p.add_argument("b", help="build B (e.g. the new _C .so)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--reps", type=int, default=300, help="pairs per measurement (a third of it for 256x56)")
    p.add_argument("--batch", type=int, default=8, help="GroupNorm batch (NHWC runs in cache-sized sample chunks "
                   "when batch < 2 x threads)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    A, B = load(args.a, "bitfast_ab_a._C"), load(args.b, "bitfast_ab_b._C")
    print(f"time(A) / time(B), median of pairs; > 1: B faster ({args.threads} thread(s), batch {args.batch})")
    for C, H in GN_SHAPES:
        for cl in (False, True):
            x = torch.randn(args.batch, C, H, H)
            x = x.contiguous(memory_format=torch.channels_last) if cl else x
            dy, w, b = torch.randn_like(x), torch.randn(C), torch.randn(C)
            _, mean, rstd = A.group_norm_fwd(x, w, b, 32, 1e-5, True)
            reps = args.reps // 3 if C * H * H > 500_000 else args.reps
            f = ratio(lambda: A.group_norm_fwd(x, w, b, 32, 1e-5, True),
                      lambda: B.group_norm_fwd(x, w, b, 32, 1e-5, True), reps)
            g = ratio(lambda: A.group_norm_bwd(dy, x, w, b, mean, rstd, 32, True),
                      lambda: B.group_norm_bwd(dy, x, w, b, mean, rstd, 32, True), reps)
            print(f"group_norm {C}x{H}x{H} {'channels_last' if cl else 'nchw':>13}: fwd {f:.3f}  bwd {g:.3f}")
    from bench.test_weight_standardize import bit_convs

    ws = [torch.randn(shape) for shape, *_ in bit_convs("R50x1")]
    ys, mean, rstd = A.weight_standardize_many_fwd(ws, 1e-10, None)
    dys = [torch.randn_like(y) for y in ys]
    f = ratio(lambda: A.weight_standardize_many_fwd(ws, 1e-10, None),
              lambda: B.weight_standardize_many_fwd(ws, 1e-10, None), max(3, args.reps // 30))
    g = ratio(lambda: A.weight_standardize_many_bwd(dys, ws, mean, rstd),
              lambda: B.weight_standardize_many_bwd(dys, ws, mean, rstd), max(3, args.reps // 30))
    print(f"weight_standardize_many R50x1 (53 weights): fwd {f:.3f}  bwd {g:.3f}")


if __name__ == "__main__":
    main()
