"""Triton kernels of the causal depthwise convolution behind ``fla.modules.ShortConvolution``.

Layout: x, y, residual, dy, dx are [B, T, C] contiguous (B = 1 with packed sequences); weight is [C, K]; states
(initial, final, their gradients) are [N, C, K] with [..., K - 1] the most recent input. All arithmetic is float32.

Each sequence is extended on the left by its initial state (zeros when none): xe(p) = x[bos + p] for p >= 0 and
xe(p) = h0[..., K + p] for -K <= p < 0. With shift j = K - 1 - k for tap k:

    forward:   z_p = b + sum_k w_k * xe(p - j_k);   y_p = act(z_p) (+ residual_p)
               final[..., i] = xe(L - K + i)                       (the last K inputs of the sequence)
    backward:  dz_p = dy_p * act'(z_p)                             (z recomputed; dz stored once, float32)
               dx_p = sum_k w_k * dz_{p + j_k}  (p + j_k < L)  (+ dfinal[..., K - L + p] when that index is >= 0)
               dw_k = sum_p dz_p * xe(p - j_k);  db = sum_p dz_p
               dh0[..., m] = sum_{p < m} w_{m - 1 - p} * dz_p  (p < L)  (+ dfinal[..., m - L] when m >= L)

Tiles cover (BT tokens) x (BC channels). With ``cu_seqlens`` the tokens of a tile may belong to several sequences:
each token finds its own sequence through ``seq_ids`` and ``cu_seqlens``, and its taps never cross its start.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fla.utils import triton_interpreting

ACTIVATIONS = {None: 0, "silu": 1, "swish": 1}


@triton.jit
def _act(z, ACTIVATION: tl.constexpr):
    if ACTIVATION == 1:
        z = z * tl.sigmoid(z)
    return z


@triton.jit
def _tokens(t, i_b, T, CU, SEQ_IDS, IS_VARLEN: tl.constexpr):
    """For token indices ``t`` [BT] of row ``i_b``: (in range, sequence, flat row index, position, sequence length)."""
    tmask = t < T
    if IS_VARLEN:
        seq = tl.load(SEQ_IDS + t, mask=tmask, other=0).to(tl.int64)
        bos = tl.load(CU + seq, mask=tmask, other=0).to(tl.int64)
        eos = tl.load(CU + seq + 1, mask=tmask, other=0).to(tl.int64)
        g = t.to(tl.int64)
    else:
        seq = tl.zeros_like(t).to(tl.int64) + i_b
        bos = seq * T
        eos = bos + T
        g = bos + t
    return tmask, seq, g, g - bos, eos - bos


@triton.jit
def _load_xe(X, H0, g, pos, seq, c, tmask, cmask, C, j: tl.constexpr, K: tl.constexpr, USE_H0: tl.constexpr):
    """xe(pos - j) for tokens (g, pos, seq) [BT] and channels c [BC]: a [BT, BC] float32 tile."""
    in_seq = pos >= j
    v = tl.load(X + (g - j)[:, None] * C + c[None, :], mask=(tmask & in_seq)[:, None] & cmask[None, :],
                other=0.0).to(tl.float32)
    if USE_H0:
        h_off = (seq[:, None] * C + c[None, :]) * K + (K + pos - j)[:, None]
        v += tl.load(H0 + h_off, mask=(tmask & (pos < j))[:, None] & cmask[None, :], other=0.0).to(tl.float32)
    return v


@triton.jit
def _preact(X, W, BIAS, H0, g, pos, seq, c, tmask, cmask, C, K: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
            HAS_BIAS: tl.constexpr, USE_H0: tl.constexpr):
    """Pre-activation z [BT, BC] of tokens (g, pos, seq)."""
    z = tl.zeros([BT, BC], dtype=tl.float32)
    if HAS_BIAS:
        z += tl.load(BIAS + c, mask=cmask, other=0.0).to(tl.float32)[None, :]
    for k in tl.static_range(K):
        w = tl.load(W + c * K + k, mask=cmask, other=0.0).to(tl.float32)
        z += _load_xe(X, H0, g, pos, seq, c, tmask, cmask, C, K - 1 - k, K, USE_H0) * w[None, :]
    return z


@triton.jit
def _dz(X, W, BIAS, H0, DY, g, pos, seq, c, tmask, cmask, C, K: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
        ACTIVATION: tl.constexpr, HAS_BIAS: tl.constexpr, USE_H0: tl.constexpr):
    """Gradient of the pre-activation [BT, BC] at tokens (g, pos, seq); zero where ``tmask`` is off."""
    dz = tl.load(DY + g[:, None] * C + c[None, :], mask=tmask[:, None] & cmask[None, :], other=0.0).to(tl.float32)
    if ACTIVATION == 1:
        z = _preact(X, W, BIAS, H0, g, pos, seq, c, tmask, cmask, C, K, BT, BC, HAS_BIAS, USE_H0)
        s = tl.sigmoid(z)
        dz = dz * s * (1 + z * (1 - s))
    return dz


@triton.jit
def _conv_fwd_kernel(
    X, W, BIAS, RES, H0, CU, SEQ_IDS, Y,
    T, C,
    K: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, ACTIVATION: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr, USE_H0: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    i_t, i_c, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    t = i_t * BT + tl.arange(0, BT)
    c = (i_c * BC + tl.arange(0, BC)).to(tl.int64)
    cmask = c < C
    tmask, seq, g, pos, length = _tokens(t, i_b, T, CU, SEQ_IDS, IS_VARLEN)
    y = _act(_preact(X, W, BIAS, H0, g, pos, seq, c, tmask, cmask, C, K, BT, BC, HAS_BIAS, USE_H0), ACTIVATION)
    off = g[:, None] * C + c[None, :]
    mask = tmask[:, None] & cmask[None, :]
    if HAS_RESIDUAL:
        y += tl.load(RES + off, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + off, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _seq_bounds(i_n, T, CU, IS_VARLEN: tl.constexpr):
    if IS_VARLEN:
        bos = tl.load(CU + i_n).to(tl.int64)
        eos = tl.load(CU + i_n + 1).to(tl.int64)
    else:
        bos = i_n * T
        eos = bos + T
    return bos, eos - bos


@triton.jit
def _conv_final_state_kernel(
    X, H0, CU, FINAL,
    T, C,
    K: tl.constexpr, BK: tl.constexpr, BC: tl.constexpr, USE_H0: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    i_n, i_c = tl.program_id(0).to(tl.int64), tl.program_id(1)
    bos, length = _seq_bounds(i_n, T, CU, IS_VARLEN)
    c = (i_c * BC + tl.arange(0, BC)).to(tl.int64)
    cmask = c < C
    i = tl.arange(0, BK)
    s = length - K + i
    kmask = i < K
    v = tl.load(X + (bos + s)[None, :] * C + c[:, None], mask=cmask[:, None] & (kmask & (s >= 0))[None, :],
                other=0.0).to(tl.float32)
    state_off = (i_n * C + c[:, None]) * K
    if USE_H0:
        v += tl.load(H0 + state_off + (K + s)[None, :], mask=cmask[:, None] & (kmask & (s < 0))[None, :],
                     other=0.0).to(tl.float32)
    tl.store(FINAL + state_off + i[None, :], v.to(FINAL.dtype.element_ty), mask=cmask[:, None] & kmask[None, :])


@triton.jit
def _conv_bwd_dz_kernel(
    X, W, BIAS, H0, DY, CU, SEQ_IDS, DZ,
    T, C,
    K: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, ACTIVATION: tl.constexpr, HAS_BIAS: tl.constexpr,
    USE_H0: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    # dz = dy * act'(z), once per token (float32), so that the next kernel reads K shifted tiles of it instead of
    # recomputing z at every shift (K times K loads)
    i_t, i_c, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    t = i_t * BT + tl.arange(0, BT)
    c = (i_c * BC + tl.arange(0, BC)).to(tl.int64)
    cmask = c < C
    tmask, seq, g, pos, length = _tokens(t, i_b, T, CU, SEQ_IDS, IS_VARLEN)
    dz = _dz(X, W, BIAS, H0, DY, g, pos, seq, c, tmask, cmask, C, K, BT, BC, ACTIVATION, HAS_BIAS, USE_H0)
    tl.store(DZ + g[:, None] * C + c[None, :], dz, mask=tmask[:, None] & cmask[None, :])


@triton.jit
def _conv_bwd_kernel(
    X, H0, DZ, W, DHT, CU, SEQ_IDS, DX, DW_PART, DB_PART,
    T, C, tiles_per_program,
    K: tl.constexpr, BK: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
    HAS_BIAS: tl.constexpr, USE_H0: tl.constexpr, HAS_DHT: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    i_tp, i_c, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    c = (i_c * BC + tl.arange(0, BC)).to(tl.int64)
    cmask = c < C
    kk = tl.arange(0, BK)
    dw = tl.zeros([BC, BK], dtype=tl.float32)
    db = tl.zeros([BC], dtype=tl.float32)
    for it in range(tiles_per_program):
        t = (i_tp * tiles_per_program + it) * BT + tl.arange(0, BT)
        tmask, seq, g, pos, length = _tokens(t, i_b, T, CU, SEQ_IDS, IS_VARLEN)
        # the outputs of this tile: dw, db and the j = 0 term of dx
        dz = tl.load(DZ + g[:, None] * C + c[None, :], mask=tmask[:, None] & cmask[None, :], other=0.0)
        db += tl.sum(dz, axis=0)
        for k in tl.static_range(K):
            v = _load_xe(X, H0, g, pos, seq, c, tmask, cmask, C, K - 1 - k, K, USE_H0)
            dw += tl.where(kk[None, :] == k, tl.sum(dz * v, axis=0)[:, None], 0.0)
        dx = dz * tl.load(W + c * K + (K - 1), mask=cmask, other=0.0).to(tl.float32)[None, :]
        # later outputs of the same sequence that read this tile's inputs
        for j in tl.static_range(1, K):
            valid = tmask & (pos + j < length)
            dz_j = tl.load(DZ + (g + j)[:, None] * C + c[None, :], mask=valid[:, None] & cmask[None, :], other=0.0)
            dx += dz_j * tl.load(W + c * K + (K - 1 - j), mask=cmask, other=0.0).to(tl.float32)[None, :]
        if HAS_DHT:
            idx = K - length + pos
            dx += tl.load(DHT + (seq[:, None] * C + c[None, :]) * K + idx[:, None],
                          mask=(tmask & (idx >= 0))[:, None] & cmask[None, :], other=0.0).to(tl.float32)
        tl.store(DX + g[:, None] * C + c[None, :], dx.to(DX.dtype.element_ty), mask=tmask[:, None] & cmask[None, :])
    p = i_b * tl.num_programs(0) + i_tp
    tl.store(DW_PART + (p * C + c[:, None]) * K + kk[None, :], dw, mask=cmask[:, None] & (kk < K)[None, :])
    if HAS_BIAS:
        tl.store(DB_PART + p * C + c, db, mask=cmask)


@triton.jit
def _conv_bwd_h0_kernel(
    X, W, BIAS, H0, DY, DHT, CU, DH0,
    T, C,
    K: tl.constexpr, BQ: tl.constexpr, BK: tl.constexpr, BC: tl.constexpr, ACTIVATION: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_DHT: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    i_n, i_c = tl.program_id(0).to(tl.int64), tl.program_id(1)
    bos, length = _seq_bounds(i_n, T, CU, IS_VARLEN)
    c = (i_c * BC + tl.arange(0, BC)).to(tl.int64)
    cmask = c < C
    # only the first K - 1 outputs of a sequence read its initial state
    q = tl.arange(0, BQ).to(tl.int64)
    qmask = (q < K - 1) & (q < length)
    seq = tl.zeros_like(q) + i_n
    dz = _dz(X, W, BIAS, H0, DY, bos + q, q, seq, c, qmask, cmask, C, K, BQ, BC, ACTIVATION, HAS_BIAS, True)
    m = tl.arange(0, BK)
    dh0 = tl.zeros([BC, BK], dtype=tl.float32)
    for p in tl.static_range(K - 1):
        dz_p = tl.sum(tl.where(q[:, None] == p, dz, 0.0), axis=0)
        widx = m - 1 - p
        w = tl.load(W + c[:, None] * K + widx[None, :], mask=cmask[:, None] & ((widx >= 0) & (m < K))[None, :],
                    other=0.0).to(tl.float32)
        dh0 += dz_p[:, None] * w
    state_off = (i_n * C + c[:, None]) * K
    if HAS_DHT:
        from_dht = (m >= length) & (m < K)
        dh0 += tl.load(DHT + state_off + (m - length)[None, :], mask=cmask[:, None] & from_dht[None, :],
                       other=0.0).to(tl.float32)
    tl.store(DH0 + state_off + m[None, :], dh0.to(DH0.dtype.element_ty), mask=cmask[:, None] & (m < K)[None, :])


@triton.jit
def _conv_update_kernel(
    X, CACHE, W, BIAS, RES, Y, CACHE_OUT,
    C,
    K: tl.constexpr, BK: tl.constexpr, BC: tl.constexpr, ACTIVATION: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
):
    i_n, i_c = tl.program_id(0).to(tl.int64), tl.program_id(1)
    c = (i_c * BC + tl.arange(0, BC)).to(tl.int64)
    cmask = c < C
    i = tl.arange(0, BK)
    x = tl.load(X + i_n * C + c, mask=cmask, other=0.0).to(tl.float32)
    state_off = (i_n * C + c[:, None]) * K
    # the whole [BC, K] tile is read before it is written: CACHE_OUT may alias CACHE
    old = tl.load(CACHE + state_off + (i + 1)[None, :], mask=cmask[:, None] & (i + 1 < K)[None, :],
                  other=0.0).to(tl.float32)
    new = tl.where(i[None, :] == K - 1, x[:, None], old)
    w = tl.load(W + c[:, None] * K + i[None, :], mask=cmask[:, None] & (i < K)[None, :], other=0.0).to(tl.float32)
    z = tl.sum(new * w, axis=1)
    if HAS_BIAS:
        z += tl.load(BIAS + c, mask=cmask, other=0.0).to(tl.float32)
    y = _act(z, ACTIVATION)
    if HAS_RESIDUAL:
        y += tl.load(RES + i_n * C + c, mask=cmask, other=0.0).to(tl.float32)
    tl.store(Y + i_n * C + c, y.to(Y.dtype.element_ty), mask=cmask)
    tl.store(CACHE_OUT + state_off + i[None, :], new.to(CACHE_OUT.dtype.element_ty),
             mask=cmask[:, None] & (i < K)[None, :])


# ----------------------------------------------------------------------------------------------------------------
# launchers


def _block_c(C: int) -> int:
    # small blocks under the interpreter make the tests cross channel-block boundaries at tiny sizes
    return min(triton.next_power_of_2(C), 32 if triton_interpreting() else 128)


def _block_t() -> int:
    return 16 if triton_interpreting() else 64


def _num_sms(x: torch.Tensor) -> int:
    if x.device.type == "cuda":
        return torch.cuda.get_device_properties(x.device).multi_processor_count
    return 1


def conv_fwd(x, weight, bias, residual, initial_state, cu_seqlens, seq_ids, activation, output_final_state,
             final_dtype):
    """x [B, T, C], weight [C, K] (contiguous). Returns (y [B, T, C] in x.dtype, final state [N, C, K] or None)."""
    B, T, C = x.shape
    K = weight.shape[1]
    varlen = cu_seqlens is not None
    # 16 x 128 tiles, 4 warps: best of the sweep in benchmarks/modules/tune_kernels.py (H200, C=2048, bf16)
    BT, BC = 16, _block_c(C)
    y = torch.empty_like(x)
    _conv_fwd_kernel[(triton.cdiv(T, BT), triton.cdiv(C, BC), B)](
        x, weight, bias, residual, initial_state, cu_seqlens, seq_ids, y, T, C,
        K=K, BT=BT, BC=BC, ACTIVATION=ACTIVATIONS[activation], HAS_BIAS=bias is not None,
        HAS_RESIDUAL=residual is not None, USE_H0=initial_state is not None, IS_VARLEN=varlen, num_warps=4,
    )
    final = None
    if output_final_state:
        N = cu_seqlens.numel() - 1 if varlen else B
        final = torch.empty((N, C, K), device=x.device, dtype=final_dtype)
        _conv_final_state_kernel[(N, triton.cdiv(C, BC))](
            x, initial_state, cu_seqlens, final, T, C,
            K=K, BK=triton.next_power_of_2(K), BC=BC, USE_H0=initial_state is not None, IS_VARLEN=varlen,
        )
    return y, final


def conv_bwd(x, weight, bias, initial_state, cu_seqlens, seq_ids, activation, dy, dht, need_dh0):
    """Gradients of ``conv_fwd``: (dx [B, T, C] in x.dtype, dweight [C, K] float32, dbias [C] float32 or None,
    dinitial_state [N, C, K] float32 or None). The residual's gradient is ``dy`` itself."""
    B, T, C = x.shape
    K = weight.shape[1]
    varlen = cu_seqlens is not None
    BT, BC, BK = _block_t(), _block_c(C), triton.next_power_of_2(K)
    NC, NT = triton.cdiv(C, BC), triton.cdiv(T, BT)
    # up to 64 programs per SM (in practice one 64 x 128 tile each at C=2048: the sweep in
    # benchmarks/modules/tune_kernels.py found that best on an H200); longer inputs loop over a run of time tiles
    # per program, which bounds the dw / db partials
    programs_t = min(NT, max(1, triton.cdiv(64 * _num_sms(x), B * NC)))
    tiles_per_program = triton.cdiv(NT, programs_t)
    programs_t = triton.cdiv(NT, tiles_per_program)
    dx = torch.empty_like(x)
    dw_part = torch.empty((B * programs_t, C, K), device=x.device, dtype=torch.float32)
    db_part = torch.empty((B * programs_t, C), device=x.device, dtype=torch.float32) if bias is not None else None
    common = dict(ACTIVATION=ACTIVATIONS[activation], HAS_BIAS=bias is not None, HAS_DHT=dht is not None,
                  IS_VARLEN=varlen)
    use_h0 = initial_state is not None
    dz = torch.empty((B, T, C), device=x.device, dtype=torch.float32)
    # the dz kernel reads like the forward: the forward's 16-token tiles and 4 warps
    _conv_bwd_dz_kernel[(triton.cdiv(T, 16), NC, B)](
        x, weight, bias, initial_state, dy, cu_seqlens, seq_ids, dz, T, C,
        K=K, BT=16, BC=BC, ACTIVATION=common["ACTIVATION"], HAS_BIAS=bias is not None, USE_H0=use_h0,
        IS_VARLEN=varlen, num_warps=4,
    )
    _conv_bwd_kernel[(programs_t, NC, B)](
        x, initial_state, dz, weight, dht, cu_seqlens, seq_ids, dx, dw_part, db_part,
        T, C, tiles_per_program,
        K=K, BK=BK, BT=BT, BC=BC, HAS_BIAS=bias is not None, USE_H0=use_h0, HAS_DHT=dht is not None,
        IS_VARLEN=varlen,
    )
    dh0 = None
    if need_dh0:
        N = initial_state.shape[0]
        dh0 = torch.empty((N, C, K), device=x.device, dtype=torch.float32)
        _conv_bwd_h0_kernel[(N, NC)](
            x, weight, bias, initial_state, dy, dht, cu_seqlens, dh0, T, C,
            K=K, BQ=triton.next_power_of_2(max(K - 1, 1)), BK=BK, BC=BC, **common,
        )
    return dx, dw_part.sum(0), db_part.sum(0) if db_part is not None else None, dh0


def conv_update(x, cache, weight, bias, residual, activation, cache_out):
    """One decoding step. x, residual: [N, C]; cache, cache_out: [N, C, K] (may be the same tensor); weight [C, K].
    Writes the shifted state into ``cache_out`` and returns y [N, C] in x.dtype."""
    N, C = x.shape
    K = weight.shape[1]
    BC = min(triton.next_power_of_2(C), 32 if triton_interpreting() else 256)
    y = torch.empty_like(x)
    _conv_update_kernel[(N, triton.cdiv(C, BC))](
        x, cache, weight, bias, residual, y, cache_out, C,
        K=K, BK=triton.next_power_of_2(K), BC=BC, ACTIVATION=ACTIVATIONS[activation], HAS_BIAS=bias is not None,
        HAS_RESIDUAL=residual is not None,
    )
    return y
