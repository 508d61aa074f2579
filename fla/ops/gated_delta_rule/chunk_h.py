"""Inter-chunk state recurrence of the gated delta rule (forward) and its reverse (backward).

Per sequence and head, with chunk-start state h_n [K, V] (float32 in registers), g the within-chunk cumulative
log-decay, L the chunk's last valid row, and W, U from ``wy_fwd.py``:

    forward  (``chunk_fwd_h``)
        v_new   = U - W h_n                                          [BT, V]  pseudo-values of the chunk
        h_{n+1} = exp(g_L) h_n + K^T (exp(g_L - g) * v_new)

    backward (``chunk_bwd_dhu``), given dh_{n+1} = dL/dh_{n+1} (the final-state gradient for the last chunk) and
    dv_local = scale * (tril_incl(Q K^T * exp(g_r - g_s)))^T dO (``chunk_bwd_dv_local``):
        dv_new  = dv_local + exp(g_L - g) * (K dh_{n+1})             [BT, V]  total gradient of v_new
        dh_n    = exp(g_L) dh_{n+1} + scale * (Q * exp(g))^T dO - W^T dv_new

One program owns one [K, BV] column slab of one (sequence, head) state and walks its chunks in order; K (<= 256) is
held whole because v_new contracts over all of it. The slab is carried transposed ([BV, K]) so that it, and every
other dot result, is only ever the LEFT operand of a product; the other operands are read from memory in the
orientation they are needed (no tl.trans of a dot result feeds another dot: Hopper miscompile, FLA #640).

Long sequences with few (sequence, head) states are cut into segments that are walked in parallel: a first walk
from a zero start also carries K transition columns (identity at the start), so each segment ends holding its own
state and the product of its chunks' transitions; the segments' true start states then chain in a few small
matmuls (``_chain_segments``) and a second walk writes the per-chunk outputs from them (``num_segments`` says when).

Stored per chunk: ``h[c]`` = state at the start of chunk c; ``dh[c]`` = gradient of the state at the END of chunk c
(what the chunk's own gradients need), both [num_chunks, H, K, V] in the compute dtype.
"""

from __future__ import annotations

import functools
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from fla.ops.gated_delta_rule.chunk_common import Chunking, dot_precision, num_stages, sequence_span, tuned

MAX_HEAD_DIM_K = 256


def _state_launch(D_K: int, D_V: int, num_states: int, dtype: torch.dtype) -> Tuple[int, int, dict]:
    """(BK, BV, launch options). The whole K in one tile; the V slab 32 wide when there are few (sequence, head)
    states (more programs then walk their chunks in parallel: each step's latency is the cost).

    bf16, from the launch sweep of ``benchmarks.ops.tune_gdn`` on an H100: otherwise 64 wide with 8 warps and two
    pipeline stages: forward 0.202 ms (D128) and 0.263 ms (D256) against 0.228 / 0.383 with the earlier settings,
    backward 0.265 / 0.350 against 0.247 / 0.605. Other dtypes keep the earlier settings their GPU tests passed
    with: 4 warps, 32 wide above K = 128, one pipeline stage there (three [64, 256] operand tiles per step) and in
    float32 (``num_stages``)."""
    BK = max(16, triton.next_power_of_2(D_K))
    few = num_states * triton.cdiv(D_V, 64) < 128
    if tuned(dtype):
        BV, launch = (32, {"num_warps": 4}) if few else (64, {"num_warps": 8})
        launch["num_stages"] = num_stages(dtype)
    else:
        BV = 32 if few or BK > 128 else 64
        launch = {"num_warps": 4, "num_stages": 1 if BK > 128 else num_stages(dtype)}
    return BK, max(16, min(triton.next_power_of_2(D_V), BV)), launch


@triton.jit
def _fwd_h_kernel(K, W, U, G, H_OUT, V_NEW, H0, HT, cu_seqlens, chunk_offsets, T, H: tl.constexpr,
                  D_K: tl.constexpr, D_V: tl.constexpr, D_P: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                  BV: tl.constexpr, USE_H0: tl.constexpr, STORE_HT: tl.constexpr, SAVE: tl.constexpr,
                  IS_VARLEN: tl.constexpr, PREC: tl.constexpr):
    # the state is carried transposed, h^T [BV, BK], so that it is the LEFT operand of both products:
    #   v_new^T = U^T - h^T W^T,   h^T <- exp(g_L) h^T + (v_new^T * exp(g_L - g)) K
    # D_P > 0 appends D_P transition columns to the state (H0 / HT rows of D_V + D_P columns): they start as the
    # identity (when USE_H0 is off) and see U = 0, so at the end they hold the product of the chunks' transitions.
    # SAVE off: neither the chunk-start states nor v_new are stored (only HT).
    i_nh, i_v = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    bos, length, NT, first_chunk = sequence_span(i_n, cu_seqlens, chunk_offsets, T, BT, IS_VARLEN)
    D_S: tl.constexpr = D_V + D_P
    o_t = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k = o_k < D_K
    m_v = o_v < D_S
    m_u = o_v < D_V
    m_vk = m_v[:, None] & m_k[None, :]
    state_off = o_k[None, :] * D_S + o_v[:, None]  # element [v, k] of a [K, D_V + D_P] state
    DT = K.dtype.element_ty

    h_t = tl.zeros([BV, BK], dtype=tl.float32)
    if USE_H0:
        h_t += tl.load(H0 + i_nh.to(tl.int64) * D_K * D_S + state_off, mask=m_vk, other=0.0).to(tl.float32)
    elif D_P > 0:
        h_t += tl.where((o_v[:, None] - D_V == o_k[None, :]) & m_vk, 1.0, 0.0)
    for i_t in range(NT):
        start = bos + i_t * BT
        n_valid = tl.minimum(length - i_t * BT, BT)
        m_t = o_t < n_valid
        m_ut = m_u[:, None] & m_t[None, :]
        rows = (start + o_t) * H + i_h  # packed (token, head) row index
        if SAVE:
            tl.store(H_OUT + ((first_chunk + i_t) * H + i_h) * D_K * D_V + o_k[None, :] * D_V + o_v[:, None],
                     h_t.to(H_OUT.dtype.element_ty), mask=m_u[:, None] & m_k[None, :])
        w_t = tl.load(W + rows[None, :] * D_K + o_k[:, None], mask=m_k[:, None] & m_t[None, :], other=0.0)
        u_t = tl.load(U + rows[None, :] * D_V + o_v[:, None], mask=m_ut, other=0.0)
        v_new_t = u_t.to(tl.float32) - tl.dot(h_t.to(DT), w_t, input_precision=PREC)
        if SAVE:
            tl.store(V_NEW + rows[None, :] * D_V + o_v[:, None], v_new_t.to(V_NEW.dtype.element_ty), mask=m_ut)
        g = tl.load(G + rows, mask=m_t, other=0.0)
        g_last = tl.load(G + (start + n_valid - 1) * H + i_h)
        decay = tl.where(m_t, tl.exp(g_last - g), 0.0)
        k = tl.load(K + rows[:, None] * D_K + o_k[None, :], mask=m_t[:, None] & m_k[None, :], other=0.0)
        h_t = h_t * tl.exp(g_last) + tl.dot((v_new_t * decay[None, :]).to(DT), k, input_precision=PREC)
    if STORE_HT:
        tl.store(HT + i_nh.to(tl.int64) * D_K * D_S + state_off, h_t, mask=m_vk)


@triton.jit
def _bwd_dhu_kernel(Q, K, W, G, DO, DV_LOCAL, DH_OUT, DV_NEW, DHT, DH0, cu_seqlens, chunk_offsets, scale, T,
                    H: tl.constexpr, D_K: tl.constexpr, D_V: tl.constexpr, D_P: tl.constexpr, BT: tl.constexpr,
                    BK: tl.constexpr, BV: tl.constexpr, USE_DHT: tl.constexpr, STORE_DH0: tl.constexpr,
                    SAVE: tl.constexpr, IS_VARLEN: tl.constexpr, PREC: tl.constexpr):
    # the gradient is carried transposed, dh^T [BV, BK], the LEFT operand of every product (as in _fwd_h_kernel):
    #   dv_new^T = dv_local^T + exp(g_L - g) * (dh^T K^T)
    #   dh^T <- exp(g_L) dh^T + dO^T (scale exp(g) * Q) - dv_new^T W
    # D_P transition columns and SAVE as in _fwd_h_kernel (dO = dv_local = 0 in the transition columns)
    i_nh, i_v = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    bos, length, NT, first_chunk = sequence_span(i_n, cu_seqlens, chunk_offsets, T, BT, IS_VARLEN)
    D_S: tl.constexpr = D_V + D_P
    o_t = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k = o_k < D_K
    m_v = o_v < D_S
    m_u = o_v < D_V
    m_vk = m_v[:, None] & m_k[None, :]
    state_off = o_k[None, :] * D_S + o_v[:, None]
    DT = K.dtype.element_ty

    dh_t = tl.zeros([BV, BK], dtype=tl.float32)
    if USE_DHT:
        dh_t += tl.load(DHT + i_nh.to(tl.int64) * D_K * D_S + state_off, mask=m_vk, other=0.0).to(tl.float32)
    elif D_P > 0:
        dh_t += tl.where((o_v[:, None] - D_V == o_k[None, :]) & m_vk, 1.0, 0.0)
    for j in range(NT):
        i_t = NT - 1 - j
        start = bos + i_t * BT
        n_valid = tl.minimum(length - i_t * BT, BT)
        m_t = o_t < n_valid
        m_ut = m_u[:, None] & m_t[None, :]
        m_tk = m_t[:, None] & m_k[None, :]
        rows = (start + o_t) * H + i_h
        if SAVE:
            tl.store(DH_OUT + ((first_chunk + i_t) * H + i_h) * D_K * D_V + o_k[None, :] * D_V + o_v[:, None],
                     dh_t.to(DH_OUT.dtype.element_ty), mask=m_u[:, None] & m_k[None, :])
        g = tl.load(G + rows, mask=m_t, other=0.0)
        g_last = tl.load(G + (start + n_valid - 1) * H + i_h)
        decay = tl.where(m_t, tl.exp(g_last - g), 0.0)
        k_t = tl.load(K + rows[None, :] * D_K + o_k[:, None], mask=m_k[:, None] & m_t[None, :], other=0.0)
        dv_t = tl.load(DV_LOCAL + rows[None, :] * D_V + o_v[:, None], mask=m_ut, other=0.0).to(tl.float32)
        dv_t += decay[None, :] * tl.dot(dh_t.to(DT), k_t, input_precision=PREC)
        if SAVE:
            tl.store(DV_NEW + rows[None, :] * D_V + o_v[:, None], dv_t.to(DV_NEW.dtype.element_ty), mask=m_ut)
        q = tl.load(Q + rows[:, None] * D_K + o_k[None, :], mask=m_tk, other=0.0)
        q = (q.to(tl.float32) * tl.where(m_t, scale * tl.exp(g), 0.0)[:, None]).to(DT)
        w = tl.load(W + rows[:, None] * D_K + o_k[None, :], mask=m_tk, other=0.0)
        do_t = tl.load(DO + rows[None, :] * D_V + o_v[:, None], mask=m_ut, other=0.0).to(DT)
        dh_t = dh_t * tl.exp(g_last) + tl.dot(do_t, q, input_precision=PREC) \
            - tl.dot(dv_t.to(DT), w, input_precision=PREC)
    if STORE_DH0:
        tl.store(DH0 + i_nh.to(tl.int64) * D_K * D_S + state_off, dh_t, mask=m_vk)


def _check_head_dim(D_K: int) -> None:
    if D_K > MAX_HEAD_DIM_K:
        raise ValueError(f"the chunked gated delta rule kernels hold the key dimension in registers: K={D_K} is too "
                         f"large (at most {MAX_HEAD_DIM_K})")


def chunk_fwd_h(k: torch.Tensor, w: torch.Tensor, u: torch.Tensor, g: torch.Tensor,
                initial_state: Optional[torch.Tensor], output_final_state: bool, chunking: Chunking,
                segments: Optional[int] = None):
    """Chunk-start states and pseudo-values.

    k, w: [B, T, H, K]; u: [B, T, H, V]; g: [B, T, H] float32 (within-chunk cumsum); initial_state: [N, H, K, V].
    Returns (h [num_chunks, H, K, V] in k.dtype, v_new [B, T, H, V] in k.dtype, final_state [N, H, K, V] float32
    or None).

    Long sequences with few (sequence, head) states are cut into segments walked in parallel (see
    ``_chain_segments``); otherwise one program walks each state's chunks in order. ``segments``: force that count
    (1: never cut; None: ``num_segments`` decides; sequences packed with cu_seqlens are never cut).
    """
    B, T, H, D_K = k.shape
    D_V = u.shape[-1]
    _check_head_dim(D_K)
    N = chunking.N
    h = k.new_empty(chunking.num_chunks, H, D_K, D_V)
    v_new = torch.empty_like(u)
    if N * H == 0:
        return h, v_new, (k.new_empty(N, H, D_K, D_V, dtype=torch.float32) if output_final_state else None)
    run = functools.partial(_launch_fwd_h, k, w, u, g)
    final_state = _walk(run, h, v_new, initial_state, output_final_state, k, D_V, chunking, segments, reverse=False)
    return h, v_new, final_state


def num_segments(num_states: int, num_chunks: int, is_varlen: bool) -> int:
    """How many segments each sequence of ``num_chunks`` chunks is cut into for the state recurrences (1: none).

    The recurrence is a chain of dependent steps per (sequence, head) state, so with few states the GPU idles while
    each chain walks its chunks. Cutting every sequence into S segments costs two parallel walks of NT / S chunks
    (the segments' own states and transition products, then the states again from the right starts) instead of
    one walk of NT: used when the chain gets at least 2x shorter (S >= 4) with about 64 chains in all and at least
    16 chunks per segment. Packed sequences (``cu_seqlens``) are walked whole."""
    if is_varlen:
        return 1
    s = min(num_chunks // 16, 64 // max(num_states, 1))
    return s if s >= 4 else 1


def _walk(run, out_a, out_b, state_in, want_last: bool, k: torch.Tensor, D_V: int, chunking: Chunking,
          segments: Optional[int], reverse: bool) -> Optional[torch.Tensor]:
    """One state recurrence over ``chunking``: ``run(out_a, out_b, state_in, state_out, chunking, D_V, D_P, save)``
    launches its kernel. Walked whole, or in segments (``_segments``; ``reverse`` for the backward's order).
    Returns the state it ends with ([N, H, K, V] float32) when ``want_last``, else None."""
    B, T, H, D_K = k.shape
    segments = _segments(segments, chunking.N * H, T, chunking)
    if segments > 1:
        seg = segment_chunking(B, T, chunking.chunk_size, segments, k.device)
        ends = k.new_empty(seg.N, H, D_K, D_V + D_K, dtype=torch.float32)
        run(None, None, None, ends, seg, D_V, D_K, False)
        starts, last = _chain_segments(ends, B, D_V, state_in, want_last, reverse)
        run(out_a, out_b, starts, None, seg, D_V, 0, True)
        return last
    last = k.new_empty(chunking.N, H, D_K, D_V, dtype=torch.float32) if want_last else None
    run(out_a, out_b, state_in, last, chunking, D_V, 0, True)
    return last


def _segments(segments: Optional[int], num_states: int, T: int, chunking: Chunking) -> int:
    if chunking.is_varlen or T <= chunking.chunk_size:
        return 1
    return num_segments(num_states, triton.cdiv(T, chunking.chunk_size), False) if segments is None else segments


def segment_chunking(B: int, T: int, chunk_size: int, segments: int, device) -> Chunking:
    """Each of B sequences of T tokens cut into at most ``segments`` runs of whole chunks, as packed sequences over
    the [B * T] rows (cu_seqlens, chunk_offsets) whose chunks keep their global numbers (sequence b's segment s
    starts at chunk b * NT + s * ceil(NT / segments))."""
    NT = triton.cdiv(T, chunk_size)
    seg_chunks = triton.cdiv(NT, segments)
    S = triton.cdiv(NT, seg_chunks)
    seq = torch.arange(B, device=device)[:, None]
    part = torch.arange(S, device=device)[None, :]
    cu_seqlens = F.pad((seq * T + part * (seg_chunks * chunk_size)).flatten(), (0, 1), value=B * T)
    chunk_offsets = F.pad((seq * NT + part * seg_chunks).flatten(), (0, 1), value=B * NT)
    return Chunking(1, B * T, B * S, B * NT, chunk_size, cu_seqlens, None, chunk_offsets)


def _chain_segments(ends: torch.Tensor, B: int, D_V: int, state: Optional[torch.Tensor], output_last: bool,
                    reverse: bool):
    """Segment start states from each segment's own walk.

    Within a chunk both recurrences are affine in the state: forward h' = A h + b with
    A = exp(g_L) I - K^T diag(exp(g_L - g)) W [K, K], backward dh = A^T dh' + c. Over a segment, out = M in + local.
    The walk with K transition columns appended to the state (identity at the start, no input there) from a zero
    start ends holding ``ends`` = [local | M] ([B * S, H, K, V + K] float32). The segments then chain in order
    (``reverse``: from the last one back) with a few small float32 matmuls: in(s + 1) = M_s in(s) + local_s.

    Returns (what each segment starts from, [B * S, H, K, V] float32; what the last one hands on, [B, H, K, V]
    float32, or None unless ``output_last``). ``state``: what the first segment starts from ([B, H, K, V], any
    float dtype) or None for zeros.
    """
    S = ends.shape[0] // B
    ends = ends.view(B, S, *ends.shape[1:])
    local, transition = ends[..., :D_V], ends[..., D_V:]
    starts = torch.empty_like(local)
    state = state.float() if state is not None else torch.zeros_like(local[:, 0])
    order = range(S - 1, -1, -1) if reverse else range(S)
    for n, i in enumerate(order):
        starts[:, i] = state
        if n + 1 < S or output_last:
            state = torch.matmul(transition[:, i], state) + local[:, i]
    return starts.view(-1, *starts.shape[2:]), (state if output_last else None)


def _launch_fwd_h(k, w, u, g, h, v_new, initial_state, final_state, chunking: Chunking, D_V: int, D_P: int,
                  save: bool) -> None:
    """One ``_fwd_h_kernel`` launch over ``chunking``'s sequences, with D_P transition columns (see the kernel)."""
    H, D_K = k.shape[2], k.shape[3]
    T = k.shape[1] if not chunking.is_varlen else 0
    BK, BV, launch = _state_launch(D_K, D_V + D_P, chunking.N * H, k.dtype)
    _fwd_h_kernel[(chunking.N * H, triton.cdiv(D_V + D_P, BV))](
        k, w, u, g, h, v_new, initial_state, final_state, chunking.cu_seqlens, chunking.chunk_offsets, T, H=H,
        D_K=D_K, D_V=D_V, D_P=D_P, BT=chunking.chunk_size, BK=BK, BV=BV, USE_H0=initial_state is not None,
        STORE_HT=final_state is not None, SAVE=save, IS_VARLEN=chunking.is_varlen, PREC=dot_precision(k.dtype),
        **launch,
    )


def chunk_bwd_dhu(q: torch.Tensor, k: torch.Tensor, w: torch.Tensor, g: torch.Tensor, do: torch.Tensor,
                  dv_local: torch.Tensor, dht: Optional[torch.Tensor], need_dh0: bool, scale: float,
                  chunking: Chunking, segments: Optional[int] = None):
    """Reverse state recurrence.

    q, k, w: [B, T, H, K]; g: [B, T, H] float32; do, dv_local: [B, T, H, V]; dht: [N, H, K, V] or None.
    Returns (dh [num_chunks, H, K, V] (gradient of each chunk's end state) in k.dtype, dv_new [B, T, H, V] in
    k.dtype, dh0 [N, H, K, V] float32 or None). ``segments`` as in ``chunk_fwd_h`` (the reverse walk is cut the
    same way).
    """
    B, T, H, D_K = k.shape
    D_V = do.shape[-1]
    _check_head_dim(D_K)
    N = chunking.N
    dh = k.new_empty(chunking.num_chunks, H, D_K, D_V)
    dv_new = torch.empty_like(do, dtype=k.dtype)
    if N * H == 0:
        return dh, dv_new, (k.new_empty(N, H, D_K, D_V, dtype=torch.float32) if need_dh0 else None)
    run = functools.partial(_launch_bwd_dhu, q, k, w, g, do, dv_local, float(scale))
    # walked backwards: in segments, the segment after s hands s its end-state gradient
    dh0 = _walk(run, dh, dv_new, dht, need_dh0, k, D_V, chunking, segments, reverse=True)
    return dh, dv_new, dh0


def _launch_bwd_dhu(q, k, w, g, do, dv_local, scale, dh, dv_new, dht, dh0, chunking: Chunking, D_V: int, D_P: int,
                    save: bool) -> None:
    """One ``_bwd_dhu_kernel`` launch over ``chunking``'s sequences, with D_P transition columns."""
    H, D_K = k.shape[2], k.shape[3]
    T = k.shape[1] if not chunking.is_varlen else 0
    BK, BV, launch = _state_launch(D_K, D_V + D_P, chunking.N * H, k.dtype)
    _bwd_dhu_kernel[(chunking.N * H, triton.cdiv(D_V + D_P, BV))](
        q, k, w, g, do, dv_local, dh, dv_new, dht, dh0, chunking.cu_seqlens, chunking.chunk_offsets, scale, T, H=H,
        D_K=D_K, D_V=D_V, D_P=D_P, BT=chunking.chunk_size, BK=BK, BV=BV, USE_DHT=dht is not None,
        STORE_DH0=dh0 is not None, SAVE=save, IS_VARLEN=chunking.is_varlen, PREC=dot_precision(k.dtype), **launch,
    )
