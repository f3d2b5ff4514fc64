"""Cross-entropy over a large vocabulary, forward and backward, never materialising fp32 logits.

Per row x of V logits with target class t (rows whose target equals ignore_index are skipped):
    u = s * x                        (s = logit_scale; s = 1 when not given)
    z = c * tanh(u / c)              (c = softcap, Gemma-2 style; z = u when not given)
    lse = log(sum_j exp(z_j)),  loss = lse - z_t
Backward, with g the row's gradient scale (grad_output, already divided by the mean's divisor):
    dz_j = g * (softmax(z)_j - [j == t]),  softmax(z)_j = exp(z_j - lse)
    dx_j = dz_j * dz/du * s,  dz/du = 1 - tanh(u / c)^2   (1 without softcap)

Memory traffic, the whole cost of this op (logits are e.g. 4096 x 128256 bf16 = 1.05 GB): the
forward reads each row once, in BLOCK-wide chunks with an online log-sum-exp (running max and
rescaled sum in fp32), and keeps only lse (4 bytes a row); the backward reads each logit once and
writes its gradient once, recomputing the softmax from lse. Three passes, the minimum when the
gradient cannot be formed before grad_output is known. Ignored rows are neither read nor (in the
forward) computed: masked-out prompt tokens cost only the zeros the backward writes.
A NaN logit gives a NaN loss for its row. A target outside [0, V) that is not ignore_index gives
a NaN loss here; the op (fusetune.ops.cross_entropy) checks targets on the device before launching.
"""
import torch
import triton
import triton.language as tl

from .utils import interpreting, next_power_of_2


@triton.jit
def _tanh(u):
    """tanh(u) = 1 - 2 / (exp(2u) + 1): one exp and one fast divide, no libdevice (the softcap
    path is bound by these special-function ops, not by memory); exp -> inf or 0 at large |u|
    gives +-1, never NaN. Its derivative, 1 - tanh(u)^2, is formed by the caller."""
    return 1.0 - 2.0 / (tl.exp(2.0 * u) + 1.0)


@triton.jit
def _cross_entropy_fwd_kernel(X, TARGETS, LOSS, LSE, x_row_stride, t_stride, n_cols, ignore_index,
                              scale, cap, inv_cap, HAS_SCALE: tl.constexpr,
                              HAS_SOFTCAP: tl.constexpr, BLOCK: tl.constexpr):
    """Per row: z = c * tanh(s * x / c) (z = s * x without softcap; s = 1 without scale),
    LSE[row] = log(sum_j exp(z_j)) (online, BLOCK columns at a time), LOSS[row] = lse - z_t;
    0 for both on ignored rows, a NaN loss for a target outside [0, V).
    Gradient (_cross_entropy_bwd_kernel): dx_j = g * (exp(z_j - lse) - [j == t]) * dz_j/dx_j."""
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * x_row_stride  # 64-bit: rows * V passes 2^31 at real shapes
    target = tl.load(TARGETS + row * t_stride).to(tl.int64)
    ignored = target == ignore_index
    cols = tl.arange(0, BLOCK)
    m = tl.full((), float("-inf"), tl.float32)
    s = tl.zeros((), tl.float32)
    end = tl.where(ignored, 0, n_cols)  # ignored rows skip the read entirely
    for start in range(0, end, BLOCK):
        mask = start + cols < n_cols
        z = tl.load(x_row + start + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_SCALE:
            z = z * scale
        if HAS_SOFTCAP:
            z = cap * _tanh(z * inv_cap)
        z = tl.where(mask, z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
        m = m_new
    # s >= 1 (the max adds exp(0)) unless a logit is NaN, which must reach the loss; ignored rows: s = 0
    lse = m + tl.log(tl.where(ignored, 1.0, s))
    in_range = (target >= 0) & (target < n_cols)
    zt = tl.load(x_row + target, mask=in_range & ~ignored, other=0.0).to(tl.float32)
    if HAS_SCALE:
        zt = zt * scale
    if HAS_SOFTCAP:
        zt = cap * _tanh(zt * inv_cap)
    loss = tl.where(in_range, lse - zt, float("nan"))
    tl.store(LOSS + row, tl.where(ignored, 0.0, loss))
    tl.store(LSE + row, tl.where(ignored, 0.0, lse))


@triton.jit
def _cross_entropy_bwd_kernel(X, DX, TARGETS, LSE, GRAD, x_row_stride, dx_row_stride, t_stride,
                              g_stride, n_cols, ignore_index, scale, cap, inv_cap,
                              HAS_SCALE: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                              BLOCK: tl.constexpr):
    """dx = g * (exp(z - lse) - onehot(t)) * dz/dx with g = GRAD[row], z as in the forward and
    dz/dx = s * (1 - tanh(s * x / c)^2) (s without softcap); zero on ignored rows. DX may alias X."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    target = tl.load(TARGETS + row * t_stride).to(tl.int64)
    keep = target != ignore_index
    g = tl.load(GRAD + row * g_stride).to(tl.float32)
    lse = tl.load(LSE + row)
    read = cols < tl.where(keep, n_cols, 0)  # ignored rows are not read, only zeroed
    z = tl.load(X + row * x_row_stride + cols, mask=read, other=0.0).to(tl.float32)
    if HAS_SCALE:
        z = z * scale
    if HAS_SOFTCAP:
        th = _tanh(z * inv_cap)
        z = cap * th
    dz = g * (tl.exp(z - lse) - tl.where(cols == target, 1.0, 0.0))
    if HAS_SOFTCAP:
        dz = dz * (1.0 - th * th)
    if HAS_SCALE:
        dz = dz * scale
    dz = tl.where(keep, dz, 0.0)
    tl.store(DX + row * dx_row_stride + cols, dz.to(DX.dtype.element_ty), mask=mask)


def _block(n_cols: int, gpu_block: int) -> int:
    # GPU: wide chunks (16 KB of bf16) keep many bytes in flight per program
    return min(4096 if interpreting() else gpu_block, next_power_of_2(n_cols))


def _flags(softcap, logit_scale):
    return dict(scale=1.0 if logit_scale is None else float(logit_scale),
                cap=1.0 if softcap is None else float(softcap),
                inv_cap=1.0 if softcap is None else 1.0 / softcap,
                HAS_SCALE=logit_scale is not None, HAS_SOFTCAP=softcap is not None)


def cross_entropy_fwd(x2d: torch.Tensor, targets: torch.Tensor, ignore_index: int,
                      softcap: float | None, logit_scale: float | None):
    """x2d (N, V) with unit column stride, targets (N,) integer -> (loss (N,) fp32, lse (N,) fp32).

    loss is 0 on ignored rows; lse there is 0 and unused.
    """
    rows, n_cols = x2d.shape
    loss = torch.empty(rows, dtype=torch.float32, device=x2d.device)
    lse = torch.empty(rows, dtype=torch.float32, device=x2d.device)
    if rows:
        block = _block(n_cols, 8192)
        _cross_entropy_fwd_kernel[(rows,)](x2d, targets, loss, lse, x2d.stride(0),
                                           targets.stride(0), n_cols, ignore_index,
                                           **_flags(softcap, logit_scale), BLOCK=block,
                                           num_warps=1 if interpreting() else 8)
    return loss, lse


def cross_entropy_bwd(grad: torch.Tensor, x2d: torch.Tensor, targets: torch.Tensor,
                      lse: torch.Tensor, ignore_index: int, softcap: float | None,
                      logit_scale: float | None, inplace: bool):
    """grad: the per-row gradient scale, (N,) or a stride-0 view of one value -> dx (N, V).

    inplace=True writes dx over x2d (each element is read before its own gradient is stored, by
    the same program) and returns x2d: no second logits-sized buffer.
    """
    rows, n_cols = x2d.shape
    dx = x2d if inplace else torch.empty_like(x2d)
    if rows:
        block = _block(n_cols, 4096)
        grid = (rows, triton.cdiv(n_cols, block))  # rows on axis 0: axis 1 is capped at 65535
        _cross_entropy_bwd_kernel[grid](x2d, dx, targets, lse, grad, x2d.stride(0), dx.stride(0),
                                        targets.stride(0), grad.stride(0), n_cols, ignore_index,
                                        **_flags(softcap, logit_scale), BLOCK=block,
                                        num_warps=1 if interpreting() else 8)
    return dx
