"""What the Triton launchers and kernels of bitfast.kernels share."""
import contextlib
import functools

import torch
import triton
import triton.language as tl


def on_device(t):
    """Context for a launch on t's own device: Triton launches on the *current* CUDA device and its current stream,
    so tensors on cuda:1 while cuda:0 is current would get the wrong stream or an illegal address. Nothing for CPU
    tensors (the interpreter)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


@triton.jit
def div(a, b, ACC: tl.constexpr):
    """a / b, correctly rounded as in the C++/CUDA backends: Triton lowers fp32 `/` to the approximate div.full.f32
    (about 2 ulp). fp64 `/` is correctly rounded already."""
    if ACC == tl.float64:
        return a / b
    else:
        return tl.div_rn(tl.cast(a, tl.float32), tl.cast(b, tl.float32))


def eps_arg(eps, dtype, device):
    """eps as the kernels take it: a float (Triton passes Python floats as fp32) for fp32 statistics, a 1-element
    fp64 tensor for fp64 ones, so that gradcheck-precision runs see eps exactly (torch.full: capture-safe)."""
    if dtype == torch.float64:
        return torch.full((1,), float(eps), dtype=torch.float64, device=device)
    return float(eps)


def guarded(launcher):
    """Wraps a launcher whose first tensor argument (or first element of a list) decides the device."""

    @functools.wraps(launcher)
    def run(first, *args, **kwargs):
        with on_device(first[0] if isinstance(first, (list, tuple)) else first):
            return launcher(first, *args, **kwargs)

    return run
