"""The Learnable Token Eviction (LTE) router: a small non-causal convolution stack that scores every token.

Per token t and key/value head h, with pre-RoPE key k and value v of head size hd:

    x[t, h]   = concat(k[t, h], v[t, h])                         2 hd channels, k first
    z_0       = x (times the padding mask)
    z_{j+1}   = SiLU(mask * conv_j(dropout(z_j)))                 kernel (1, k_j), dilation (1, d_j), 'same' zero
                                                                  padding; channels halve at every layer
    logit     = proj(z_J)                                         a 1x1 convolution to one channel per head
    score     = sigmoid(logit) - 0.5  in (-0.5, 0.5)   ('sigmoid'; the token is kept iff score > 0)
              | ReLU(logit)                            ('relu')

The convolutions are non-causal: a token's score depends on the tokens within ``margin = receptive_field // 2``
positions on either side, ``receptive_field = 1 + sum_j (k_j - 1) d_j``.

Sharing (``routing_shared``):

* ``'head'`` (the paper's configs): one stack per layer, grouped by head (groups = H_kv); channel ``h * 2 hd + j``
  of the flattened input is channel j of head h.
* ``'layer'``: one ungrouped stack per layer of width 2 hd, applied to every head as a separate row.
* ``'all'``: one ungrouped stack shared by every LTE layer of a model. The model builds it
  (``LTERouter.build_shared_stack``) and passes it to each router as ``shared_stack``; there is no process-global
  stack (the reference keeps one in a module global, shared across model instances too).

Parameters keep the reference's ``Conv2d`` shapes (state-dict keys ``conv_stack.convs.{j}.weight`` [G c_{j+1},
c_j, 1, k_j], ``conv_stack.convs.{j}.bias`` [G c_{j+1}], ``conv_stack.proj.weight`` [G, c_J, 1, 1],
``conv_stack.proj.bias`` [G], with c_0 = 2 hd and G = H_kv for 'head', 1 otherwise); the computation uses
``conv1d`` on ``weight.squeeze(2)`` views, which is the same arithmetic without the dummy height axis.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from fla.ops.lte.router_step import lte_router_step, router_centre_scores, routing_activation
from fla.ops.utils.index import prepare_lens, prepare_position_ids, prepare_sequence_ids
from fla.utils import check_choice, check_cu_seqlens, check_non_negative_float, check_positive_int, check_tensor

ROUTING_METHODS = ("sigmoid", "relu")
ROUTING_SHARED = ("head", "layer", "all")


@dataclass
class RoutingStats:
    """What an LTE layer's training / eval forward hands to the L1 regulariser (``LTESparsityController.loss``).

    Attributes:
        layer_idx: the absolute index of the layer in the model.
        score: [B, T, H_kv] float32 router scores (-inf at padded positions); differentiable.
        selected: [B, T, H_kv] bool, the tokens the layer kept (after the sink / window adjustment).
        margin: the router's ``margin`` (receptive_field // 2): the last ``margin`` positions of a training sequence
            are scored without their full right context, so the regulariser drops them.
    """

    layer_idx: int
    score: torch.Tensor
    selected: torch.Tensor
    margin: int


def _check_int_list(name: str, values, *, odd: bool = False) -> List[int]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise ValueError(f"{name} must be a list of positive integers, got {values!r}")
    out = []
    for j, value in enumerate(values):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1 or (odd and value % 2 == 0):
            what = "odd positive integers (a 'same'-padded non-causal convolution)" if odd else "positive integers"
            raise ValueError(f"{name}[{j}]={value!r} is not allowed; {name} must hold {what}, got {list(values)}")
        out.append(value)
    return out


def init_router_conv(conv: nn.Conv2d) -> None:
    """The reference's init of one router convolution (marked by ``LTEConvolutionStack`` with ``lte_projection``):
    Kaiming-normal weight (fan_in, ReLU gain); bias U(+-1/sqrt(fan_in)) (PyTorch's default) for the stack's convs,
    0.5 for the final projection. Model init (``_init_weights``) calls it on the Conv2d modules it visits."""
    with torch.no_grad():
        conv.reset_parameters()
        nn.init.kaiming_normal_(conv.weight, mode="fan_in", nonlinearity="relu")
        if getattr(conv, "lte_projection", False):
            nn.init.constant_(conv.bias, 0.5)


class LTEConvolutionStack(nn.Module):
    """Dilated 1-D convolutions halving the channels at every layer, then a 1x1 projection to one logit per group.

    Args:
        in_channels: c_0, the input channels of one group (2 hd: key and value of one head).
        num_groups: G, independent groups (H_kv for 'head' sharing, 1 otherwise); input channels are G * c_0.
        conv_size: kernel sizes k_j (odd).
        conv_dilation: dilations d_j, as many as ``conv_size``.
        dropout_prob: dropout before each convolution (not before the projection).

    ``forward(x [N, G c_0, T], mask [N, T] or None) -> logits [N, G, T]`` in x's dtype (see the module docstring).
    """

    def __init__(
        self,
        in_channels: int,
        num_groups: int,
        conv_size: Sequence[int],
        conv_dilation: Sequence[int],
        dropout_prob: float = 0.0,
    ) -> None:
        super().__init__()
        check_positive_int("in_channels", in_channels)
        check_positive_int("num_groups", num_groups)
        conv_size = _check_int_list("conv_size", conv_size, odd=True)
        conv_dilation = _check_int_list("conv_dilation", conv_dilation)
        if len(conv_size) != len(conv_dilation):
            raise ValueError(f"conv_size {conv_size} and conv_dilation {conv_dilation} must have the same length "
                             "(one kernel size and one dilation per convolution)")
        dropout_prob = check_non_negative_float("dropout_prob", dropout_prob)
        if dropout_prob >= 1:
            raise ValueError(f"dropout_prob must be in [0, 1), got {dropout_prob!r}")
        channels = [in_channels]
        for j in range(len(conv_size)):
            if channels[-1] % 2:
                raise ValueError(
                    f"the router halves its channels at every convolution: {channels[-1]} channels before "
                    f"convolution {j} are odd (in_channels={in_channels}, {len(conv_size)} convolutions in conv_size)"
                )
            channels.append(channels[-1] // 2)

        self.in_channels = in_channels
        self.num_groups = num_groups
        self.conv_size = conv_size
        self.conv_dilation = conv_dilation
        self.dropout_prob = dropout_prob
        self.channels = channels
        G = num_groups
        self.convs = nn.ModuleList(
            nn.Conv2d(G * channels[j], G * channels[j + 1], kernel_size=(1, k), dilation=(1, d), groups=G,
                      padding="same")
            for j, (k, d) in enumerate(zip(conv_size, conv_dilation))
        )
        self.proj = nn.Conv2d(G * channels[-1], G, kernel_size=1, groups=G)
        for conv in self.convs:  # what ``init_router_conv`` reads (model init visits the Conv2d modules themselves)
            conv.lte_projection = False
        self.proj.lte_projection = True
        self.reset_parameters()

    @property
    def receptive_field(self) -> int:
        """Tokens that influence one score: 1 + sum_j (k_j - 1) d_j."""
        return 1 + sum((k - 1) * d for k, d in zip(self.conv_size, self.conv_dilation))

    @property
    def margin(self) -> int:
        """Neighbours on each side that influence a score: receptive_field // 2."""
        return self.receptive_field // 2

    def reset_parameters(self) -> None:
        """Kaiming-normal (fan_in, ReLU gain) conv and projection weights; projection bias 0.5 (nearly every token
        is kept at the start); conv biases PyTorch's default U(+-1/sqrt(fan_in)) (``init_router_conv``)."""
        for conv in self.convs:
            init_router_conv(conv)
        init_router_conv(self.proj)

    def extra_repr(self) -> str:
        return (f"in_channels={self.in_channels}, num_groups={self.num_groups}, conv_size={self.conv_size}, "
                f"conv_dilation={self.conv_dilation}, dropout_prob={self.dropout_prob}")

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x [N, G c_0, T]; mask [N, T] (1 = token) or None. Returns logits [N, G, T] in the compute dtype: the
        promotion of x's and the weights' dtypes (inputs are never downcast to the weights' dtype)."""
        dtype = torch.promote_types(x.dtype, self.proj.weight.dtype)
        x = x.to(dtype)
        m = None if mask is None else mask.to(dtype).unsqueeze(1)
        for conv, k, d in zip(self.convs, self.conv_size, self.conv_dilation):
            x = F.dropout(x, self.dropout_prob, self.training)
            bias = None if conv.bias is None else conv.bias.to(dtype)
            x = F.conv1d(x, conv.weight.squeeze(2).to(dtype), bias, padding=(k - 1) * d // 2, dilation=d,
                         groups=self.num_groups)
            if m is not None:
                x = x * m
            x = F.silu(x)
        return F.conv1d(x, self.proj.weight.squeeze(2).to(dtype), self.proj.bias.to(dtype), groups=self.num_groups)

    def centre_parameters(self):
        """(conv weights [G c_{j+1}, c_j, k_j], conv biases, dilations, projection weight [G, c_J], projection
        bias [G]): the stack's parameters as ``fla.ops.lte.router_step`` takes them (views, no copies)."""
        return ([conv.weight.squeeze(2) for conv in self.convs], [conv.bias for conv in self.convs],
                list(self.conv_dilation), self.proj.weight.flatten(1), self.proj.bias)


class LTERouter(nn.Module):
    """Scores each token of each key/value head for eviction; see the module docstring.

    Args:
        num_kv_heads: H_kv.
        head_dim: hd, the size of one key / value head (the stack's input is 2 hd channels per head).
        conv_size, conv_dilation: kernel sizes (odd) and dilations of the convolutions.
        dropout_prob: dropout before each convolution (training only).
        routing_method: 'sigmoid' (score = sigmoid(logit) - 0.5) or 'relu' (score = ReLU(logit)).
        routing_grad: if False the router's input is detached, so no gradient reaches k and v through the router.
        routing_shared: 'head' | 'layer' | 'all' (see the module docstring).
        shared_stack: with 'all' only, and required there: the model's one ``LTEConvolutionStack``
            (``LTERouter.build_shared_stack``).

    Mutable attributes (the sparsity controller flips them during warm-up):
        enabled: when False the LTE layer selects every token. The router still computes the same score (the L1
            statistics stay meaningful), so this flag does not change ``forward``.
        routing_grad: as the argument.
    """

    def __init__(
        self,
        num_kv_heads: int,
        head_dim: int,
        conv_size: Sequence[int],
        conv_dilation: Sequence[int],
        dropout_prob: float = 0.0,
        routing_method: str = "sigmoid",
        routing_grad: bool = True,
        routing_shared: str = "head",
        shared_stack: Optional[LTEConvolutionStack] = None,
    ) -> None:
        super().__init__()
        check_positive_int("num_kv_heads", num_kv_heads)
        check_positive_int("head_dim", head_dim)
        check_choice("routing_method", routing_method, ROUTING_METHODS)
        check_choice("routing_shared", routing_shared, ROUTING_SHARED)
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.routing_method = routing_method
        self.routing_shared = routing_shared
        self.routing_grad = bool(routing_grad)
        self.enabled = True

        if routing_shared == "all":
            if shared_stack is None:
                raise ValueError(
                    "routing_shared='all' needs shared_stack: the model builds one stack with "
                    "LTERouter.build_shared_stack(...) and passes it to the router of every LTE layer"
                )
            if not isinstance(shared_stack, LTEConvolutionStack):
                raise ValueError(f"shared_stack must be an LTEConvolutionStack, got {type(shared_stack).__name__}")
            expected = (2 * head_dim, 1, _check_int_list("conv_size", conv_size, odd=True),
                        _check_int_list("conv_dilation", conv_dilation))
            got = (shared_stack.in_channels, shared_stack.num_groups, shared_stack.conv_size,
                   shared_stack.conv_dilation)
            if got != expected:
                raise ValueError(
                    "shared_stack does not fit this router: (in_channels, num_groups, conv_size, conv_dilation) = "
                    f"{got}, expected {expected} (2 * head_dim channels, 1 group)"
                )
            self.conv_stack = shared_stack
        else:
            if shared_stack is not None:
                raise ValueError(f"shared_stack is only used with routing_shared='all', got routing_shared="
                                 f"{routing_shared!r}; each 'head' / 'layer' router builds its own stack")
            groups = num_kv_heads if routing_shared == "head" else 1
            self.conv_stack = LTEConvolutionStack(2 * head_dim, groups, conv_size, conv_dilation, dropout_prob)

    @staticmethod
    def build_shared_stack(head_dim: int, conv_size: Sequence[int], conv_dilation: Sequence[int],
                           dropout_prob: float = 0.0) -> LTEConvolutionStack:
        """The one ungrouped stack that every router of a model shares under ``routing_shared='all'``."""
        check_positive_int("head_dim", head_dim)
        return LTEConvolutionStack(2 * head_dim, 1, conv_size, conv_dilation, dropout_prob)

    @property
    def receptive_field(self) -> int:
        return self.conv_stack.receptive_field

    @property
    def margin(self) -> int:
        return self.conv_stack.margin

    def extra_repr(self) -> str:
        return (f"num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, routing_method={self.routing_method!r}, "
                f"routing_shared={self.routing_shared!r}, routing_grad={self.routing_grad}, enabled={self.enabled}")

    def forward(
        self,
        k: torch.Tensor,
        v: torch.Tensor,
        mask: Optional[torch.Tensor] = None,
        cu_seqlens: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Score every token.

        Args:
            k: [B, T, H_kv, hd] keys **before** RoPE.
            v: [B, T, H_kv, hd] values.
            mask: [B, T] padding mask (1 / True = token) or None. Padded tokens are zeroed at the input and after
                every convolution, so they never influence a real token's score.
            cu_seqlens: [N + 1] offsets of N sequences packed into B = 1; the convolutions do not cross sequence
                boundaries (each sequence is scored as if it were alone).

        Returns:
            score [B, T, H_kv] float32; -inf at padded positions. ``enabled`` does not change it.
        """
        check_tensor("k", k, ndim=4)
        if k.shape[-2:] != (self.num_kv_heads, self.head_dim):
            raise ValueError(f"k must be [batch, time, num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}], "
                             f"got {list(k.shape)}")
        check_tensor("v", v, shape=tuple(k.shape), device=k.device)
        B, T = k.shape[:2]
        if mask is not None:
            check_tensor("mask", mask, shape=(B, T), device=k.device)
            mask = mask != 0
        check_cu_seqlens(cu_seqlens, k)

        x = torch.cat([k, v], dim=-1)  # [B, T, H, 2 hd], k first
        if not self.routing_grad:
            x = x.detach()
        if cu_seqlens is None:
            return self._score(x, mask)

        # Packed sequences: scatter them into a right-padded [N, L_max] batch, whose padding the mask zeroes
        # exactly like the convolutions' own zero padding at a sequence end; gather the scores back.
        cu_seqlens = cu_seqlens.long()
        seq_ids, pos = prepare_sequence_ids(cu_seqlens), prepare_position_ids(cu_seqlens)
        lens = prepare_lens(cu_seqlens)
        N, L = lens.numel(), max(int(lens.max()), 1)
        padded = x.new_zeros((N, L) + tuple(x.shape[2:]))
        padded = padded.index_put((seq_ids, pos), x[0])
        valid = torch.arange(L, device=x.device)[None, :] < lens[:, None]
        if mask is not None:
            valid = valid.index_put((seq_ids, pos), mask[0])
        score = self._score(padded, valid)
        return score[seq_ids, pos].unsqueeze(0)

    def score_centre(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The score of the centre of a window of RF = ``receptive_field`` tokens (the cached decode step's ring).

        Args:
            x: [B, H_kv * 2 hd, RF]: per head its key then its value features, channel-first (a contiguous ring
                whose 'layer' / 'all' rows are views), **zero** where mask is False (the padding mask of ``forward``
                is not applied to x again).
            mask: [B, RF] bool, True = token.

        Returns:
            [B, H_kv] float32: ``forward(k, v, mask)[:, RF // 2]`` of the same window; -inf where the centre is
            masked.
        """
        B, C, RF = x.shape
        H = self.num_kv_heads
        if C != 2 * H * self.head_dim:
            raise ValueError(f"x must be [batch, 2 * num_kv_heads * head_dim = {2 * H * self.head_dim}, "
                             f"receptive_field], got {list(x.shape)}")
        check_tensor("mask", mask, shape=(B, RF), dtype=torch.bool, device=x.device)
        if RF != self.receptive_field:
            raise ValueError(f"x must be [batch, channels, receptive_field={self.receptive_field}], got "
                             f"{list(x.shape)}")
        if not self.routing_grad:
            x = x.detach()
        stack = self.conv_stack
        return router_centre_scores(x, mask, H, *stack.centre_parameters(), stack.num_groups, self.routing_method,
                                    stack.dropout_prob, stack.training)

    def decode_step(self, ring: torch.Tensor, ring_valid: torch.Tensor, new_k: torch.Tensor, new_v: torch.Tensor,
                    real: torch.Tensor, pos: torch.Tensor, score: torch.Tensor, window_size: int) -> None:
        """One decode step of the router ring, in place (``fla.ops.lte.router_step.lte_router_step``).

        Args:
            ring: [B, R, H_kv * 2 hd] (R = receptive_field; token at cache position c in slot c % R, per head its
                pre-RoPE key then its value, zero for pads), ring_valid: [B, R] bool.
            new_k, new_v: [B, H_kv, hd] the new token (pre-RoPE key). real: [B] bool. pos: [B] its cache position.
            score: [B, S, H_kv] float32, the LTE cache's scores: the token at pos - margin gets its score in ring
                slot (pos - margin) % (window_size + 1) (-inf when it is not a real token).
        """
        stack = self.conv_stack
        lte_router_step(ring, ring_valid, new_k, new_v, real, pos, score, window_size, *stack.centre_parameters(),
                        stack.num_groups, self.routing_method, stack.dropout_prob, stack.training)

    def _score(self, x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        """x [B, T, H, 2 hd], mask [B, T] bool or None -> score [B, T, H] float32."""
        B, T, H, C = x.shape
        if mask is not None:
            x = x * mask[:, :, None, None].to(x.dtype)
        if self.routing_shared == "head":
            logits = self.conv_stack(x.reshape(B, T, H * C).transpose(1, 2), mask)  # [B, H, T]
        else:
            # Every head is a row of its own. The reference does not pass the mask into a shared ('layer' / 'all')
            # stack, so there padding leaks into real tokens' scores through the conv outputs; we mask here too.
            rows = x.permute(0, 2, 3, 1).reshape(B * H, C, T)
            row_mask = None if mask is None else mask.repeat_interleave(H, dim=0)
            logits = self.conv_stack(rows, row_mask).reshape(B, H, T)
        score = routing_activation(logits.transpose(1, 2), self.routing_method)
        if mask is not None:
            score = score.masked_fill(~mask[:, :, None], float("-inf"))
        return score
