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
    D, eps,
    HAS_RESIDUAL: tl.constexpr, STORE_RESIDUAL: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_GATE: tl.constexpr, ACTIVATION: tl.constexpr, BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    s = tl.load(X + row * D + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        s += tl.load(RES + row * D + cols, mask=mask, other=0.0).to(tl.float32)
    if STORE_RESIDUAL:
        tl.store(RES_OUT + row * D + cols, s, mask=mask)
    rstd = 1.0 / tl.sqrt(tl.sum(s * s, axis=0) / D + eps)
    tl.store(RSTD + row, rstd)
    y = s * rstd
    if HAS_WEIGHT:
        y = y * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y = y + tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_GATE:
        g = tl.load(G + row * D + cols, mask=mask, other=0.0).to(tl.float32)
        y = y * _gate_act(g, ACTIVATION)
    tl.store(Y + row * D + cols, y, mask=mask)


@triton.jit
def _rms_norm_bwd_kernel(
    S, W, B, G, RSTD, DY, DRES_OUT, DS, DG, DW_PARTIAL, DB_PARTIAL,
    M, D, rows_per_program,
    HAS_DRES_OUT: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_GATE: tl.constexpr, ACTIVATION: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    if HAS_WEIGHT:
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        b = tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_D], dtype=tl.float32)
    db = tl.zeros([BLOCK_D], dtype=tl.float32)
    row_start = pid.to(tl.int64) * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    for row in range(row_start, row_end):
        off = row * D
        s = tl.load(S + off + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + off + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row)
        n = s * rstd
        if HAS_GATE:
            g = tl.load(G + off + cols, mask=mask, other=0.0).to(tl.float32)
            y = n
            if HAS_WEIGHT:
                y = y * w
            if HAS_BIAS:
                y = y + b
            tl.store(DG + off + cols, dy * y * _gate_act_grad(g, ACTIVATION), mask=mask)
            dy = dy * _gate_act(g, ACTIVATION)
        dw += dy * n
        db += dy
        dn = dy
        if HAS_WEIGHT:
            dn = dy * w
        ds = rstd * (dn - n * (tl.sum(dn * n, axis=0) / D))
        if HAS_DRES_OUT:
            ds += tl.load(DRES_OUT + off + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(DS + off + cols, ds, mask=mask)
    if HAS_WEIGHT:
        tl.store(DW_PARTIAL + pid * D + cols, dw, mask=mask)
    if HAS_BIAS:
        tl.store(DB_PARTIAL + pid * D + cols, db, mask=mask)


def _block_d(D: int, elem_bytes: int) -> int:
    block = triton.next_power_of_2(D)
    if block * elem_bytes > 65536:
        raise ValueError(f"the normalised dimension D={D} is too large for the fused RMSNorm kernel (at most {65536 // elem_bytes})")
    return block


def _num_warps(block_d: int) -> int:
    return min(max(block_d // 256, 1), 16)


def rms_norm_fwd(x, residual, weight, bias, gate, activation, eps, store_residual, residual_dtype):
    """x, residual, gate: [M, D] contiguous. Returns (y [M, D] in x.dtype, s [M, D] or None, rstd [M] float32)."""
    M, D = x.shape
    block_d = _block_d(D, x.element_size())
    y = torch.empty_like(x)
    s = torch.empty((M, D), device=x.device, dtype=residual_dtype) if store_residual else None
    rstd = torch.empty((M,), device=x.device, dtype=torch.float32)
    _rms_norm_fwd_kernel[(M,)](
        x, residual, weight, bias, gate, y, s, rstd, D, eps,
        HAS_RESIDUAL=residual is not None, STORE_RESIDUAL=store_residual, HAS_WEIGHT=weight is not None,
        HAS_BIAS=bias is not None, HAS_GATE=gate is not None, ACTIVATION=ACTIVATIONS[activation],
        BLOCK_D=block_d, num_warps=_num_warps(block_d),
    )
    return y, s, rstd


def _num_programs(x: torch.Tensor, M: int) -> int:
    if x.device.type == "cuda":
        sms = torch.cuda.get_device_properties(x.device).multi_processor_count
        return max(1, min(M, 4 * sms))
    return max(1, min(M, 4))


def rms_norm_bwd(dy, s, rstd, weight, bias, gate, activation, dres_out):
    """Gradients of ``rms_norm_fwd``: (ds [M, D] float32, dgate or None, dweight or None, dbias or None).

    ``s`` is the normalised input (x + residual). ``ds`` is the gradient of that sum, hence of x and of residual.
    """
    M, D = s.shape
    block_d = _block_d(D, 4)
    programs = _num_programs(s, M)
    rows_per_program = triton.cdiv(M, programs)
    ds = torch.empty((M, D), device=s.device, dtype=torch.float32)
    dg = torch.empty_like(gate) if gate is not None else None
    dw_partial = torch.empty((programs, D), device=s.device, dtype=torch.float32) if weight is not None else None
    db_partial = torch.empty((programs, D), device=s.device, dtype=torch.float32) if bias is not None else None
    _rms_norm_bwd_kernel[(programs,)](
        s, weight, bias, gate, rstd, dy, dres_out, ds, dg, dw_partial, db_partial,
        M, D, rows_per_program,
        HAS_DRES_OUT=dres_out is not None, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
        HAS_GATE=gate is not None, ACTIVATION=ACTIVATIONS[activation], BLOCK_D=block_d,
        num_warps=_num_warps(block_d),
    )
    dw = dw_partial.sum(0).to(weight.dtype) if weight is not None else None
    db = db_partial.sum(0).to(bias.dtype) if bias is not None else None
    return ds, dg, dw, db
