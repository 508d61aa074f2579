"""Training-step benchmark (tokens/s, MFU, peak memory) per model family; run ``python -m benchmarks.training``.

Model FLOPs per token, the numerator of MFU (forward + backward; backward counted as twice the forward):

    flops_per_token = 6 * N  +  3 * sum over token-mixer layers of  mixer_fwd_flops_per_token

    N: parameters that multiply activations: every parameter except the input embedding table, plus the
       output projection (lm_head) when it shares the embedding's weight.
    softmax attention layer (HQ query heads of size D): 4 * HQ * D * keys, where keys is the mean number of keys a
       query attends to over positions 0 .. T-1 (QK^T and PV, 2 flops per multiply-add):
         full causal: (T + 1) / 2;   sliding window w: mean of min(i + 1, w);
         NSA (block size BS, S selected blocks, window w): mean of floor((i + 1) / BS) + min(S * BS, i + 1)
             + min(w, i + 1);
         LTE (window w, i.e. w + 1 keys): mean of min(i + 1, w + 1); the keys an LTE query keeps beyond its window
             depend on the learnt router and are not counted (so LTE's figure is a lower bound).
    Gated DeltaNet layer (H heads, key size K, value size V, chunk C = 64): 2 * H * (3 * K * V + C / 2 * (K + V)):
       reading and updating the K x V state and producing the output from it, plus the causal intra-chunk
       attention. Short convolutions, norms and gates are not counted.

MFU = flops_per_token * tokens_per_second / peak, with the dense bf16 peak of the card from ``PEAK_TFLOPS``
(None when the card is not in the table, and on the CPU).
"""

from __future__ import annotations

from typing import Dict, List, Optional

import torch

# dense bf16 tensor-core peak, TFLOP/s (vendor figures without sparsity), matched in this order by substring of the
# device name (so "H100 PCIe" is tried before the SXM "H100")
PEAK_TFLOPS = {"H200": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0}
GDN_CHUNK = 64


def peak_tflops(device: str) -> Optional[float]:
    for key, value in PEAK_TFLOPS.items():
        if key in device:
            return value
    return None


def matmul_params(model: torch.nn.Module) -> int:
    """Parameters that multiply activations (see the module docstring)."""
    total = sum(p.numel() for p in model.parameters())
    emb = model.get_input_embeddings().weight
    out = model.get_output_embeddings()
    tied = out is not None and out.weight is emb
    return total - emb.numel() + (emb.numel() if tied else 0)


def _mean_keys(seq_len: int, cap: Optional[int]) -> float:
    """Mean over positions i < seq_len of min(i + 1, cap) (cap None: i + 1)."""
    if cap is None or cap >= seq_len:
        return (seq_len + 1) / 2
    return (cap * (cap + 1) / 2 + (seq_len - cap) * cap) / seq_len


def mixer_layers(config) -> List[Dict]:
    """The token mixer of each layer of ``config`` as a dict: kind (gdn, attn, swa, nsa, lte) and its sizes."""
    L = config.num_hidden_layers
    if config.model_type == "transformer":
        heads = config.num_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        kind = "attn" if config.window_size is None else "swa"
        return [{"kind": kind, "heads": heads, "head_dim": head_dim, "window": config.window_size}] * L
    attn = dict(getattr(config, "attn", None) or {})
    attn_layers = set(attn.get("layers", []))
    heads, key_dim = config.num_heads, config.head_dim
    gdn = {"kind": "gdn", "heads": heads, "key_dim": key_dim, "value_dim": int(key_dim * config.expand_v)}
    layers = []
    for i in range(L):
        if i not in attn_layers:
            layers.append(gdn)
            continue
        a_heads = attn["num_heads"]
        a_dim = attn.get("head_dim") or config.hidden_size // a_heads
        kind = attn.get("attn_type") or "attn"
        if kind == "attn" and attn.get("window_size") is not None:
            kind = "swa"
        layers.append({"kind": kind, "heads": a_heads, "head_dim": a_dim, "window": attn.get("window_size"),
                       "block_size": attn.get("block_size"), "block_counts": attn.get("block_counts")})
    return layers


def mixer_fwd_flops_per_token(layer: Dict, seq_len: int) -> float:
    kind = layer["kind"]
    if kind == "gdn":
        K, V = layer["key_dim"], layer["value_dim"]
        return 2 * layer["heads"] * (3 * K * V + GDN_CHUNK / 2 * (K + V))
    if kind == "attn":
        keys = _mean_keys(seq_len, None)
    elif kind == "swa":
        keys = _mean_keys(seq_len, layer["window"])
    elif kind == "lte":
        keys = _mean_keys(seq_len, layer["window"] + 1)
    elif kind == "nsa":
        bs, s, w = layer["block_size"], layer["block_counts"], layer["window"] or 0
        compressed = sum((i + 1) // bs for i in range(seq_len)) / seq_len
        keys = compressed + _mean_keys(seq_len, s * bs) + (_mean_keys(seq_len, w) if w else 0)
    else:
        raise ValueError(f"unknown mixer kind {kind!r}")
    return 4 * layer["heads"] * layer["head_dim"] * keys


def flops_per_token(model: torch.nn.Module, seq_len: int) -> float:
    """Training (forward + backward) model FLOPs per token at sequence length ``seq_len``."""
    mixers = sum(mixer_fwd_flops_per_token(layer, seq_len) for layer in mixer_layers(model.config))
    return 6 * matmul_params(model) + 3 * mixers
