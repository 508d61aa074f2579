"""Short causal depthwise convolution: the ``ShortConvolution`` module and the ``causal_conv1d`` function.

Gated DeltaNet runs q, k and v through one of these each (kernel size 4, SiLU). Per channel c and sequence, with
K taps ``w[c, 0..K-1]`` (tap K-1 multiplies the current token):

    z_t = b_c + sum_k w[c, k] * x[t - (K - 1) + k]      (inputs before the sequence start come from its state)
    y_t = act(z_t) + residual_t                         (act: SiLU or identity)

The convolution state of a sequence is [C, K]: its last K inputs, [..., -1] the most recent. An initial state
stands for the inputs just before the sequence (only its last K - 1 columns influence the outputs); the final
state is the last K inputs of the sequence, with the initial state (or zeros) filling in for sequences shorter
than K. ``step`` consumes one token: shift the state left, append the token, y = act(sum(state * w) + b).

``causal_conv1d`` dispatches on the input's device (``fla.utils.backend``): the Triton kernels in
``fla.modules.conv_kernels`` for CUDA tensors, a vectorised torch path (float32, differentiable by autograd)
elsewhere.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from fla.ops.utils.index import prepare_sequence_ids
from fla.utils import (
    FLOAT_DTYPES,
    autocast_custom_bwd,
    autocast_custom_fwd,
    check_choice,
    check_cu_seqlens,
    check_positive_int,
    check_tensor,
    use_triton,
)

ACTIVATIONS = (None, "silu", "swish")
MASK_DTYPES = (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.float64) + FLOAT_DTYPES


def _activate(z: torch.Tensor, activation: Optional[str]) -> torch.Tensor:
    return F.silu(z) if activation in ("silu", "swish") else z


# ----------------------------------------------------------------------------------------------------------------
# torch path


def causal_conv1d_torch(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    residual: Optional[torch.Tensor] = None,
    initial_state: Optional[torch.Tensor] = None,
    output_final_state: bool = False,
    activation: Optional[str] = None,
    cu_seqlens: Optional[torch.Tensor] = None,
    final_dtype: Optional[torch.dtype] = None,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Torch path of ``causal_conv1d`` (arguments already validated; weight [C, K]). Computes in float32.

    Every sequence is extended on the left by its K-state columns, so that the K shifted slices of the extended
    tensor never read across a sequence boundary; no Python loop over time or sequences.
    """
    B, T, C = x.shape
    K = weight.shape[1]
    w = weight.float()
    xf = x.float()
    if cu_seqlens is None:
        state = (initial_state.float().transpose(1, 2) if initial_state is not None
                 else xf.new_zeros(B, K, C))
        xe = torch.cat([state, xf], dim=1)  # [B, K + T, C]; row K + t is token t
        z = xe[:, 1:T + 1] * w[:, 0]
        for k in range(1, K):
            z = z + xe[:, k + 1:k + 1 + T] * w[:, k]
        final = xe[:, T:].transpose(1, 2) if output_final_state else None
    else:
        N = cu_seqlens.numel() - 1
        cu = cu_seqlens.long()
        seq = prepare_sequence_ids(cu)
        # packed layout with K state rows in front of each sequence: sequence n occupies rows
        # [cu[n] + n * K, cu[n + 1] + (n + 1) * K), its state first
        M = T + N * K
        token_rows = torch.arange(T, device=x.device) + (seq + 1) * K
        state_rows = (cu[:-1] + torch.arange(N, device=x.device) * K)[:, None] + torch.arange(K, device=x.device)
        if initial_state is not None:
            src = torch.cat([xf[0], initial_state.float().transpose(1, 2).reshape(N * K, C)])
            state_src = T + torch.arange(N * K, device=x.device)
        else:
            src = torch.cat([xf[0], xf.new_zeros(1, C)])
            state_src = torch.full((N * K,), T, device=x.device, dtype=torch.long)
        perm = torch.empty(M, device=x.device, dtype=torch.long)
        perm[token_rows] = torch.arange(T, device=x.device)
        perm[state_rows.reshape(-1)] = state_src
        xe = src[perm]  # [M, C]
        # z_ext[r] = output at extended row r + K - 1
        z_ext = xe[:M - K + 1] * w[:, 0]
        for k in range(1, K):
            z_ext = z_ext + xe[k:M - K + 1 + k] * w[:, k]
        z = z_ext[token_rows - (K - 1)][None]
        if output_final_state:
            ends = cu[1:] + (torch.arange(N, device=x.device) + 1) * K
            final = xe[ends[:, None] - K + torch.arange(K, device=x.device)].transpose(1, 2)
        else:
            final = None
    if bias is not None:
        z = z + bias.float()
    y = _activate(z, activation)
    if residual is not None:
        y = y + residual.float()
    if final is not None:
        final = final.to(final_dtype or x.dtype)
    return y.to(x.dtype), final


# ----------------------------------------------------------------------------------------------------------------
# Triton path


class CausalConv1dFunction(torch.autograd.Function):
    @staticmethod
    @autocast_custom_fwd
    def forward(ctx, x, weight, bias, residual, initial_state, cu_seqlens, activation, output_final_state,
                final_dtype):
        from fla.modules.conv_kernels import conv_fwd

        x = x.contiguous()
        weight = weight.contiguous()
        residual = residual.contiguous() if residual is not None else None
        initial_state = initial_state.contiguous() if initial_state is not None else None
        seq_ids = prepare_sequence_ids(cu_seqlens) if cu_seqlens is not None else None
        bias = bias.contiguous() if bias is not None else None
        y, final = conv_fwd(x, weight, bias, residual, initial_state, cu_seqlens, seq_ids, activation,
                            output_final_state, final_dtype)
        ctx.save_for_backward(x, weight, bias, initial_state, cu_seqlens, seq_ids)
        ctx.activation = activation
        ctx.residual_dtype = residual.dtype if residual is not None else None
        return y, final

    @staticmethod
    @autocast_custom_bwd
    def backward(ctx, dy, dfinal):
        from fla.modules.conv_kernels import conv_bwd

        x, weight, bias, initial_state, cu_seqlens, seq_ids = ctx.saved_tensors
        dy = dy.contiguous()
        dfinal = dfinal.contiguous() if dfinal is not None else None
        need_dh0 = initial_state is not None and ctx.needs_input_grad[4]
        dx, dw, db, dh0 = conv_bwd(x, weight, bias, initial_state, cu_seqlens, seq_ids, ctx.activation, dy, dfinal,
                                   need_dh0)
        dres = dy.to(ctx.residual_dtype) if ctx.residual_dtype is not None else None
        return (dx, dw.to(weight.dtype), db.to(bias.dtype) if db is not None else None, dres,
                dh0.to(initial_state.dtype) if dh0 is not None else None, None, None, None, None)


# ----------------------------------------------------------------------------------------------------------------
# public functions


def _check_weight(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Accept [C, K] or nn.Conv1d's depthwise [C, 1, K]; return the [C, K] view."""
    C = x.shape[-1]
    check_tensor("weight", weight, ndim=(2, 3), dtype=FLOAT_DTYPES, device=x.device)
    if weight.ndim == 3:
        check_tensor("weight", weight, shape=(C, 1, None))
        weight = weight.reshape(C, weight.shape[-1])
    check_tensor("weight", weight, shape=(C, None))
    return weight


def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    residual: Optional[torch.Tensor] = None,
    initial_state: Optional[torch.Tensor] = None,
    output_final_state: bool = False,
    activation: Optional[str] = None,
    cu_seqlens: Optional[torch.Tensor] = None,
    mask: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Causal depthwise 1-D convolution over time, per sequence, with optional bias, SiLU and residual.

    Args:
        x: [B, T, C], float32 / float16 / bfloat16. With ``cu_seqlens``, B must be 1 (sequences packed along T).
        weight: [C, K] or [C, 1, K] (``nn.Conv1d`` depthwise layout); tap K - 1 multiplies the current token.
        bias: [C] or None.
        residual: [B, T, C] or None; added after the activation.
        initial_state: [N, C, K] or None (zeros): the last K inputs before each sequence, [..., -1] the most
            recent. N = B, or the number of sequences with ``cu_seqlens``. Differentiable.
        output_final_state: also return the last K inputs of each sequence.
        activation: None, 'silu' or 'swish' (the same).
        cu_seqlens: [N + 1] int32/int64 offsets of packed sequences (FlashAttention style), or None.
        mask: [B, T] 0/1 padding mask or None; positions where it is 0 are zeroed before the convolution (x itself
            is not modified).

    Returns:
        (y [B, T, C] in x.dtype, final_state [N, C, K] in initial_state's dtype (x's when None), or None).
    """
    check_tensor("x", x, ndim=3, dtype=FLOAT_DTYPES)
    B, T, C = x.shape
    weight = _check_weight(weight, x)
    K = weight.shape[1]
    if bias is not None:
        check_tensor("bias", bias, shape=(C,), dtype=FLOAT_DTYPES, device=x.device)
    if residual is not None:
        check_tensor("residual", residual, shape=tuple(x.shape), dtype=FLOAT_DTYPES, device=x.device)
    check_cu_seqlens(cu_seqlens, x)
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    if initial_state is not None:
        check_tensor("initial_state", initial_state, shape=(N, C, K), dtype=FLOAT_DTYPES, device=x.device)
    if mask is not None:
        check_tensor("mask", mask, shape=(B, T), dtype=MASK_DTYPES, device=x.device)
        x = x * mask.unsqueeze(-1).to(x.dtype)
    check_choice("activation", activation, ACTIVATIONS)
    final_dtype = initial_state.dtype if initial_state is not None else x.dtype
    if use_triton(x) and T > 0:
        return CausalConv1dFunction.apply(x, weight, bias, residual, initial_state, cu_seqlens, activation,
                                          bool(output_final_state), final_dtype)
    return causal_conv1d_torch(x, weight, bias, residual, initial_state, output_final_state, activation, cu_seqlens,
                               final_dtype)


def causal_conv1d_update(
    x: torch.Tensor,
    cache: Optional[torch.Tensor],
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    residual: Optional[torch.Tensor] = None,
    activation: Optional[str] = None,
    cu_seqlens: Optional[torch.Tensor] = None,
    inplace: bool = True,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """One decoding step of ``causal_conv1d``: one new token per sequence. Not differentiable through the cache.

    Args:
        x: [B, 1, C] (N = B), or [1, N, C] with ``cu_seqlens`` = [0, 1, ..., N] (one token per packed sequence).
        cache: [N, C, K] convolution state ([..., -1] the most recent input), or None for zeros.
        weight, bias, activation: as in ``causal_conv1d``.
        residual: same shape as x, or None.
        inplace: write the new state into ``cache`` (else into a new tensor).

    Returns:
        (y of x's shape and dtype, new state [N, C, K]: ``cache`` itself when ``inplace``).
    """
    check_tensor("x", x, ndim=3, dtype=FLOAT_DTYPES)
    B, T, C = x.shape
    if cu_seqlens is None:
        if T != 1:
            raise ValueError(f"x must hold one token per sequence, shape [B, 1, C], got {list(x.shape)}; "
                             "use causal_conv1d for longer inputs")
    else:
        check_cu_seqlens(cu_seqlens, x)
        if cu_seqlens.numel() != T + 1 or bool((cu_seqlens[1:] - cu_seqlens[:-1] != 1).any()):
            raise ValueError(f"cu_seqlens must be [0, 1, ..., N] for a decoding step (one token per sequence), "
                             f"got {cu_seqlens.tolist()}")
    N = B * T
    weight = _check_weight(weight, x)
    K = weight.shape[1]
    if bias is not None:
        check_tensor("bias", bias, shape=(C,), dtype=FLOAT_DTYPES, device=x.device)
    if residual is not None:
        check_tensor("residual", residual, shape=tuple(x.shape), dtype=FLOAT_DTYPES, device=x.device)
    check_choice("activation", activation, ACTIVATIONS)
    if cache is None:
        cache = x.new_zeros(N, C, K)
    check_tensor("cache", cache, shape=(N, C, K), dtype=FLOAT_DTYPES, device=x.device)
    if inplace and not cache.is_contiguous():
        raise ValueError("cache must be contiguous to be updated in place")
    rows = x.reshape(N, C)
    res_rows = residual.reshape(N, C) if residual is not None else None
    if use_triton(x):
        from fla.modules.conv_kernels import conv_update

        out = cache if inplace else torch.empty_like(cache)
        y = conv_update(rows.contiguous(), cache.contiguous(), weight.contiguous(), bias,
                        res_rows.contiguous() if res_rows is not None else None, activation, out)
        return y.reshape(x.shape), out
    new = torch.cat([cache[..., 1:].float(), rows.float().unsqueeze(-1)], dim=-1)
    z = (new * weight.float()).sum(-1)
    if bias is not None:
        z = z + bias.float()
    y = _activate(z, activation)
    if res_rows is not None:
        y = y + res_rows.float()
    if inplace:
        cache.copy_(new)
        out = cache
    else:
        out = new.to(cache.dtype)
    return y.to(x.dtype).reshape(x.shape), out


# ----------------------------------------------------------------------------------------------------------------
# module


class ShortConvolution(nn.Conv1d):
    """Causal depthwise convolution over time with an optional SiLU, as applied to q, k and v in Gated DeltaNet.

    An ``nn.Conv1d(hidden_size, hidden_size, kernel_size, groups=hidden_size, padding=kernel_size - 1)``, so the
    parameters are ``weight`` [hidden_size, 1, kernel_size] (and ``bias`` [hidden_size] when ``bias=True``), the
    state-dict keys of FLA checkpoints. ``forward`` runs ``causal_conv1d``; ``step`` decodes one token.
    """

    def __init__(self, hidden_size: int, kernel_size: int = 4, bias: bool = False, activation: Optional[str] = "silu",
                 device=None, dtype=None):
        check_positive_int("hidden_size", hidden_size)
        check_positive_int("kernel_size", kernel_size)
        check_choice("activation", activation, ACTIVATIONS)
        super().__init__(hidden_size, hidden_size, kernel_size, groups=hidden_size, padding=kernel_size - 1,
                         bias=bias, device=device, dtype=dtype)
        self.hidden_size = hidden_size
        self.activation = activation

    def extra_repr(self) -> str:
        s = f"{self.hidden_size}, kernel_size={self.kernel_size[0]}"
        if self.bias is not None:
            s += ", bias=True"
        return s + f", activation={self.activation!r}"

    @property
    def state_size(self) -> int:
        """Number of elements of one sequence's convolution state: hidden_size * kernel_size."""
        return self.hidden_size * self.kernel_size[0]

    def _check_hidden(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or x.ndim != 3:
            raise ValueError(f"x must be a [B, T, hidden_size] tensor, got "
                             f"{list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        if x.shape[-1] != self.hidden_size:
            raise ValueError(f"x has last dimension {x.shape[-1]}, expected hidden_size={self.hidden_size}")

    def forward(
        self,
        x: torch.Tensor,
        residual: Optional[torch.Tensor] = None,
        mask: Optional[torch.Tensor] = None,
        cache: Optional[torch.Tensor] = None,
        output_final_state: bool = False,
        cu_seqlens: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Convolve ``x`` causally, per sequence.

        Args:
            x: [B, T, hidden_size].
            residual: [B, T, hidden_size] or None; added after the activation.
            mask: [B, T] 0/1 padding mask or None; padded inputs are zeroed before the convolution.
            cache: initial state [N, hidden_size, kernel_size] or None; N = B, or the number of sequences with
                ``cu_seqlens``. Not modified (``step`` updates its cache in place).
            output_final_state: also return the new state (the last kernel_size inputs of each sequence).
            cu_seqlens: [N + 1] offsets of sequences packed along T (B = 1), or None.

        Returns:
            (y [B, T, hidden_size] in x.dtype, final state [N, hidden_size, kernel_size] or None).
        """
        self._check_hidden(x)
        B, T, _ = x.shape
        if cu_seqlens is None:
            single_tokens = T == 1
        else:  # every packed sequence one token long (the values are read, as check_cu_seqlens does)
            single_tokens = (B == 1 and isinstance(cu_seqlens, torch.Tensor) and cu_seqlens.numel() == T + 1
                             and not bool((cu_seqlens[1:] - cu_seqlens[:-1] != 1).any()))
        needs_grad = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (x, self.weight, self.bias, residual, cache))
        if cache is not None and single_tokens and not needs_grad and T > 0:
            # decoding: one fused update instead of a convolution launch plus a state gather
            if mask is not None:
                check_tensor("mask", mask, shape=(B, T), dtype=MASK_DTYPES, device=x.device)
                x = x * mask.unsqueeze(-1).to(x.dtype)
            y, state = causal_conv1d_update(x, cache, self.weight, self.bias, residual, self.activation,
                                            cu_seqlens=cu_seqlens, inplace=False)
            return y, (state if output_final_state else None)
        return causal_conv1d(x, self.weight, self.bias, residual=residual, initial_state=cache,
                             output_final_state=output_final_state, activation=self.activation,
                             cu_seqlens=cu_seqlens, mask=mask)

    def step(
        self,
        x: torch.Tensor,
        residual: Optional[torch.Tensor] = None,
        cache: Optional[torch.Tensor] = None,
        output_final_state: bool = True,
        cu_seqlens: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Decode one token per sequence, updating ``cache`` in place.

        Args:
            x: [B, 1, hidden_size], or [1, N, hidden_size] with ``cu_seqlens`` = [0, 1, ..., N].
            residual: same shape as x, or None.
            cache: [N, hidden_size, kernel_size]; shifted left, x written as its newest column. None: zeros.
            output_final_state: return the updated cache (else None; the cache is updated all the same).
            cu_seqlens: see ``x``.

        Returns:
            (y of x's shape, the updated cache or None).
        """
        self._check_hidden(x)
        y, cache = causal_conv1d_update(x, cache, self.weight, self.bias, residual, self.activation,
                                        cu_seqlens=cu_seqlens, inplace=True)
        return y, (cache if output_final_state else None)
