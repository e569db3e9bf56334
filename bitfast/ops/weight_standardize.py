r"""Weight standardization (Qiao et al.; BiT's StdConv2d).

For a conv weight w of shape (O, Cin/groups, kh, kw), per output channel o over its K = Cin/groups*kh*kw entries:

    mean_o = 1/K sum w,   var_o = 1/K sum (w - mean_o)^2   (biased)
    y      = (w - mean_o) * rstd_o,   rstd_o = 1 / sqrt(var_o + eps)

eps is 1e-10 in the official BiT code and 1e-8 in timm. Always computed in fp32 (fp64 for fp64 weights): 1e-8
underflows in fp16. `out_dtype` writes bf16/fp16 directly, folding autocast's cast into the same pass.

Backward, with yhat = (w - mean) * rstd recomputed from w:

    dw = rstd * (dy - mean_row(dy) - yhat * mean_row(dy * yhat))
"""
from typing import Optional

import torch
from torch import Tensor

from bitfast import _backend
from bitfast.ops._common import FLOAT_DTYPES, acc_dtype, check_float


# ------------------------------------------------------------------------------------------------ reference
def _rows(w, dtype):
    """w as (O, K) rows in `dtype` (works for O = 0 too, where reshape(O, -1) cannot)."""
    O = w.shape[0]
    return w.reshape(O, w.numel() // O if O else 0).to(dtype)


def weight_standardize_fwd_ref(w, eps, out_dtype):
    """Pure-torch forward -> (y, mean, rstd). Also the "torch" backend. Keeps w's memory format.

    Corrected two-pass (as the kernels): d = w - m0 around the rounded mean m0, then c = mean(d) removes
    m0's rounding error, so fp32 stays accurate when |mean| >> std.
    """
    wf = _rows(w, acc_dtype(w.dtype))  # (O, K)
    m0 = wf.mean(1, keepdim=True)
    d = wf - m0
    c = d.mean(1, keepdim=True)
    rstd = torch.rsqrt((d.square().mean(1, keepdim=True) - c.square()).clamp_min(0) + eps)
    y = torch.empty_like(w, dtype=out_dtype or w.dtype)
    y.copy_(((d - c) * rstd).reshape(w.shape))
    return y, (m0 + c).squeeze(1), rstd.squeeze(1)


def weight_standardize_bwd_ref(dy, w, mean, rstd):
    """Pure-torch backward -> dw in w's dtype and memory format."""
    acc = acc_dtype(w.dtype)
    yhat = (_rows(w, acc) - mean[:, None]) * rstd[:, None]  # (O, K)
    g = _rows(dy, acc)
    dw = rstd[:, None] * (g - g.mean(1, keepdim=True) - yhat * (g * yhat).mean(1, keepdim=True))
    out = torch.empty_like(w)
    out.copy_(dw.reshape(w.shape))
    return out


# ---------------------------------------------------------------------------------------------- backends
def _native(name):
    from bitfast import _C

    return getattr(_C, name)


def _triton(name):
    from bitfast.kernels import weight_standardize as k

    return getattr(k, name)


_FWD = {"torch": lambda: weight_standardize_fwd_ref, "cpu": lambda: _native("weight_standardize_fwd"),
        "cuda": lambda: _native("weight_standardize_fwd"), "triton": lambda: _triton("weight_standardize_fwd")}
_BWD = {"torch": lambda: weight_standardize_bwd_ref, "cpu": lambda: _native("weight_standardize_bwd"),
        "cuda": lambda: _native("weight_standardize_bwd"), "triton": lambda: _triton("weight_standardize_bwd")}


# ------------------------------------------------------------------------------------------ registration
@torch.library.custom_op("bitfast::weight_standardize_fwd", mutates_args=())
def _fwd(w: Tensor, eps: float, out_dtype: Optional[torch.dtype], backend: str) -> tuple[Tensor, Tensor, Tensor]:
    y, mean, rstd = _FWD[backend]()(w, eps, out_dtype)
    return y, mean, rstd


@_fwd.register_fake
def _(w, eps, out_dtype, backend):
    stats = w.new_empty((w.shape[0],), dtype=acc_dtype(w.dtype))
    return torch.empty_like(w, dtype=out_dtype or w.dtype), stats, torch.empty_like(stats)


@torch.library.custom_op("bitfast::weight_standardize_bwd", mutates_args=())
def _bwd(dy: Tensor, w: Tensor, mean: Tensor, rstd: Tensor, backend: str) -> Tensor:
    return _BWD[backend]()(dy, w, mean, rstd)


@_bwd.register_fake
def _(dy, w, mean, rstd, backend):
    return torch.empty_like(w)


def _setup_context(ctx, inputs, output):
    w, _eps, _out_dtype, backend = inputs
    _y, mean, rstd = output
    ctx.save_for_backward(w, mean, rstd)
    ctx.backend = backend


def _grad(ctx, dy, bwd):
    """Gradient for (w, ...) from a bwd implementation with the _C signature."""
    w, mean, rstd = ctx.saved_tensors
    dy = dy if dy.stride() == w.stride() else torch.empty_like(w, dtype=dy.dtype).copy_(dy)
    return bwd(dy, w, mean, rstd), None, None, None


def _backward(ctx, dy, _dmean, _drstd):
    return _grad(ctx, dy, lambda *args: _bwd(*args, ctx.backend))


_fwd.register_autograd(_backward, setup_context=_setup_context)


class _Eager(torch.autograd.Function):
    """The custom op's math without torch.library's per-call dispatch cost; used outside torch.compile."""

    @staticmethod
    def forward(ctx, w, eps, out_dtype, backend):
        y, mean, rstd = _FWD[backend]()(w, eps, out_dtype)
        _setup_context(ctx, (w, eps, out_dtype, backend), (y, mean, rstd))
        return y

    @staticmethod
    def backward(ctx, dy):
        return _grad(ctx, dy, _BWD[ctx.backend]())


# ------------------------------------------------------------------------------------------------ public
def check_weight(w, name="w"):
    """Validate a conv/linear weight for standardization; returns it in a layout the kernels read."""
    check_float(w, name)
    if w.dim() < 2:
        raise ValueError(f"{name} must have at least 2 dimensions (O, ...), got shape {tuple(w.shape)}")
    dense = w.is_contiguous() or (w.dim() == 4 and w.is_contiguous(memory_format=torch.channels_last))
    return w if dense else w.contiguous()


def weight_standardize(w, eps=1e-10, out_dtype=None, backend=None):
    """Standardize w per output channel over (Cin, kh, kw); returns a tensor like w in `out_dtype` (default w's)."""
    w = check_weight(w)
    if out_dtype is not None and out_dtype not in FLOAT_DTYPES:
        raise TypeError(f"out_dtype must be a float dtype or None, got {out_dtype}")
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    name = _backend.resolve("weight_standardize", backend, w.device.type, (w, out_dtype))
    if torch.compiler.is_compiling():
        return _fwd(w, float(eps), out_dtype, name)[0]
    return _Eager.apply(w, float(eps), out_dtype, name)
