"""Shared utilities: backend choice, argument validation, autocast helpers for autograd functions."""

from fla.utils.autocast import autocast_custom_bwd, autocast_custom_fwd
from fla.utils.backend import requested_backend, triton_interpreting, use_triton
from fla.utils.validation import (
    FLOAT_DTYPES,
    check_choice,
    check_cu_seqlens,
    check_non_negative_float,
    check_positive_int,
    check_qkv,
    check_same_device,
    check_scale,
    check_tensor,
)

__all__ = [
    "FLOAT_DTYPES",
    "autocast_custom_bwd",
    "autocast_custom_fwd",
    "check_choice",
    "check_cu_seqlens",
    "check_non_negative_float",
    "check_positive_int",
    "check_qkv",
    "check_same_device",
    "check_scale",
    "check_tensor",
    "requested_backend",
    "triton_interpreting",
    "use_triton",
]
