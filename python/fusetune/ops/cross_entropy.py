"""Large-vocabulary cross-entropy: autograd Function over the Triton kernels or the CUDA extension's
ops, and `cross_entropy`."""
import torch

from fusetune.backend import resolve
from fusetune.reference.cross_entropy import REDUCTIONS, mean_divisor
from fusetune.reference.cross_entropy import cross_entropy as cross_entropy_reference

CUDA_OPS = ("cross_entropy_fwd", "cross_entropy_bwd")  # the torch.ops.fusetune operators of the CUDA path


def check_targets(targets: torch.Tensor, vocab: int, ignore_index: int):
    """Every target is a class of the vocabulary or ignore_index: checked on the device (no host
    sync; on a GPU the error surfaces when the stream reaches it)."""
    valid = ((targets >= 0) & (targets < vocab)) | (targets == ignore_index)
    torch._assert_async(valid.all(), f"cross_entropy: a target is outside [0, {vocab}) and is not ignore_index "
                                     f"({ignore_index}): labels must be token ids of this vocabulary (resize "
                                     f"the embeddings after adding tokens)")


def _check(logits, targets, reduction, num_items_in_batch, softcap):
    if logits.dim() not in (2, 3):
        raise ValueError(f"cross_entropy: logits must be (N, V) or (B, S, V), got shape "
                         f"{tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise TypeError(f"cross_entropy: logits must be a floating tensor, got {logits.dtype}")
    if logits.shape[-1] == 0:
        raise ValueError("cross_entropy: logits have an empty vocabulary dim")
    if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        raise TypeError(f"cross_entropy: targets must hold integer class indices (torch.long), got "
                        f"{targets.dtype}; convert with targets.long()")
    if targets.shape != logits.shape[:-1]:
        raise ValueError(f"cross_entropy: targets of shape {tuple(targets.shape)} do not match "
                         f"logits {tuple(logits.shape)}; they must be {tuple(logits.shape[:-1])} "
                         f"(shift labels before the call)")
    if targets.device != logits.device:
        raise ValueError(f"cross_entropy: logits are on {logits.device} but targets on "
                         f"{targets.device}; move both to one device")
    if reduction not in REDUCTIONS:
        raise ValueError(f"cross_entropy: unknown reduction {reduction!r}; use one of {REDUCTIONS}")
    if num_items_in_batch is not None:
        if reduction != "mean":
            raise ValueError(f"cross_entropy: num_items_in_batch divides the summed loss, so it "
                             f"needs reduction='mean', got {reduction!r}")
        if isinstance(num_items_in_batch, torch.Tensor):
            if num_items_in_batch.numel() != 1:
                raise ValueError(f"cross_entropy: num_items_in_batch must be an int or a one-element "
                                 f"tensor, got shape {tuple(num_items_in_batch.shape)}")
        elif not num_items_in_batch > 0:
            raise ValueError(f"cross_entropy: num_items_in_batch must be > 0 (the count of label tokens in the "
                             f"whole batch), got {num_items_in_batch}; leave it None to divide by this batch's own "
                             f"count")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"cross_entropy: softcap must be > 0 (None for no softcap), got {softcap}")


def kernel_forward(x2d, targets, ignore_index: int, softcap, logit_scale, backend: str):
    """x2d (N, V) with unit column stride, targets (N,) -> (loss, lse), fp32 (N,) each; 0 on
    ignored rows. On the "triton" or "cuda" backend."""
    if backend == "cuda":
        loss, lse = (torch.empty(x2d.shape[0], dtype=torch.float32, device=x2d.device) for _ in range(2))
        torch.ops.fusetune.cross_entropy_fwd(x2d, targets.long(), ignore_index, _scale(logit_scale), softcap or 0.0,
                                             loss, lse)
        return loss, lse
    from fusetune.triton_kernels.cross_entropy import cross_entropy_fwd

    return cross_entropy_fwd(x2d, targets, ignore_index, softcap, logit_scale)


def kernel_backward(g, x2d, targets, lse, ignore_index: int, softcap, logit_scale, inplace: bool, backend: str):
    """The logits' gradient for the per-row scale g ((N,), or a stride-0 view of one value); written
    over x2d when inplace (each element is read before its gradient is stored)."""
    if backend == "cuda":
        dx = x2d if inplace else torch.empty_like(x2d)
        torch.ops.fusetune.cross_entropy_bwd(x2d, targets.long(), lse, g.float(), ignore_index,
                                             _scale(logit_scale), softcap or 0.0, dx)
        return dx
    from fusetune.triton_kernels.cross_entropy import cross_entropy_bwd

    return cross_entropy_bwd(g, x2d, targets, lse, ignore_index, softcap, logit_scale, inplace)


def _scale(logit_scale) -> float:
    return 1.0 if logit_scale is None else float(logit_scale)


class CrossEntropyFunction(torch.autograd.Function):
    """divisor: None for "none"/"sum", else what the summed loss is divided by (number/tensor)."""

    @staticmethod
    def forward(ctx, logits, targets, ignore_index, reduction, divisor, softcap, logit_scale,
                inplace_backward, backend):
        x2d = logits.reshape(-1, logits.shape[-1])
        if x2d.stride(-1) != 1:
            x2d = x2d.contiguous()
        t = targets.reshape(-1)
        losses, lse = kernel_forward(x2d, t, ignore_index, softcap, logit_scale, backend)
        ctx.save_for_backward(x2d, t, lse)
        ctx.args = (ignore_index, reduction, divisor, softcap, logit_scale, inplace_backward, backend)
        ctx.shape = logits.shape
        if reduction == "none":
            return losses.view(targets.shape)
        total = losses.sum()
        return total if divisor is None else total / divisor

    @staticmethod
    def backward(ctx, grad):
        x2d, t, lse = ctx.saved_tensors
        ignore_index, reduction, divisor, softcap, logit_scale, inplace, backend = ctx.args
        # the per-row gradient scale stays on the device: the kernel reads it, nothing syncs
        g = grad.reshape(-1) if reduction == "none" else grad.reshape(1)
        if divisor is not None:
            g = g / divisor
        if reduction != "none":
            g = g.expand(t.shape[0])  # stride 0: every row reads the one value
        dx = kernel_backward(g, x2d, t, lse, ignore_index, softcap, logit_scale, inplace, backend)
        if inplace:
            # the kernel wrote through raw pointers: bump the version so that any other autograd
            # node that saved these logits raises instead of reading gradients as logits
            torch.autograd.graph.increment_version(x2d)
        return dx.view(ctx.shape), None, None, None, None, None, None, None, None


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                  reduction: str = "mean", num_items_in_batch=None, softcap: float | None = None,
                  logit_scale: float | None = None, inplace_backward: bool = False):
    """Cross-entropy of logits (N, V) or (B, S, V), any float dtype, against targets (N,) / (B, S).

    Targets are class indices already shifted by the caller; rows whose target equals
    ignore_index (any value) contribute nothing. Per row, z = softcap * tanh(logit_scale * x /
    softcap) (each step only when given), loss = logsumexp(z) - z[target], accumulated in fp32.
    reduction: "mean" (sum over non-ignored rows / their count, or / num_items_in_batch when given:
    an int or a one-element tensor on any device, as Hugging Face passes for gradient
    accumulation; all rows ignored gives 0, not NaN), "sum", or "none" (per-row losses shaped like
    targets, 0 on ignored rows). The loss is fp32 (float64 for float64 logits on the torch path);
    the gradient has the logits' dtype. No host sync.

    inplace_backward=True (Triton and CUDA paths): the backward writes d logits into the logits tensor's own
    memory, so the caller's logits are OVERWRITTEN by backward; use it only when nothing reads
    the logits after the loss (as in a causal-LM head). It saves one logits-sized buffer.
    A NaN logit gives a NaN loss. A target outside [0, V) that is not ignore_index is an error
    checked on the device (no host sync; on a GPU it is a device-side assert, as in torch's own
    cross_entropy, and ends the process). A num_items_in_batch number <= 0 is an error; a tensor
    count is read as at least 1 (no sync: Trainer passes 0 for an accumulation step whose labels are
    all ignored). All rows ignored: the mean is 0 with a zero gradient (Hugging Face's loss gives NaN
    there), so an empty micro-batch of a gradient-accumulation step adds nothing.
    """
    _check(logits, targets, reduction, num_items_in_batch, softcap)
    check_targets(targets, logits.shape[-1], ignore_index)
    backend = resolve("cross_entropy", logits.device, CUDA_OPS)
    if backend == "torch":
        return cross_entropy_reference(logits, targets, ignore_index, reduction, num_items_in_batch,
                                       softcap, logit_scale)
    divisor = None
    if reduction == "mean":
        divisor = mean_divisor(targets != ignore_index, num_items_in_batch, torch.float32)
    return CrossEntropyFunction.apply(logits, targets, ignore_index, reduction, divisor, softcap,
                                      logit_scale, inplace_backward, backend)
