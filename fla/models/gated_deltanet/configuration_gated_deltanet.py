"""``GatedDeltaNetConfig`` (``model_type='gated_deltanet'``): FLA's config keys, the reference's meanings.

The paper's ``gated_delta_net_{0.4B,1.4B}`` configs (``configs/``) are pure Gated DeltaNet models of this type; its
SWA and full-attention baselines are this type too, with an ``attn`` dict naming the attention layers
(``fla.layers.Attention`` mixers at those indices). Unknown keys are kept as attributes, as transformers does.
"""

from __future__ import annotations

import copy
from typing import Any, Dict, Optional

from fla.models.configuration_base import FLAConfig

ATTN_MODES = ("chunk", "fused_recurrent")


def normalize_attn_config(attn: Optional[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    """Validate an ``attn`` dict (the hybrid attention layers) and fill FLA's defaults into a copy: ``num_kv_heads``
    (= num_heads), ``qkv_bias`` (False), ``window_size`` (None: full attention) and ``rope_theta`` (10000)."""
    if attn is None:
        return None
    if not isinstance(attn, dict):
        raise ValueError(f"attn must be a dict (with 'layers' and 'num_heads') or None, got {type(attn).__name__}")
    for key in ("layers", "num_heads"):
        if key not in attn:
            raise ValueError(f"attn must name '{key}' (got keys {sorted(attn)})")
    layers = attn["layers"]
    if not isinstance(layers, (list, tuple)) or not all(
            isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers):
        raise ValueError(f"attn['layers'] must be a list of layer indices (ints >= 0), got {layers!r}")
    attn = copy.deepcopy(attn)
    attn.setdefault("num_kv_heads", attn["num_heads"])
    attn.setdefault("qkv_bias", False)
    attn.setdefault("window_size", None)
    attn.setdefault("rope_theta", 10000.0)
    return attn


class GatedDeltaNetConfig(FLAConfig):
    """Configuration of ``GatedDeltaNetModel`` / ``GatedDeltaNetForCausalLM``.

    Mixer: ``attn_mode`` ('chunk' or 'fused_recurrent'), ``hidden_size``, ``expand_v`` (d_v / d_k), ``head_dim``
    (d_k), ``num_heads``, ``num_v_heads`` (None = num_heads), ``use_gate``, ``use_short_conv``, ``conv_size``,
    ``allow_neg_eigval``. Blocks: ``num_hidden_layers``, ``hidden_ratio`` / ``intermediate_size`` / ``hidden_act``
    of the SwiGLU MLP, ``norm_eps``. ``attn``: None, or the hybrid attention layers (dict with ``layers``,
    ``num_heads``, ...). Init: ``initializer_range`` (std of the normal init; 0.006 as in the paper).
    Kernels and loss: ``fuse_norm`` (fla RMSNorm with the fused residual add, else torch's RMSNorm),
    ``fuse_swiglu``, ``fuse_cross_entropy``, ``fuse_linear_cross_entropy`` (chunked LM head + loss in training;
    takes precedence over ``fuse_cross_entropy``), ``use_l2warp``. Tokens: ``vocab_size``, ``pad_token_id``,
    ``bos_token_id``, ``eos_token_id``, ``tie_word_embeddings``; ``max_position_embeddings`` (informational:
    recurrent layers have no position limit); ``use_cache``.
    """

    model_type = "gated_deltanet"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        attn_mode: str = "chunk",
        hidden_size: int = 2048,
        expand_v: float = 2,
        use_gate: bool = True,
        use_short_conv: bool = True,
        allow_neg_eigval: bool = False,
        conv_size: int = 4,
        head_dim: int = 256,
        num_heads: int = 6,
        num_v_heads: Optional[int] = None,
        max_position_embeddings: int = 2048,
        hidden_ratio: Optional[float] = 4,
        intermediate_size: Optional[int] = None,
        hidden_act: str = "swish",
        num_hidden_layers: int = 21,
        norm_eps: float = 1e-6,
        attn: Optional[Dict[str, Any]] = None,
        use_cache: bool = True,
        pad_token_id: Optional[int] = None,
        bos_token_id: Optional[int] = 1,
        eos_token_id: Optional[int] = 2,
        tie_word_embeddings: bool = False,
        initializer_range: float = 0.006,
        fuse_norm: bool = True,
        fuse_swiglu: bool = True,
        fuse_cross_entropy: bool = True,
        fuse_linear_cross_entropy: bool = False,
        use_l2warp: bool = False,
        vocab_size: int = 32000,
        **kwargs: Any,
    ) -> None:
        if attn_mode not in ATTN_MODES:
            raise ValueError(f"attn_mode={attn_mode!r}; choose one of {ATTN_MODES}")
        self.attn_mode = attn_mode
        self.hidden_size = hidden_size
        self.expand_v = expand_v
        self.use_gate = use_gate
        self.use_short_conv = use_short_conv
        self.allow_neg_eigval = allow_neg_eigval
        self.conv_size = conv_size
        self.head_dim = head_dim
        self.num_heads = num_heads
        self.num_v_heads = num_v_heads
        self.max_position_embeddings = max_position_embeddings
        self.hidden_ratio = hidden_ratio
        self.intermediate_size = intermediate_size
        self.hidden_act = hidden_act
        self.num_hidden_layers = num_hidden_layers
        self.norm_eps = norm_eps
        self.attn = normalize_attn_config(attn)
        self.use_cache = use_cache
        self.initializer_range = initializer_range
        self.fuse_norm = fuse_norm
        self.fuse_swiglu = fuse_swiglu
        self.fuse_cross_entropy = fuse_cross_entropy
        self.fuse_linear_cross_entropy = fuse_linear_cross_entropy
        self.use_l2warp = use_l2warp
        self.vocab_size = vocab_size
        self.init_base(pad_token_id, bos_token_id, eos_token_id, tie_word_embeddings, **kwargs)
