"""Fused RMSNorm and LayerNorm in Triton, forward and backward, optionally fused with the residual add before them.

    y, new_residual = add_norm(x, residual, weight, bias, eps, rms=...)    new_residual = x + residual, y = Norm(new_residual)

Memory-bound, so each kernel reads and writes every element once where it can:
- forward: each program normalizes whole rows held in registers (one read, one write), several at a time when rows
  are short (per-head QK-norm); rows longer than FWD_MAX_BLOCK go in chunks (statistics passes, then the normalize
  pass, re-reading the row from L2), so 8K-16K hidden sizes do not spill registers.
- backward: a fixed number of programs, each over a contiguous range of rows, summing dweight/dbias in fp32 over its
  rows into its own row of a partial buffer; a second reduction (torch.sum over programs) finishes them. No atomics,
  so gradients are bitwise deterministic for a given device.
Statistics and arithmetic are fp32 (fp64 for fp64 inputs, which gradcheck uses); outputs are in the input dtype.
Imported only when used: Triton decides when a kernel is defined whether to run it in its interpreter
(TRITON_INTERPRET=1, how the tests run it on CPU).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

FWD_MAX_BLOCK = 8192  # longest row the forward holds in registers; longer rows are processed in chunks of this size
BWD_MAX_BLOCK = 4096  # the backward keeps more live per element (x, dy, weight, the dweight/dbias sums)


@triton.jit
def _load_sum(X, R, x_offs, r_offs, mask, H_TY: tl.constexpr, HAS_RES: tl.constexpr, ACC: tl.constexpr):
    """x (+ residual), rounded to the new residual's dtype so that y = Norm(the stored new residual)."""
    h = tl.load(X + x_offs, mask=mask, other=0.0).to(ACC)
    if HAS_RES:
        h += tl.load(R + r_offs, mask=mask, other=0.0).to(ACC)
    return h.to(H_TY).to(ACC)


@triton.jit
def _dx(xhat, wdy, c1, c2, rstd, IS_RMS: tl.constexpr):
    """d Norm / d h applied to dy: rstd * (w*dy - xhat * mean(xhat*w*dy) [- mean(w*dy) for LayerNorm])."""
    if IS_RMS:
        return (wdy - xhat * c1) * rstd
    return (wdy - xhat * c1 - c2) * rstd


@triton.jit
def _norm_fwd_rows(X, R, H, Y, W, B, MEAN, RSTD, stride_x, stride_r, stride_h, stride_y, M, N, eps,
                   IS_RMS: tl.constexpr, HAS_RES: tl.constexpr, STORE_H: tl.constexpr, HAS_BIAS: tl.constexpr,
                   ROWS: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr):
    """ROWS whole rows per program, held in registers: each element read once and written once."""
    rows = (tl.program_id(0) * ROWS + tl.arange(0, ROWS)).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    row_ok = rows < M
    mask = row_ok[:, None] & (cols < N)[None, :]
    h = _load_sum(X, R, rows[:, None] * stride_x + cols[None, :], rows[:, None] * stride_r + cols[None, :], mask,
                  H.dtype.element_ty, HAS_RES, ACC)
    if STORE_H:
        tl.store(H + rows[:, None] * stride_h + cols[None, :], h.to(H.dtype.element_ty), mask=mask)
    if IS_RMS:
        centred = h
    else:
        mean = tl.sum(h, axis=1) / N
        centred = tl.where(mask, h - mean[:, None], 0.0)
        tl.store(MEAN + rows, mean, mask=row_ok)
    rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=1) / N + eps)
    tl.store(RSTD + rows, rstd, mask=row_ok)
    y = centred * rstd[:, None] * tl.load(W + cols, mask=cols < N, other=0.0).to(ACC)[None, :]
    if HAS_BIAS:
        y += tl.load(B + cols, mask=cols < N, other=0.0).to(ACC)[None, :]
    tl.store(Y + rows[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _norm_fwd_chunked(X, R, H, Y, W, B, MEAN, RSTD, stride_x, stride_r, stride_h, stride_y, N, eps,
                      IS_RMS: tl.constexpr, HAS_RES: tl.constexpr, STORE_H: tl.constexpr, HAS_BIAS: tl.constexpr,
                      BLOCK: tl.constexpr, ACC: tl.constexpr):
    """One row longer than FWD_MAX_BLOCK per program, in chunks: statistics (the mean, then the centred variance, so no
    E[x^2]-E[x]^2 cancellation), then y; the later passes re-read the row, from L2 for rows this size."""
    row = tl.program_id(0).to(tl.int64)
    X += row * stride_x
    R += row * stride_r
    H += row * stride_h
    Y += row * stride_y
    H_TY = H.dtype.element_ty
    cols = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], dtype=ACC)
    for start in range(0, N, BLOCK):
        c = start + cols
        h = _load_sum(X, R, c, c, c < N, H_TY, HAS_RES, ACC)
        if STORE_H:
            tl.store(H + c, h.to(H_TY), mask=c < N)
        if IS_RMS:
            acc += h * h
        else:
            acc += h
    if IS_RMS:
        mean = 0.0
        var = tl.sum(acc, axis=0) / N
    else:
        mean = tl.sum(acc, axis=0) / N
        acc = tl.zeros([BLOCK], dtype=ACC)
        for start in range(0, N, BLOCK):
            c = start + cols
            d = tl.where(c < N, _load_sum(X, R, c, c, c < N, H_TY, HAS_RES, ACC) - mean, 0.0)
            acc += d * d
        var = tl.sum(acc, axis=0) / N
        tl.store(MEAN + row, mean)
    rstd = 1.0 / tl.sqrt(var + eps)
    tl.store(RSTD + row, rstd)
    for start in range(0, N, BLOCK):
        c = start + cols
        y = (_load_sum(X, R, c, c, c < N, H_TY, HAS_RES, ACC) - mean) * rstd * tl.load(W + c, mask=c < N).to(ACC)
        if HAS_BIAS:
            y += tl.load(B + c, mask=c < N).to(ACC)
        tl.store(Y + c, y.to(Y.dtype.element_ty), mask=c < N)


@triton.jit
def _norm_bwd_rows(H, W, DY, DH, DX, DR, MEAN, RSTD, DW_PART, DB_PART,
                   stride_h, stride_dy, stride_dh, stride_dx, stride_dr, M, N, rows_per_program,
                   IS_RMS: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DH: tl.constexpr, STORE_DR: tl.constexpr,
                   ROWS: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr):
    """dx (+ DH, the gradient arriving at the new residual) for this program's rows, ROWS at a time, and its partial
    sums dweight = sum(dy * xhat), dbias = sum(dy) over them, kept in registers until one store at the end."""
    pid = tl.program_id(0)
    first = pid.to(tl.int64) * rows_per_program
    end = tl.minimum(first + rows_per_program, M)
    cols = tl.arange(0, BLOCK)
    w = tl.load(W + cols, mask=cols < N, other=0.0).to(ACC)[None, :]
    dw = tl.zeros([ROWS, BLOCK], dtype=ACC)
    db = tl.zeros([ROWS, BLOCK], dtype=ACC)
    for i in range(0, rows_per_program, ROWS):
        rows = first + i + tl.arange(0, ROWS)
        row_ok = rows < end
        mask = row_ok[:, None] & (cols < N)[None, :]
        rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)[:, None]
        h = tl.load(H + rows[:, None] * stride_h + cols[None, :], mask=mask, other=0.0).to(ACC)
        if IS_RMS:
            xhat = h * rstd
        else:
            xhat = tl.where(mask, (h - tl.load(MEAN + rows, mask=row_ok, other=0.0)[:, None]) * rstd, 0.0)
        dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(ACC)
        wdy = w * dy
        dw += dy * xhat
        if HAS_BIAS:
            db += dy
        dx = _dx(xhat, wdy, (tl.sum(xhat * wdy, axis=1) / N)[:, None], (tl.sum(wdy, axis=1) / N)[:, None], rstd,
                 IS_RMS)
        if HAS_DH:
            dx += tl.load(DH + rows[:, None] * stride_dh + cols[None, :], mask=mask, other=0.0).to(ACC)
        tl.store(DX + rows[:, None] * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        if STORE_DR:
            tl.store(DR + rows[:, None] * stride_dr + cols[None, :], dx.to(DR.dtype.element_ty), mask=mask)
    tl.store(DW_PART + pid.to(tl.int64) * N + cols, tl.sum(dw, axis=0), mask=cols < N)
    if HAS_BIAS:
        tl.store(DB_PART + pid.to(tl.int64) * N + cols, tl.sum(db, axis=0), mask=cols < N)


@triton.jit
def _norm_bwd_chunked(H, W, DY, DH, DX, DR, MEAN, RSTD, DW_PART, DB_PART,
                      stride_h, stride_dy, stride_dh, stride_dx, stride_dr, M, N, rows_per_program,
                      IS_RMS: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DH: tl.constexpr, STORE_DR: tl.constexpr,
                      BLOCK: tl.constexpr, ACC: tl.constexpr):
    """As _norm_bwd_rows for rows longer than BWD_MAX_BLOCK: per row, the two row sums over chunks, then dx chunk by
    chunk, adding into this program's own row of the partial sums (zeroed by the caller)."""
    pid = tl.program_id(0)
    first = pid.to(tl.int64) * rows_per_program
    DW_PART += pid.to(tl.int64) * N
    DB_PART += pid.to(tl.int64) * N
    cols = tl.arange(0, BLOCK)
    for i in range(rows_per_program):
        r = first + i
        if r < M:  # the last program may have fewer rows
            rstd = tl.load(RSTD + r)
            if IS_RMS:
                mean = 0.0
            else:
                mean = tl.load(MEAN + r)
            acc1 = tl.zeros([BLOCK], dtype=ACC)
            acc2 = tl.zeros([BLOCK], dtype=ACC)
            for start in range(0, N, BLOCK):
                c = start + cols
                m = c < N
                xhat = tl.where(m, (tl.load(H + r * stride_h + c, mask=m, other=0.0).to(ACC) - mean) * rstd, 0.0)
                wdy = (tl.load(W + c, mask=m, other=0.0).to(ACC)
                       * tl.load(DY + r * stride_dy + c, mask=m, other=0.0).to(ACC))
                acc1 += xhat * wdy
                acc2 += wdy
            c1 = tl.sum(acc1, axis=0) / N
            c2 = tl.sum(acc2, axis=0) / N
            for start in range(0, N, BLOCK):
                c = start + cols
                m = c < N
                xhat = tl.where(m, (tl.load(H + r * stride_h + c, mask=m, other=0.0).to(ACC) - mean) * rstd, 0.0)
                dy = tl.load(DY + r * stride_dy + c, mask=m, other=0.0).to(ACC)
                dx = _dx(xhat, tl.load(W + c, mask=m, other=0.0).to(ACC) * dy, c1, c2, rstd, IS_RMS)
                if HAS_DH:
                    dx += tl.load(DH + r * stride_dh + c, mask=m, other=0.0).to(ACC)
                tl.store(DX + r * stride_dx + c, dx.to(DX.dtype.element_ty), mask=m)
                if STORE_DR:
                    tl.store(DR + r * stride_dr + c, dx.to(DR.dtype.element_ty), mask=m)
                tl.store(DW_PART + c, tl.load(DW_PART + c, mask=m, other=0.0) + dy * xhat, mask=m)
                if HAS_BIAS:
                    tl.store(DB_PART + c, tl.load(DB_PART + c, mask=m, other=0.0) + dy, mask=m)
                # The partial row is this program's alone; the barrier orders its read-modify-write between rows even
                # if the compiler gives the load and the store of an element to different threads.
                tl.debug_barrier()


# --- Launch -------------------------------------------------------------------------------------------------------

def _rows(t: torch.Tensor) -> torch.Tensor:
    """A (rows, hidden) view with unit stride along hidden (copied only if the input is not laid out so)."""
    t = t.reshape(-1, t.shape[-1])
    return t if t.stride(-1) == 1 else t.contiguous()


def _layout(n: int, max_block: int, tile: int, per_thread: int) -> tuple[int, int, int]:
    """(block, rows per step, warps) for rows of n elements: several rows per step while rows * block <= tile,
    `per_thread` elements per thread (4 to 16 warps). rows == 0: the row is longer than one block and goes in
    chunks of `block`."""
    block = min(triton.next_power_of_2(n), max_block)
    rows = max(1, min(128, tile // block)) if block >= n else 0
    warps = min(16, max(4, block * max(rows, 1) // (32 * per_thread)))
    return block, rows, warps


def forward_layout(n: int, max_block: int | None = None) -> tuple[int, int, int]:
    return _layout(n, max_block or FWD_MAX_BLOCK, tile=4096, per_thread=16)


def backward_layout(n: int, max_block: int | None = None) -> tuple[int, int, int]:
    # The backward holds ~8 values per element: smaller tiles and half the elements per thread, or ptxas spills
    # (checked by `bench/norm_kernels.py --ptxas` with Triton 3.6, 3.8 and 3.9).
    return _layout(n, max_block or BWD_MAX_BLOCK, tile=2048, per_thread=8)


def _acc_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _backward_programs(rows: int, device: torch.device) -> int:
    """Enough programs to fill the GPU twice over; each one's partial dweight row costs hidden * 4 bytes."""
    if device.type == "cuda":
        slots = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    else:  # the interpreter on CPU: a few programs, so that the partial sums and their reduction are exercised
        slots = 4
    return max(1, min(rows, slots))


def _backward_buffers(ctx, h: torch.Tensor, dy: torch.Tensor | None, dh: torch.Tensor | None):
    """A fused norm's backward inputs and outputs as (rows, hidden) tensors: dy (zeros if None), dh (the gradient of
    the returned sum x + residual; dy alone if None), dx in the input's dtype and dresidual in the residual's where
    that differs (else dx itself, store_dr False)."""
    (m, n), device = h.shape, h.device
    dy2 = _rows(dy) if dy is not None else torch.zeros((m, n), dtype=h.dtype, device=device)
    dh2 = _rows(dh) if dh is not None else dy2
    dx = torch.empty((m, n), dtype=ctx.x_dtype, device=device)
    store_dr = ctx.r_dtype is not None and ctx.r_dtype != ctx.x_dtype
    dr = torch.empty((m, n), dtype=ctx.r_dtype, device=device) if store_dr else dx
    return dy2, dh2, dx, dr, store_dr


class _FusedNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, residual, weight, bias, eps, rms, residual_in_fp32, max_block):
        shape, n = x.shape, x.shape[-1]
        if weight.shape != (n,) or (bias is not None and bias.shape != (n,)):
            raise ValueError(f"norm weight/bias of shape {tuple(weight.shape)} do not match hidden size {n}")
        if residual is not None and residual.shape != shape:
            raise ValueError(f"residual shape {tuple(residual.shape)} differs from input shape {tuple(shape)}")
        x2 = _rows(x)
        r2 = _rows(residual) if residual is not None else x2
        out_dtype = torch.promote_types(x.dtype, residual.dtype) if residual is not None else x.dtype
        h_dtype = torch.promote_types(out_dtype, torch.float32) if residual_in_fp32 else out_dtype
        store_h = residual is not None or h_dtype != x.dtype
        m, device = x2.shape[0], x.device
        y = torch.empty((m, n), dtype=out_dtype, device=device)
        h = torch.empty((m, n), dtype=h_dtype, device=device) if store_h else x2
        rstd = torch.empty(m, dtype=torch.promote_types(x.dtype, torch.float32), device=device)
        mean = rstd if rms else torch.empty_like(rstd)
        block, rows, warps = forward_layout(n, max_block)
        args = (x2, r2, h, y, weight, bias if bias is not None else weight, mean, rstd,
                x2.stride(0), r2.stride(0), h.stride(0), y.stride(0))
        flags = {"IS_RMS": rms, "HAS_RES": residual is not None, "STORE_H": store_h, "HAS_BIAS": bias is not None,
                 "BLOCK": block, "ACC": _acc_dtype(x.dtype), "num_warps": warps}
        if m and rows:
            _norm_fwd_rows[(triton.cdiv(m, rows),)](*args, m, n, eps, ROWS=rows, **flags)
        elif m:
            _norm_fwd_chunked[(m,)](*args, n, eps, **flags)
        ctx.save_for_backward(h, weight, bias, mean, rstd)
        ctx.rms, ctx.max_block, ctx.shape = rms, max_block, shape
        ctx.x_dtype, ctx.r_dtype = x.dtype, residual.dtype if residual is not None else None
        ctx.set_materialize_grads(False)
        return y.view(shape), (h.view(shape) if store_h else None)

    @staticmethod
    def backward(ctx, dy, dh):
        h, weight, bias, mean, rstd = ctx.saved_tensors
        (m, n), device = h.shape, h.device
        dy2, dh2, dx, dr, store_dr = _backward_buffers(ctx, h, dy, dh)
        block, rows, warps = backward_layout(n, ctx.max_block)
        rows_per_program = triton.cdiv(m, _backward_programs(m, device))
        if rows:  # whole tiles per program, so that only the last program has a partial one
            rows_per_program = triton.cdiv(rows_per_program, rows) * rows
        programs = triton.cdiv(m, rows_per_program) if m else 0
        # The chunked kernel adds into its partial row; the tiled one writes it once.
        alloc = torch.empty if rows else torch.zeros
        acc_dtype = torch.promote_types(ctx.x_dtype, torch.float32)
        dw_part = alloc((programs, n), dtype=acc_dtype, device=device)
        db_part = alloc((programs, n), dtype=acc_dtype, device=device) if bias is not None else dw_part
        args = (h, weight, dy2, dh2, dx, dr, mean, rstd, dw_part, db_part,
                h.stride(0), dy2.stride(0), dh2.stride(0), dx.stride(0), dr.stride(0), m, n, rows_per_program)
        flags = {"IS_RMS": ctx.rms, "HAS_BIAS": bias is not None, "HAS_DH": dh is not None, "STORE_DR": store_dr,
                 "BLOCK": block, "ACC": _acc_dtype(ctx.x_dtype), "num_warps": warps}
        if programs and rows:
            _norm_bwd_rows[(programs,)](*args, ROWS=rows, **flags)
        elif programs:
            _norm_bwd_chunked[(programs,)](*args, **flags)
        dweight = dw_part.sum(0).to(weight.dtype)
        dbias = db_part.sum(0).to(bias.dtype) if bias is not None else None
        dresidual = dr.view(ctx.shape) if ctx.r_dtype is not None else None
        return dx.view(ctx.shape), dresidual, dweight, dbias, None, None, None, None


def norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float, *, rms: bool,
         max_block: int | None = None) -> torch.Tensor:
    """RMSNorm (`rms`) or LayerNorm of x over its last dimension; `max_block` (default FWD_/BWD_MAX_BLOCK) caps the
    row elements held in registers, longer rows going in chunks."""
    return _FusedNorm.apply(x, None, weight, bias, eps, rms, False, max_block)[0]


def add_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor | None,
             eps: float, *, rms: bool, residual_in_fp32: bool = False,
             max_block: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(Norm(x + residual), x + residual) in one pass; residual None means just x. With `residual_in_fp32` the new
    residual is kept in fp32 (the norm then sees the unrounded sum); y is in the inputs' dtype."""
    y, h = _FusedNorm.apply(x, residual, weight, bias, eps, rms, residual_in_fp32, max_block)
    return y, (x if h is None else h)
