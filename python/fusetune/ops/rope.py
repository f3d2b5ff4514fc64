"""RoPE: autograd Function over the Triton kernel or the CUDA extension op, and `rope`."""
import torch

from fusetune.backend import CUDA_DTYPES, resolve
from fusetune.reference.rope import rope as rope_reference

CUDA_OPS = ("rope",)  # the torch.ops.fusetune operator of the CUDA path


def _check(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    for name, t in (("q", q), ("k", k), ("cos", cos), ("sin", sin)):
        if not t.is_floating_point():
            raise TypeError(f"rope: {name} must be a floating tensor, got {t.dtype}")
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"rope: q and k must be 4-D (batch, heads, seq, head_dim), got q "
                         f"{tuple(q.shape)} and k {tuple(k.shape)}; pass Hugging Face's "
                         f"(batch, seq, heads, head_dim) tensors as x.transpose(1, 2)")
    batch, _, seq, head_dim = q.shape
    if (k.shape[0], k.shape[2], k.shape[3]) != (batch, seq, head_dim):
        raise ValueError(f"rope: q {tuple(q.shape)} and k {tuple(k.shape)} must agree in batch, "
                         f"seq and head_dim (dims 0, 2, 3; only the head count may differ)")
    if cos.shape != sin.shape:
        raise ValueError(f"rope: cos {tuple(cos.shape)} and sin {tuple(sin.shape)} must have one "
                         f"shape")
    if (cos.dim() not in (2, 3) or cos.shape[-2] != seq
            or (cos.dim() == 3 and cos.shape[0] not in (1, batch))):
        raise ValueError(f"rope: cos/sin of shape {tuple(cos.shape)} do not fit q "
                         f"{tuple(q.shape)}; they must be ({batch}, {seq}, rd), (1, {seq}, rd) or "
                         f"({seq}, rd), gathered per token (position_ids already applied)")
    rd = cos.shape[-1]
    if rd % 2 or not 0 < rd <= head_dim:
        raise ValueError(f"rope: the rotary dim (last dim of cos/sin) is {rd}; it must be even and "
                         f"between 2 and head_dim={head_dim}")
    devices = {t.device for t in (q, k, cos, sin)}
    if len(devices) > 1:
        raise ValueError(f"rope: q, k, cos and sin are on {sorted(map(str, devices))}; move all "
                         f"four to one device")


def _check_inplace(q: torch.Tensor, k: torch.Tensor):
    if q.data_ptr() == k.data_ptr():
        raise ValueError("rope: inplace=True with q and k sharing memory would rotate it twice; "
                         "pass distinct tensors or inplace=False")
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad) and (
            q._base is not None or k._base is not None):
        # autograd lets a Function modify in place at most one view input, and only with one output
        raise ValueError("rope: inplace=True needs q and k that are not views when they require "
                         "grad (Hugging Face's transposed q/k are views); use inplace=False, which "
                         "in training costs no lasting memory: nothing keeps the unrotated q/k")
    for name, t in (("q", q), ("k", k)):
        if any(st == 0 and n > 1 for st, n in zip(t.stride(), t.shape)):
            raise ValueError(f"rope: inplace=True on {name}, an expanded tensor (stride 0 of "
                             f"{tuple(t.stride())}) whose elements share memory; use inplace=False")


def _check_kernel(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backend: str):
    for name, t in (("q", q), ("k", k)):
        if t.stride(-1) != 1:
            raise ValueError(f"rope: {name}'s last dim must have stride 1 (strides "
                             f"{tuple(t.stride())}); pass {name}.contiguous()")
    if torch.is_grad_enabled() and (cos.requires_grad or sin.requires_grad):
        raise ValueError(f"rope: the {backend} path gives no gradient to cos/sin, which require grad "
                         f"here; detach them (Hugging Face's rotary embedding makes them under "
                         f"no_grad) or use the 'torch' backend")
    if backend == "cuda" and q.dtype != k.dtype:
        raise TypeError(f"rope: the cuda path rotates q and k of one dtype, got {q.dtype} and {k.dtype}; "
                        f"cast them to one dtype or use the 'triton' backend")


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _rows(t: torch.Tensor) -> torch.Tensor:
    """cos/sin as (B or 1, S, rd) with unit last stride (small: a copy only if it is not)."""
    return _unit_last(t if t.dim() == 3 else t[None])


def _rope_fwd(q, k, cos, sin, inplace: bool, backend: str):
    if backend == "triton":
        from fusetune.triton_kernels.rope import rope_fwd

        return rope_fwd(q, k, cos, sin, inplace)
    q_out, k_out = (q, k) if inplace else (torch.empty_like(q), torch.empty_like(k))
    torch.ops.fusetune.rope(q, k, cos, sin, False, q_out, k_out)
    return q_out, k_out


def _rope_bwd(dq_out, dk_out, cos, sin, backend: str):
    if backend == "triton":
        from fusetune.triton_kernels.rope import rope_bwd

        return rope_bwd(dq_out, dk_out, cos, sin)
    dq, dk = torch.empty_like(dq_out), torch.empty_like(dk_out)
    torch.ops.fusetune.rope(dq_out, dk_out, cos, sin, True, dq, dk)  # the transposed rotation
    return dq, dk


class RoPEFunction(torch.autograd.Function):
    """On the Triton or CUDA kernel; cos/sin get no gradient (None): they are functions of
    positions, not trained."""

    @staticmethod
    def forward(ctx, q, k, cos, sin, inplace, backend):
        cos, sin = _rows(cos), _rows(sin)
        q_out, k_out = _rope_fwd(q, k, cos, sin, inplace, backend)
        if inplace:
            ctx.mark_dirty(q, k)
        ctx.save_for_backward(cos, sin)
        ctx.backend = backend
        return q_out, k_out

    @staticmethod
    def backward(ctx, dq_out, dk_out):
        cos, sin = ctx.saved_tensors
        # not in place: the incoming gradient may be shared with other branches or expanded
        dq, dk = _rope_bwd(_unit_last(dq_out), _unit_last(dk_out), cos, sin, ctx.backend)
        return (dq if ctx.needs_input_grad[0] else None, dk if ctx.needs_input_grad[1] else None,
                None, None, None, None)


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
         inplace: bool = False):
    """Rotary position embedding of q and k, as Hugging Face's apply_rotary_pos_emb.

    q (B, Hq, S, D) and k (B, Hk, S, D), Hk <= Hq allowed (GQA); any strides with a unit last
    stride (Hugging Face's (B, S, H, D).transpose(1, 2) views need no copy). cos, sin: (B, S, rd),
    (1, S, rd) or (S, rd), gathered per token, bf16 or fp32; rd even, <= D: the first rd dims of
    each head rotate, the rest pass through (partial rotary, Phi-3 style). Computed in fp32; q_out
    in q's dtype, k_out in k's. Differentiable in q and k; cos/sin get no gradient on the Triton
    path (an error if they require grad), the torch path differentiates them.
    inplace=True writes the results into q and k and returns them; when grad is needed, q and k
    must be neither views nor leaves (autograd's rules for in-place Functions), so it suits
    inference. The backward writes new gradient tensors: the incoming gradient may be shared with
    other branches of the graph or expanded, so overwriting it is not safe. The cuda path needs q
    and k of one dtype.
    Returns (q_out, k_out).
    """
    _check(q, k, cos, sin)
    if inplace:
        _check_inplace(q, k)
    cuda_accepts = (q.dtype == k.dtype and q.dtype in CUDA_DTYPES and cos.dtype == sin.dtype
                    and cos.dtype in CUDA_DTYPES and q.shape[0] <= 65535)
    backend = resolve("rope", q.device, CUDA_OPS, cuda_accepts)
    if backend != "torch":
        _check_kernel(q, k, cos, sin, backend)
        return RoPEFunction.apply(q, k, cos, sin, inplace, backend)
    q_out, k_out = rope_reference(q, k, cos, sin)
    if inplace:
        return q.copy_(q_out), k.copy_(k_out)
    return q_out, k_out
