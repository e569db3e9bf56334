"""Drop-in modules backed by bitfast ops. They keep the state_dict keys of their torch/timm counterparts."""
import weakref

import torch
from torch import nn

from bitfast import ops


class GroupNorm(nn.GroupNorm):
    """torch.nn.GroupNorm with bitfast's fused kernel; same constructor and state_dict keys.

    `backend` (optional, keyword-only) pins a backend for this module; default: use_backend()/env/auto.
    """

    def __init__(self, num_groups, num_channels, eps=1e-5, affine=True, device=None, dtype=None, *, backend=None):
        super().__init__(num_groups, num_channels, eps, affine, device, dtype)
        self.backend = backend

    def forward(self, x):
        return ops.group_norm(x, self.num_groups, self.weight, self.bias, self.eps, None, self.backend)


class GroupNormAct(GroupNorm):
    """GroupNorm followed by an activation (None or "relu"), fused into one kernel. Keys: weight, bias."""

    def __init__(self, num_groups, num_channels, eps=1e-5, affine=True, act="relu", device=None, dtype=None, *,
                 backend=None):
        if act not in (None, "relu"):
            raise ValueError(f"act must be None or 'relu', got {act!r}")
        super().__init__(num_groups, num_channels, eps, affine, device, dtype, backend=backend)
        self.act = act

    def forward(self, x):
        return ops.group_norm(x, self.num_groups, self.weight, self.bias, self.eps, self.act, self.backend)

    def extra_repr(self):
        return super().extra_repr() + f", act={self.act!r}"


class StdConv2d(nn.Conv2d):
    """Weight-standardized Conv2d (BiT). Same constructor as nn.Conv2d plus `eps`; timm StdConv2d's keys.

    In eval mode with unchanged weights (tracked by tensor version) the standardized weight is cached, so
    inference costs a plain conv. `forward(x, std_weight)` accepts a weight standardized elsewhere (e.g. by
    ops.weight_standardize_many for a whole model in one launch).
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1,
                 bias=False, eps=1e-10, device=None, dtype=None, *, backend=None):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                         device=device, dtype=dtype)
        self.eps = eps
        self.backend = backend
        self._cache = None  # (weakref to weight, key, standardized weight), eval mode only

    def standardized_weight(self, dtype=None):
        return ops.weight_standardize(self.weight, self.eps, out_dtype=dtype, backend=self.backend)

    def _cached_weight(self, dtype):
        # Identity by weakref, not data_ptr: a new Parameter can reuse a freed one's address at version 0.
        w = self.weight
        key = (w._version, w.device, w.dtype, dtype, self.eps)
        c = self._cache
        if c is None or c[0]() is not w or c[1] != key:
            with torch.no_grad():
                c = self._cache = (weakref.ref(w), key, self.standardized_weight(dtype))
        return c[2]

    def forward(self, x, std_weight=None):
        if std_weight is None:
            dtype = ops.std_conv2d_autocast_dtype(x.device.type)
            grad = torch.is_grad_enabled() and self.weight.requires_grad
            if self.training or grad or torch.compiler.is_compiling():
                std_weight = self.standardized_weight(dtype)
            else:
                std_weight = self._cached_weight(dtype)
        return self._conv_forward(x, std_weight, self.bias)

    def train(self, mode=True):
        self._cache = None
        return super().train(mode)

    def extra_repr(self):
        return super().extra_repr() + f", eps={self.eps}"
