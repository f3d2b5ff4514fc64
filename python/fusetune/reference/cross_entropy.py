import torch

REDUCTIONS = ("mean", "sum", "none")


def mean_divisor(valid: torch.Tensor, num_items_in_batch, dtype: torch.dtype):
    """The divisor of reduction="mean", without a host sync.

    num_items_in_batch (int, or a one-element tensor on any device) when given: the count of
    target tokens over all micro-batches of a gradient-accumulation step, so the summed micro-batch
    losses equal one big batch's mean. Otherwise the count of non-ignored rows, at least 1: when
    every row is ignored the mean loss is 0 (with zero gradient), not 0/0 = NaN.
    A CPU tensor stays on the CPU as a 0-dim tensor, which torch reads as a host scalar in CUDA
    arithmetic; a tensor on another GPU is copied device to device.
    """
    if num_items_in_batch is None:
        return valid.sum().clamp(min=1)
    if not isinstance(num_items_in_batch, torch.Tensor):
        return num_items_in_batch
    n = num_items_in_batch.reshape(()).clamp(min=1)  # 0: a step whose labels are all ignored (no sync to check)
    return n.to(dtype=dtype) if n.device.type == "cpu" else n.to(device=valid.device, dtype=dtype)


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                  reduction: str = "mean", num_items_in_batch=None, softcap: float | None = None,
                  logit_scale: float | None = None):
    """Cross-entropy of logits (..., V) against integer targets (...), computed in at least fp32.

    z = softcap * tanh(logit_scale * x / softcap) (each step only when given);
    loss_i = logsumexp(z_i) - z_i[target_i], 0 where target_i == ignore_index.
    reduction "none": per-row losses shaped like targets; "sum"; "mean": the sum over
    mean_divisor(...) (see there). The loss dtype is promote(logits dtype, fp32).
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; use one of {REDUCTIONS}")
    compute = torch.promote_types(logits.dtype, torch.float32)
    z = logits.reshape(-1, logits.shape[-1]).to(compute)
    if logit_scale is not None:
        z = z * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    t = targets.reshape(-1).long()
    valid = t != ignore_index
    picked = z.gather(1, torch.where(valid, t, 0).unsqueeze(1)).squeeze(1)
    losses = torch.where(valid, torch.logsumexp(z, dim=-1) - picked, 0.0)
    if reduction == "none":
        return losses.view(targets.shape)
    total = losses.sum()
    if reduction == "sum":
        return total
    return total / mean_divisor(valid, num_items_in_batch, compute)
