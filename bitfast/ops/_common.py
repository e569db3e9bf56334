"""Small helpers shared by the op files: layout, dtype and argument checks with messages that name the argument."""
import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def acc_dtype(dtype):
    """Statistics/accumulation dtype: fp32, except fp64 stays fp64 (for gradcheck)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def is_channels_last(x):
    """True for a channels_last(_3d) tensor that is not also plain-contiguous (the kernels' NHWC path)."""
    if x.is_contiguous():
        return False
    if x.dim() == 4:
        return x.is_contiguous(memory_format=torch.channels_last)
    if x.dim() == 5:
        return x.is_contiguous(memory_format=torch.channels_last_3d)
    return False


def dense_layout(x):
    """x itself if the kernels can read it (contiguous or channels_last), else a contiguous copy."""
    return x if x.is_contiguous() or is_channels_last(x) else x.contiguous()


def empty_like_layout(x, dtype=None):
    """An empty tensor shaped like x, in x's kernel layout (what the kernels and the fake impls both return)."""
    dtype = dtype or x.dtype
    if is_channels_last(x):
        fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        return torch.empty(x.shape, dtype=dtype, device=x.device).contiguous(memory_format=fmt)
    return torch.empty(x.shape, dtype=dtype, device=x.device)


def check_float(t, name):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16, bfloat16 or float64, got {t.dtype}")


def check_param(p, name, x, size):
    """weight/bias of a norm over x: shape (size,), same device, dtype == x.dtype or float32 (autocast params)."""
    if p is None:
        return None
    check_float(p, name)
    if p.shape != (size,):
        raise ValueError(f"{name} must have shape ({size},), got {tuple(p.shape)}")
    if p.device != x.device:
        raise ValueError(f"{name} is on {p.device} but x is on {x.device}")
    if p.dtype not in (x.dtype, torch.float32):
        raise TypeError(f"{name} dtype {p.dtype} must match x ({x.dtype}) or be float32")
    return p.to(acc_dtype(x.dtype)).contiguous()
