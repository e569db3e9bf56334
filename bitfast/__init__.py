"""bitfast: Big Transfer (BiT) ResNet-v2 with fused GroupNorm and weight-standardization kernels.

    import bitfast
    bitfast.info()                      # versions and which backends are usable here
    y = bitfast.ops.group_norm(x, 32, w, b, act="relu")
    with bitfast.use_backend("torch"):  # pick a default backend for a block
        ...
"""
from bitfast import nn, ops
from bitfast._backend import BACKENDS, BackendUnavailable, current_backend, use_backend
from bitfast.info import info
from bitfast.version import __version__

__all__ = ["nn", "ops", "info", "use_backend", "current_backend", "BACKENDS", "BackendUnavailable", "__version__"]
