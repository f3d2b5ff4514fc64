"""Fused NF4 dequantise + small-M matmul (decoding): autograd Function over the Triton kernel or the
CUDA extension's op, and `nf4_gemv`. On those backends the dense weight is never written (see
triton_kernels/nf4_gemv.py, csrc/nf4_gemv.cu).

    out = x W^T,  W (N, K) frozen NF4  ->  dx = dy W (W dequantised in dy's dtype), no gradient to W
"""
import torch

from fusetune.backend import resolve
from fusetune.ops.nf4 import nf4_dequant, weight_tensors
from fusetune.reference import nf4 as reference

CUDA_OPS = ("nf4_gemv",)  # the torch.ops.fusetune operator of the CUDA path
MAX_ROWS = 16  # the kernels' tile (GEMV_MAX_M, kNf4GemvMaxM): more rows dequantise (its own op), then one matmul


def _cuda_takes(x: torch.Tensor, packed: torch.Tensor, blocksize: int) -> bool:
    """The shapes csrc/nf4_gemv.cu takes (kernels.h: nf4_gemv_supported)."""
    return x.shape[1] % 32 == 0 and blocksize % 32 == 0 and packed.data_ptr() % 16 == 0


class NF4GemvFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, packed, absmax, blocksize, shape, code, nested_absmax, nested_code, offset,
                nested_blocksize, backend):
        ctx.save_for_backward(packed, absmax, code, nested_absmax, nested_code, offset)
        ctx.layout = (blocksize, shape, nested_blocksize)
        if backend == "cuda":
            out = torch.empty(x.shape[0], shape[0], dtype=x.dtype, device=x.device)
            torch.ops.fusetune.nf4_gemv(x.contiguous(), packed, absmax, code, blocksize, nested_absmax, nested_code,
                                        offset, nested_blocksize, out)
            return out
        from fusetune.triton_kernels.nf4_gemv import nf4_gemv as nf4_gemv_triton

        return nf4_gemv_triton(x.contiguous(), packed, absmax, code, blocksize, shape[0], shape[1],
                               nested_absmax, nested_code, offset, nested_blocksize)

    @staticmethod
    def backward(ctx, dy):
        packed, absmax, code, nested_absmax, nested_code, offset = ctx.saved_tensors
        blocksize, shape, nested_blocksize = ctx.layout
        w = nf4_dequant(packed, absmax, blocksize, shape, dy.dtype, code, nested_absmax, nested_code, offset,
                        nested_blocksize)
        return (dy @ w,) + (None,) * 10


def nf4_gemv(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, blocksize: int, shape,
             code: torch.Tensor | None = None, nested_absmax: torch.Tensor | None = None,
             nested_code: torch.Tensor | None = None, offset: torch.Tensor | None = None,
             nested_blocksize: int = 256) -> torch.Tensor:
    """x (M, K) @ W^T -> (M, N) in x's dtype, for W of `shape` (N, K) in NF4 (the weight's arguments
    as nf4_dequant's). For few rows: the kernels take M <= 16 (more rows: nf4_dequant, then a
    matmul; so do shapes the CUDA kernel does not take: K or blocksize not a multiple of 32).
    Differentiable in x.
    """
    shape = torch.Size(shape)
    if x.dim() != 2 or len(shape) != 2 or x.shape[1] != shape[1]:
        raise ValueError(f"nf4_gemv: x must be (M, K) with K the weight's in-features; got x "
                         f"{tuple(x.shape)} for a weight of shape {tuple(shape)}")
    if x.device != packed.device:
        raise ValueError(f"nf4_gemv: x is on {x.device} but the weight on {packed.device}; move both to "
                         f"one device")
    packed, code, nested_code = weight_tensors(packed, code, nested_code)
    backend = resolve("nf4_gemv", x.device, CUDA_OPS)
    if backend == "torch":
        return reference.nf4_gemv(x, packed, absmax, blocksize, shape, code, nested_absmax, nested_code, offset,
                                  nested_blocksize)
    if x.shape[0] > MAX_ROWS or (backend == "cuda" and not _cuda_takes(x, packed, blocksize)):
        w = nf4_dequant(packed, absmax, blocksize, shape, x.dtype, code, nested_absmax, nested_code, offset,
                        nested_blocksize)
        return x @ w.T
    return NF4GemvFunction.apply(x, packed, absmax, blocksize, shape, code, nested_absmax, nested_code, offset,
                                 nested_blocksize, backend)
