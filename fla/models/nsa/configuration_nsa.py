"""``NSAConfig`` (``model_type='nsa'``): FLA's config keys for a model whose every layer is Native Sparse Attention.

Every layer is an ``fla.layers.NativeSparseAttention`` (RoPE, grouped-query, compressed + selected + window
branches) + SwiGLU MLP. The paper's ``nsa_{0.4B,1.4B}`` configs (``configs/``) are of this type. Unknown keys are
kept as attributes.
"""

from __future__ import annotations

from typing import Any, Optional

from fla.models.configuration_base import FLAConfig


class NSAConfig(FLAConfig):
    """Configuration of ``NSAModel`` / ``NSAForCausalLM``.

    Mixer: ``hidden_size``, ``num_heads``, ``num_kv_heads`` (must divide num_heads; any group size), ``head_dim``
    (the size of every head, independent of hidden_size; honoured here, whereas the reference's block ignored it
    and always used 64, the value of every paper config), ``qkv_bias``, ``block_size``, ``block_counts``,
    ``window_size`` (keys of the window branch, the query itself included; 0 / None: no window branch),
    ``rope_theta``, ``max_position_embeddings`` (informational). Blocks: ``num_hidden_layers``, ``hidden_ratio`` /
    ``intermediate_size`` / ``hidden_act``, ``norm_eps``, ``elementwise_affine`` (stored for FLA compatibility).
    Init: ``initializer_range``. Kernels and loss: ``fuse_norm``, ``fuse_swiglu``, ``fuse_cross_entropy``,
    ``fuse_linear_cross_entropy``, ``use_l2warp``. Tokens: ``vocab_size``, ``pad_token_id``, ``bos_token_id``,
    ``eos_token_id``, ``tie_word_embeddings``; ``use_cache``.
    """

    model_type = "nsa"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        hidden_size: int = 2048,
        num_hidden_layers: int = 24,
        num_heads: int = 64,
        num_kv_heads: Optional[int] = 4,
        head_dim: int = 64,
        qkv_bias: bool = False,
        block_size: int = 64,
        block_counts: int = 16,
        window_size: Optional[int] = 512,
        rope_theta: Optional[float] = 10000.0,
        max_position_embeddings: int = 2048,
        hidden_ratio: Optional[float] = 4,
        intermediate_size: Optional[int] = None,
        hidden_act: str = "swish",
        initializer_range: float = 0.006,
        elementwise_affine: Optional[bool] = True,
        norm_eps: float = 1e-6,
        use_cache: bool = True,
        pad_token_id: Optional[int] = None,
        bos_token_id: Optional[int] = 1,
        eos_token_id: Optional[int] = 2,
        tie_word_embeddings: bool = False,
        fuse_norm: bool = True,
        fuse_swiglu: bool = True,
        fuse_cross_entropy: bool = True,
        fuse_linear_cross_entropy: bool = False,
        use_l2warp: bool = False,
        vocab_size: int = 32000,
        **kwargs: Any,
    ) -> None:
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.qkv_bias = qkv_bias
        self.block_size = block_size
        self.block_counts = block_counts
        self.window_size = window_size
        self.rope_theta = rope_theta
        self.max_position_embeddings = max_position_embeddings
        self.hidden_ratio = hidden_ratio
        self.intermediate_size = intermediate_size
        self.hidden_act = hidden_act
        self.initializer_range = initializer_range
        self.elementwise_affine = elementwise_affine
        self.norm_eps = norm_eps
        self.use_cache = use_cache
        self.fuse_norm = fuse_norm
        self.fuse_swiglu = fuse_swiglu
        self.fuse_cross_entropy = fuse_cross_entropy
        self.fuse_linear_cross_entropy = fuse_linear_cross_entropy
        self.use_l2warp = use_l2warp
        self.vocab_size = vocab_size
        self.init_base(pad_token_id, bos_token_id, eos_token_id, tie_word_embeddings, **kwargs)
