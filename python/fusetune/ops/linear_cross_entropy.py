"""Fused linear cross-entropy: the loss of an lm_head without its (tokens x vocab) logits.

Forward walks the tokens in chunks. Per chunk c, with D the divisor of the mean:
    logits_c = h_c @ W^T (+ b)                     in h's dtype, as the lm_head computes them
    loss_c, lse_c = cross-entropy kernel forward   (fp32 online log-sum-exp)
    dz_c = (softmax(z_c) - onehot(t_c)) / D        written over logits_c by the backward kernel
    dh_c = dz_c @ W,   dW += dz_c^T @ h_c (fp32),   db += sum_rows dz_c (fp32)
so the gradients are ready when forward ends, and backward only scales them by grad_output.
Peak extra memory: one chunk of logits, plus dh (N x H), plus an fp32 (V x H) dW only when the
head trains. The gradient work happens in forward only when autograd will need it.
"""
import torch

from fusetune.backend import resolve
from fusetune.ops.cross_entropy import CUDA_OPS, kernel_backward, kernel_forward
from fusetune.ops.cross_entropy import _check as _check_cross_entropy
from fusetune.ops.cross_entropy import check_targets
from fusetune.reference.cross_entropy import mean_divisor
from fusetune.reference.linear_cross_entropy import linear_cross_entropy as reference

CHUNK_BYTES = 1 << 28  # logits of one chunk: 256 MiB (1024 tokens at vocab 128256 in bf16)


def _chunk_tokens(vocab: int, element_size: int) -> int:
    return max(1, CHUNK_BYTES // (vocab * element_size))


class LinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, ignore_index, reduction, num_items_in_batch,
                softcap, logit_scale, track_grad, backend):
        h2d = hidden.reshape(-1, hidden.shape[-1])
        t = targets.reshape(-1)
        if reduction == "mean":
            divisor = mean_divisor(t != ignore_index, num_items_in_batch, torch.float32)
        else:
            divisor = torch.ones((), device=h2d.device)
        # 1 / divisor as a device tensor that the kernels read; dividing a device tensor by an int
        # or a CPU scalar tensor copies nothing and syncs nothing
        scale = torch.ones(1, dtype=torch.float32, device=h2d.device) / divisor
        need_dh = track_grad and ctx.needs_input_grad[0]
        need_dw = track_grad and ctx.needs_input_grad[1]
        need_db = track_grad and bias is not None and ctx.needs_input_grad[2]
        dh = torch.empty_like(h2d) if need_dh else None
        dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_dw else None
        db = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_db else None
        total = torch.zeros((), dtype=torch.float32, device=h2d.device)
        step = _chunk_tokens(weight.shape[0], h2d.element_size())
        for start in range(0, h2d.shape[0], step):
            h_c, t_c = h2d[start:start + step], t[start:start + step]
            logits = torch.nn.functional.linear(h_c, weight, bias)
            losses, lse = kernel_forward(logits, t_c, ignore_index, softcap, logit_scale, backend)
            total += losses.sum()
            if need_dh or need_dw or need_db:
                dz = kernel_backward(scale.expand(t_c.shape[0]), logits, t_c, lse, ignore_index,
                                     softcap, logit_scale, True, backend)
                if need_dh:
                    torch.mm(dz, weight, out=dh[start:start + step])
                if need_dw:  # the chunk's product in the weight's dtype, summed over chunks in fp32
                    dw += (dz.t() @ h_c).float()
                if need_db:
                    db += dz.float().sum(0)
        ctx.save_for_backward(dh, dw, db)
        ctx.shapes = hidden.shape, weight.dtype, None if bias is None else bias.dtype
        return total * scale.reshape(())

    @staticmethod
    def backward(ctx, grad):
        dh, dw, db = ctx.saved_tensors
        hidden_shape, weight_dtype, bias_dtype = ctx.shapes
        dh = None if dh is None else (dh * grad.to(dh.dtype)).view(hidden_shape)
        dw = None if dw is None else (dw * grad).to(weight_dtype)
        db = None if db is None else (db * grad).to(bias_dtype)
        return dh, dw, db, None, None, None, None, None, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         bias: torch.Tensor | None = None, ignore_index: int = -100,
                         reduction: str = "mean", num_items_in_batch=None,
                         softcap: float | None = None, logit_scale: float | None = None):
    """Cross-entropy of hidden @ weight^T (+ bias) against targets, never holding all the logits.

    hidden (N, H) or (B, S, H); weight (V, H) (an lm_head's); targets (N,) / (B, S), already
    shifted. Same semantics as fusetune.cross_entropy (ignore_index, softcap, logit_scale,
    num_items_in_batch) with reduction "mean" or "sum"; the loss is fp32. Differentiable in
    hidden, weight and bias (each chunk's weight gradient is summed over chunks in fp32).
    """
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"linear_cross_entropy: weight of shape {tuple(weight.shape)} does not fit "
                         f"hidden {tuple(hidden.shape)}; it must be (vocab, {hidden.shape[-1]})")
    if weight.dtype != hidden.dtype or weight.device != hidden.device:
        raise ValueError(f"linear_cross_entropy: hidden is {hidden.dtype} on {hidden.device} but weight "
                         f"{weight.dtype} on {weight.device}; cast and move them to match")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"linear_cross_entropy: reduction must be 'mean' or 'sum', got {reduction!r} "
                         f"(per-row losses need the logits: use fusetune.cross_entropy)")
    logits_shape = (*hidden.shape[:-1], weight.shape[0])
    _check_cross_entropy(torch.empty(logits_shape, device="meta", dtype=hidden.dtype),
                         targets.to("meta"), reduction, num_items_in_batch, softcap)
    if targets.device != hidden.device:
        raise ValueError(f"linear_cross_entropy: hidden is on {hidden.device} but targets on "
                         f"{targets.device}; move both to one device")
    check_targets(targets, weight.shape[0], ignore_index)
    backend = resolve("linear_cross_entropy", hidden.device, CUDA_OPS)
    if backend == "torch":
        return reference(hidden, weight, targets, bias, ignore_index, reduction, num_items_in_batch,
                         softcap, logit_scale)
    track = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, weight, bias))
    return LinearCrossEntropyFunction.apply(hidden, weight, bias, targets, ignore_index, reduction,
                                            num_items_in_batch, softcap, logit_scale, track, backend)
