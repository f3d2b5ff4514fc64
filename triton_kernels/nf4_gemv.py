"""Fused NF4 dequantise + small-M matmul (decoding): out (M, N) = x (M, K) @ dequant(W)^T for W (N, K)
in bitsandbytes' NF4 format (see triton_kernels/nf4.py) and M <= 16, dequantising in registers:
the bf16 weight is never written (see _nf4_gemv_kernel).
"""
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .utils import _sm_count, interpreting


H100_SMS = 132  # the GPU the heuristic is sized for when the launch is only captured (tests/aot_compile.py)
GEMV_MAX_M = 16


@dataclass(frozen=True)
class GemvConfig:
    """Launch parameters of _nf4_gemv_kernel.

    block_n: output features per program (power of 2; >= 16 with use_dot).
    block_k: K elements per loop step (power of 2, >= 32); a step reads block_n * block_k / 2 bytes.
    split_k: programs along K, each summing a contiguous range of K tiles into an fp32 partial
             (SPLIT_K, M, N) buffer that a second kernel adds up in a fixed order (deterministic).
    use_dot: tl.dot on M padded to 16 rows (any M <= 16); False (M == 1 only): fp32 FMAs into a
             per-element accumulator, summed once after the K loop.
    w_lhs:   with use_dot, the weight tile is tl.dot's left operand (acc is (BLOCK_N, 16)), else the
             right one (x @ w^T, acc (16, BLOCK_N)).
    num_stages: passed to the compiler when set (software pipelining of the K loop).
    """
    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    use_dot: bool = True
    w_lhs: bool = True
    num_stages: int | None = None


def _pow2(v: int) -> bool:
    return isinstance(v, int) and v > 0 and v & (v - 1) == 0


def nf4_gemv_config(m: int, n: int, k: int, blocksize: int, sm_count: int = H100_SMS) -> GemvConfig:
    """The launch config for an (m, k) x (n, k)^T NF4 product on a GPU with sm_count SMs.

    - M == 1: fp32 FMAs (use_dot=False, no padding to 16 rows); M > 1: tl.dot on 16 rows.
    - block_k: the largest power of 2 <= 256 (128 with tl.dot) dividing K (>= 32) when K is a
      multiple of the blocksize (the fast path, no masks), else 64.
    - block_n = 64 (8 KiB of packed weight per step at block_k 256). Then, while the grid has
      fewer than 2 programs per SM, split K in 2 (at most one split per K tile, and the fp32
      partials, 8 * M * N * split bytes written and read, stay under 1/8 of the N * K / 2 weight
      bytes), and only then halve block_n (down to 16).
    - num_warps: 8 for tiles of >= 16384 elements without tl.dot, else 4 (one warpgroup); with
      tl.dot num_stages 1. At these sizes ptxas (sm_90) gives 128 registers (use_dot=False, 64 x
      256, 8 warps) and ~130 (tl.dot, 64 x 128, 4 warps), no spills: 2 and 4 programs per SM.
    """
    use_dot = m > 1
    if k % blocksize == 0:
        block_k = 128 if use_dot else 256
        while block_k > 32 and k % block_k:
            block_k //= 2
    else:
        block_k = 64
    block_n = 64
    k_tiles = triton.cdiv(k, block_k)
    max_split = max(1, min(k_tiles, k // (128 * max(m, 1))))
    target = 2 * sm_count
    split = 1
    while triton.cdiv(n, block_n) * split < target and split * 2 <= max_split:
        split *= 2
    while triton.cdiv(n, block_n) * split < target and block_n > 16:
        block_n //= 2
    num_warps = 8 if block_n * block_k >= 16384 and not use_dot else 4
    # tl.dot loops would otherwise be software-pipelined through shared memory, the 16-entry
    # code-book gathers included (4-byte async copies, ~90 KiB of buffers at 64 x 256)
    return GemvConfig(block_n, block_k, split, num_warps, use_dot, num_stages=1 if use_dot else None)


@triton.jit
def _nf4_finish_scale(raw, NESTED_ABSMAX, NESTED_CODE, OFFSET, block, NESTED: tl.constexpr,
                      NESTED_BLOCKSIZE: tl.constexpr):
    """fp32 absmax of the (in-range) block indices `block` from raw = ABSMAX[block] (fp32, or the
    uint8 code q when NESTED), as _nf4_dequant_kernel computes it."""
    if NESTED:
        scale = tl.load(NESTED_CODE + raw.to(tl.int32)) * tl.load(NESTED_ABSMAX + block // NESTED_BLOCKSIZE)
        scale = scale + tl.load(OFFSET)
    else:
        scale = raw
    return scale


@triton.jit
def _aligned_tile(t, group, in_group, k_bytes, blocks_per_row, BLOCK_K: tl.constexpr,
                  BLOCKSIZE: tl.constexpr, GROUP_BYTES: tl.constexpr, EVEN_K: tl.constexpr):
    """Byte offsets in a row (GROUPS, GROUP_BYTES) of K tile t, the same clamped in-row for loads,
    and the block index in a row of each group."""
    kb = t * (BLOCK_K // 2) + group[:, None] * GROUP_BYTES + in_group[None, :]
    blk = (t * BLOCK_K + group * (2 * GROUP_BYTES)) // BLOCKSIZE
    kb_c = kb
    if not EVEN_K:
        kb_c = tl.minimum(kb, k_bytes - 1)
        blk = tl.minimum(blk, blocks_per_row - 1)
    return kb, kb_c, blk


@triton.jit
def _round_bf16(v):
    """fp32 -> bf16, round to nearest even by hand (the interpreter's cast truncates)."""
    bits = v.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _gemv_dot(acc, w, xv, W_LHS: tl.constexpr, X_FP32: tl.constexpr, X_BF16: tl.constexpr,
              INTERPRET: tl.constexpr):
    """acc += w (BLOCK_N, BK) fp32 . xv (BLOCK_M, BK) over BK with tl.dot; acc is (BLOCK_N, BLOCK_M)
    when W_LHS, else (BLOCK_M, BLOCK_N)."""
    if X_FP32:
        wd = w
        xd = xv
    elif INTERPRET:
        # the interpreter's bf16 tl.dot is wrong: the weight is rounded to x's dtype as on the GPU,
        # then both operands go in as fp32 (bf16/fp16 products are exact in fp32)
        if X_BF16:
            wd = _round_bf16(w).to(tl.float32)
        else:
            wd = w.to(tl.float16).to(tl.float32)
        xd = xv.to(tl.float32)
    else:
        wd = w.to(xv.dtype)  # rounded once, as dequantise-then-matmul rounds the weight
        xd = xv
    if X_FP32 or INTERPRET:
        if W_LHS:
            acc = tl.dot(wd, tl.trans(xd), acc, input_precision="ieee")
        else:
            acc = tl.dot(xd, tl.trans(wd), acc, input_precision="ieee")
    else:
        if W_LHS:
            acc = tl.dot(wd, tl.trans(xd), acc)
        else:
            acc = tl.dot(xd, tl.trans(wd), acc)
    return acc


@triton.jit
def _unpack_pairs(words, X_FP32: tl.constexpr, X_BF16: tl.constexpr):
    """(x[2j], x[2j + 1]) in fp32 from the little-endian words holding both (int32 for bf16/fp16,
    int64 for fp32): one load per pair, no deinterleaving in registers."""
    if X_FP32:
        even = words.to(tl.uint32).to(tl.float32, bitcast=True)
        odd = (words >> 32).to(tl.uint32).to(tl.float32, bitcast=True)
    elif X_BF16:
        even = (words << 16).to(tl.float32, bitcast=True)
        odd = (words & -65536).to(tl.float32, bitcast=True)
    else:
        even = words.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        odd = (words >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    return even, odd


@triton.jit
def _nf4_gemv_kernel(X, PACKED, ABSMAX, CODE, NESTED_ABSMAX, NESTED_CODE, OFFSET, OUT, M, N, K,
                     k_bytes, blocks_per_row, k_tiles, tiles_per_split,
                     BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr,
                     ALIGNED: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUPS: tl.constexpr,
                     GROUP_BYTES: tl.constexpr, USE_DOT: tl.constexpr, W_LHS: tl.constexpr,
                     X_FP32: tl.constexpr, X_BF16: tl.constexpr, PARTIAL: tl.constexpr,
                     INTERPRET: tl.constexpr):
    """out[m, n] = sum_k x[m, k] * W[n, k], W (N, K) in bitsandbytes' NF4 format, fp32 sums.

    Element e = n * K + k of W lives in byte e // 2 (high nibble when e is even) and block
    e // BLOCKSIZE: W[n, k] = CODE[nibble] * absmax[e // BLOCKSIZE], with double quantisation
    absmax[b] = NESTED_CODE[q[b]] * NESTED_ABSMAX[b // NESTED_BLOCKSIZE] + OFFSET (product
    rounded to fp32 first: launched with enable_fp_fusion=False).
    Program (pid_n, pid_k) owns rows pid_n * BLOCK_N + [0, BLOCK_N) and K tiles
    [pid_k * tiles_per_split, ...) of BLOCK_K columns.
    ALIGNED (K % BLOCKSIZE == 0: K is even, every row starts a byte and a block): a step loads the
    (BLOCK_N, BLOCK_K / 2) packed bytes as (BLOCK_N, GROUPS, GROUP_BYTES), each group sharing one
    absmax, and dequantises the high nibbles (even k) and low nibbles (odd k) separately.
      USE_DOT: hi and lo interleave back into (BLOCK_N, BLOCK_K) for one tl.dot with the x tile
        (M padded to BLOCK_M = 16 rows by clamping; rows >= M are not stored).
      else (M == 1): X holds x as (x[2j], x[2j + 1]) words (int32 for bf16/fp16, int64 for fp32);
        acc (BLOCK_N, GROUPS, GROUP_BYTES) += hi * x_even + lo * x_odd elementwise (explicit
        FMAs: fp fusion is off), summed over k once after the loop.
      The packed bytes and raw absmax of tile t + 1 are loaded before tile t is dequantised.
    Otherwise each element finds its own byte, nibble and block (the slow path).
    Out-of-range rows and columns are clamped on load (their x is 0 or their output is not
    stored), so the fast path's loads carry no masks. PARTIAL: fp32 sums go to OUT[pid_k, m, n]
    for _nf4_gemv_reduce_kernel; else to OUT[m, n] in OUT's dtype.
    """
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows_c = tl.minimum(rows, N - 1).to(tl.int64)
    ms = tl.arange(0, BLOCK_M)
    t_lo = pid_k * tiles_per_split
    t_hi = tl.minimum(t_lo + tiles_per_split, k_tiles)
    if USE_DOT:
        x_rows = X + tl.minimum(ms, M - 1).to(tl.int64)[:, None] * K  # (BLOCK_M, 1)
        if W_LHS:
            acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    elif ALIGNED:
        acc = tl.zeros((BLOCK_N, GROUPS, GROUP_BYTES), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    if ALIGNED:
        row_bytes = (rows_c * k_bytes)[:, None, None]
        row_blocks = (rows_c * blocks_per_row)[:, None]
        group = tl.arange(0, GROUPS)
        in_group = tl.arange(0, GROUP_BYTES)
        # prefetch: the packed bytes and raw absmax of tile t + 1 are requested before tile t is
        # dequantised, doubling the bytes in flight per thread for 8-odd registers
        _, kb_c, blk = _aligned_tile(t_lo, group, in_group, k_bytes, blocks_per_row, BLOCK_K, BLOCKSIZE,
                                     GROUP_BYTES, EVEN_K)
        packed_next = tl.load(PACKED + row_bytes + kb_c[None, :, :])
        raw_next = tl.load(ABSMAX + row_blocks + blk[None, :])
        for t in range(t_lo, t_hi):
            packed = packed_next.to(tl.int32)
            raw = raw_next
            kb, _, blk = _aligned_tile(t, group, in_group, k_bytes, blocks_per_row, BLOCK_K, BLOCKSIZE,
                                       GROUP_BYTES, EVEN_K)
            _, kb_c, blk_next = _aligned_tile(tl.minimum(t + 1, t_hi - 1), group, in_group, k_bytes,
                                              blocks_per_row, BLOCK_K, BLOCKSIZE, GROUP_BYTES, EVEN_K)
            packed_next = tl.load(PACKED + row_bytes + kb_c[None, :, :])
            raw_next = tl.load(ABSMAX + row_blocks + blk_next[None, :])
            scale = _nf4_finish_scale(raw, NESTED_ABSMAX, NESTED_CODE, OFFSET, row_blocks + blk[None, :],
                                      NESTED, NESTED_BLOCKSIZE)[:, :, None]
            hi = tl.load(CODE + (packed >> 4)) * scale
            lo = tl.load(CODE + (packed & 15)) * scale
            if USE_DOT:
                # back in k order for one dot with a contiguous x tile (two dots, hi with x[:, 0::2]
                # and lo with x[:, 1::2], got two MMA layouts and an accumulator shuffle per step)
                w = tl.reshape(tl.join(hi, lo), (BLOCK_N, BLOCK_K))
                kx = t * BLOCK_K + tl.arange(0, BLOCK_K)
                if EVEN_K:
                    xv = tl.load(x_rows + kx[None, :])
                else:
                    xv = tl.load(x_rows + kx[None, :], mask=kx[None, :] < K, other=0.0)
                acc = _gemv_dot(acc, w, xv, W_LHS, X_FP32, X_BF16, INTERPRET)
            else:
                # x's words loaded per weight row (L1 hits): the (BLOCK_N, GROUPS, GROUP_BYTES)
                # shape gives them the layout of the packed bytes, with no layout conversion of hi/lo
                words_at = X + (kb[None, :, :] + 0 * row_bytes)
                if EVEN_K:
                    words = tl.load(words_at)
                else:
                    words = tl.load(words_at, mask=kb[None, :, :] + 0 * row_bytes < k_bytes, other=0)
                x_even, x_odd = _unpack_pairs(words, X_FP32, X_BF16)
                acc = tl.fma(hi, x_even, acc)
                acc = tl.fma(lo, x_odd, acc)
    else:
        for t in range(t_lo, t_hi):
            kx = t * BLOCK_K + tl.arange(0, BLOCK_K)
            elem = rows_c[:, None] * K + tl.minimum(kx, K - 1)[None, :]
            packed = tl.load(PACKED + (elem >> 1)).to(tl.int32)
            nibble = (packed >> (4 - 4 * (elem & 1)).to(tl.int32)) & 15
            block = elem // BLOCKSIZE
            scale = _nf4_finish_scale(tl.load(ABSMAX + block), NESTED_ABSMAX, NESTED_CODE, OFFSET, block,
                                      NESTED, NESTED_BLOCKSIZE)
            w = tl.load(CODE + nibble) * scale
            if USE_DOT:
                xv = tl.load(x_rows + kx[None, :], mask=kx[None, :] < K, other=0.0)
                acc = _gemv_dot(acc, w, xv, W_LHS, X_FP32, X_BF16, INTERPRET)
            else:
                xv = tl.load(X + kx[None, :], mask=kx[None, :] < K, other=0.0).to(tl.float32)
                acc = tl.fma(w, xv, acc)
    if USE_DOT:
        res = acc
    elif ALIGNED:
        res = tl.sum(tl.sum(acc, axis=2), axis=1)[:, None]  # (BLOCK_N, 1)
    else:
        res = tl.sum(acc, axis=1)[:, None]
    if W_LHS or not USE_DOT:
        offs = ms.to(tl.int64)[None, :] * N + rows[:, None]
        mask = (ms[None, :] < M) & (rows[:, None] < N)
    else:
        offs = ms.to(tl.int64)[:, None] * N + rows[None, :]
        mask = (ms[:, None] < M) & (rows[None, :] < N)
    if PARTIAL:
        tl.store(OUT + pid_k.to(tl.int64) * M * N + offs, res, mask=mask)
    elif INTERPRET and X_BF16:
        tl.store(OUT + offs, _round_bf16(res), mask=mask)
    else:
        tl.store(OUT + offs, res.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _nf4_gemv_reduce_kernel(PARTIAL, OUT, numel, SPLIT_K: tl.constexpr, BLOCK: tl.constexpr,
                            ROUND_BF16: tl.constexpr):
    """OUT[i] = sum_s PARTIAL[s, i] over s = 0 .. SPLIT_K - 1 in order (fp32), cast to OUT's dtype."""
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < numel
    acc = tl.load(PARTIAL + idx, mask=mask, other=0.0)
    for s in tl.static_range(1, SPLIT_K):
        acc += tl.load(PARTIAL + s * numel + idx, mask=mask, other=0.0)
    if ROUND_BF16:
        tl.store(OUT + idx, _round_bf16(acc), mask=mask)
    else:
        tl.store(OUT + idx, acc.to(OUT.dtype.element_ty), mask=mask)


def _check_tensor(name: str, t, dtype: torch.dtype, numel: int, device: torch.device):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"nf4_gemv: {name} must be a tensor, got {type(t).__name__}")
    if t.dtype != dtype:
        raise ValueError(f"nf4_gemv: {name} must be {dtype}, got {t.dtype}")
    if t.numel() != numel:
        raise ValueError(f"nf4_gemv: {name} must hold {numel} elements, got {t.numel()} "
                         f"(shape {tuple(t.shape)})")
    if t.device != device:
        raise ValueError(f"nf4_gemv: {name} is on {t.device}, x on {device}")
    if not t.is_contiguous():
        raise ValueError(f"nf4_gemv: {name} must be contiguous")


def _check_gemv_config(cfg: GemvConfig, m: int):
    if not (_pow2(cfg.block_n) and _pow2(cfg.block_k) and cfg.block_k >= 32):
        raise ValueError(f"nf4_gemv: block_n and block_k must be powers of 2, block_k >= 32: {cfg}")
    if cfg.use_dot and cfg.block_n < 16:
        raise ValueError(f"nf4_gemv: tl.dot needs block_n >= 16: {cfg}")
    if not cfg.use_dot and m != 1:
        raise ValueError(f"nf4_gemv: use_dot=False handles M == 1 only, got M = {m}: {cfg}")
    if not (isinstance(cfg.split_k, int) and cfg.split_k >= 1 and _pow2(cfg.num_warps)):
        raise ValueError(f"nf4_gemv: split_k must be >= 1 and num_warps a power of 2: {cfg}")


def nf4_gemv(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
             blocksize: int, n: int, k: int, nested_absmax: torch.Tensor | None = None,
             nested_code: torch.Tensor | None = None, offset: torch.Tensor | None = None,
             nested_blocksize: int = 256, *, config: GemvConfig | None = None) -> torch.Tensor:
    """out (M, N) = x (M, K) @ dequant(W)^T in x's dtype, W (N, K) NF4-packed, never materialised.

        out[m, n] = sum_k x[m, k] * W[n, k],  W[n, k] = code[nibble(e)] * absmax[e // blocksize],
        e = n * K + k, nibble(e) = high nibble of packed[e // 2] for even e, low for odd e;
        with nested_absmax: absmax[b] = nested_code[q[b]] * nested_absmax[b // nested_blocksize]
        + offset (q = absmax, uint8), product rounded to fp32 first (as in nf4_dequant).

    Sums in fp32. With tl.dot (M > 1, bf16/fp16 x) the weight is rounded to x's dtype first, as
    dequantise-then-matmul does; with fp32 x the dot is full fp32 ("ieee", not tf32); the M == 1
    path (use_dot=False) multiplies in fp32 without rounding the weight.
    x: (M, K) contiguous fp32/bf16/fp16, M <= 16. packed: uint8, ceil(N * K / 2) bytes (any
    shape, contiguous); absmax: fp32 per block of `blocksize` flat elements (power of 2), or
    uint8 with nested_absmax (fp32), nested_code (fp32, 256) and offset (fp32, 1 element) given;
    code: fp32 (16,). All on x's device.
    config: launch parameters (GemvConfig), default nf4_gemv_config(M, N, K, blocksize).
    split_k > 1 adds a (split_k, M, N) fp32 buffer and a second small kernel, no atomics: the
    result does not depend on timing.
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"nf4_gemv: x must be a 2-D (M, K) tensor, got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"nf4_gemv: x must be fp32, bf16 or fp16, got {x.dtype}")
    if not x.is_contiguous():
        raise ValueError("nf4_gemv: x must be contiguous (call .contiguous())")
    m = x.shape[0]
    if m > GEMV_MAX_M:
        raise ValueError(f"nf4_gemv: M = {m} rows > {GEMV_MAX_M}; use nf4_dequant + matmul for larger M")
    if not (isinstance(n, int) and isinstance(k, int) and n > 0 and k > 0):
        raise ValueError(f"nf4_gemv: n and k must be positive ints, got n={n!r}, k={k!r}")
    if x.shape[1] != k:
        raise ValueError(f"nf4_gemv: x has {x.shape[1]} columns, W has k = {k}")
    if not (_pow2(blocksize) and blocksize >= 2):
        raise ValueError(f"nf4_gemv: blocksize must be a power of 2 >= 2, got {blocksize!r}")
    device = x.device
    n_blocks = triton.cdiv(n * k, blocksize)
    _check_tensor("packed", packed, torch.uint8, (n * k + 1) // 2, device)
    _check_tensor("code", code, torch.float32, 16, device)
    nested = nested_absmax is not None
    if nested != (nested_code is not None) or nested != (offset is not None):
        raise ValueError("nf4_gemv: give nested_absmax, nested_code and offset together (double "
                         "quantisation) or none of them")
    if nested:
        if not (isinstance(nested_blocksize, int) and nested_blocksize > 0):
            raise ValueError(f"nf4_gemv: nested_blocksize must be a positive int, got {nested_blocksize!r}")
        _check_tensor("absmax", absmax, torch.uint8, n_blocks, device)
        _check_tensor("nested_absmax", nested_absmax, torch.float32,
                      triton.cdiv(n_blocks, nested_blocksize), device)
        _check_tensor("nested_code", nested_code, torch.float32, 256, device)
        _check_tensor("offset", offset, torch.float32, 1, device)
    else:
        _check_tensor("absmax", absmax, torch.float32, n_blocks, device)
    out = torch.empty((m, n), dtype=x.dtype, device=device)
    if m == 0:
        return out
    interpret = interpreting()
    if config is None:
        if device.type == "cuda":
            sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
        else:  # the interpreter runs small grids; a captured launch (aot_compile) sizes for an H100
            sms = 4 if interpret else H100_SMS
        config = nf4_gemv_config(m, n, k, blocksize, sms)
    _check_gemv_config(config, m)
    aligned = k % blocksize == 0
    k_tiles = triton.cdiv(k, config.block_k)
    tiles_per_split = triton.cdiv(k_tiles, config.split_k)
    split = triton.cdiv(k_tiles, tiles_per_split)  # no empty splits
    group_bytes = min(blocksize, config.block_k) // 2
    dst = out if split == 1 else torch.empty((split, m, n), dtype=torch.float32, device=device)
    options = {"num_warps": config.num_warps, "enable_fp_fusion": False}
    if config.num_stages is not None:
        options["num_stages"] = config.num_stages
    grid = (triton.cdiv(n, config.block_n), split)
    if aligned and not config.use_dot:  # the M == 1 fast path reads x as (x[2j], x[2j + 1]) words
        x = x.view(torch.int64 if x.dtype == torch.float32 else torch.int32)
    _nf4_gemv_kernel[grid](x, packed, absmax, code, nested_absmax if nested else absmax,
                           nested_code if nested else code, offset if nested else code, dst,
                           m, n, k, k // 2, k // blocksize if aligned else 0, k_tiles, tiles_per_split,
                           BLOCKSIZE=blocksize, NESTED=nested, NESTED_BLOCKSIZE=nested_blocksize,
                           ALIGNED=aligned, EVEN_K=k % config.block_k == 0,
                           BLOCK_M=16 if config.use_dot else 1, BLOCK_N=config.block_n,
                           BLOCK_K=config.block_k, GROUPS=config.block_k // (2 * group_bytes),
                           GROUP_BYTES=group_bytes, USE_DOT=config.use_dot,
                           W_LHS=config.w_lhs or not config.use_dot, X_FP32=out.dtype == torch.float32,
                           X_BF16=out.dtype == torch.bfloat16, PARTIAL=split > 1, INTERPRET=interpret,
                           **options)
    if split > 1:
        block = 1024
        _nf4_gemv_reduce_kernel[(triton.cdiv(m * n, block),)](
            dst, out, m * n, SPLIT_K=split, BLOCK=block,
            ROUND_BF16=interpret and out.dtype == torch.bfloat16, num_warps=4)
    return out
