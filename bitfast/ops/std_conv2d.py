"""Weight-standardized 2-D convolution: conv2d(x, weight_standardize(w)). The convolution itself is cuDNN/ATen's;
only the standardization is bitfast's. Under autocast the standardized weight is written directly in the autocast
dtype, so autocast's own cast of the weight becomes a no-op."""
import torch
import torch.nn.functional as F

from bitfast.ops.weight_standardize import weight_standardize


def autocast_dtype(device_type):
    """The dtype autocast would cast a conv weight to on `device_type`, or None when autocast is off."""
    if device_type in ("cuda", "cpu") and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def std_conv2d(x, w, bias=None, stride=1, padding=0, dilation=1, groups=1, eps=1e-10, backend=None):
    """F.conv2d with the weight standardized per output channel (see bitfast.ops.weight_standardize)."""
    if w.dim() != 4:
        raise ValueError(f"w must be a 4-D conv weight (O, Cin/groups, kh, kw), got shape {tuple(w.shape)}")
    ws = weight_standardize(w, eps, out_dtype=autocast_dtype(x.device.type), backend=backend)
    return F.conv2d(x, ws, bias, stride, padding, dilation, groups)
