"""NF4 dequantisation (bitsandbytes' 4-bit format, see fusetune.reference.nf4): the Triton kernel, the
CUDA extension op and `nf4_dequant`.

Forward only: NF4 weights are frozen, so no gradient flows to the packed data or its scales.
"""
import torch

from fusetune.backend import CUDA_DTYPES, resolve
from fusetune.reference import nf4 as reference

CUDA_OPS = ("nf4_dequant",)  # the torch.ops.fusetune operators of the CUDA path


def weight_tensors(packed: torch.Tensor, code: torch.Tensor | None, nested_code: torch.Tensor | None):
    """(packed, code, nested_code) as every backend reads them: contiguous uint8 bytes (bitsandbytes'
    quant_storage may be another dtype), the fp32 code book (NF4's own when None), fp32 nested code."""
    if packed.dtype != torch.uint8:
        packed = packed.view(torch.uint8)
    code = reference.nf4_code(packed.device) if code is None else code.float()
    return (packed.contiguous(), code.contiguous(),
            None if nested_code is None else nested_code.float().contiguous())


def cuda_takes_scales(absmax: torch.Tensor, nested_absmax: torch.Tensor | None, offset: torch.Tensor | None) -> bool:
    """Whether the CUDA op takes these scales (csrc/ops.cpp, check_nf4_weight): contiguous fp32 absmax, or
    uint8 codes with fp32 nested_absmax and offset; the Triton kernel reads any float dtype."""
    if nested_absmax is None:
        return absmax.dtype == torch.float32 and absmax.is_contiguous()
    return (absmax.dtype == torch.uint8 and nested_absmax.dtype == torch.float32 and offset.dtype == torch.float32
            and absmax.is_contiguous() and nested_absmax.is_contiguous() and offset.is_contiguous())


def nf4_dequant(packed: torch.Tensor, absmax: torch.Tensor, blocksize: int, shape, dtype: torch.dtype,
                code: torch.Tensor | None = None, nested_absmax: torch.Tensor | None = None,
                nested_code: torch.Tensor | None = None, offset: torch.Tensor | None = None,
                nested_blocksize: int = 256, out: torch.Tensor | None = None) -> torch.Tensor:
    """packed NF4 data -> tensor of `shape` in `dtype`, written into `out` (contiguous, of that shape
    and dtype) when given. Arguments as fusetune.reference.nf4.dequantize_nf4's: with nested_absmax
    given, absmax holds the uint8 double-quantised codes.
    """
    shape = torch.Size(shape)
    if blocksize < 2 or blocksize & (blocksize - 1):
        raise ValueError(f"nf4_dequant: blocksize must be a power of two (bitsandbytes' are 32 to 4096), got "
                         f"{blocksize}")
    if out is not None and (out.shape != shape or out.dtype != dtype or not out.is_contiguous()):
        raise ValueError(f"nf4_dequant: out must be contiguous {tuple(shape)} {dtype}, got "
                         f"{tuple(out.shape)} {out.dtype}")
    packed, code, nested_code = weight_tensors(packed, code, nested_code)
    backend = resolve("nf4_dequant", packed.device, CUDA_OPS,
                      dtype in CUDA_DTYPES and cuda_takes_scales(absmax, nested_absmax, offset))
    if backend == "triton":
        from fusetune.triton_kernels.nf4 import nf4_dequant as nf4_dequant_triton

        # the kernel writes out's memory flat: a contiguous out of any shape goes in as it is
        result = nf4_dequant_triton(packed, absmax, code, blocksize, shape.numel(), dtype, nested_absmax,
                                    nested_code, offset, nested_blocksize, out=out)
        return result if out is not None else result.view(shape)
    if backend == "cuda":
        if dtype not in CUDA_DTYPES:
            raise ValueError(f"nf4_dequant: the CUDA backend writes {', '.join(map(str, CUDA_DTYPES))}, not "
                             f"{dtype}; use FUSETUNE_BACKEND=triton or torch for it")
        if out is None:
            out = torch.empty(shape, dtype=dtype, device=packed.device)
        torch.ops.fusetune.nf4_dequant(packed, absmax, code, blocksize, nested_absmax, nested_code, offset,
                                       nested_blocksize, out)
        return out
    result = reference.dequantize_nf4(packed, absmax, blocksize, shape, dtype, code, nested_absmax, nested_code,
                                      offset, nested_blocksize)
    return result if out is None else out.copy_(result)
