"""bitfast ops: torch.library custom ops with fake impls and autograd, one op per file.

Each file holds the math (docstring), the pure-torch reference, the registration and the public function.
"""
from bitfast.ops.group_norm import group_norm, group_norm_bwd_ref, group_norm_fwd_ref
from bitfast.ops.std_conv2d import autocast_dtype as std_conv2d_autocast_dtype, std_conv2d
from bitfast.ops.weight_standardize import weight_standardize, weight_standardize_bwd_ref, weight_standardize_fwd_ref
from bitfast.ops.weight_standardize_many import weight_standardize_many

__all__ = ["group_norm", "weight_standardize", "weight_standardize_many", "std_conv2d", "std_conv2d_autocast_dtype", "group_norm_fwd_ref", "group_norm_bwd_ref",
           "weight_standardize_fwd_ref", "weight_standardize_bwd_ref"]
