"""Triton kernel of one LTE router decode step (``fla.ops.lte.router_step.lte_router_step``), in place.

One program per (row b, kv head h), new token at cache position p = pos[b], router ring of R = 2m + 1 slots
(token at position c in ring slot c % R), convolutions j = 0 .. L-1 (L <= ``MAX_LAYERS``) with kernel sizes k_j,
dilations d_j and channels c_0 = 2 hd, c_{j+1} = c_j / 2:

1. write the new token's key and value (zeros for a pad) into ring slot p % R, its flag too (head 0 only);
   a CTA barrier makes the write visible to the loads below;
2. layer 0 reads its k_0 taps straight from the ring: the input row of time index i (0 = position p - 2m) is ring
   slot (p - 2m + i) mod R, output rows t = 0 .. R - 1 - (k_0 - 1) d_0 (row t is centred on time index
   t + (k_0 - 1) d_0 / 2); each tap is one [T, c_0] x [c_0, c_1] tensor-core product;
3. later layers take their input from registers: the rows of tap s are selected by a 0/1 shift matrix
   (row t picks row t + s d_j, a product of [T, T] x [T, c_j]: exact), then multiplied by the tap's weights;
4. every layer but the last multiplies its outputs by the flags of the time indices they are centred on, then SiLU
   (the last: SiLU only, as ``router_centre_logits``); the 1x1 projection of output row 0 gives the logit;
5. score = sigmoid(logit) - 0.5 ('sigmoid') or ReLU(logit) ('relu'), -inf when the centre (time index m) is not a
   real token, stored into ``score[b, (p - m) mod W1, h]``.

Rows beyond a layer's valid outputs hold values no valid row depends on. Products take the weights' dtype with
float32 accumulation; bias, flags and SiLU in float32. No host sync, no data-dependent shape: capturable in a CUDA
graph.
"""

from __future__ import annotations

from typing import Dict, Sequence, Tuple

import triton
import triton.language as tl

MAX_LAYERS = 4


def launch_constexprs(num_heads: int, head_dim: int, kernel_sizes: Sequence[int], dilations: Sequence[int],
                      grouped: bool, sigmoid: bool, fp32: bool) -> Tuple[Dict[str, object], int]:
    """The constexprs and the number of warps ``_lte_router_step_kernel`` runs with, for a stack of L <=
    ``MAX_LAYERS`` convolutions (channels 2 hd, hd, ...; unused layers get kernel size 1) over H = ``num_heads`` kv
    heads; ``grouped``: one stack per head; ``fp32``: float32 weights (exact products). Returns (constexprs,
    num_warps): exact float32 products need 8 warps (4 spill about 20 KB per thread on sm_90; bf16 at 4 warps:
    117 registers, none)."""
    L = len(kernel_sizes)
    R = 1 + sum((k - 1) * d for k, d in zip(kernel_sizes, dilations))
    ks = list(kernel_sizes) + [1] * (MAX_LAYERS - L)
    ds = list(dilations) + [1] * (MAX_LAYERS - L)
    ch = [max(2 * head_dim >> j, 1) for j in range(MAX_LAYERS + 1)]
    constexprs = dict(H=num_heads, HD=head_dim, R=R, TP=max(16, triton.next_power_of_2(R)), NL=L, GROUPED=grouped,
                      C0=ch[0], C1=ch[1], C2=ch[2], C3=ch[3], C4=ch[4], CL=2 * head_dim >> L, M2=R - 1,
                      **{f"K{j}": ks[j] for j in range(MAX_LAYERS)}, **{f"D{j}": ds[j] for j in range(MAX_LAYERS)},
                      SIGMOID=sigmoid, PREC="ieee" if fp32 else "tf32")
    return constexprs, 8 if fp32 else 4


@triton.jit
def _shifted_tap_product(act, W, w_off, o_t, TP: tl.constexpr, CIN: tl.constexpr, COUT: tl.constexpr,
                         KS: tl.constexpr, DIL: tl.constexpr, PREC: tl.constexpr):
    """sum over taps s of (rows t + s DIL of act [TP, CIN]) x W[:, :, s]^T -> [TP, COUT] float32."""
    DT = W.dtype.element_ty
    o_ci = tl.arange(0, CIN)
    o_co = tl.arange(0, COUT)
    acc = tl.zeros([TP, COUT], dtype=tl.float32)
    for s in tl.static_range(KS):
        shift = (o_t[None, :] == o_t[:, None] + s * DIL).to(DT)  # [TP, TP]
        x = tl.dot(shift, act, input_precision=PREC).to(DT)
        w = tl.load(W + w_off + o_co[None, :] * (CIN * KS) + o_ci[:, None] * KS + s)  # [CIN, COUT]
        acc += tl.dot(x, w, input_precision=PREC)
    return acc


@triton.jit
def _conv_layer(act, W, Bias, g, RVALID, i_b, p, real, first, o_t, TP: tl.constexpr, CIN: tl.constexpr,
                COUT: tl.constexpr, KS: tl.constexpr, DIL: tl.constexpr, R: tl.constexpr, M2: tl.constexpr,
                MASKED: tl.constexpr, PREC: tl.constexpr):
    """One convolution of the stack on act [TP, CIN] (row t centred on time index ``first + t``): taps, bias, the
    flags of the new centres (``MASKED``: every layer but the last), SiLU. Returns (act [TP, COUT], new first)."""
    DT = W.dtype.element_ty
    acc = _shifted_tap_product(act.to(DT), W, g * (COUT * CIN * KS), o_t, TP, CIN, COUT, KS, DIL, PREC)
    acc += tl.load(Bias + g * COUT + tl.arange(0, COUT)).to(tl.float32)[None, :]
    first = first + (KS - 1) * DIL // 2
    if MASKED:
        acc *= _flags_at(RVALID, i_b, p, real, first, o_t, R, M2)[:, None]
    return acc * tl.sigmoid(acc), first


@triton.jit
def _flags_at(RVALID, i_b, p, real, first, o_t, R: tl.constexpr, M2: tl.constexpr):
    """[TP] float32 flags of time indices first + t (0 outside the ring); the newest (index R - 1) is ``real``."""
    i = first + o_t
    slot = ((p - M2 + i) % R + R) % R
    f = tl.load(RVALID + i_b * R + slot, mask=i < R, other=0).to(tl.float32)
    return tl.where(i == R - 1, real, f)


@triton.jit
def _lte_router_step_kernel(
    RING, RVALID, NEW_K, NEW_V, REAL, POS, SCORE,
    W0, B0, W1, B1, W2, B2, W3, B3, PW, PB,
    WIN1, stride_sb, stride_ss, stride_sh,
    H: tl.constexpr, HD: tl.constexpr, R: tl.constexpr, TP: tl.constexpr, NL: tl.constexpr, GROUPED: tl.constexpr,
    C0: tl.constexpr, C1: tl.constexpr, C2: tl.constexpr, C3: tl.constexpr, C4: tl.constexpr, CL: tl.constexpr,
    M2: tl.constexpr, K0: tl.constexpr, D0: tl.constexpr, K1: tl.constexpr, D1: tl.constexpr, K2: tl.constexpr,
    D2: tl.constexpr, K3: tl.constexpr, D3: tl.constexpr, SIGMOID: tl.constexpr, PREC: tl.constexpr,
):
    i_b = tl.program_id(0).to(tl.int64)
    i_h = tl.program_id(1).to(tl.int64)
    DT = W0.dtype.element_ty
    p = tl.load(POS + i_b).to(tl.int64)
    real_b = tl.load(REAL + i_b) != 0
    real = real_b.to(tl.float32)
    ring_b = RING + i_b * (R * H * C0) + i_h * C0  # [R, H * C0] row-major per batch row

    # 1. the new token into its ring slot
    o_d = tl.arange(0, HD)
    new_slot = p % R
    nk = tl.load(NEW_K + (i_b * H + i_h) * HD + o_d).to(tl.float32) * real
    nv = tl.load(NEW_V + (i_b * H + i_h) * HD + o_d).to(tl.float32) * real
    tl.store(ring_b + new_slot * (H * C0) + o_d, nk.to(RING.dtype.element_ty))
    tl.store(ring_b + new_slot * (H * C0) + HD + o_d, nv.to(RING.dtype.element_ty))
    if i_h == 0:
        tl.store(RVALID + i_b * R + new_slot, real_b.to(tl.uint8))
    tl.debug_barrier()

    # 2. layer 0 from the ring
    o_t = tl.arange(0, TP)
    o_c0 = tl.arange(0, C0)
    o_c1 = tl.arange(0, C1)
    g = i_h if GROUPED else 0
    acc = tl.zeros([TP, C1], dtype=tl.float32)
    for s in tl.static_range(K0):
        i = o_t + s * D0
        slot = ((p - M2 + i) % R + R) % R
        x = tl.load(ring_b + slot[:, None] * (H * C0) + o_c0[None, :], mask=(i < R)[:, None], other=0.0)
        w = tl.load(W0 + g * (C1 * C0 * K0) + o_c1[None, :] * (C0 * K0) + o_c0[:, None] * K0 + s)  # [C0, C1]
        acc += tl.dot(x.to(DT), w, input_precision=PREC)
    acc += tl.load(B0 + g * C1 + o_c1).to(tl.float32)[None, :]
    first = (K0 - 1) * D0 // 2
    if NL > 1:
        acc *= _flags_at(RVALID, i_b, p, real, first, o_t, R, M2)[:, None]
    act = acc * tl.sigmoid(acc)

    # 3. later layers from registers
    if NL > 1:
        act, first = _conv_layer(act, W1, B1, g, RVALID, i_b, p, real, first, o_t, TP, C1, C2, K1, D1, R, M2, NL > 2,
                                 PREC)
    if NL > 2:
        act, first = _conv_layer(act, W2, B2, g, RVALID, i_b, p, real, first, o_t, TP, C2, C3, K2, D2, R, M2, NL > 3,
                                 PREC)
    if NL > 3:
        act, first = _conv_layer(act, W3, B3, g, RVALID, i_b, p, real, first, o_t, TP, C3, C4, K3, D3, R, M2, False,
                                 PREC)

    # 4. the 1x1 projection of row 0
    o_cl = tl.arange(0, CL)
    pw = tl.load(PW + g * CL + o_cl).to(DT).to(tl.float32)
    z = act.to(DT).to(tl.float32)
    logit = tl.sum(tl.sum(tl.where(o_t[:, None] == 0, z * pw[None, :], 0.0), axis=1), axis=0)
    logit += tl.load(PB + g).to(tl.float32)
    logit = logit.to(DT).to(tl.float32)  # the projection's output in the compute dtype, as the torch path

    # 5. score of the centre into the attention cache's ring
    if SIGMOID:
        score = tl.sigmoid(logit) - 0.5
    else:
        score = tl.maximum(logit, 0.0)
    m = M2 // 2
    centre_real = tl.sum(_flags_at(RVALID, i_b, p, real, m, o_t, R, M2) * (o_t == 0), axis=0) > 0
    score = tl.where(centre_real, score, float("-inf"))
    target = ((p - m) % WIN1 + WIN1) % WIN1
    tl.store(SCORE + i_b * stride_sb + target * stride_ss + i_h * stride_sh, score)
