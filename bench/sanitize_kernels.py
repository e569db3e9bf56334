"""Call every CUDA kernel of bitfast once, small, for compute-sanitizer (bench/gpu_check.sh, stage `sanitize`):

    compute-sanitizer --tool memcheck  --error-exitcode 1 python bench/sanitize_kernels.py
    compute-sanitizer --tool racecheck --error-exitcode 1 python bench/sanitize_kernels.py

It covers on the device what the CPU emulation (csrc/emu, ctest) cannot: real memory ordering, lockstep warps and
the device's own bounds checks. Every launcher: GroupNorm(+ReLU) forward and backward, NCHW and NHWC, vector and
scalar loads, more than one NHWC chunk; fp32, fp16, bf16; weight standardization single and many (an (8, 0, 3, 3)
weight in the list), with out_dtype. `--device cpu --backend cpu` runs the same calls on the CPU (a smoke test of
this script). Exit code 0 when every call returned finite outputs.
"""
import argparse
import sys

import torch

import bitfast


def gn_calls(device, backend):
    # (N, C, H, W, G, channels_last); the last has 2 NHWC chunks (x of one sample over half the 24 MB chunk)
    shapes = [(2, 64, 8, 8, 32, False), (2, 64, 7, 7, 32, False), (2, 64, 8, 8, 32, True), (3, 24, 13, 17, 6, True),
              (1, 16, 1, 1, 16, True), (2, 2048, 56, 56, 32, True)]
    for N, C, H, W, G, cl in shapes:
        for dt in (torch.float32, torch.float16, torch.bfloat16):
            if C * H * W > 1 << 20 and (dt != torch.bfloat16 or device == "cpu"):
                continue  # the big chunked case once, in bf16 on the GPU
            x = torch.randn(N, C, H, W, device=device, dtype=dt)
            x = x.contiguous(memory_format=torch.channels_last) if cl else x
            x.requires_grad_()
            w = torch.randn(C, device=device, requires_grad=True)
            b = torch.randn(C, device=device, requires_grad=True)
            y = bitfast.ops.group_norm(x, G, w, b, act="relu", backend=backend)
            y.float().square().sum().backward()
            yield f"group_norm {tuple(x.shape)} {dt} {'nhwc' if cl else 'nchw'}", (y, x.grad, w.grad, b.grad)


def ws_calls(device, backend):
    for dt, out in ((torch.float32, None), (torch.float32, torch.bfloat16), (torch.float16, None)):
        ws = [torch.randn(s, device=device, dtype=dt, requires_grad=True)
              for s in ((64, 3, 7, 7), (8, 0, 3, 3), (256, 64, 1, 1), (128, 128, 3, 3))]
        ys = bitfast.ops.weight_standardize_many(ws, 1e-10, out_dtype=out, backend=backend)
        sum(y.float().square().sum() for y in ys).backward()
        yield f"weight_standardize_many {dt}->{out}", tuple(ys) + tuple(w.grad for w in ws)
        w = torch.randn(64, 32, 3, 3, device=device, dtype=dt, requires_grad=True)
        y = bitfast.ops.weight_standardize(w, 1e-10, out_dtype=out, backend=backend)
        y.float().square().sum().backward()
        yield f"weight_standardize {dt}->{out}", (y, w.grad)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--backend", default="cuda")
    a = p.parse_args(argv)
    bad = 0
    for name, outs in list(gn_calls(a.device, a.backend)) + list(ws_calls(a.device, a.backend)):
        ok = all(t is None or bool(torch.isfinite(t.float()).all()) for t in outs)
        bad += not ok
        print(f"{'ok' if ok else 'FAIL'}: {name}", flush=True)
    if a.device == "cuda":
        torch.cuda.synchronize()
    print(f"{bad} failures")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
