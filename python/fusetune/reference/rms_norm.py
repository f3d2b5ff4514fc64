import torch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, variant: str = "llama"):
    """RMSNorm over the last dim, as Hugging Face computes it.

    llama: normalise in fp32, cast to x's dtype, times w (result in promote(x, w) dtype).
    gemma: normalise in fp32, times (1 + w) in fp32, cast to x's dtype.
    """
    compute = torch.promote_types(x.dtype, torch.float32)
    xf = x.to(compute)
    xhat = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if variant == "llama":
        return weight * xhat.to(x.dtype)
    if variant == "gemma":
        return (xhat * (1.0 + weight.to(compute))).to(x.dtype)
    raise ValueError(f"unknown RMSNorm variant {variant!r}; use 'llama' or 'gemma'")
