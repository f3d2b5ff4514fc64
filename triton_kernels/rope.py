"""Rotary position embedding (RoPE) in Hugging Face's rotate_half convention; q and k in one launch.

Per token (b, s) and head, over the first rd (rotary) dims of the head, with h = rd/2,
x1 = x[:h], x2 = x[h:rd] and cos[b, s], sin[b, s] split the same way into (c1, c2), (s1, s2):
    y1 = x1*c1 - x2*s1,   y2 = x2*c2 + x1*s2,   y[rd:] = x[rd:]   (partial rotary)
that is y = x*cos + rotate_half(x)*sin with rotate_half(x) = cat(-x2, x1).
Backward is the transposed map, rotate_half^T(g) = cat(g2, -g1):
    dx1 = g1*c1 + g2*s2,  dx2 = g2*c2 - g1*s1,   dx[rd:] = g[rd:]
which is the forward with (s1, s2) replaced by (-s2, -s1): the inverse rotation (for Hugging Face's
cos/sin, whose two halves are equal, just sin negated). rope_bwd launches the forward kernel with
INVERSE=True. No gradient flows to cos/sin.
"""
import torch
import triton
import triton.language as tl

from .utils import elementwise_warps, next_power_of_2

_MAX_TILE = 4096  # heads x half-dims rotated per loop step


@triton.jit
def _rope_heads(X, Y, x_head_stride, y_head_stride, n_heads, c1, c2, s1, s2, half, head_dim,
                COPY_PASS: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
                BLOCK_PASS: tl.constexpr):
    """Rotate all n_heads heads of one token; X and Y point at head 0 of that token."""
    d = tl.arange(0, BLOCK_HALF)[None, :]
    d_mask = d < half
    p = 2 * half + tl.arange(0, BLOCK_PASS)[None, :]
    p_mask = p < head_dim
    for h0 in range(0, n_heads, BLOCK_H):
        h = h0 + tl.arange(0, BLOCK_H)[:, None]
        x_row = X + h.to(tl.int64) * x_head_stride
        y_row = Y + h.to(tl.int64) * y_head_stride
        mask = (h < n_heads) & d_mask
        # both halves are loaded before either is stored: safe when Y is X (in place)
        x1 = tl.load(x_row + d, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(x_row + half + d, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_row + d, (x1 * c1 - x2 * s1).to(Y.dtype.element_ty), mask=mask)
        tl.store(y_row + half + d, (x2 * c2 + x1 * s2).to(Y.dtype.element_ty), mask=mask)
        if COPY_PASS:
            pass_mask = (h < n_heads) & p_mask
            tl.store(y_row + p, tl.load(x_row + p, mask=pass_mask), mask=pass_mask)


@triton.jit
def _rope_fwd_kernel(Q, K, COS, SIN, QO, KO,
                     q_b, q_s, q_h, k_b, k_s, k_h, qo_b, qo_s, qo_h, ko_b, ko_s, ko_h,
                     cos_b, cos_s, sin_b, sin_s, n_q_heads, n_k_heads, half, head_dim,
                     INVERSE: tl.constexpr, COPY_PASS: tl.constexpr, BLOCK_HQ: tl.constexpr,
                     BLOCK_HK: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_PASS: tl.constexpr):
    """y = x * cos + rotate_half(x) * sin over the first 2 * half dims of every q and k head of one
    token (the rest copied when COPY_PASS): y1 = x1*c1 - x2*s1, y2 = x2*c2 + x1*s2.
    Gradient, the transposed rotation: dx1 = dy1*c1 + dy2*s2, dx2 = dy2*c2 - dy1*s1, which is this
    kernel with INVERSE=True ((s1, s2) -> (-s2, -s1)). No gradient to cos/sin."""
    # one program per token: cos/sin are read once and shared by every q and k head
    s = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    d = tl.arange(0, BLOCK_HALF)
    m = d < half
    cos_row = COS + b * cos_b + s * cos_s
    sin_row = SIN + b * sin_b + s * sin_s
    c1 = tl.load(cos_row + d, mask=m, other=0.0).to(tl.float32)[None, :]
    c2 = tl.load(cos_row + half + d, mask=m, other=0.0).to(tl.float32)[None, :]
    s1 = tl.load(sin_row + d, mask=m, other=0.0).to(tl.float32)[None, :]
    s2 = tl.load(sin_row + half + d, mask=m, other=0.0).to(tl.float32)[None, :]
    if INVERSE:
        s1, s2 = -s2, -s1
    _rope_heads(Q + b * q_b + s * q_s, QO + b * qo_b + s * qo_s, q_h, qo_h, n_q_heads,
                c1, c2, s1, s2, half, head_dim, COPY_PASS, BLOCK_HQ, BLOCK_HALF, BLOCK_PASS)
    _rope_heads(K + b * k_b + s * k_s, KO + b * ko_b + s * ko_s, k_h, ko_h, n_k_heads,
                c1, c2, s1, s2, half, head_dim, COPY_PASS, BLOCK_HK, BLOCK_HALF, BLOCK_PASS)


def _head_block(n_heads: int, block_half: int) -> int:
    return max(1, min(next_power_of_2(max(n_heads, 1)), _MAX_TILE // block_half))


def _launch(q, k, cos, sin, q_out, k_out, inverse: bool):
    """q, k, q_out, k_out: (B, H, S, D) with unit last stride; cos, sin: (B or 1, S, rd)."""
    batch, n_q_heads, seq, head_dim = q.shape
    n_k_heads = k.shape[1]
    half = cos.shape[-1] // 2
    if batch * seq == 0:
        return
    block_half = next_power_of_2(half)
    block_hq = _head_block(n_q_heads, block_half)
    # broadcast cos/sin over the batch with a zero stride
    cos_b = cos.stride(0) if cos.shape[0] > 1 else 0
    sin_b = sin.stride(0) if sin.shape[0] > 1 else 0
    copy_pass = 2 * half < head_dim and q_out.data_ptr() != q.data_ptr()
    _rope_fwd_kernel[(seq, batch)](
        q, k, cos, sin, q_out, k_out,
        q.stride(0), q.stride(2), q.stride(1), k.stride(0), k.stride(2), k.stride(1),
        q_out.stride(0), q_out.stride(2), q_out.stride(1),
        k_out.stride(0), k_out.stride(2), k_out.stride(1),
        cos_b, cos.stride(1), sin_b, sin.stride(1), n_q_heads, n_k_heads, half, head_dim,
        INVERSE=inverse, COPY_PASS=copy_pass, BLOCK_HQ=block_hq,
        BLOCK_HK=_head_block(n_k_heads, block_half), BLOCK_HALF=block_half,
        BLOCK_PASS=next_power_of_2(max(head_dim - 2 * half, 1)),
        num_warps=elementwise_warps(block_hq * block_half))


def rope_fwd(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
             inplace: bool = False):
    """q (B, Hq, S, D), k (B, Hk, S, D), any strides with unit last stride; cos, sin (B or 1, S, rd)
    with unit last stride -> (q_out, k_out) in q's and k's dtype and layout. inplace: written into
    q and k, which are returned."""
    q_out = q if inplace else torch.empty_like(q)
    k_out = k if inplace else torch.empty_like(k)
    _launch(q, k, cos, sin, q_out, k_out, inverse=False)
    return q_out, k_out


def rope_bwd(dq_out: torch.Tensor, dk_out: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """The gradients of rope_fwd's outputs -> (dq, dk), new tensors in the gradients' dtype."""
    dq = torch.empty_like(dq_out)
    dk = torch.empty_like(dk_out)
    _launch(dq_out, dk_out, cos, sin, dq, dk, inverse=True)
    return dq, dk
