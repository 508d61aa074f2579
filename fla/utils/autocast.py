"""Autocast helpers for custom autograd functions, for any device type.

``torch.amp.custom_fwd`` needs the device type at decoration time; ours reads it from the first tensor argument at
call time, so the same autograd function serves CPU and CUDA tensors.

- ``autocast_custom_fwd``: records the caller's autocast state in ``ctx`` and runs the forward under it.
- ``autocast_custom_bwd``: runs the backward under the autocast state that the forward saw.
"""

from __future__ import annotations

import functools

import torch


def _device_type(args, kwargs) -> str:
    for a in list(args) + list(kwargs.values()):
        if isinstance(a, torch.Tensor):
            return a.device.type
    return "cpu"


def autocast_custom_fwd(forward):
    @functools.wraps(forward)
    def wrapper(ctx, *args, **kwargs):
        device_type = _device_type(args, kwargs)
        ctx._fla_device_type = device_type
        ctx._fla_autocast_enabled = torch.is_autocast_enabled(device_type)
        ctx._fla_autocast_dtype = torch.get_autocast_dtype(device_type)
        return forward(ctx, *args, **kwargs)

    return wrapper


def autocast_custom_bwd(backward):
    @functools.wraps(backward)
    def wrapper(ctx, *args, **kwargs):
        device_type = getattr(ctx, "_fla_device_type", _device_type(args, kwargs))
        enabled = getattr(ctx, "_fla_autocast_enabled", False)
        dtype = getattr(ctx, "_fla_autocast_dtype", None)
        with torch.autocast(device_type=device_type, enabled=enabled, dtype=dtype):
            return backward(ctx, *args, **kwargs)

    return wrapper
