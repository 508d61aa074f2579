"""``GatedDeltaNet``: the Gated DeltaNet token mixer (Yang et al., 2024) with FLA's parameter names.

Per token x (hidden size H), with n heads of key size d_k = head_dim and value size d_v = head_dim * expand_v:

    q, k, v = SiLU(ShortConv(q_proj x)), SiLU(ShortConv(k_proj x)), SiLU(ShortConv(v_proj x))   split into n heads
    beta    = sigmoid(b_proj x)                 (x 2 with allow_neg_eigval: update eigenvalues in (-1, 1])
    g       = -exp(A_log) * softplus(a_proj x + dt_bias)        float32, the per-head log decay
    o       = gated_delta_rule(L2norm(q), L2norm(k), v, g, beta, scale = d_k ** -0.5)
    y       = o_proj(RMSNorm_{d_v}(o) * SiLU(g_proj x))         (plain RMSNorm without use_gate)

The gated delta rule keeps a [d_k, d_v] float32 state per head and sequence (``fla.ops.gated_delta_rule``): the
chunked op for training and long inputs, the recurrent op for at most 64 tokens at inference (decoding).

Everything runs in the dtype of the input: float32 inputs stay float32 (the reference implementation silently ran
its kernels in float16 then).
"""

from __future__ import annotations

import math
from typing import Any, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from fla.layers.utils import check_mixer_inputs, pad_input, padding_mask, unpad_input
from fla.modules import FusedRMSNormGated, RMSNorm, ShortConvolution
from fla.utils import check_choice, check_positive_int

MODES = ("chunk", "fused_recurrent")
# Inference inputs of at most this many tokens run the recurrent op (FLA's switch).
RECURRENT_MAX_TOKENS = 64

# dt = exp(U(ln DT_MIN, ln DT_MAX)) clamped below at DT_FLOOR; dt_bias = softplus^{-1}(dt) (Mamba-2's init)
DT_MIN, DT_MAX, DT_FLOOR = 1e-3, 1e-1, 1e-4
A_MAX = 16.0  # A ~ U(0, 16], A_log = ln A


class GatedDeltaNet(nn.Module):
    """Gated DeltaNet token mixer; see the module docstring for the computation.

    Args:
        hidden_size: H, the model width.
        expand_v: d_v / d_k; ``head_dim * expand_v`` must be an integer.
        head_dim: d_k, the key (and query) size per head.
        num_heads: n, the number of heads.
        num_v_heads: the number of value heads; None means ``num_heads`` (the only supported value: grouped value
            heads are not implemented).
        mode: 'chunk' (training and long inputs) or 'fused_recurrent' (inference only: it has no backward). At
            inference, inputs of at most 64 tokens always take the recurrent op.
        use_gate: output gate ``g_proj`` with a gated RMSNorm (else a plain RMSNorm, no ``g_proj``).
        use_short_conv: the causal depthwise convolutions ``q_conv1d`` / ``k_conv1d`` / ``v_conv1d`` (else SiLU
            directly after the projections).
        allow_neg_eigval: beta = 2 sigmoid(b) instead of sigmoid(b).
        conv_size, conv_bias: kernel size and bias of the short convolutions.
        layer_idx: the index of this layer in the model (its slot in the cache).
        norm_eps: epsilon of the output norm.

    Parameters (FLA's state-dict keys): ``q_proj``, ``k_proj`` [n d_k, H]; ``v_proj``, ``g_proj`` [n d_v, H];
    ``a_proj``, ``b_proj`` [n, H]; ``o_proj`` [H, n d_v] (no biases); ``A_log``, ``dt_bias`` [n] (no weight decay:
    ``_no_weight_decay = True``); ``q_conv1d``, ``k_conv1d``, ``v_conv1d`` weight [C, 1, conv_size];
    ``o_norm.weight`` [d_v].
    """

    def __init__(
        self,
        hidden_size: int = 2048,
        expand_v: float = 2,
        head_dim: int = 256,
        num_heads: int = 6,
        num_v_heads: Optional[int] = None,
        mode: str = "chunk",
        use_gate: bool = True,
        use_short_conv: bool = True,
        allow_neg_eigval: bool = False,
        conv_size: int = 4,
        conv_bias: bool = False,
        layer_idx: Optional[int] = None,
        norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        check_positive_int("hidden_size", hidden_size)
        check_positive_int("head_dim", head_dim)
        check_positive_int("num_heads", num_heads)
        check_positive_int("conv_size", conv_size)
        check_choice("mode", mode, MODES)
        if num_v_heads is None:
            num_v_heads = num_heads
        if num_v_heads != num_heads:
            raise ValueError(
                f"num_v_heads={num_v_heads!r} differs from num_heads={num_heads}: grouped value heads are not "
                "supported; leave num_v_heads=None (= num_heads)"
            )
        if isinstance(expand_v, bool) or not isinstance(expand_v, (int, float)) or not expand_v > 0:
            raise ValueError(f"expand_v must be a number > 0, got {expand_v!r}")
        head_v_dim = head_dim * expand_v
        if not math.isclose(head_v_dim, round(head_v_dim)):
            raise ValueError(f"head_dim * expand_v = {head_dim} * {expand_v} = {head_v_dim} must be an integer "
                             "(the value size per head)")
        if layer_idx is not None and (isinstance(layer_idx, bool) or not isinstance(layer_idx, int) or layer_idx < 0):
            raise ValueError(f"layer_idx must be None or an int >= 0, got {layer_idx!r}")

        self.hidden_size = hidden_size
        self.expand_v = expand_v
        self.head_dim = head_dim
        self.num_heads = num_heads
        self.num_v_heads = num_v_heads
        self.head_k_dim = head_dim
        self.head_v_dim = int(round(head_v_dim))
        self.key_dim = num_heads * self.head_k_dim
        self.value_dim = num_v_heads * self.head_v_dim
        self.mode = mode
        self.use_gate = bool(use_gate)
        self.use_short_conv = bool(use_short_conv)
        self.allow_neg_eigval = bool(allow_neg_eigval)
        self.conv_size = conv_size
        self.conv_bias = bool(conv_bias)
        self.layer_idx = layer_idx
        self.norm_eps = norm_eps

        self.q_proj = nn.Linear(hidden_size, self.key_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, self.key_dim, bias=False)
        self.v_proj = nn.Linear(hidden_size, self.value_dim, bias=False)
        self.a_proj = nn.Linear(hidden_size, num_v_heads, bias=False)
        self.b_proj = nn.Linear(hidden_size, num_v_heads, bias=False)
        self.A_log = nn.Parameter(torch.empty(num_v_heads, dtype=torch.float32))
        self.dt_bias = nn.Parameter(torch.empty(num_v_heads, dtype=torch.float32))
        if self.use_short_conv:
            self.q_conv1d = ShortConvolution(self.key_dim, conv_size, bias=self.conv_bias, activation="silu")
            self.k_conv1d = ShortConvolution(self.key_dim, conv_size, bias=self.conv_bias, activation="silu")
            self.v_conv1d = ShortConvolution(self.value_dim, conv_size, bias=self.conv_bias, activation="silu")
        if self.use_gate:
            self.g_proj = nn.Linear(hidden_size, self.value_dim, bias=False)
            self.o_norm = FusedRMSNormGated(self.head_v_dim, eps=norm_eps, activation="swish")
        else:
            self.o_norm = RMSNorm(self.head_v_dim, eps=norm_eps)
        self.o_proj = nn.Linear(self.value_dim, hidden_size, bias=False)
        self.reset_parameters()

    def extra_repr(self) -> str:
        return (f"mode={self.mode!r}, num_heads={self.num_heads}, head_dim={self.head_dim}, "
                f"expand_v={self.expand_v}, use_gate={self.use_gate}, use_short_conv={self.use_short_conv}, "
                f"allow_neg_eigval={self.allow_neg_eigval}, layer_idx={self.layer_idx}")

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Draw the decay parameters (this module's own; the submodules initialise themselves):
        A_log = ln A with A ~ U(0, 16], and dt_bias = softplus^{-1}(dt), dt = max(exp(U(ln 1e-3, ln 1e-1)), 1e-4).

        Called by the constructor and by the models' weight initialisation, so that a model built on the meta device
        and materialised with ``to_empty`` gets these values too (the reference left them uninitialised there).
        """
        # In-place pointwise ops on the parameters themselves: the same code works for plain, meta and sharded
        # (FSDP2 DTensor) parameters, where the reference skipped sharded ones and left them uninitialised.
        # A = 16 (1 - u), u ~ U[0, 1): A lies in (0, 16], so A_log is always finite.
        self.A_log.uniform_(0.0, 1.0).neg_().add_(1.0).mul_(A_MAX).log_()
        dt = self.dt_bias
        dt.uniform_(0.0, 1.0).mul_(math.log(DT_MAX) - math.log(DT_MIN)).add_(math.log(DT_MIN)).exp_()
        dt.clamp_(min=DT_FLOOR)
        dt.add_(torch.log(-torch.expm1(-dt)))  # softplus^{-1}(dt) = dt + log(1 - exp(-dt))
        # weight-decay exclusion tags (re-set here: to_empty and FSDP create new Parameter objects)
        self.A_log._no_weight_decay = True
        self.dt_bias._no_weight_decay = True

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        past_key_values: Optional[Any] = None,
        use_cache: bool = False,
        output_attentions: bool = False,
        **kwargs: Any,
    ) -> Tuple[torch.Tensor, None, Optional[Any]]:
        """Mix the tokens of ``hidden_states`` [B, T, H].

        Args:
            attention_mask: [B, T'] 0/1 padding mask (1 = token) or None; its last T columns are used (T' >= T:
                ``generate`` passes past and new columns). Padded tokens are removed before the mixer (sequences
                are packed and described by ``cu_seqlens``), so left padding does not reach the state, and the output
                is zero there. Cannot be combined with ``cu_seqlens`` unless it is all ones.
            past_key_values: an ``fla.models.utils.Cache`` or None. The layer continues from its state there (if
                any) and, with ``use_cache``, stores its new state there.
            use_cache: store the final recurrent and convolution states in ``past_key_values``.
            output_attentions: accepted for API compatibility; there are no attention weights (None is returned).
            kwargs: ``cu_seqlens`` [N + 1] (int32 / int64) for B = 1 inputs that pack N sequences; other keyword
                arguments (e.g. ``position_ids``) are ignored.

        Returns:
            (output [B, T, H] in the input's dtype, None, past_key_values)
        """
        check_mixer_inputs(hidden_states, self.hidden_size, past_key_values, self.layer_idx)
        if self.training and self.mode == "fused_recurrent":
            raise ValueError("mode='fused_recurrent' has no backward pass; use mode='chunk' to train")
        batch_size, q_len, _ = hidden_states.shape
        cu_seqlens = kwargs.get("cu_seqlens")

        indices = None
        mask = padding_mask(attention_mask, batch_size, q_len, cu_seqlens)
        if mask is not None:
            hidden_states, indices, cu_seqlens, _ = unpad_input(hidden_states, mask)

        last_state = None
        if past_key_values is not None and len(past_key_values) > self.layer_idx:
            last_state = past_key_values[self.layer_idx]
        recurrent_state = last_state["recurrent_state"] if last_state is not None else None
        conv_state = last_state["conv_state"] if last_state is not None else None

        if self.use_short_conv:
            conv_q, conv_k, conv_v = conv_state if conv_state is not None else (None, None, None)
            q, conv_q = self.q_conv1d(self.q_proj(hidden_states), cache=conv_q, output_final_state=use_cache,
                                      cu_seqlens=cu_seqlens)
            k, conv_k = self.k_conv1d(self.k_proj(hidden_states), cache=conv_k, output_final_state=use_cache,
                                      cu_seqlens=cu_seqlens)
            v, conv_v = self.v_conv1d(self.v_proj(hidden_states), cache=conv_v, output_final_state=use_cache,
                                      cu_seqlens=cu_seqlens)
            conv_state = (conv_q, conv_k, conv_v)
        else:
            q = F.silu(self.q_proj(hidden_states))
            k = F.silu(self.k_proj(hidden_states))
            v = F.silu(self.v_proj(hidden_states))
        q = q.unflatten(-1, (self.num_heads, self.head_k_dim))
        k = k.unflatten(-1, (self.num_heads, self.head_k_dim))
        v = v.unflatten(-1, (self.num_v_heads, self.head_v_dim))

        beta = self.b_proj(hidden_states).sigmoid()
        if self.allow_neg_eigval:
            beta = beta * 2.0
        g = -self.A_log.float().exp() * F.softplus(self.a_proj(hidden_states).float() + self.dt_bias.float())

        # imported here, not at the top: `import fla` stays free of kernel modules
        if self.mode == "fused_recurrent" or (not self.training and q_len <= RECURRENT_MAX_TOKENS):
            from fla.ops.gated_delta_rule import fused_recurrent_gated_delta_rule as gated_delta_rule
        else:
            from fla.ops.gated_delta_rule import chunk_gated_delta_rule as gated_delta_rule
        o, recurrent_state = gated_delta_rule(
            q, k, v, g, beta,
            initial_state=recurrent_state,
            output_final_state=use_cache,
            use_qk_l2norm_in_kernel=True,
            cu_seqlens=cu_seqlens,
        )

        if use_cache and past_key_values is not None:
            past_key_values.update(
                recurrent_state=recurrent_state,
                conv_state=conv_state if self.use_short_conv else None,
                layer_idx=self.layer_idx,
                offset=q_len,
            )

        if self.use_gate:
            gate = self.g_proj(hidden_states).unflatten(-1, (self.num_v_heads, self.head_v_dim))
            o = self.o_norm(o, gate)
        else:
            o = self.o_norm(o)
        o = self.o_proj(o.flatten(-2))
        if indices is not None:
            o = pad_input(o, indices, batch_size, q_len)
        return o, None, past_key_values
