"""RMSNorm forward and backward.

Forward, per row x of n elements, with w' = w + offset (offset 0: Llama, 1: Gemma):
    rstd = 1 / sqrt(mean(x^2) + eps),  xhat = x * rstd,  y = xhat * w'
  Llama casts xhat to the input dtype before the weight product; Gemma stays in fp32 throughout.
Backward, with g = dy * w':
    dx = rstd * (g - xhat * mean(g * xhat))
    dw = sum over rows of dy * xhat
"""
import torch
import triton
import triton.language as tl

from .utils import elementwise_warps, interpreting, program_count, row_block


@triton.jit
def _rms_norm_fwd_kernel(X, W, Y, RSTD, x_row_stride, y_row_stride, n_cols, eps, offset,
                         CAST_BEFORE_WEIGHT: tl.constexpr, BLOCK: tl.constexpr):
    """One row: rstd = 1 / sqrt(mean(x^2) + eps), y = xhat * (w + offset) with xhat = x * rstd
    (rounded to x's dtype first when CAST_BEFORE_WEIGHT); rstd saved for the backward.
    Gradient (_rms_norm_bwd_kernel): dx = rstd * (g - xhat * mean(g * xhat)), g = dy * (w + offset);
    dw = sum over rows of dy * xhat."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(X + row * x_row_stride + cols, mask=mask, other=0.0)
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / n_cols + eps)
    xhat = xf * rstd
    w = tl.load(W + cols, mask=mask, other=0.0)
    if CAST_BEFORE_WEIGHT:
        y = xhat.to(x.dtype).to(tl.float32) * (w.to(tl.float32) + offset)
    else:
        y = xhat * (w.to(tl.float32) + offset)
    tl.store(Y + row * y_row_stride + cols, y.to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + row, rstd)


@triton.jit
def _rms_norm_bwd_kernel(DY, X, W, RSTD, DX, DW_PARTIAL, dy_row_stride, x_row_stride,
                         dx_row_stride, n_rows, n_cols, rows_per_program, offset,
                         CAST_BEFORE_WEIGHT: tl.constexpr, COMPUTE_DW: tl.constexpr,
                         BLOCK: tl.constexpr):
    """Rows [pid * rows_per_program, ...): with g = dy * (w + offset) and xhat = x * rstd,
        dx = rstd * (g - xhat * mean(g * xhat))
    (the rounding of xhat before the weight passes the gradient through unchanged, as autograd's
    .to() does); with COMPUTE_DW, DW_PARTIAL[pid] = sum over those rows of dy * xhat (xhat
    rounded as in the forward), which the launcher sums over programs."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32) + offset
    dw = tl.zeros((BLOCK,), dtype=tl.float32)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    # pointers advance row by row: 64-bit pointer arithmetic, no int32 offset overflow
    first = row_start.to(tl.int64)
    x_ptr = X + first * x_row_stride
    dy_ptr = DY + first * dy_row_stride
    dx_ptr = DX + first * dx_row_stride
    for row in range(row_start, row_end):
        x = tl.load(x_ptr + cols, mask=mask, other=0.0)
        dy = tl.load(dy_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row)
        xhat = x.to(tl.float32) * rstd
        g = dy * w
        dx = rstd * (g - xhat * (tl.sum(g * xhat, axis=0) / n_cols))
        tl.store(dx_ptr + cols, dx.to(DX.dtype.element_ty), mask=mask)
        if COMPUTE_DW:
            if CAST_BEFORE_WEIGHT:
                xhat = xhat.to(x.dtype).to(tl.float32)
            dw += dy * xhat
        x_ptr += x_row_stride
        dy_ptr += dy_row_stride
        dx_ptr += dx_row_stride
    if COMPUTE_DW:
        tl.store(DW_PARTIAL + pid.to(tl.int64) * n_cols + cols, dw, mask=mask)


def rms_norm_fwd(x2d: torch.Tensor, weight: torch.Tensor, eps: float, offset: float,
                 cast_before_weight: bool, out_dtype: torch.dtype):
    """x2d (rows, n) with unit column stride -> (y (rows, n) of out_dtype, rstd (rows,) fp32)."""
    rows, n = x2d.shape
    y = torch.empty((rows, n), dtype=out_dtype, device=x2d.device)
    rstd = torch.empty(rows, dtype=torch.float32, device=x2d.device)
    block = row_block(n)
    if rows:
        _rms_norm_fwd_kernel[(rows,)](x2d, weight, y, rstd, x2d.stride(0), y.stride(0), n, eps,
                                      offset, CAST_BEFORE_WEIGHT=cast_before_weight, BLOCK=block,
                                      num_warps=elementwise_warps(block))
    return y, rstd


def rms_norm_bwd(dy2d: torch.Tensor, x2d: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor,
                 offset: float, cast_before_weight: bool, compute_dw: bool):
    """-> (dx (rows, n) in x's dtype, dw in weight's dtype or None)."""
    rows, n = x2d.shape
    dx = torch.empty_like(x2d)
    programs = max(1, min(rows, program_count(x2d.device, per_sm=1 if interpreting() else 2)))
    rows_per_program = triton.cdiv(rows, programs) if rows else 0
    dw_partial = torch.empty((programs, n) if compute_dw else (1,), dtype=torch.float32,
                             device=x2d.device)
    block = row_block(n)
    if rows:
        _rms_norm_bwd_kernel[(programs,)](dy2d, x2d, weight, rstd, dx, dw_partial, dy2d.stride(0),
                                          x2d.stride(0), dx.stride(0), rows, n, rows_per_program,
                                          offset, CAST_BEFORE_WEIGHT=cast_before_weight,
                                          COMPUTE_DW=compute_dw, BLOCK=block,
                                          num_warps=elementwise_warps(block))
    dw = None
    if compute_dw:
        dw = (dw_partial.sum(0) if rows else torch.zeros(n, device=x2d.device)).to(weight.dtype)
    return dx, dw
