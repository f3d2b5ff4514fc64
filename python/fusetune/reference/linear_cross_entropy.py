import torch

from fusetune.reference.cross_entropy import cross_entropy


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         bias: torch.Tensor | None = None, ignore_index: int = -100,
                         reduction: str = "mean", num_items_in_batch=None,
                         softcap: float | None = None, logit_scale: float | None = None):
    """cross_entropy(hidden @ weight^T + bias, targets): the logits in hidden's dtype, as an
    lm_head computes them, then the loss in at least fp32."""
    logits = torch.nn.functional.linear(hidden, weight, bias)
    return cross_entropy(logits, targets, ignore_index, reduction, num_items_in_batch, softcap,
                         logit_scale)
