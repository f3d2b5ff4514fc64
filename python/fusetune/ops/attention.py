"""Attention: autograd Function over the Triton flash-attention kernels, and `attention`.

A checkpointed layer (fusetune.training.checkpoint) runs its forward twice: without grad, then
again in backward to build the graph. Within `keeping_attention(KeptAttention())` the first run
keeps each attention call's output and log-sum-exp; within `keeping_attention(KeptAttention(kept, kinds))`
the recompute takes them in the same order instead of running the attention forward again (its
backward needs exactly those, and the kernel is deterministic, so the gradients are the same).
"""
import contextlib
import threading

import torch

from fusetune.backend import resolve
from fusetune.reference.attention import attention as attention_reference

CUDA_OPS = ()  # no CUDA C++ implementation yet
MAX_HEAD_DIM = 256
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def segments(segment_ids: torch.Tensor):
    """(run ids, run start, run end) of (B, S) segment ids, each (B, S) int32 on their device.

    A run is a stretch of equal ids (a packed document); start / end are the first and one past
    the last index of each token's run: the kernels' block ranges. No host sync.
    """
    batch, seq = segment_ids.shape
    index = torch.arange(seq, device=segment_ids.device).expand(batch, seq)
    begins = torch.ones_like(segment_ids, dtype=torch.bool)
    begins[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    ends = torch.ones_like(begins)
    ends[:, :-1] = begins[:, 1:]
    runs = begins.cumsum(1) - 1
    start = torch.where(begins, index, 0).cummax(1).values
    end = torch.where(ends, index + 1, seq).flip(1).cummin(1).values.flip(1)
    return tuple(t.to(torch.int32).contiguous() for t in (runs, start, end))


def _check(q, k, v, scale, softcap, window, segment_ids):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dtype not in DTYPES:
            raise TypeError(f"attention: {name} is {t.dtype}; the kernels take float16, bfloat16 or float32")
        if t.dim() != 4:
            raise ValueError(f"attention: {name} must be 4-D (batch, heads, seq, head_dim), got "
                             f"{tuple(t.shape)}; pass Hugging Face's (batch, seq, heads, head_dim) as x.transpose(1, 2)")
    if len({q.dtype, k.dtype, v.dtype}) > 1:
        raise TypeError(f"attention: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if len({q.device, k.device, v.device}) > 1:
        raise ValueError(f"attention: q, k, v are on {q.device}, {k.device}, {v.device}; move them to one device")
    batch, heads, sq, head_dim = q.shape
    if k.shape != v.shape or k.shape[0] != batch or k.shape[3] != head_dim:
        raise ValueError(f"attention: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} must agree in batch "
                         f"and head_dim, and k and v in every dim")
    if k.shape[1] == 0 or heads % k.shape[1]:
        raise ValueError(f"attention: {heads} query heads are not a multiple of {k.shape[1]} key/value heads")
    if k.shape[2] < sq:
        raise ValueError(f"attention: {sq} queries but only {k.shape[2]} keys; queries are the last Sq positions "
                         f"of the keys (Sk >= Sq)")
    if not 0 < head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"attention: head_dim {head_dim} is not supported (1 to {MAX_HEAD_DIM}); use torch's "
                         f"scaled_dot_product_attention for it")
    if scale is not None and not scale > 0:
        raise ValueError(f"attention: scale must be positive, got {scale}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"attention: softcap must be positive or None, got {softcap}")
    if window is not None and (int(window) != window or window < 1):
        raise ValueError(f"attention: window must be a positive int or None, got {window}")
    if segment_ids is not None:
        if segment_ids.shape != (batch, sq) or k.shape[2] != sq:
            raise ValueError(f"attention: segment_ids {tuple(segment_ids.shape)} must be (batch, seq) = "
                             f"({batch}, {sq}), with as many keys as queries (got {k.shape[2]} keys)")
        if segment_ids.dtype.is_floating_point or segment_ids.dtype == torch.bool:
            raise TypeError(f"attention: segment_ids must be integers, got {segment_ids.dtype}")
        if segment_ids.device != q.device:
            raise ValueError(f"attention: segment_ids are on {segment_ids.device}, q on {q.device}")


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


_kept = threading.local()  # .store: the KeptAttention of the checkpointed layer running now, or None


class KeptAttention:
    """One layer's attention calls, in call order: the kernel each ran (`kinds`: "fusetune" for the
    Triton kernel, an SDPA backend of ops.sdpa, or None where the call kept nothing) and the
    (output, log-sum-exp) pairs of those that kept them. Filled by the forward (tensors=None), or
    handed back to the recompute, which must run the same calls: each takes its pair, or learns that
    it kept none, in turn. The outputs are kept in the memory layout their kernel wrote, (B, Sq, Hq, D)."""

    def __init__(self, tensors=None, kinds=None):
        self.replaying = tensors is not None
        self.tensors = list(tensors or ())
        self.kinds = list(kinds or ())
        self.calls = self.taken = 0

    def next_kind(self) -> str | None:
        """In the recompute: the kernel the next call's forward ran (None: it kept nothing)."""
        if self.calls >= len(self.kinds):
            raise RuntimeError("attention: a checkpointed layer's recompute called attention more often than its "
                               "forward; the layer must run the same calls both times")
        return self.kinds[self.calls]

    def record(self, kind: str | None, out: torch.Tensor | None = None, lse: torch.Tensor | None = None):
        """In the forward: a call of `kind` and what it keeps (out (B, Hq, Sq, D), lse), if anything."""
        self.kinds.append(kind)
        if kind is not None:
            self.tensors += [out.transpose(1, 2), lse]

    def take(self, q: torch.Tensor, kind: str | None):
        """In the recompute: the next call's kept (out, lse), checked against this call's kernel and q."""
        then = self.next_kind()
        self.calls += 1
        if then != kind:
            raise RuntimeError(f"attention: a checkpointed layer's recompute ran {kind or 'uncached'} attention where "
                               f"its forward ran {then or 'uncached'}; keep the settings that choose it (sdpa_kernel, "
                               f"fusetune.use_backend) the same over the forward and the backward")
        if kind is None:
            return None
        out, lse = self.tensors[self.taken:self.taken + 2]
        self.taken += 2
        batch, heads, seq, head_dim = q.shape
        if out.shape != (batch, seq, heads, head_dim):
            raise RuntimeError(f"attention: a checkpointed layer's recompute asked for attention of q {tuple(q.shape)} "
                               f"where its forward had {tuple(out.transpose(1, 2).shape)}")
        return out.transpose(1, 2), lse

    def check_all_taken(self):
        if self.calls != len(self.kinds):
            raise RuntimeError("attention: a checkpointed layer's recompute called attention less often than its "
                               "forward; the layer must run the same calls both times")


@contextlib.contextmanager
def keeping_attention(store: KeptAttention | None):
    previous = getattr(_kept, "store", None)
    _kept.store = store
    try:
        yield store
    finally:
        _kept.store = previous


class AttentionFunction(torch.autograd.Function):
    """forward(ctx, q, k, v, causal, scale, softcap, window, runs, kept): kept, an (out, lse) pair
    a checkpointed layer's forward computed for these q, k, v, is taken instead of running the
    kernel (None: run it)."""

    @staticmethod
    def forward(ctx, q, k, v, causal, scale, softcap, window, runs, kept):
        from fusetune.triton_kernels.attention import attention_fwd

        q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
        out, lse = kept if kept is not None else attention_fwd(q, k, v, causal, scale, softcap, window, runs)
        ctx.save_for_backward(q, k, v, out, lse, *(runs or ()))
        ctx.options = (causal, scale, softcap, window)
        return out

    @staticmethod
    def backward(ctx, dout):
        from fusetune.triton_kernels.attention import attention_bwd

        q, k, v, out, lse, *runs = ctx.saved_tensors
        dq, dk, dv = attention_bwd(_unit_last(dout), q, k, v, out, lse, *ctx.options, segments=tuple(runs) or None)
        return dq, dk, dv, None, None, None, None, None, None


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True, scale: float | None = None,
              softcap: float | None = None, window: int | None = None, segment_ids: torch.Tensor | None = None,
              runs=None) -> torch.Tensor:
    """Scaled dot-product attention without the (Sq x Sk) scores in memory (flash attention).

    q (B, Hq, Sq, D), k and v (B, Hk, Sk, D): Hq a multiple of Hk (GQA/MQA, k/v never repeated),
    Sk >= Sq (query i sits at position i + Sk - Sq), D up to 256, any strides (Hugging Face's
    (B, S, H, D).transpose(1, 2) views need no copy); float16, bfloat16 or float32, fp32 softmax.
    scale: multiplies q k^T (default D**-0.5; Gemma's query_pre_attn_scalar**-0.5 goes here).
    softcap: c * tanh(x / c) on the scaled scores (Gemma-2). window: a key j is seen by the query
    at position i only if i - j < window (Hugging Face's sliding window). segment_ids (B, S):
    packed documents; a token sees only tokens of its own run of equal ids (needs Sq == Sk);
    `runs` may pass segments(segment_ids) computed once for many layers instead.
    Returns out (B, Hq, Sq, D) in q's dtype; its memory is (B, Sq, Hq, D), so
    out.transpose(1, 2) is contiguous, the layout Hugging Face's attention functions return.
    """
    if runs is not None:
        segment_ids = runs[0]
    _check(q, k, v, scale, softcap, window, segment_ids)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if resolve("attention", q.device, CUDA_OPS) == "triton":
        if segment_ids is not None and runs is None:
            runs = segments(segment_ids)
        options = (causal, scale, softcap and float(softcap), window and int(window), runs)

        def forward():
            from fusetune.triton_kernels.attention import attention_fwd

            return attention_fwd(_unit_last(q), _unit_last(k), _unit_last(v), *options)
        return keeping(q, "fusetune", forward, lambda kept: AttentionFunction.apply(q, k, v, *options, kept))
    out, _ = attention_reference(q, k, v, causal, scale, softcap, window, segment_ids)
    return out


def current_store() -> KeptAttention | None:
    """The KeptAttention of the checkpointed layer whose forward or recompute runs now (keeping_attention)."""
    return getattr(_kept, "store", None)


def keeping(q: torch.Tensor, kind: str | None, forward, apply) -> torch.Tensor:
    """One attention call of kernel `kind` under the checkpointed layer running now, if any: its
    forward (no grad) runs `forward()` -> (out, lse) and keeps the pair; its recompute passes the
    kept pair to `apply(kept)`, the autograd Function; outside a checkpointed layer apply(None) runs
    it whole. kind None: a call that keeps nothing (the recompute runs it again), recorded all the
    same, so that each later call takes its own pair."""
    store = current_store()
    if store is None:
        return apply(None)
    if store.replaying:
        return apply(store.take(q, kind))
    if torch.is_grad_enabled():
        return apply(None)
    if kind is None:
        store.record(None)
        return apply(None)
    out, lse = forward()
    store.record(kind, out, lse)
    return out
