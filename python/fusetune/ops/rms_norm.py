"""RMSNorm: autograd Function over the Triton kernels, the CUDA extension op, and `rms_norm`."""
import torch

from fusetune.backend import CUDA_DTYPES, resolve
from fusetune.reference.rms_norm import rms_norm as rms_norm_reference

VARIANTS = {"llama": (0.0, True), "gemma": (1.0, False)}  # variant -> (weight offset, cast before w)
CUDA_OPS = ("rms_norm_fwd", "rms_norm_bwd")  # the torch.ops.fusetune operators of the CUDA path


def _check(x: torch.Tensor, weight: torch.Tensor, variant: str):
    if variant not in VARIANTS:
        raise ValueError(f"unknown RMSNorm variant {variant!r}; use one of {sorted(VARIANTS)}")
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"rms_norm: weight of shape {tuple(weight.shape)} does not match the last "
                         f"dim of x {tuple(x.shape)}; it must be ({x.shape[-1]},)")
    if x.device != weight.device:
        raise ValueError(f"rms_norm: x is on {x.device} but weight on {weight.device}; move both "
                         f"to one device")
    if not x.is_floating_point():
        raise TypeError(f"rms_norm: x must be a floating tensor, got {x.dtype}")


def _out_dtype(x: torch.Tensor, weight: torch.Tensor, variant: str) -> torch.dtype:
    return torch.promote_types(x.dtype, weight.dtype) if variant == "llama" else x.dtype


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps, variant):
        from fusetune.triton_kernels.rms_norm import rms_norm_fwd

        offset, cast = VARIANTS[variant]
        x2d = x.reshape(-1, x.shape[-1])
        if x2d.stride(-1) != 1:
            x2d = x2d.contiguous()
        y, rstd = rms_norm_fwd(x2d, weight, eps, offset, cast, _out_dtype(x, weight, variant))
        ctx.save_for_backward(x2d, weight, rstd)
        ctx.variant = variant
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        from fusetune.triton_kernels.rms_norm import rms_norm_bwd

        x2d, weight, rstd = ctx.saved_tensors
        offset, cast = VARIANTS[ctx.variant]
        dy2d = dy.reshape(-1, dy.shape[-1])
        if dy2d.stride(-1) != 1:
            dy2d = dy2d.contiguous()
        dx, dw = rms_norm_bwd(dy2d, x2d, weight, rstd, offset, cast, ctx.needs_input_grad[1])
        return dx.view(dy.shape), dw, None, None


class RMSNormCudaFunction(torch.autograd.Function):
    """The CUDA C++ fallback (torch.ops.fusetune.rms_norm_fwd / rms_norm_bwd)."""

    @staticmethod
    def forward(ctx, x, weight, eps, variant):
        offset, cast = VARIANTS[variant]
        x2d = x.reshape(-1, x.shape[-1]).contiguous()
        y, rstd = torch.ops.fusetune.rms_norm_fwd(x2d, weight.contiguous(), eps, offset, cast)
        ctx.save_for_backward(x2d, weight, rstd)
        ctx.variant = variant
        return y.to(_out_dtype(x, weight, variant)).view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        x2d, weight, rstd = ctx.saved_tensors
        offset, cast = VARIANTS[ctx.variant]
        dy2d = dy.reshape(-1, dy.shape[-1]).to(x2d.dtype).contiguous()
        dx, dw = torch.ops.fusetune.rms_norm_bwd(dy2d, x2d, weight.contiguous(), rstd, offset, cast)
        dw = dw.to(weight.dtype) if ctx.needs_input_grad[1] else None
        return dx.view(dy.shape), dw, None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, variant: str = "llama"):
    """RMSNorm over the last dim of x (any leading dims; q/k head norms pass (..., head_dim)).

    variant "llama": y = cast(x * rstd) * w;  "gemma": y = cast(x * rstd * (1 + w)).
    Differentiable in x and weight.
    """
    _check(x, weight, variant)
    # (the kernel writes x's dtype: a wider output, llama's with an fp32 weight, is Triton's)
    cuda_accepts = x.dtype in CUDA_DTYPES and weight.dtype in (x.dtype, torch.float32) \
        and _out_dtype(x, weight, variant) == x.dtype
    backend = resolve("rms_norm", x.device, CUDA_OPS, cuda_accepts)
    if backend == "triton":
        return RMSNormFunction.apply(x, weight.contiguous(), eps, variant)
    if backend == "cuda":
        return RMSNormCudaFunction.apply(x, weight, eps, variant)
    return rms_norm_reference(x, weight, eps, variant)

