"""Compile every Triton kernel of bitfast to a real cubin for an NVIDIA arch, on a machine without a GPU.

    python tests/triton_compile_check.py 90       # sm_90 (H100/H200); also 80 (A100)

The interpreter (TRITON_INTERPRET=1, how the CPU tests run the kernels) executes kernels as numpy and accepts code
that the real compiler rejects (types, constexpr use, layouts). This runs the host wrappers of kernels/ on CPU
tensors of BiT-like shapes with a stand-in driver that reports a CUDA target, and every launch only compiles
(JITFunction.run with warmup=True): ptxas from the triton wheel must produce a cubin for each specialization. No
kernel runs, so outputs are garbage; what can be checked is in the PTX (inspect(): correctly rounded fp32 division,
fp64 eps, round-to-nearest bf16/fp16 stores). Prints one line per compiled kernel; exits 2 if the harness cannot
attach to this Triton version, 1 if a kernel fails to compile or its PTX shows one of those faults.
"""
import os
import sys
import traceback

os.environ.pop("TRITON_INTERPRET", None)  # must be unset before triton decorates the kernels

import torch  # noqa: E402


def attach(arch, on_compile=None):
    """Point Triton at a fake CUDA device of compute capability `arch` and make launches compile-only.
    -> list that collects (kernel name, cubin bytes) per compile. on_compile(name, grid, compiled kernel), if given,
    sees every launch (bench/budget.py reads registers and shared memory from it)."""
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    class CompileOnlyDriver:  # what JITFunction.run asks of the active driver before it would launch
        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_current_target(self):
            return GPUTarget("cuda", arch, 32)

        def get_active_torch_device(self):
            return torch.device("cpu")

    driver.set_active(CompileOnlyDriver())
    compiled, run = [], JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        kernel = run(self, *args, grid=grid, warmup=True, **kwargs)
        bound = dict(zip(self.arg_names, args), **kwargs)
        compiled.append((self.fn.__name__, len(kernel.asm["cubin"])))
        findings.extend(inspect(self.fn.__name__, bound, kernel.asm["ptx"]))
        if on_compile is not None:
            on_compile(self.fn.__name__, grid, kernel)
        return kernel

    JITFunction.run = compile_only
    return compiled


findings = []  # what inspect() objected to, over all compiles


def inspect(name, bound, ptx):
    """Numerics visible in the PTX of one specialization -> list of findings (empty = fine):
    - fp32 divisions and reciprocals are correctly rounded (div.rn / rcp.rn), never the approximate div.full /
      div.approx / rcp.approx that `/` lowers to: the kernels promise parity with the C++/CUDA backends;
    - fp64 statistics (ACC = fp64) never take eps as a Python float, which Triton passes as fp32;
    - a bf16 or fp16 kernel converts to its storage type with round-to-nearest (cvt.rn), never truncation;
    - the forward's ReLU keeps NaN (the interpreter's numpy maximum keeps it too, so only the PTX shows this)."""
    import re

    import triton.language as tl

    out = [f"{name}: approximate fp32 division ({op})" for op in sorted(set(re.findall(
        r"\b(div\.full\.f32|div\.approx(?:\.ftz)?\.f32|rcp\.approx(?:\.ftz)?\.f32)", ptx)))]
    if bound.get("ACC") == tl.float64 and isinstance(bound.get("eps"), float):
        out.append(f"{name}: fp64 statistics with eps passed as a float (rounded to fp32)")
    if name in ("_nchw_fwd", "_nhwc_normalize") and re.search(r"\bmax(\.ftz)?\.f32", ptx):
        out.append(f"{name}: ReLU through max.f32, which turns NaN into 0 (torch.relu keeps NaN)")
    for ty in ("bf16", "f16"):
        if re.search(rf"cvt\.(rz|rm|rp)[a-z.]*\.{ty}(x2)?\.f32", ptx):
            out.append(f"{name}: a non-round-to-nearest conversion to {ty}")
    return out


def exercise():
    """Call every host wrapper over the dtypes, layouts and block-size regimes the ops use."""
    from bitfast.kernels import group_norm as gn
    from bitfast.kernels import weight_standardize as ws

    for C, H in ((64, 12), (256, 56), (2048, 7)):  # BiT: C/G from 2 to 64, short and long rows
        for dt in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
            for cl in (False, True):
                x = torch.randn(2, C, H, H).to(dt)
                x = x.contiguous(memory_format=torch.channels_last) if cl else x
                acc = torch.float64 if dt == torch.float64 else torch.float32
                affine = [(torch.randn(C, dtype=acc), torch.randn(C, dtype=acc))]
                for w, b in affine + ([(None, None)] if dt == torch.float32 else []):  # no-affine: one dtype
                    y, mean, rstd = gn.group_norm_fwd(x, w, b, 32, 1e-5, w is not None)
                    gn.group_norm_bwd(torch.randn_like(x), x, w, b, mean, rstd, 32, w is not None)
    for dt, out in ((torch.float32, None), (torch.float32, torch.bfloat16), (torch.float64, None),
                    (torch.bfloat16, torch.float16)):
        weights = [torch.randn(s).to(dt) for s in ((64, 3, 7, 7), (256, 64, 1, 1), (512, 512, 3, 3))]
        y, mean, rstd = ws.weight_standardize_fwd(weights[0], 1e-10, out)
        ws.weight_standardize_bwd(torch.randn_like(y), weights[0], mean, rstd)
        ys, mean, rstd = ws.weight_standardize_many_fwd(weights, 1e-10, out)
        ws.weight_standardize_many_bwd([torch.randn_like(y) for y in ys], weights, mean, rstd)


def main(arch):
    try:
        compiled = attach(arch)
    except Exception:  # this Triton's internals moved: the check itself needs updating
        traceback.print_exc()
        print(f"cannot attach the compile-only driver to triton (sm_{arch})")
        return 2
    try:
        exercise()
    except Exception:
        traceback.print_exc()
        print(f"FAILED: a Triton kernel did not compile for sm_{arch} (after {len(compiled)} compiles)")
        return 1
    if findings:
        print("FAILED: numerics found in the PTX:\n  " + "\n  ".join(sorted(set(findings))))
        return 1
    names = sorted({n for n, _ in compiled})
    empty = [n for n, size in compiled if size == 0]
    print(f"sm_{arch}: {len(names)} kernels compiled over {len(compiled)} launches: {', '.join(names)}")
    if empty:
        print(f"FAILED: empty cubin for {sorted(set(empty))}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]) if len(sys.argv) > 1 else 90))
