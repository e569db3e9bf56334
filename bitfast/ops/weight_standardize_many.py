r"""Weight standardization of many weights at once: every conv weight of a model in one kernel launch forward and
one backward (CUDA/Triton: a grouped kernel over a table of pointers/offsets; CPU: one OpenMP loop over all rows).

For each weight w_i of shape (O_i, ...) the math is bitfast.ops.weight_standardize's, row by row:

    y_i = (w_i - mean) * rstd,   rstd = 1 / sqrt(var + eps),   biased var over the K_i = numel/O_i entries of a row

mean/rstd of all weights are returned concatenated, shape (sum O_i,), fp32 (fp64 for fp64 weights). The gradients
are those of calling weight_standardize on each weight separately (the kernels share the per-row code).
"""
from typing import Optional

import torch
from torch import Tensor

from bitfast import _backend
from bitfast.ops._common import FLOAT_DTYPES, acc_dtype
from bitfast.ops.weight_standardize import check_weight, weight_standardize_bwd_ref, weight_standardize_fwd_ref


# ------------------------------------------------------------------------------------------------ reference
def _fwd_one(w, eps, out_dtype):
    if w.numel() == 0:  # (0, ...) or K == 0: nothing to standardize (mean/rstd rows left unset, like the kernels)
        stats = w.new_empty((w.shape[0],), dtype=acc_dtype(w.dtype))
        return torch.empty_like(w, dtype=out_dtype or w.dtype), stats, torch.empty_like(stats)
    return weight_standardize_fwd_ref(w, eps, out_dtype)


def weight_standardize_many_fwd_ref(ws, eps, out_dtype):
    """Per-weight loop over the reference -> (ys, mean, rstd) with mean/rstd concatenated. The "torch" backend."""
    outs = [_fwd_one(w, eps, out_dtype) for w in ws]
    return [o[0] for o in outs], torch.cat([o[1] for o in outs]), torch.cat([o[2] for o in outs])


def weight_standardize_many_bwd_ref(dys, ws, mean, rstd):
    """Per-weight loop over the reference backward -> dws."""
    sizes = [w.shape[0] for w in ws]
    return [weight_standardize_bwd_ref(dy, w, m, r) if w.numel() else torch.empty_like(w)
            for dy, w, m, r in zip(dys, ws, mean.split(sizes), rstd.split(sizes))]


# ---------------------------------------------------------------------------------------------- backends
def _native(name):
    from bitfast import _C

    return getattr(_C, name)


def _triton(name):
    from bitfast.kernels import weight_standardize as k

    return getattr(k, name)


_FWD = {"torch": lambda: weight_standardize_many_fwd_ref, "cpu": lambda: _native("weight_standardize_many_fwd"),
        "cuda": lambda: _native("weight_standardize_many_fwd"),
        "triton": lambda: _triton("weight_standardize_many_fwd")}
_BWD = {"torch": lambda: weight_standardize_many_bwd_ref, "cpu": lambda: _native("weight_standardize_many_bwd"),
        "cuda": lambda: _native("weight_standardize_many_bwd"),
        "triton": lambda: _triton("weight_standardize_many_bwd")}


# ------------------------------------------------------------------------------------------ registration
@torch.library.custom_op("bitfast::weight_standardize_many_fwd", mutates_args=())
def _fwd(ws: list[Tensor], eps: float, out_dtype: Optional[torch.dtype],
         backend: str) -> tuple[list[Tensor], Tensor, Tensor]:
    ys, mean, rstd = _FWD[backend]()(ws, eps, out_dtype)
    return list(ys), mean, rstd


@_fwd.register_fake
def _(ws, eps, out_dtype, backend):
    rows = sum(w.shape[0] for w in ws)
    stats = ws[0].new_empty((rows,), dtype=acc_dtype(ws[0].dtype))
    return [torch.empty_like(w, dtype=out_dtype or w.dtype) for w in ws], stats, torch.empty_like(stats)


@torch.library.custom_op("bitfast::weight_standardize_many_bwd", mutates_args=())
def _bwd(dys: list[Tensor], ws: list[Tensor], mean: Tensor, rstd: Tensor, backend: str) -> list[Tensor]:
    return list(_BWD[backend]()(dys, ws, mean, rstd))


@_bwd.register_fake
def _(dys, ws, mean, rstd, backend):
    return [torch.empty_like(w) for w in ws]


def _setup_context(ctx, inputs, output):
    ws, _eps, out_dtype, backend = inputs
    _ys, mean, rstd = output
    ctx.save_for_backward(*ws, mean, rstd)
    ctx.backend = backend
    ctx.out_dtype = out_dtype or ws[0].dtype


def _grads(ctx, dys, bwd):
    """dws from a bwd implementation with the _C signature (dys, ws, mean, rstd)."""
    *ws, mean, rstd = ctx.saved_tensors
    # The kernels read each grad in its weight's layout and all grads in one dtype; an unused output has no grad.
    dys = [torch.zeros_like(w, dtype=ctx.out_dtype) if dy is None
           else dy if dy.stride() == w.stride() and dy.dtype == ctx.out_dtype
           else torch.empty_like(w, dtype=ctx.out_dtype).copy_(dy)
           for dy, w in zip(dys, ws)]
    return list(bwd(dys, ws, mean, rstd))


def _backward(ctx, dys, _dmean, _drstd):
    return _grads(ctx, dys, lambda *args: _bwd(*args, ctx.backend)), None, None, None


_fwd.register_autograd(_backward, setup_context=_setup_context)


class _Eager(torch.autograd.Function):
    """The custom op's math without torch.library's per-call dispatch, which costs ~1 ms per fwd+bwd for R50x1's
    53 weights (schema checks on every list element): 3% of an H100 train step. Used outside torch.compile."""

    @staticmethod
    def forward(ctx, eps, out_dtype, backend, *ws):
        ys, mean, rstd = _FWD[backend]()(list(ws), eps, out_dtype)
        _setup_context(ctx, (ws, eps, out_dtype, backend), (ys, mean, rstd))
        return tuple(ys)

    @staticmethod
    def backward(ctx, *dys):
        return (None, None, None, *_grads(ctx, dys, _BWD[ctx.backend]()))


# ------------------------------------------------------------------------------------------------ public
def weight_standardize_many(weights, eps=1e-10, out_dtype=None, backend=None):
    """Standardize every weight of `weights` (a list of tensors of one dtype and device, e.g. all conv weights of a
    model) per output channel, in one launch per direction. Returns a list like `weights` in `out_dtype`."""
    if isinstance(weights, Tensor) or not isinstance(weights, (list, tuple)):
        raise TypeError(f"weights must be a list or tuple of tensors, got {type(weights).__name__}")
    if len(weights) == 0:
        return []
    ws = [check_weight(w, f"weights[{i}]") for i, w in enumerate(weights)]
    for i, w in enumerate(ws):
        if w.dtype != ws[0].dtype or w.device != ws[0].device:
            raise ValueError(f"weights[{i}] is {w.dtype} on {w.device} but weights[0] is {ws[0].dtype} on "
                             f"{ws[0].device}; all weights must share one dtype and device")
    if out_dtype is not None and out_dtype not in FLOAT_DTYPES:
        raise TypeError(f"out_dtype must be a float dtype or None, got {out_dtype}")
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    name = _backend.resolve("weight_standardize_many", backend, ws[0].device.type, (ws[0], out_dtype))
    if torch.compiler.is_compiling():
        return _fwd(ws, float(eps), out_dtype, name)[0]
    return list(_Eager.apply(float(eps), out_dtype, name, *ws))


def standardize_conv_weights(convs, out_dtype=None, backend=None):
    """Standardized weights of `convs` (modules with .weight and .eps, e.g. every bitfast.nn.StdConv2d of a model),
    from one weight_standardize_many call per distinct eps (BiT uses one). Returns a list aligned with `convs`, to
    pass as `conv(x, std_weight)`. Under autocast pass out_dtype=bitfast.ops.std_conv2d_autocast_dtype(device)."""
    convs = list(convs)
    out = [None] * len(convs)
    for eps in dict.fromkeys(float(c.eps) for c in convs):
        idx = [i for i, c in enumerate(convs) if float(c.eps) == eps]
        for i, y in zip(idx, weight_standardize_many([convs[i].weight for i in idx], eps, out_dtype, backend)):
            out[i] = y
    return out
