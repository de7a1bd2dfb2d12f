"""Fused DyT (Dynamic Tanh) in Triton, forward and backward, optionally fused with the residual add before it.

    y, new_residual = add_dyt(x, residual, alpha, weight, bias)    new_residual = x + residual,
                                                                    y = weight * tanh(alpha * new_residual) + bias

DyT is element-wise, so the forward is one pass over (rows x columns) tiles. The backward recomputes
t = tanh(alpha * h) from the saved input and produces, in one pass,
    dh = dy * weight * alpha * (1 - t^2) (+ the gradient arriving at the new residual)
and the partial sums dweight = sum_rows(dy * t), dbias = sum_rows(dy), dalpha = sum(dy * weight * h * (1 - t^2)).
As in triton_norm.py, a fixed number of programs each own a contiguous range of rows and write their partial sums to
their own row (dweight, dbias) or element (dalpha) of a buffer that torch.sum finishes: no atomics, so the gradients
are bitwise deterministic for a given device. Arithmetic is fp32 (fp64 for fp64 inputs, which gradcheck uses).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from normtron.kernels.triton_norm import _acc_dtype, _backward_buffers, _backward_programs, _load_sum, _rows

MAX_BLOCK = 4096  # columns per tile; wider rows go in several column tiles


@triton.jit
def _tanh(z):
    """tanh without libdevice (which the interpreter lacks): sign(z) (1 - e^(-2|z|)) / (1 + e^(-2|z|)), no overflow;
    its cancellation near 0 is avoided by the Taylor series there (|z| < 0.1: truncation error < 6e-8 relative)."""
    a = tl.abs(z)
    e = tl.exp(-2.0 * a)
    big = (1.0 - e) / (1.0 + e)
    z2 = z * z
    small = z * (1.0 - z2 * (1.0 / 3.0 - z2 * (2.0 / 15.0)))
    return tl.where(a < 0.1, small, tl.where(z < 0, -big, big))


@triton.jit
def _dyt_fwd(X, R, H, Y, A, W, B, stride_x, stride_r, stride_h, stride_y, M, N,
             HAS_RES: tl.constexpr, STORE_H: tl.constexpr, HAS_BIAS: tl.constexpr,
             ROWS: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr):
    """One ROWS x BLOCK tile per program: each element read once and written once."""
    rows = (tl.program_id(0) * ROWS + tl.arange(0, ROWS)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    col_ok = cols < N
    mask = (rows < M)[:, None] & col_ok[None, :]
    h = _load_sum(X, R, rows[:, None] * stride_x + cols[None, :], rows[:, None] * stride_r + cols[None, :], mask,
                  H.dtype.element_ty, HAS_RES, ACC)
    if STORE_H:
        tl.store(H + rows[:, None] * stride_h + cols[None, :], h.to(H.dtype.element_ty), mask=mask)
    y = _tanh(tl.load(A).to(ACC) * h) * tl.load(W + cols, mask=col_ok, other=0.0).to(ACC)[None, :]
    if HAS_BIAS:
        y += tl.load(B + cols, mask=col_ok, other=0.0).to(ACC)[None, :]
    tl.store(Y + rows[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _dyt_bwd(H, A, W, DY, DH, DX, DR, DW_PART, DB_PART, DA_PART,
             stride_h, stride_dy, stride_dh, stride_dx, stride_dr, M, N, rows_per_program,
             HAS_BIAS: tl.constexpr, HAS_DH: tl.constexpr, STORE_DR: tl.constexpr,
             ROWS: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr):
    """This program's rows, column tile by column tile; the partial sums stay in registers until one store per tile
    (dweight, dbias) or per program (dalpha)."""
    pid = tl.program_id(0)
    first = pid.to(tl.int64) * rows_per_program
    end = tl.minimum(first + rows_per_program, M)
    alpha = tl.load(A).to(ACC)
    da = tl.zeros([BLOCK], dtype=ACC)  # summed over rows as it goes: one fewer tile of registers
    for start in range(0, N, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        col_ok = cols < N
        w = tl.load(W + cols, mask=col_ok, other=0.0).to(ACC)[None, :]
        dw = tl.zeros([ROWS, BLOCK], dtype=ACC)
        db = tl.zeros([ROWS, BLOCK], dtype=ACC)
        for i in range(0, rows_per_program, ROWS):
            rows = first + i + tl.arange(0, ROWS)
            mask = (rows < end)[:, None] & col_ok[None, :]
            h = tl.load(H + rows[:, None] * stride_h + cols[None, :], mask=mask, other=0.0).to(ACC)
            dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(ACC)
            t = _tanh(alpha * h)
            dz = dy * w * (1.0 - t * t)  # d loss / d (alpha * h)
            dw += dy * t
            if HAS_BIAS:
                db += dy
            da += tl.sum(dz * h, axis=0)
            dx = dz * alpha
            if HAS_DH:
                dx += tl.load(DH + rows[:, None] * stride_dh + cols[None, :], mask=mask, other=0.0).to(ACC)
            tl.store(DX + rows[:, None] * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
            if STORE_DR:
                tl.store(DR + rows[:, None] * stride_dr + cols[None, :], dx.to(DR.dtype.element_ty), mask=mask)
        tl.store(DW_PART + pid.to(tl.int64) * N + cols, tl.sum(dw, axis=0), mask=col_ok)
        if HAS_BIAS:
            tl.store(DB_PART + pid.to(tl.int64) * N + cols, tl.sum(db, axis=0), mask=col_ok)
    tl.store(DA_PART + pid, tl.sum(da, axis=0))


def _layout(n: int, max_block: int | None, tile: int, per_thread: int) -> tuple[int, int, int]:
    """(columns per tile, rows per tile, warps): tiles of about `tile` elements, `per_thread` elements per thread."""
    block = min(triton.next_power_of_2(n), max_block or MAX_BLOCK)
    rows = max(1, min(128, tile // block))
    return block, rows, min(16, max(4, block * rows // (32 * per_thread)))


def forward_layout(n: int, max_block: int | None = None) -> tuple[int, int, int]:
    return _layout(n, max_block, tile=4096, per_thread=16)


def backward_layout(n: int, max_block: int | None = None) -> tuple[int, int, int]:
    # Three partial sums live per element (dweight, dbias, dalpha): half the elements per thread of the forward
    # (`bench/norm_kernels.py --ptxas`: no spills).
    return _layout(n, max_block, tile=2048, per_thread=8)


class _FusedDyT(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, residual, alpha, weight, bias, max_block):
        shape, n = x.shape, x.shape[-1]
        if alpha.numel() != 1 or weight.shape != (n,) or (bias is not None and bias.shape != (n,)):
            raise ValueError(f"DyT alpha/weight/bias of shapes {tuple(alpha.shape)}/{tuple(weight.shape)} do not "
                             f"match one scalar and hidden size {n}")
        if residual is not None and residual.shape != shape:
            raise ValueError(f"residual shape {tuple(residual.shape)} differs from input shape {tuple(shape)}")
        x2 = _rows(x)
        r2 = _rows(residual) if residual is not None else x2
        out_dtype = torch.promote_types(x.dtype, residual.dtype) if residual is not None else x.dtype
        m, device = x2.shape[0], x.device
        y = torch.empty((m, n), dtype=out_dtype, device=device)
        h = torch.empty((m, n), dtype=out_dtype, device=device) if residual is not None else x2
        block, rows, warps = forward_layout(n, max_block)
        if m:
            _dyt_fwd[(triton.cdiv(m, rows), triton.cdiv(n, block))](
                x2, r2, h, y, alpha, weight, bias if bias is not None else weight,
                x2.stride(0), r2.stride(0), h.stride(0), y.stride(0), m, n,
                HAS_RES=residual is not None, STORE_H=residual is not None, HAS_BIAS=bias is not None,
                ROWS=rows, BLOCK=block, ACC=_acc_dtype(x.dtype), num_warps=warps)
        ctx.save_for_backward(h, alpha, weight, bias)
        ctx.max_block, ctx.shape = max_block, shape
        ctx.x_dtype, ctx.r_dtype = x.dtype, residual.dtype if residual is not None else None
        ctx.set_materialize_grads(False)
        return y.view(shape), (h.view(shape) if residual is not None else None)

    @staticmethod
    def backward(ctx, dy, dh):
        h, alpha, weight, bias = ctx.saved_tensors
        (m, n), device = h.shape, h.device
        dy2, dh2, dx, dr, store_dr = _backward_buffers(ctx, h, dy, dh)
        block, rows, warps = backward_layout(n, ctx.max_block)
        rows_per_program = triton.cdiv(triton.cdiv(m, _backward_programs(m, device)), rows) * rows
        programs = triton.cdiv(m, rows_per_program) if m else 0
        acc_dtype = torch.promote_types(ctx.x_dtype, torch.float32)
        dw_part = torch.empty((programs, n), dtype=acc_dtype, device=device)
        db_part = torch.empty((programs, n), dtype=acc_dtype, device=device) if bias is not None else dw_part
        da_part = torch.empty(programs, dtype=acc_dtype, device=device)
        if programs:
            _dyt_bwd[(programs,)](
                h, alpha, weight, dy2, dh2, dx, dr, dw_part, db_part, da_part,
                h.stride(0), dy2.stride(0), dh2.stride(0), dx.stride(0), dr.stride(0), m, n, rows_per_program,
                HAS_BIAS=bias is not None, HAS_DH=dh is not None, STORE_DR=store_dr,
                ROWS=rows, BLOCK=block, ACC=_acc_dtype(ctx.x_dtype), num_warps=warps)
        dalpha = da_part.sum().reshape(alpha.shape).to(alpha.dtype)
        dweight = dw_part.sum(0).to(weight.dtype)
        dbias = db_part.sum(0).to(bias.dtype) if bias is not None else None
        dresidual = dr.view(ctx.shape) if ctx.r_dtype is not None else None
        return dx.view(ctx.shape), dresidual, dalpha, dweight, dbias, None


def dyt(x: torch.Tensor, alpha: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
        max_block: int | None = None) -> torch.Tensor:
    """weight * tanh(alpha * x) (+ bias) over the last dimension; alpha holds one element; `max_block` (default
    MAX_BLOCK) caps the columns per tile."""
    return _FusedDyT.apply(x, None, alpha, weight, bias, max_block)[0]


def add_dyt(x: torch.Tensor, residual: torch.Tensor | None, alpha: torch.Tensor, weight: torch.Tensor,
            bias: torch.Tensor | None, max_block: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(DyT(x + residual), x + residual) in one pass; residual None means just x."""
    y, h = _FusedDyT.apply(x, residual, alpha, weight, bias, max_block)
    return y, (x if h is None else h)
