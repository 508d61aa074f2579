"""Argument checks that raise ``ValueError`` naming the argument, its value and what is allowed."""

from __future__ import annotations

from typing import Iterable, Optional, Sequence, Union

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DtypeSpec = Union[torch.dtype, Sequence[torch.dtype], None]


def _dtype_names(dtypes: Iterable[torch.dtype]) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def check_tensor(
    name: str,
    x,
    *,
    ndim: Union[int, Sequence[int], None] = None,
    dtype: DtypeSpec = None,
    shape: Optional[Sequence[Optional[int]]] = None,
    device: Optional[torch.device] = None,
) -> torch.Tensor:
    """Check that ``x`` is a tensor with the given rank, dtype(s), shape (None = any size) and device.

    Returns ``x`` so that calls can be chained.
    """
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if x.ndim not in allowed:
            raise ValueError(f"{name} must have {' or '.join(map(str, allowed))} dimensions, got shape {tuple(x.shape)}")
    if dtype is not None:
        allowed = (dtype,) if isinstance(dtype, torch.dtype) else tuple(dtype)
        if x.dtype not in allowed:
            raise ValueError(f"{name} has dtype {str(x.dtype).replace('torch.', '')}; allowed: {_dtype_names(allowed)}")
    if shape is not None:
        if x.ndim != len(shape) or any(s is not None and s != d for s, d in zip(shape, x.shape)):
            want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
            raise ValueError(f"{name} must have shape {want}, got {list(x.shape)}")
    if device is not None and x.device != torch.device(device):
        raise ValueError(f"{name} is on {x.device} but must be on {device} (the device of the other inputs)")
    return x


def check_same_device(**tensors) -> None:
    """All non-None tensors must share one device."""
    items = [(k, v) for k, v in tensors.items() if v is not None]
    if not items:
        return
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {first_name} is on {first.device}; put them on one device")


def check_choice(name: str, value, allowed: Sequence) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not allowed; choose one of {', '.join(repr(a) for a in allowed)}")


def check_positive_int(name: str, value, *, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def check_non_negative_float(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ValueError(f"{name} must be a number >= 0, got {value!r}")
    return float(value)


def check_cu_seqlens(cu_seqlens: Optional[torch.Tensor], x: torch.Tensor, name: str = "cu_seqlens") -> None:
    """Validate FlashAttention-style ``cu_seqlens`` of shape [N + 1] for an input ``x`` of shape [1, T, ...].

    Checks: an integer vector on ``x``'s device, batch size 1, starting at 0, non-decreasing, ending at T.
    The last two checks read the values (a device sync on CUDA), as silent out-of-bounds access is worse.
    """
    if cu_seqlens is None:
        return
    check_tensor(name, cu_seqlens, ndim=1, dtype=(torch.int32, torch.int64), device=x.device)
    if x.shape[0] != 1:
        raise ValueError(f"with {name} the batch size must be 1 (sequences packed along time), got {x.shape[0]}")
    if cu_seqlens.numel() < 2:
        raise ValueError(f"{name} must hold at least 2 offsets [0, ..., T], got {cu_seqlens.tolist()}")
    values = cu_seqlens.tolist()
    if values[0] != 0 or values[-1] != x.shape[1] or any(b < a for a, b in zip(values, values[1:])):
        raise ValueError(
            f"{name} must start at 0, be non-decreasing and end at T={x.shape[1]}, got {values if len(values) < 20 else values[:10] + ['...'] + values[-5:]}"
        )


def check_scale(scale) -> None:
    """An attention op's ``scale``: None (meaning D ** -0.5) or a number."""
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
        raise ValueError(f"scale must be None (meaning D ** -0.5) or a number, got {scale!r}")


def check_qkv(q, k, v, time_dim_name: str = "T") -> None:
    """Attention inputs: q [B, T_q, HQ, D], k [B, <time_dim_name>, H, D], v as k but its last dim; one float
    dtype and device; HQ a multiple of H (grouped-query attention). Time lengths are the caller's to relate."""
    check_tensor("q", q, ndim=4, dtype=FLOAT_DTYPES)
    check_tensor("k", k, ndim=4, dtype=q.dtype, device=q.device)
    check_tensor("v", v, ndim=4, dtype=q.dtype, device=q.device)
    B, _, HQ, D = q.shape
    if k.shape[0] != B or k.shape[-1] != D:
        raise ValueError(f"k must have shape [B={B}, {time_dim_name}, H, D={D}], got {list(k.shape)}")
    H = k.shape[2]
    if v.shape[:3] != k.shape[:3]:
        raise ValueError(f"v must have shape [{', '.join(map(str, k.shape[:3]))}, V] (as k but its last dim), "
                         f"got {list(v.shape)}")
    if H == 0 or HQ % H != 0:
        raise ValueError(f"the number of query heads HQ={HQ} (q.shape[2]) must be a multiple of the number of kv "
                         f"heads H={H} (k.shape[2])")
