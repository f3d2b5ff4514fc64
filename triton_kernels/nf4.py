"""NF4 dequantisation of bitsandbytes' 4-bit format (see fusetune.reference.nf4 for the format).

out[2i] = code[byte_i >> 4] * absmax[2i // blocksize], out[2i + 1] = code[byte_i & 15] * absmax[...]
With double quantisation, absmax[b] = nested_code[q[b]] * nested_absmax[b // 256] + offset, the
product rounded to fp32 before the add (fp fusion is switched off so the GPU does not contract it
into an FMA: the result stays bit-exact with bitsandbytes).
Each program reads a tile of bytes once (as rows that each lie in one block, so a scale is read
once per row, not per byte) and writes the 2x as many outputs contiguously.
"""
import torch
import triton
import triton.language as tl


BLOCK_BYTES = 1024  # 2048 outputs per program
NUM_WARPS = 4


@triton.jit
def _nf4_dequant_kernel(PACKED, ABSMAX, CODE, NESTED_ABSMAX, NESTED_CODE, OFFSET, OUT, n_elements,
                        BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr,
                        BF16_OUT: tl.constexpr, BLOCK_BYTES: tl.constexpr, ROW_BYTES: tl.constexpr):
    """OUT[e] = CODE[nibble(e)] * absmax[e // BLOCKSIZE] for the 2 * BLOCK_BYTES elements of this
    program, nibble(e) the high nibble of PACKED[e // 2] for even e, the low one for odd e; with
    NESTED, absmax[b] = NESTED_CODE[ABSMAX[b]] * NESTED_ABSMAX[b // NESTED_BLOCKSIZE] + OFFSET
    (product rounded to fp32 first). Rounded once to OUT's dtype (to nearest even by hand for
    bf16). Forward only: NF4 weights are frozen, nothing flows back to the packed data or scales."""
    # the tile is (rows, ROW_BYTES) bytes, each row inside one quantisation block: one scale per row
    ROWS: tl.constexpr = BLOCK_BYTES // ROW_BYTES
    n_bytes = (n_elements + 1) // 2
    row = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    byte = row[:, None] * ROW_BYTES + tl.arange(0, ROW_BYTES)[None, :]
    packed = tl.load(PACKED + byte, mask=byte < n_bytes, other=0).to(tl.int32)
    row_ok = row * ROW_BYTES < n_bytes
    block = row * ROW_BYTES // (BLOCKSIZE // 2)  # both nibbles of a byte share a block: blocksize is even
    if NESTED:
        q = tl.load(ABSMAX + block, mask=row_ok, other=0).to(tl.int32)
        scale = tl.load(NESTED_CODE + q) * tl.load(NESTED_ABSMAX + block // NESTED_BLOCKSIZE, mask=row_ok,
                                                   other=0.0)
        scale = scale + tl.load(OFFSET)
    else:
        scale = tl.load(ABSMAX + block, mask=row_ok, other=0.0)
    hi = tl.load(CODE + (packed >> 4)) * scale[:, None]
    lo = tl.load(CODE + (packed & 15)) * scale[:, None]
    # (rows, ROW_BYTES, 2) row-major = hi0, lo0, hi1, lo1, ...: the element order in memory
    vals = tl.reshape(tl.join(hi, lo), (2 * BLOCK_BYTES,))
    idx = tl.program_id(0).to(tl.int64) * (2 * BLOCK_BYTES) + tl.arange(0, 2 * BLOCK_BYTES)
    if BF16_OUT:
        # round to nearest even by hand: the interpreter's fp32 -> bf16 cast truncates
        bits = vals.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        vals = bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    tl.store(OUT + idx, vals.to(OUT.dtype.element_ty), mask=idx < n_elements)


def nf4_dequant(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int,
                n_elements: int, out_dtype: torch.dtype, nested_absmax: torch.Tensor | None = None,
                nested_code: torch.Tensor | None = None, offset: torch.Tensor | None = None,
                nested_blocksize: int = 256, out: torch.Tensor | None = None) -> torch.Tensor:
    """n_elements of out_dtype from contiguous packed uint8 data: a new flat (n_elements,) tensor, or
    `out`.

    absmax: fp32 per block, or with nested_absmax given, uint8 codes into nested_code (fp32, 256),
    nested_absmax fp32 per nested_blocksize blocks, offset a 1-element fp32 tensor (no host sync).
    out: an optional contiguous buffer of n_elements of out_dtype to write into (any shape: the
    kernel writes its memory flat), returned as given.
    """
    if out is None:
        out = torch.empty(n_elements, dtype=out_dtype, device=packed.device)
    if n_elements == 0:
        return out
    nested = nested_absmax is not None
    grid = (triton.cdiv((n_elements + 1) // 2, BLOCK_BYTES),)
    _nf4_dequant_kernel[grid](packed, absmax, code, nested_absmax if nested else absmax,
                              nested_code if nested else code, offset if nested else absmax, out,
                              n_elements, BLOCKSIZE=blocksize, NESTED=nested,
                              NESTED_BLOCKSIZE=nested_blocksize,
                              BF16_OUT=out_dtype == torch.bfloat16, BLOCK_BYTES=BLOCK_BYTES,
                              ROW_BYTES=min(blocksize // 2, BLOCK_BYTES), num_warps=NUM_WARPS,
                              enable_fp_fusion=False)
    return out
