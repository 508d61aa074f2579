"""``HybridGatedDeltaNetConfig`` (``model_type='hybrid_gated_deltanet'``): the paper's laLTE and laNSA models.

Gated DeltaNet layers interleaved with attention-type layers listed in ``attn['layers']``; ``attn['attn_type']``
picks their mixer: ``'lte'`` (``fla.layers.LTEAttention``), ``'nsa'`` (``fla.layers.NativeSparseAttention``) or
``'attn'`` (the default, ``fla.layers.Attention``; a ``window_size`` makes it SWA). The GDN fields are those of
``GatedDeltaNetConfig``; the hybrid rescales ``o_proj`` / ``down_proj`` at init (``prenorm_residual_strategy``
'rescale'), as the reference does.

The ``attn`` dict keys each type needs (a missing one is an error naming it; unknown keys are kept):

    lte: conv_size, conv_dilation, dropout_prob, buffer_size, sink_size, routing_method, routing_grad,
         routing_shared, and the L1 controller's l1_* keys (``fla.models.lte_controller.CONTROLLER_KEYS``)
    nsa: head_dim, block_size, block_counts, window_size (an int)
"""

from __future__ import annotations

from typing import Any, Dict, Optional

from fla.models.gated_deltanet.configuration_gated_deltanet import GatedDeltaNetConfig, normalize_attn_config

ATTN_TYPES = ("attn", "lte", "nsa")
LTE_LAYER_KEYS = ("conv_size", "conv_dilation", "dropout_prob", "buffer_size", "sink_size", "routing_method",
                  "routing_grad", "routing_shared")
NSA_LAYER_KEYS = ("head_dim", "block_size", "block_counts", "window_size")


def normalize_hybrid_attn_config(attn: Optional[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    """``normalize_attn_config`` plus the attention type and the keys that type needs."""
    attn = normalize_attn_config(attn)
    if attn is None:
        return None
    kind = attn.setdefault("attn_type", "attn")
    if kind not in ATTN_TYPES:
        raise ValueError(f"attn['attn_type']={kind!r}; choose one of {ATTN_TYPES}")
    if kind == "lte":
        from fla.models.lte_controller import CONTROLLER_KEYS

        required = LTE_LAYER_KEYS + tuple(CONTROLLER_KEYS)
        if not isinstance(attn.get("window_size"), int) or isinstance(attn.get("window_size"), bool):
            raise ValueError(f"attn['window_size'] must be an int for attn_type 'lte', got {attn.get('window_size')!r}")
    elif kind == "nsa":
        required = NSA_LAYER_KEYS
    else:
        required = ()
    missing = [key for key in required if key not in attn]
    if missing:
        raise ValueError(f"attn_type {kind!r} needs the attn keys {missing} (got {sorted(attn)})")
    return attn


class HybridGatedDeltaNetConfig(GatedDeltaNetConfig):
    """Configuration of ``HybridGatedDeltaNetModel`` / ``HybridGatedDeltaNetForCausalLM``: the fields of
    ``GatedDeltaNetConfig`` with an ``attn`` dict of any ``attn_type`` (see the module docstring)."""

    model_type = "hybrid_gated_deltanet"

    def __init__(self, attn: Optional[Dict[str, Any]] = None, prenorm_residual_strategy: Optional[str] = "rescale",
                 **kwargs: Any) -> None:
        super().__init__(attn=None, **kwargs)
        self.attn = normalize_hybrid_attn_config(attn)
        self.prenorm_residual_strategy = prenorm_residual_strategy
