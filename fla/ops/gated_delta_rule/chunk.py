"""``chunk_gated_delta_rule``: the chunked gated delta rule for training and prefill.

(Placeholder dispatch until the chunked Triton kernels and the chunked torch path land: both paths run the float32
token-by-token reference, which is exact but slow.)
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from fla.ops.gated_delta_rule.common import check_gdn_inputs
from fla.ops.gated_delta_rule.naive import naive_recurrent_gated_delta_rule


def chunk_gated_delta_rule(
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
    """Gated delta rule over whole sequences; see ``fla.ops.gated_delta_rule.naive`` for the recurrence.

    Args:
        q, k: [B, T, H, K]. v: [B, T, H, V]. g (log decay): [B, T, H]. beta: [B, T, H].
        scale: output scale, default K ** -0.5.
        initial_state: [N, H, K, V] or None. output_final_state: return the final states [N, H, K, V] (float32).
        use_qk_l2norm_in_kernel: L2-normalise q and k over K inside the op (x / sqrt(sum x^2 + 1e-6)).
        cu_seqlens: [N + 1] offsets of packed sequences (B = 1).

    Returns:
        (o [B, T, H, V] in v.dtype, final_state [N, H, K, V] float32 or None)
    """
    check_gdn_inputs(q, k, v, g, beta, initial_state, cu_seqlens)
    return naive_recurrent_gated_delta_rule(q, k, v, g, beta, scale, initial_state, output_final_state,
                                            use_qk_l2norm_in_kernel, cu_seqlens)
