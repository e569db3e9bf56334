r"""GroupNorm with an optional fused ReLU.

For x of shape (N, C, *spatial), G groups of C/G channels, D = C/G * prod(spatial) elements per (n, g):

    mean = 1/D sum x,   var = 1/D sum (x - mean)^2   (biased; corrected two-pass, never E[x^2] - E[x]^2)
    xhat = (x - mean) * rstd,  rstd = 1 / sqrt(var + eps)
    y    = act(xhat * weight[c] + bias[c]),   act = identity or ReLU

Backward, with dy already multiplied by the ReLU mask (y > 0, recomputed, not stored) and g = dy * weight[c]:

    dbias[c]   = sum_{n,s} dy              dweight[c] = sum_{n,s} dy * xhat
    dx         = rstd * (g - mean_group(g) - xhat * mean_group(g * xhat))

Statistics are fp32 (fp64 for fp64 input) and the saved mean/rstd are in that dtype. Activations stay in
their own dtype, also under autocast (the op is not on autocast's upcast list).
"""
from typing import Optional

import torch
from torch import Tensor

from bitfast import _backend
from bitfast.ops._common import acc_dtype, check_float, check_param, dense_layout, empty_like_layout


# ------------------------------------------------------------------------------------------------ reference
def group_norm_fwd_ref(x, weight, bias, num_groups, eps, relu):
    """Pure-torch forward -> (y, mean, rstd). Also the "torch" backend."""
    N, C = x.shape[:2]
    if x.numel() == 0:
        stats = x.new_zeros((N, num_groups), dtype=acc_dtype(x.dtype))
        return empty_like_layout(x), stats, stats.clone()
    xg = x.reshape(N, num_groups, -1).to(acc_dtype(x.dtype))  # (N, G, D)
    # Corrected two-pass, as the kernels: d = x - m0 around the rounded mean m0, and c = mean(d) removes m0's
    # rounding error, so x = 1000 + N(0, 1) normalises as accurately as N(0, 1).
    m0 = xg.mean(-1, keepdim=True)
    d = xg - m0
    c = d.mean(-1, keepdim=True)
    rstd = torch.rsqrt((d.square().mean(-1, keepdim=True) - c.square()).clamp_min(0) + eps)
    mean = (m0 + c).squeeze(-1)
    y = ((d - c) * rstd).reshape(N, C, -1)  # (N, C, S)
    rstd = rstd.squeeze(-1)
    if weight is not None:
        y = y * weight.to(y.dtype)[:, None]
    if bias is not None:
        y = y + bias.to(y.dtype)[:, None]
    if relu:
        y = y.relu()
    out = empty_like_layout(x)
    out.copy_(y.reshape(x.shape))
    return out, mean, rstd


def group_norm_bwd_ref(dy, x, weight, bias, mean, rstd, num_groups, relu):
    """Pure-torch backward -> (dx, dweight, dbias); dweight/dbias in the stats dtype, shape (C,)."""
    N, C = x.shape[:2]
    acc = acc_dtype(x.dtype)
    if x.numel() == 0:
        return empty_like_layout(x), x.new_zeros(C, dtype=acc), x.new_zeros(C, dtype=acc)
    xhat = ((x.reshape(N, num_groups, -1).to(acc) - mean[..., None]) * rstd[..., None]).reshape(N, C, -1)
    w = weight.to(acc)[:, None] if weight is not None else torch.ones(C, 1, dtype=acc, device=x.device)
    g = dy.reshape(N, C, -1).to(acc)
    if relu:
        b = bias.to(acc)[:, None] if bias is not None else 0.0
        g = g * (xhat * w + b > 0)
    dbias, dweight = g.sum((0, 2)), (g * xhat).sum((0, 2))
    gw = (g * w).reshape(N, num_groups, -1)  # (N, G, D)
    xh = xhat.reshape(N, num_groups, -1)
    dx = rstd[..., None] * (gw - gw.mean(-1, keepdim=True) - xh * (gw * xh).mean(-1, keepdim=True))
    out = empty_like_layout(x)
    out.copy_(dx.reshape(x.shape))
    return out, dweight, dbias


# ---------------------------------------------------------------------------------------------- backends
def _native(name):
    from bitfast import _C

    return getattr(_C, name)


def _triton(name):
    from bitfast.kernels import group_norm as k

    return getattr(k, name)


_FWD = {"torch": lambda: group_norm_fwd_ref, "cpu": lambda: _native("group_norm_fwd"),
        "cuda": lambda: _native("group_norm_fwd"), "triton": lambda: _triton("group_norm_fwd")}
_BWD = {"torch": lambda: group_norm_bwd_ref, "cpu": lambda: _native("group_norm_bwd"),
        "cuda": lambda: _native("group_norm_bwd"), "triton": lambda: _triton("group_norm_bwd")}


# ------------------------------------------------------------------------------------------ registration
@torch.library.custom_op("bitfast::group_norm_fwd", mutates_args=())
def _fwd(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], num_groups: int, eps: float, relu: bool,
         backend: str) -> tuple[Tensor, Tensor, Tensor]:
    y, mean, rstd = _FWD[backend]()(x, weight, bias, num_groups, eps, relu)
    return y, mean, rstd


@_fwd.register_fake
def _(x, weight, bias, num_groups, eps, relu, backend):
    stats = x.new_empty((x.shape[0], num_groups), dtype=acc_dtype(x.dtype))
    return empty_like_layout(x), stats, torch.empty_like(stats)


@torch.library.custom_op("bitfast::group_norm_bwd", mutates_args=())
def _bwd(dy: Tensor, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], mean: Tensor, rstd: Tensor,
         num_groups: int, relu: bool, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    dx, dw, db = _BWD[backend]()(dy, x, weight, bias, mean, rstd, num_groups, relu)
    return dx, dw, db


@_bwd.register_fake
def _(dy, x, weight, bias, mean, rstd, num_groups, relu, backend):
    dw = x.new_empty((x.shape[1],), dtype=acc_dtype(x.dtype))
    return empty_like_layout(x), dw, torch.empty_like(dw)


def _setup_context(ctx, inputs, output):
    x, weight, bias, num_groups, _eps, relu, backend = inputs
    _y, mean, rstd = output
    ctx.save_for_backward(x, weight, bias, mean, rstd)
    ctx.meta = (num_groups, relu, backend)


def _grads(ctx, dy, bwd):
    """Gradients for (x, weight, bias, ...) from a bwd implementation with the _C signature."""
    x, weight, bias, mean, rstd = ctx.saved_tensors
    num_groups, relu, _backend_name = ctx.meta
    dy = dy.to(x.dtype)
    dy = dy if dy.stride() == x.stride() else empty_like_layout(x).copy_(dy)  # kernels read dy in x's layout
    dx, dw, db = bwd(dy, x, weight, bias, mean, rstd, num_groups, relu)
    return dx, dw if weight is not None else None, db if bias is not None else None, None, None, None, None


def _backward(ctx, dy, _dmean, _drstd):
    return _grads(ctx, dy, lambda *args: _bwd(*args, ctx.meta[2]))


_fwd.register_autograd(_backward, setup_context=_setup_context)


class _Eager(torch.autograd.Function):
    """The custom op's math without torch.library's per-call dispatch (~200 us fwd+bwd on a CPU, more than the
    kernel on small layers). Used outside torch.compile; compiled graphs use the custom op."""

    @staticmethod
    def forward(ctx, x, weight, bias, num_groups, eps, relu, backend):
        y, mean, rstd = _FWD[backend]()(x, weight, bias, num_groups, eps, relu)
        _setup_context(ctx, (x, weight, bias, num_groups, eps, relu, backend), (y, mean, rstd))
        return y

    @staticmethod
    def backward(ctx, dy):
        return _grads(ctx, dy, _BWD[ctx.meta[2]]())


# ------------------------------------------------------------------------------------------------ public
def group_norm(x, num_groups, weight=None, bias=None, eps=1e-5, act=None, backend=None):
    """act(GroupNorm(x)). x: (N, C, *spatial), contiguous or channels_last (kept). act: None or "relu".

    backend: None (use_backend()/BITFAST_BACKEND/auto), "torch", "cpu", "cuda" or "triton".
    """
    check_float(x, "x")
    if x.dim() < 2:
        raise ValueError(f"x must have at least 2 dimensions (N, C, *), got shape {tuple(x.shape)}")
    C = x.shape[1]
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups <= 0 or C % num_groups:
        raise ValueError(f"num_groups={num_groups!r} must be a positive int dividing the channel count C={C}")
    if act not in (None, "relu"):
        raise ValueError(f"act must be None or 'relu', got {act!r}")
    w = check_param(weight, "weight", x, C)
    b = check_param(bias, "bias", x, C)
    name = _backend.resolve("group_norm", backend, x.device.type, (x, num_groups))
    if name == "cuda" and x.dtype == torch.float64:  # the CUDA kernels are fp32/fp16/bf16 only
        if (backend or _backend.current_backend()) == "cuda":
            raise _backend.BackendUnavailable("bitfast: the cuda backend of group_norm does not take float64 x; "
                                              "use backend='triton', 'torch' or 'cpu'")
        name = "triton" if _backend.usable_why("triton", "cuda") is None else "torch"
    args = (dense_layout(x), w, b, num_groups, float(eps), act == "relu", name)
    if torch.compiler.is_compiling():
        return _fwd(*args)[0]
    return _Eager.apply(*args)
