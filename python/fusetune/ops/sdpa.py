"""torch's own SDPA kernels (cuDNN, flash) for plain causal attention, with their log-sum-exp kept.

F.scaled_dot_product_attention hides the log-sum-exp its backward needs, so a checkpointed layer
(fusetune.training.checkpoint) had to run the attention forward again in its recompute: at long
context the largest single cost it repeats (at 128k tokens about a sixth of an 8B step's FLOPs).
`sdpa` calls the backend SDPA itself would pick for these tensors through its aten ops, which
return the log-sum-exp, so the layer's forward keeps (output, log-sum-exp) like fusetune's own
kernel does (ops.attention.keeping) and the recompute goes straight to the backward op. Only the
backends whose ops take q, k, v as SDPA passes them (GQA unrepeated) are called directly; with
any other choice (efficient, math, a backend torch adds later) the call is F.scaled_dot_product_attention
as before, and the recompute runs it again.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend

from fusetune.ops.attention import current_store, keeping

aten = torch.ops.aten
BACKENDS = ("cudnn", "flash", "cpu")  # sdpa_backend's answers


def sdpa_backend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float | None) -> str | None:
    """"cudnn", "flash" (CUDA) or "cpu" (the CPU flash kernel): what SDPA would run for these tensors
    in training (sdpa_kernel contexts included), where fusetune can call it with the log-sum-exp;
    else None. Asked as for tensors that need grad: a layer's forward runs without grad, and its
    recompute's backward reads what that forward kept."""
    if q.shape[-1] % 8 or v.shape[-1] != q.shape[-1]:  # (padded by SDPA for its kernels; kept outputs have q's shape)
        return None
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    try:
        choice = SDPBackend(torch._fused_sdp_choice(q, k, v, None, 0.0, causal, scale=scale,
                                                    enable_gqa=q.shape[1] != k.shape[1]))
    except (AttributeError, RuntimeError, TypeError, ValueError):  # a private API: a torch that moved it
        return None
    if choice == SDPBackend.FLASH_ATTENTION:
        return "flash" if q.is_cuda else "cpu"
    if choice == SDPBackend.CUDNN_ATTENTION and q.is_cuda:
        return "cudnn"
    return None


def _forward(backend, q, k, v, causal, scale):
    if backend == "cudnn":
        out, lse, *_ = aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, causal, False, scale=scale)
    elif backend == "flash":
        out, lse, *_ = aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)
    else:
        out, lse = aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)
    return out, lse


def _backward(backend, dout, q, k, v, out, lse, causal, scale):
    sq, sk = q.shape[2], k.shape[2]
    # no dropout: the random-state arguments are read only with it, so empty ones of their type stand in
    if backend == "cudnn":
        seed = torch.empty((), dtype=torch.long, device=q.device)
        return aten._scaled_dot_product_cudnn_attention_backward(dout, q, k, v, out, lse, seed, seed, None, None, None,
                                                                 sq, sk, 0.0, causal, scale=scale)
    if backend == "flash":
        seed = torch.empty(2, dtype=torch.uint64, device=q.device)
        offset = torch.empty((), dtype=torch.uint64, device=q.device)
        return aten._scaled_dot_product_flash_attention_backward(dout, q, k, v, out, lse, None, None, sq, sk, 0.0,
                                                                 causal, seed, offset, scale=scale)
    return aten._scaled_dot_product_flash_attention_for_cpu_backward(dout, q, k, v, out, lse, 0.0, causal, scale=scale)


class SdpaFunction(torch.autograd.Function):
    """forward(ctx, q, k, v, backend, causal, scale, kept) -> out: SDPA's `backend` kernels; kept, the
    (out, lse) pair a checkpointed layer's forward computed for these q, k, v, is taken instead of
    running the forward (None: run it)."""

    @staticmethod
    def forward(ctx, q, k, v, backend, causal, scale, kept):
        out, lse = kept if kept is not None else _forward(backend, q, k, v, causal, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.options = (backend, causal, scale)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        backend, causal, scale = ctx.options
        # the kernels want the gradient laid out like the output (Hugging Face's reshape gives that already)
        dout = dout if dout.stride() == out.stride() else torch.empty_like(out).copy_(dout)
        dq, dk, dv = _backward(backend, dout, q, k, v, out, lse, causal, scale)
        return dq, dk, dv, None, None, None, None


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True, scale: float | None = None):
    """F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, enable_gqa=...) for q
    (B, Hq, S, D), k and v (B, Hk, S, D). Within a checkpointed layer, where SDPA's backend allows
    (sdpa_backend), its forward keeps the output and log-sum-exp and its recompute reuses them,
    through the kernel the forward ran (the choice is not asked again: settings such as an
    sdpa_kernel context may differ in backward). Returns (B, Hq, S, D)."""
    store = current_store()
    backend = None
    if store is not None:
        backend = store.next_kind() if store.replaying else sdpa_backend(q, k, v, causal, scale)
    if backend not in BACKENDS:  # kept nothing (a replayed call another kernel ran: take() names the mismatch)
        gqa = q.shape[1] != k.shape[1]
        return keeping(q, None, None, lambda kept: F.scaled_dot_product_attention(q, k, v, is_causal=causal,
                                                                                  scale=scale, enable_gqa=gqa))
    return keeping(q, backend, lambda: _forward(backend, q, k, v, causal, scale),
                   lambda kept: SdpaFunction.apply(q, k, v, backend, causal, scale, kept))
