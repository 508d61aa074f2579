"""Triton kernels for RMS normalisation, optionally fused with a residual add and an output gate.

Shared by ``fla.modules.layernorm.RMSNorm`` and ``fla.modules.fused_norm_gate.FusedRMSNormGated``. Rows are
normalised independently over their last dimension D; all arithmetic is in float32 whatever the storage dtype.

Forward, per row:   s = x (+ residual);  r = 1 / sqrt(mean(s^2) + eps);  n = s * r;  y = n * w (+ b)
                    (y = y * act(gate) when gated; act = swish or sigmoid)
Backward, per row:  dy' = dy * act(gate);  dgate = dy * y * act'(gate);  dn = dy' * w
                    ds = r * (dn - n * mean(dn * n))  (+ d residual_out when the sum is returned)
                    dw = sum_rows dy' * n;  db = sum_rows dy'
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

ACTIVATIONS = {"swish": 0, "silu": 0, "sigmoid": 1}


@triton.jit
def _gate_act(g, ACTIVATION: tl.constexpr):
    s = tl.sigmoid(g)
    if ACTIVATION == 0:
        return g * s
    return s


@triton.jit
def _gate_act_grad(g, ACTIVATION: tl.constexpr):
    s = tl.sigmoid(g)
    if ACTIVATION == 0:
        return s * (1 + g * (1 - s))
    return s * (1 - s)


@triton.jit
def _rms_norm_fwd_kernel(
    X, RES, W, B, G, Y, RES_OUT, RSTD,
    M, D, eps,
    HAS_RESIDUAL: tl.constexpr, STORE_RESIDUAL: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_GATE: tl.constexpr, ACTIVATION: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr,
):
    # one [BM, BD] tile of rows per program: short rows (D = 64..256, per-head norms) still fill the program
    rows = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)
    cols = tl.arange(0, BD)
    m_rows = rows < M
    mask = m_rows[:, None] & (cols < D)[None, :]
    off = rows[:, None] * D + cols[None, :]
    s = tl.load(X + off, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        s += tl.load(RES + off, mask=mask, other=0.0).to(tl.float32)
    if STORE_RESIDUAL:
        tl.store(RES_OUT + off, s, mask=mask)
    rstd = 1.0 / tl.sqrt(tl.sum(s * s, axis=1) / D + eps)
    tl.store(RSTD + rows, rstd, mask=m_rows)
    y = s * rstd[:, None]
    if HAS_WEIGHT:
        y = y * tl.load(W + cols, mask=cols < D, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        y = y + tl.load(B + cols, mask=cols < D, other=0.0).to(tl.float32)[None, :]
    if HAS_GATE:
        g = tl.load(G + off, mask=mask, other=0.0).to(tl.float32)
        y = y * _gate_act(g, ACTIVATION)
    tl.store(Y + off, y, mask=mask)


@triton.jit
def _rms_norm_bwd_kernel(
    S, W, B, G, RSTD, DY, DRES_OUT, DX, DRES, DG, DW_PARTIAL, DB_PARTIAL,
    M, D, num_programs,
    HAS_DRES_OUT: tl.constexpr, STORE_DRES: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_GATE: tl.constexpr, ACTIVATION: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr,
):
    # persistent: program p handles row tiles p, p + P, p + 2P, ... and keeps its share of dw / db in registers
    pid = tl.program_id(0)
    cols = tl.arange(0, BD)
    m_cols = cols < D
    if HAS_WEIGHT:
        w = tl.load(W + cols, mask=m_cols, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        b = tl.load(B + cols, mask=m_cols, other=0.0).to(tl.float32)[None, :]
    dw = tl.zeros([BD], dtype=tl.float32)
    db = tl.zeros([BD], dtype=tl.float32)
    num_tiles = tl.cdiv(M, BM)
    for tile in range(pid, num_tiles, num_programs):
        rows = (tile * BM + tl.arange(0, BM)).to(tl.int64)
        m_rows = rows < M
        mask = m_rows[:, None] & m_cols[None, :]
        off = rows[:, None] * D + cols[None, :]
        s = tl.load(S + off, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + off, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + rows, mask=m_rows, other=0.0)[:, None]
        n = s * rstd
        if HAS_GATE:
            g = tl.load(G + off, mask=mask, other=0.0).to(tl.float32)
            y = n
            if HAS_WEIGHT:
                y = y * w
            if HAS_BIAS:
                y = y + b
            tl.store(DG + off, dy * y * _gate_act_grad(g, ACTIVATION), mask=mask)
            dy = dy * _gate_act(g, ACTIVATION)
        dw += tl.sum(dy * n, axis=0)
        db += tl.sum(dy, axis=0)
        dn = dy
        if HAS_WEIGHT:
            dn = dy * w
        ds = rstd * (dn - n * (tl.sum(dn * n, axis=1) / D)[:, None])
        if HAS_DRES_OUT:
            ds += tl.load(DRES_OUT + off, mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + off, ds, mask=mask)
        if STORE_DRES:
            tl.store(DRES + off, ds, mask=mask)
    if HAS_WEIGHT:
        tl.store(DW_PARTIAL + pid * D + cols, dw, mask=m_cols)
    if HAS_BIAS:
        tl.store(DB_PARTIAL + pid * D + cols, db, mask=m_cols)


def _blocks(D: int, elem_bytes: int):
    """(BM, BD, num_warps): BM rows of BD >= D columns per tile; a whole row must fit in one tile."""
    BD = triton.next_power_of_2(D)
    if BD * elem_bytes > 65536:
        raise ValueError(f"the normalised dimension D={D} is too large for the fused RMSNorm kernel (at most {65536 // elem_bytes})")
    BM = max(1, min(64, 4096 // BD))
    return BM, BD, min(max(BM * BD // 512, 1), 16)


def _bwd_blocks(D: int):
    """(BM, BD, num_warps, programs per SM) of the backward, from the sweep in benchmarks/modules/tune_kernels.py
    (H200, bf16): D=1024 best at 2 rows x 4 warps x 16 programs/SM (0.078 ms vs 0.063 floor), D=128 at 32 rows x
    4 warps x 4 programs/SM (0.180 vs 0.157)."""
    BM, BD, _ = _blocks(D, 4)
    if BD >= 1024:
        return min(BM, 2), BD, 4, 16
    return BM, BD, 4, 4


def rms_norm_fwd(x, residual, weight, bias, gate, activation, eps, store_residual, residual_dtype):
    """x, residual, gate: [M, D] contiguous. Returns (y [M, D] in x.dtype, s [M, D] or None, rstd [M] float32)."""
    M, D = x.shape
    BM, BD, num_warps = _blocks(D, x.element_size())
    y = torch.empty_like(x)
    s = torch.empty((M, D), device=x.device, dtype=residual_dtype) if store_residual else None
    rstd = torch.empty((M,), device=x.device, dtype=torch.float32)
    if M == 0:
        return y, s, rstd
    _rms_norm_fwd_kernel[(triton.cdiv(M, BM),)](
        x, residual, weight, bias, gate, y, s, rstd, M, D, eps,
        HAS_RESIDUAL=residual is not None, STORE_RESIDUAL=store_residual, HAS_WEIGHT=weight is not None,
        HAS_BIAS=bias is not None, HAS_GATE=gate is not None, ACTIVATION=ACTIVATIONS[activation],
        BM=BM, BD=BD, num_warps=num_warps,
    )
    return y, s, rstd


def _num_programs(x: torch.Tensor, num_tiles: int, per_sm: int) -> int:
    if x.device.type == "cuda":
        sms = torch.cuda.get_device_properties(x.device).multi_processor_count
        return max(1, min(num_tiles, per_sm * sms))
    return max(1, min(num_tiles, 4))


def rms_norm_bwd(dy, s, rstd, weight, bias, gate, activation, dres_out, x_dtype, residual_dtype=None):
    """Gradients of ``rms_norm_fwd``: (dx [M, D], dresidual or None, dgate or None, dweight or None, dbias or None).

    ``s`` is the normalised input (x + residual); the gradient of that sum is the gradient of both x and residual.
    It is written once in ``x_dtype`` and, when ``residual_dtype`` differs, once more in that dtype; otherwise
    dresidual is dx itself.
    """
    M, D = s.shape
    BM, BD, num_warps, per_sm = _bwd_blocks(D)
    programs = _num_programs(s, triton.cdiv(M, BM), per_sm)
    dx = torch.empty((M, D), device=s.device, dtype=x_dtype)
    store_dres = residual_dtype is not None and residual_dtype != x_dtype
    dres = torch.empty((M, D), device=s.device, dtype=residual_dtype) if store_dres else None
    dg = torch.empty_like(gate) if gate is not None else None
    dw_partial = torch.empty((programs, D), device=s.device, dtype=torch.float32) if weight is not None else None
    db_partial = torch.empty((programs, D), device=s.device, dtype=torch.float32) if bias is not None else None
    _rms_norm_bwd_kernel[(programs,)](
        s, weight, bias, gate, rstd, dy, dres_out, dx, dres, dg, dw_partial, db_partial,
        M, D, programs,
        HAS_DRES_OUT=dres_out is not None, STORE_DRES=store_dres, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
        HAS_GATE=gate is not None, ACTIVATION=ACTIVATIONS[activation], BM=BM, BD=BD, num_warps=num_warps,
    )
    dw = dw_partial.sum(0).to(weight.dtype) if weight is not None else None
    db = db_partial.sum(0).to(bias.dtype) if bias is not None else None
    if residual_dtype is not None and not store_dres:
        dres = dx
    return dx, dres, dg, dw, db
