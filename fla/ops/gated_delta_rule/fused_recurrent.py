"""``fused_recurrent_gated_delta_rule``: token-by-token gated delta rule for decoding and short inputs.

(Placeholder until the Triton decode kernel lands: runs the float32 reference.)
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from fla.ops.gated_delta_rule.common import check_gdn_inputs
from fla.ops.gated_delta_rule.naive import naive_recurrent_gated_delta_rule


def fused_recurrent_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: Optional[float] = None,
    initial_state: Optional[torch.Tensor] = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
    cu_seqlens: Optional[torch.LongTensor] = None,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Same arguments and results as ``chunk_gated_delta_rule``; meant for decoding (T = 1) and short inputs."""
    check_gdn_inputs(q, k, v, g, beta, initial_state, cu_seqlens)
    return naive_recurrent_gated_delta_rule(q, k, v, g, beta, scale, initial_state, output_final_state,
                                            use_qk_l2norm_in_kernel, cu_seqlens)
