"""NF4 (4-bit NormalFloat) dequantisation and the product with a dequantised weight in plain torch,
in bitsandbytes' storage format.

Format (bitsandbytes.functional.quantize_4bit with quant_type="nf4"):
  - data: uint8, two 4-bit codes per byte, element 2i in the HIGH nibble, 2i+1 in the low one;
    an odd element count leaves the last low nibble as padding.
  - the flat weight is cut into blocks of `blocksize` elements (the last may be short); block b
    has a scale absmax[b] (fp32) and value = NF4_CODE[nibble] * absmax[b], rounded once to the
    output dtype.
  - double quantisation: absmax itself is stored as uint8 codes into a 256-entry table
    (nested_code) with one fp32 scale per `nested_blocksize` (256) blocks and an fp32 offset:
    absmax[b] = nested_code[q[b]] * nested_absmax[b // 256] + offset, the product rounded to fp32
    before the add (bitsandbytes stores it first).
"""
import torch

# bitsandbytes.functional.get_4bit_type("nf4"): quantiles of N(0, 1), normalised to [-1, 1]
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)


def nf4_code(device=None) -> torch.Tensor:
    return torch.tensor(NF4_CODE, dtype=torch.float32, device=device)


def dequantize_absmax(qabsmax: torch.Tensor, nested_absmax: torch.Tensor, nested_code: torch.Tensor,
                      offset: torch.Tensor, nested_blocksize: int = 256) -> torch.Tensor:
    """uint8 double-quantised absmax -> fp32 absmax."""
    blocks = torch.arange(qabsmax.numel(), device=qabsmax.device) // nested_blocksize
    scaled = nested_code.float()[qabsmax.reshape(-1).long()] * nested_absmax.float()[blocks]
    return scaled + offset.float()


def dequantize_nf4(packed: torch.Tensor, absmax: torch.Tensor, blocksize: int, shape, dtype: torch.dtype,
                   code: torch.Tensor | None = None, nested_absmax: torch.Tensor | None = None,
                   nested_code: torch.Tensor | None = None, offset: torch.Tensor | None = None,
                   nested_blocksize: int = 256) -> torch.Tensor:
    """packed uint8 NF4 data -> tensor of `shape` and `dtype`.

    With nested_absmax given, absmax holds the uint8 double-quantised codes.
    """
    n = 1
    for s in shape:
        n *= s
    data = packed.reshape(-1)
    code = nf4_code(data.device) if code is None else code.float()
    if nested_absmax is not None:
        absmax = dequantize_absmax(absmax, nested_absmax, nested_code, offset, nested_blocksize)
    nibbles = torch.stack((data >> 4, data & 15), dim=1).reshape(-1)[:n].long()
    blocks = torch.arange(n, device=data.device) // blocksize
    return (code[nibbles] * absmax.float()[blocks]).to(dtype).reshape(shape)


def nf4_gemv(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, blocksize: int, shape,
             code: torch.Tensor | None = None, nested_absmax: torch.Tensor | None = None,
             nested_code: torch.Tensor | None = None, offset: torch.Tensor | None = None,
             nested_blocksize: int = 256) -> torch.Tensor:
    """x (M, K) @ W^T for W of `shape` (N, K) in NF4: W dequantised to x's dtype, then one matmul."""
    w = dequantize_nf4(packed, absmax, blocksize, shape, x.dtype, code, nested_absmax, nested_code, offset,
                       nested_blocksize)
    return x @ w.T
