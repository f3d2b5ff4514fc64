"""Flash attention forward and backward: online softmax, causal or not, GQA/MQA, logit softcap,
sliding window, and packed documents (segments), never holding the (queries x keys) scores.

Shapes: q (B, Hq, Sq, D), k and v (B, Hk, Sk, D) with Hq a multiple of Hk (query head h reads key
head h // (Hq / Hk): GQA without repeating k/v); any strides with a unit last stride. Query i sits
at position i + Sk - Sq (its causal offset: a query block appended to a cache). Scores, for each
allowed key j of query i:
    x = scale * q_i . k_j,    s = c * tanh(x / c) with softcap c (else s = x)
    allowed: j <= pos(i) (causal), pos(i) - j < window (sliding window, Hugging Face's convention),
             seg(i) == seg(j) (packed documents; segments are runs of equal ids, Sq == Sk)
    o_i = sum_j p_ij v_j,   p_ij = exp(s_ij - lse_i),   lse_i = log sum_j exp(s_ij)
computed block by block with a running max and sum (fp32), in base 2: the kernels work with
s * log2(e) and keep lse in base 2 (`LSE` holds lse_i * log2(e)).

Backward (flash-attention 2's split): a preprocessing kernel computes delta_i = sum_d dO_id O_id;
then, with p recomputed from q, k and the saved lse,
    dv_j = sum_i p_ij dO_i,   dp_ij = dO_i . v_j,   ds_ij = p_ij (dp_ij - delta_i),
    dx_ij = ds_ij (1 - tanh(x_ij / c)^2)  (softcap; else dx = ds),
    dq_i = scale sum_j dx_ij k_j,   dk_j = scale sum_i dx_ij q_i.
One kernel per key block computes dk and dv (looping over the query heads of its key head, so GQA
needs no atomics), another per query block computes dq: deterministic, nothing accumulated in
global memory.

Block skipping: a query block visits only the key blocks its mask can allow (causal end, window
start, its documents' span from the per-token run start / end arrays), and a key block only the
query blocks that can see it. Of those, the blocks seen whole (inside the causal edge and the
window, not past the end) run an unmasked copy of the loop; only edge blocks (and, with documents,
all blocks) build the mask. The dk/dv kernel works on the transposed (keys x queries) tile, so p^T
and ds^T feed their products from registers. Grids are (blocks, heads, batch); the query-major
kernels run their last blocks (the most keys under a causal mask) first. Row offsets are int64 (a
600k-token row of 32 x 128 heads passes 2^31).
"""
import torch
import triton
import triton.language as tl

from .utils import interpreting, next_power_of_2, program_count

# a finite running-max start: a row whose first block is all masked gives p = 0, not nan
_NEG_INIT: tl.constexpr = tl.constexpr(-1.0e30)


def _configs(*shapes):
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in shapes]


if interpreting():
    _FWD = _DKDV = _DQ = [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=4, num_stages=1)]
else:
    # (BLOCK_M, BLOCK_N, warps, stages): Hopper-sized tiles, the 64 x 64 ones for head dim 256
    _FWD = _configs((128, 64, 8, 3), (128, 128, 8, 2), (128, 128, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3))
    _DKDV = _configs((64, 128, 8, 2), (32, 128, 4, 3), (64, 64, 4, 3), (64, 128, 4, 2))
    _DQ = _configs((128, 64, 8, 2), (64, 64, 4, 3), (128, 32, 4, 3), (64, 128, 8, 2))
# SEQ_BUCKET / GROUP_BUCKET: plain int arguments the kernels never read, for the autotuner's key only
# (constexprs would compile a kernel per bucket)
_KEY = ["HEAD_DIM", "SEQ_BUCKET", "CAUSAL", "SOFTCAP", "WINDOW", "SEGMENTS", "GROUP_BUCKET"]


def _prune(configs, named_args, **kwargs):
    """Head dim 256 takes 64 x 64 tiles at 2 stages (larger ones pass Hopper's 227 KiB of shared memory)."""
    if named_args.get("HEAD_DIM", kwargs.get("HEAD_DIM", 0)) <= 128:
        return configs
    return [triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=w, num_stages=2) for w in (4, 8)]


@triton.jit
def _tanh(x):
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0  # no libdevice (the interpreter has none)


@triton.jit
def _scores(a, b, scale, softcap, SOFTCAP: tl.constexpr, PRECISION: tl.constexpr):
    """(s = scores of a . b^T in base 2, tanh(x / c) for the softcap's derivative, or 0) of a tile:
    q . k^T in the query-major kernels, k . q^T (the transposed tile) in the key-major one."""
    x = tl.dot(a, tl.trans(b), input_precision=PRECISION)
    if SOFTCAP:
        t = _tanh(x * (scale / softcap))
        return t * (softcap * 1.4426950408889634), t
    return x * (scale * 1.4426950408889634), x * 0.0


@triton.jit
def _allowed(q_idx, k_idx, SQ, SK, offset, window, seg_q, seg_k,
             CAUSAL: tl.constexpr, WINDOW: tl.constexpr, SEGMENTS: tl.constexpr):
    """The mask of the keys k_idx each query q_idx may see; q_idx / k_idx (and their segment ids)
    come as a column and a row (or a row and a column: the transposed tile) and broadcast."""
    ok = (q_idx < SQ) & (k_idx < SK)
    pos = q_idx + offset
    if CAUSAL:
        ok &= k_idx <= pos
    if WINDOW:
        ok &= pos - k_idx < window
    if SEGMENTS:
        ok &= seg_q == seg_k
    return ok


@triton.jit
def _key_block_mask(n0, rows, seg_rows, SEG, seg_b, SQ, SK, offset, window, BLOCK_N: tl.constexpr,
                    CAUSAL: tl.constexpr, WINDOW: tl.constexpr, SEGMENTS: tl.constexpr):
    """The (rows x keys n0 ..) mask of a query-major kernel's edge block."""
    cols = n0 + tl.arange(0, BLOCK_N)
    seg_cols = cols
    if SEGMENTS:
        seg_cols = tl.load(SEG + seg_b + cols, mask=cols < SK, other=-2)
    return _allowed(rows[:, None], cols[None, :], SQ, SK, offset, window, seg_rows[:, None], seg_cols[None, :],
                    CAUSAL, WINDOW, SEGMENTS)


@triton.jit
def _tile(base, start, stride, limit, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
          CHECK: tl.constexpr):
    """Rows start .. start + BLOCK of a (rows x HEAD_DIM) slab as a (BLOCK x BLOCK_D) tile, zero past
    HEAD_DIM and (CHECK) past `limit` rows. The row offset is int64, the in-tile offsets int32."""
    idx = tl.arange(0, BLOCK)
    dims = tl.arange(0, BLOCK_D)
    ptrs = base + tl.cast(start, tl.int64) * stride + (idx[:, None] * stride + dims[None, :])
    if CHECK:
        tile = tl.load(ptrs, mask=(start + idx[:, None] < limit) & (dims[None, :] < HEAD_DIM), other=0.0)
    elif BLOCK_D == HEAD_DIM:
        tile = tl.load(ptrs)
    else:
        tile = tl.load(ptrs, mask=dims[None, :] < HEAD_DIM, other=0.0)
    return tile


@triton.jit
def _store_tile(base, start, stride, limit, tile, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr,
                BLOCK_D: tl.constexpr):
    idx = tl.arange(0, BLOCK)
    dims = tl.arange(0, BLOCK_D)
    ptrs = base + tl.cast(start, tl.int64) * stride + (idx[:, None] * stride + dims[None, :])
    tl.store(ptrs, tile.to(base.dtype.element_ty), mask=(start + idx[:, None] < limit) & (dims[None, :] < HEAD_DIM))


@triton.jit
def _key_span(m0, SQ, SK, offset, window, START, END, seg_b,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              CAUSAL: tl.constexpr, WINDOW: tl.constexpr, SEGMENTS: tl.constexpr):
    """The keys the query block at m0 visits: [lo, hi) (lo a multiple of BLOCK_N) and within it
    [full_lo, full_hi), the key blocks that every query of the block sees whole (no mask needed:
    inside the causal edge and the window, not past Sk; with documents, none)."""
    lo = 0
    hi = SK
    last = tl.minimum(m0 + BLOCK_M, SQ) - 1
    if CAUSAL:
        hi = tl.minimum(hi, last + offset + 1)
    if WINDOW:
        lo = tl.maximum(lo, m0 + offset - window + 1)
    if SEGMENTS:
        lo = tl.maximum(lo, tl.load(START + seg_b + m0))
        hi = tl.minimum(hi, tl.load(END + seg_b + last))
    lo = (lo // BLOCK_N) * BLOCK_N
    full_lo = lo
    full_hi = (SK // BLOCK_N) * BLOCK_N
    if CAUSAL:  # key block n0 is whole for the first query m0 if n0 + BLOCK_N - 1 <= m0 + offset
        full_hi = tl.minimum(full_hi, ((m0 + offset + 1) // BLOCK_N) * BLOCK_N)
    if WINDOW:  # ... and for the last query if last + offset - n0 < window
        full_lo = tl.maximum(full_lo, last + offset - window + 1)
    if SEGMENTS:
        full_lo = hi
    full_lo = tl.minimum(tl.cdiv(full_lo, BLOCK_N) * BLOCK_N, hi)
    full_hi = tl.maximum(tl.minimum(full_hi, hi), full_lo)
    return lo, full_lo, full_hi, hi


@triton.jit
def _query_span(n0, SQ, SK, offset, window, START, END, seg_b,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                CAUSAL: tl.constexpr, WINDOW: tl.constexpr, SEGMENTS: tl.constexpr):
    """The queries that can see the key block at n0: [lo, hi) (lo a multiple of BLOCK_M) and within
    it [full_lo, full_hi), the query blocks that see the whole key block (no mask needed)."""
    last = tl.minimum(n0 + BLOCK_N, SK) - 1
    lo = 0
    hi = SQ
    if CAUSAL:
        lo = tl.maximum(lo, n0 - offset)
    if WINDOW:
        hi = tl.minimum(hi, last + window - offset)
    if SEGMENTS:
        lo = tl.maximum(lo, tl.load(START + seg_b + n0))
        hi = tl.minimum(hi, tl.load(END + seg_b + last))
    lo = (lo // BLOCK_M) * BLOCK_M
    full_lo = lo
    full_hi = (SQ // BLOCK_M) * BLOCK_M
    if CAUSAL:  # the first query m0 sees the block's last key if n0 + BLOCK_N - 1 <= m0 + offset
        full_lo = tl.maximum(full_lo, n0 + BLOCK_N - 1 - offset)
    if WINDOW:  # the last query m0 + BLOCK_M - 1 sees its first key if that minus n0 is < window - offset
        full_hi = tl.minimum(full_hi, (tl.maximum(n0 + window - offset, 0) // BLOCK_M) * BLOCK_M)
    if SEGMENTS or n0 + BLOCK_N > SK:
        full_lo = hi
    full_lo = tl.minimum(tl.cdiv(full_lo, BLOCK_M) * BLOCK_M, hi)
    full_hi = tl.maximum(tl.minimum(full_hi, hi), full_lo)
    return lo, full_lo, full_hi, hi


@triton.jit
def _query_block(Q, SEG, START, END, sq_b, sq_h, sq_m, H, GROUP, SQ, SK, offset, window,
                 HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
                 SEGMENTS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """What a (query block, head, batch) program starts from: its indices, q tile, segment ids and
    the key spans it visits. The last query blocks (the most keys under a causal mask) run first."""
    m0 = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    bh = b * H + h
    hk = h // GROUP
    rows = m0 + tl.arange(0, BLOCK_M)
    q = _tile(Q + b * sq_b + h * sq_h, m0, sq_m, SQ, BLOCK_M, HEAD_DIM, BLOCK_D, True)
    seg_b = b * SQ
    seg_rows = rows
    if SEGMENTS:
        seg_rows = tl.load(SEG + seg_b + rows, mask=rows < SQ, other=-1)
    lo, full_lo, full_hi, hi = _key_span(m0, SQ, SK, offset, window, START, END, seg_b, BLOCK_M, BLOCK_N,
                                         CAUSAL, WINDOW, SEGMENTS)
    return bh, b, h, hk, m0, rows, q, seg_b, seg_rows, lo, full_lo, full_hi, hi


@triton.jit
def _fwd_blocks(acc, l_i, m_i, q, k_base, v_base, sk_n, sv_n, SEG, seg_b, rows, seg_rows, start, stop,
                SQ, SK, offset, scale, qk_scale, softcap, window, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                CAUSAL: tl.constexpr, SOFTCAP: tl.constexpr, WINDOW: tl.constexpr, SEGMENTS: tl.constexpr,
                PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr):
    """The online softmax over key blocks start .. stop (MASKED: blocks at an edge of the mask)."""
    for n0 in range(start, stop, BLOCK_N):
        k = _tile(k_base, n0, sk_n, SK, BLOCK_N, HEAD_DIM, BLOCK_D, MASKED)
        v = _tile(v_base, n0, sv_n, SK, BLOCK_N, HEAD_DIM, BLOCK_D, MASKED)
        # x: the scores before the base-2 factor (softcapped, or raw with the scale in qk_scale), so
        # x * qk_scale - m is one fused multiply-add
        x = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        if SOFTCAP:
            x = _tanh(x * (scale / softcap)) * softcap
        if MASKED:
            ok = _key_block_mask(n0, rows, seg_rows, SEG, seg_b, SQ, SK, offset, window, BLOCK_N, CAUSAL, WINDOW,
                                 SEGMENTS)
            x = tl.where(ok, x, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(x, 1) * qk_scale)
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(x * qk_scale - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.autotune(configs=_FWD, key=_KEY, prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _attention_fwd_kernel(Q, K, V, O, LSE, SEG, START, END,
                          sq_b, sq_h, sq_m, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, so_b, so_h, so_m,
                          H, GROUP, SQ, SK, offset, scale, softcap, window,
                          HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, SEQ_BUCKET,
                          GROUP_BUCKET, CAUSAL: tl.constexpr, SOFTCAP: tl.constexpr,
                          WINDOW: tl.constexpr, SEGMENTS: tl.constexpr, PRECISION: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """O and base-2 LSE of one (query block, head, batch). Gradient: the two kernels below."""
    bh, b, h, hk, m0, rows, q, seg_b, seg_rows, lo, full_lo, full_hi, hi = _query_block(
        Q, SEG, START, END, sq_b, sq_h, sq_m, H, GROUP, SQ, SK, offset, window,
        HEAD_DIM, BLOCK_D, CAUSAL, WINDOW, SEGMENTS, BLOCK_M, BLOCK_N)
    k_base = K + b * sk_b + hk * sk_h
    v_base = V + b * sv_b + hk * sv_h
    m_i = tl.full([BLOCK_M], _NEG_INIT, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    qk_scale = 1.4426950408889634 if SOFTCAP else scale * 1.4426950408889634
    # the window's edge, the blocks seen whole, the causal diagonal (and documents: all masked)
    acc, l_i, m_i = _fwd_blocks(acc, l_i, m_i, q, k_base, v_base, sk_n, sv_n, SEG, seg_b, rows, seg_rows, lo,
                                full_lo, SQ, SK, offset, scale, qk_scale, softcap, window, HEAD_DIM, BLOCK_D, CAUSAL,
                                SOFTCAP, WINDOW, SEGMENTS, PRECISION, BLOCK_N, True)
    acc, l_i, m_i = _fwd_blocks(acc, l_i, m_i, q, k_base, v_base, sk_n, sv_n, SEG, seg_b, rows, seg_rows, full_lo,
                                full_hi, SQ, SK, offset, scale, qk_scale, softcap, window, HEAD_DIM, BLOCK_D, CAUSAL,
                                SOFTCAP, WINDOW, SEGMENTS, PRECISION, BLOCK_N, False)
    acc, l_i, m_i = _fwd_blocks(acc, l_i, m_i, q, k_base, v_base, sk_n, sv_n, SEG, seg_b, rows, seg_rows, full_hi,
                                hi, SQ, SK, offset, scale, qk_scale, softcap, window, HEAD_DIM, BLOCK_D, CAUSAL,
                                SOFTCAP, WINDOW, SEGMENTS, PRECISION, BLOCK_N, True)
    row_ok = rows < SQ
    l_i = tl.where(row_ok, l_i, 1.0)  # rows past the end saw no key
    _store_tile(O + b * so_b + h * so_h, m0, so_m, SQ, acc / l_i[:, None], BLOCK_M, HEAD_DIM, BLOCK_D)
    tl.store(LSE + bh * SQ + rows, m_i + tl.log2(l_i), mask=row_ok)


@triton.jit
def _attention_bwd_preprocess_kernel(O, DO, DELTA, so_b, so_h, so_m, sdo_b, sdo_h, sdo_m, H, SQ,
                                     HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta_i = sum_d dO_id * O_id (fp32) of one (query block, head, batch)."""
    m0 = tl.program_id(0) * BLOCK_M
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    rows = m0 + tl.arange(0, BLOCK_M)
    o = _tile(O + b * so_b + h * so_h, m0, so_m, SQ, BLOCK_M, HEAD_DIM, BLOCK_D, True)
    do = _tile(DO + b * sdo_b + h * sdo_h, m0, sdo_m, SQ, BLOCK_M, HEAD_DIM, BLOCK_D, True)
    tl.store(DELTA + (b * H + h) * SQ + rows, tl.sum(o.to(tl.float32) * do.to(tl.float32), 1), mask=rows < SQ)


@triton.jit
def _dkdv_blocks(dk, dv, k, v, q_base, do_base, sq_m, sdo_m, LSE, DELTA, SEG, seg_b, bh, cols, seg_cols,
                 start, stop, SQ, SK, offset, scale, softcap, window, HEAD_DIM: tl.constexpr,
                 BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, SOFTCAP: tl.constexpr, WINDOW: tl.constexpr,
                 SEGMENTS: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, MASKED: tl.constexpr):
    """dk, dv of a key block over query blocks start .. stop of one query head, in the transposed
    (keys x queries) tile, so p^T and ds^T feed their products straight from registers."""
    for m0 in range(start, stop, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        q = _tile(q_base, m0, sq_m, SQ, BLOCK_M, HEAD_DIM, BLOCK_D, MASKED)
        do = _tile(do_base, m0, sdo_m, SQ, BLOCK_M, HEAD_DIM, BLOCK_D, MASKED)
        if MASKED:
            lse = tl.load(LSE + bh * SQ + rows, mask=rows < SQ, other=0.0)
            delta = tl.load(DELTA + bh * SQ + rows, mask=rows < SQ, other=0.0)
        else:
            lse = tl.load(LSE + bh * SQ + rows)
            delta = tl.load(DELTA + bh * SQ + rows)
        s_t, t_t = _scores(k, q, scale, softcap, SOFTCAP, PRECISION)  # (keys, queries)
        p_t = tl.exp2(s_t - lse[None, :])
        if MASKED:
            seg_rows = rows
            if SEGMENTS:
                seg_rows = tl.load(SEG + seg_b + rows, mask=rows < SQ, other=-1)
            ok = _allowed(rows[None, :], cols[:, None], SQ, SK, offset, window, seg_rows[None, :],
                          seg_cols[:, None], CAUSAL, WINDOW, SEGMENTS)
            p_t = tl.where(ok, p_t, 0.0)
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        if SOFTCAP:
            ds_t = ds_t * (1.0 - t_t * t_t)
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=PRECISION)
    return dk, dv


@triton.autotune(configs=_DKDV, key=_KEY, prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _attention_bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, SEG, START, END,
                               sq_b, sq_h, sq_m, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n,
                               sdo_b, sdo_h, sdo_m, sdk_b, sdk_h, sdk_n, sdv_b, sdv_h, sdv_n,
                               H, SPLIT, GROUP, SQ, SK, offset, scale, softcap, window,
                               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, SEQ_BUCKET,
                               GROUP_BUCKET, CAUSAL: tl.constexpr, SOFTCAP: tl.constexpr,
                               WINDOW: tl.constexpr, SEGMENTS: tl.constexpr, PRECISION: tl.constexpr,
                               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dk, dv of one (key block, key head x part, batch), summed over the query heads of its part:
    the GROUP query heads reading a key head in SPLIT parts of GROUP / SPLIT each (SPLIT > 1 writes
    each part's sums to its own slot, head index hk * SPLIT + part, for the launcher to add up)."""
    n0 = tl.program_id(0) * BLOCK_N
    slot = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    hk = slot // SPLIT
    per_part = GROUP // SPLIT
    first_head = hk * GROUP + (slot % SPLIT) * per_part
    cols = n0 + tl.arange(0, BLOCK_N)
    k = _tile(K + b * sk_b + hk.to(tl.int64) * sk_h, n0, sk_n, SK, BLOCK_N, HEAD_DIM, BLOCK_D, True)
    v = _tile(V + b * sv_b + hk.to(tl.int64) * sv_h, n0, sv_n, SK, BLOCK_N, HEAD_DIM, BLOCK_D, True)
    seg_b = b * SQ
    seg_cols = cols
    if SEGMENTS:
        seg_cols = tl.load(SEG + seg_b + cols, mask=cols < SK, other=-2)
    lo, full_lo, full_hi, hi = _query_span(n0, SQ, SK, offset, window, START, END, seg_b, BLOCK_M, BLOCK_N,
                                           CAUSAL, WINDOW, SEGMENTS)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for g in range(0, per_part):
        h = (first_head + g).to(tl.int64)
        bh = b * H + h
        q_base = Q + b * sq_b + h * sq_h
        do_base = DO + b * sdo_b + h * sdo_h
        # the causal diagonal, the query blocks that see the key block whole, the window's edge
        dk, dv = _dkdv_blocks(dk, dv, k, v, q_base, do_base, sq_m, sdo_m, LSE, DELTA, SEG, seg_b, bh, cols,
                              seg_cols, lo, full_lo, SQ, SK, offset, scale, softcap, window, HEAD_DIM, BLOCK_D,
                              CAUSAL, SOFTCAP, WINDOW, SEGMENTS, PRECISION, BLOCK_M, True)
        dk, dv = _dkdv_blocks(dk, dv, k, v, q_base, do_base, sq_m, sdo_m, LSE, DELTA, SEG, seg_b, bh, cols,
                              seg_cols, full_lo, full_hi, SQ, SK, offset, scale, softcap, window, HEAD_DIM,
                              BLOCK_D, CAUSAL, SOFTCAP, WINDOW, SEGMENTS, PRECISION, BLOCK_M, False)
        dk, dv = _dkdv_blocks(dk, dv, k, v, q_base, do_base, sq_m, sdo_m, LSE, DELTA, SEG, seg_b, bh, cols,
                              seg_cols, full_hi, hi, SQ, SK, offset, scale, softcap, window, HEAD_DIM, BLOCK_D,
                              CAUSAL, SOFTCAP, WINDOW, SEGMENTS, PRECISION, BLOCK_M, True)
    _store_tile(DK + b * sdk_b + slot.to(tl.int64) * sdk_h, n0, sdk_n, SK, dk * scale, BLOCK_N, HEAD_DIM, BLOCK_D)
    _store_tile(DV + b * sdv_b + slot.to(tl.int64) * sdv_h, n0, sdv_n, SK, dv, BLOCK_N, HEAD_DIM, BLOCK_D)


@triton.jit
def _dq_blocks(dq, q, do, lse, delta, k_base, v_base, sk_n, sv_n, SEG, seg_b, rows, seg_rows, start, stop,
               SQ, SK, offset, scale, softcap, window, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
               CAUSAL: tl.constexpr, SOFTCAP: tl.constexpr, WINDOW: tl.constexpr, SEGMENTS: tl.constexpr,
               PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr):
    """dq of a query block over key blocks start .. stop."""
    for n0 in range(start, stop, BLOCK_N):
        k = _tile(k_base, n0, sk_n, SK, BLOCK_N, HEAD_DIM, BLOCK_D, MASKED)
        v = _tile(v_base, n0, sv_n, SK, BLOCK_N, HEAD_DIM, BLOCK_D, MASKED)
        s, t = _scores(q, k, scale, softcap, SOFTCAP, PRECISION)
        p = tl.exp2(s - lse[:, None])
        if MASKED:
            ok = _key_block_mask(n0, rows, seg_rows, SEG, seg_b, SQ, SK, offset, window, BLOCK_N, CAUSAL, WINDOW,
                                 SEGMENTS)
            p = tl.where(ok, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        if SOFTCAP:
            ds = ds * (1.0 - t * t)
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)
    return dq


@triton.autotune(configs=_DQ, key=_KEY, prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _attention_bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, SEG, START, END,
                             sq_b, sq_h, sq_m, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n,
                             sdo_b, sdo_h, sdo_m, sdq_b, sdq_h, sdq_m,
                             H, GROUP, SQ, SK, offset, scale, softcap, window,
                             HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, SEQ_BUCKET,
                             GROUP_BUCKET, CAUSAL: tl.constexpr, SOFTCAP: tl.constexpr,
                             WINDOW: tl.constexpr, SEGMENTS: tl.constexpr, PRECISION: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dq of one (query block, head, batch)."""
    bh, b, h, hk, m0, rows, q, seg_b, seg_rows, lo, full_lo, full_hi, hi = _query_block(
        Q, SEG, START, END, sq_b, sq_h, sq_m, H, GROUP, SQ, SK, offset, window,
        HEAD_DIM, BLOCK_D, CAUSAL, WINDOW, SEGMENTS, BLOCK_M, BLOCK_N)
    do = _tile(DO + b * sdo_b + h * sdo_h, m0, sdo_m, SQ, BLOCK_M, HEAD_DIM, BLOCK_D, True)
    lse = tl.load(LSE + bh * SQ + rows, mask=rows < SQ, other=0.0)
    delta = tl.load(DELTA + bh * SQ + rows, mask=rows < SQ, other=0.0)
    k_base = K + b * sk_b + hk * sk_h
    v_base = V + b * sv_b + hk * sv_h
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    dq = _dq_blocks(dq, q, do, lse, delta, k_base, v_base, sk_n, sv_n, SEG, seg_b, rows, seg_rows, lo, full_lo,
                    SQ, SK, offset, scale, softcap, window, HEAD_DIM, BLOCK_D, CAUSAL, SOFTCAP, WINDOW, SEGMENTS,
                    PRECISION, BLOCK_N, True)
    dq = _dq_blocks(dq, q, do, lse, delta, k_base, v_base, sk_n, sv_n, SEG, seg_b, rows, seg_rows, full_lo,
                    full_hi, SQ, SK, offset, scale, softcap, window, HEAD_DIM, BLOCK_D, CAUSAL, SOFTCAP, WINDOW,
                    SEGMENTS, PRECISION, BLOCK_N, False)
    dq = _dq_blocks(dq, q, do, lse, delta, k_base, v_base, sk_n, sv_n, SEG, seg_b, rows, seg_rows, full_hi, hi,
                    SQ, SK, offset, scale, softcap, window, HEAD_DIM, BLOCK_D, CAUSAL, SOFTCAP, WINDOW, SEGMENTS,
                    PRECISION, BLOCK_N, True)
    _store_tile(DQ + b * sdq_b + h * sdq_h, m0, sdq_m, SQ, dq * scale, BLOCK_M, HEAD_DIM, BLOCK_D)


def _strides(t: torch.Tensor):
    """(batch, head, seq) strides of a (B, H, S, D) tensor with a unit last stride."""
    return t.stride(0), t.stride(1), t.stride(2)


def _options(q, k, causal, scale, softcap, window, segments):
    """Launch arguments shared by the three kernels: sizes, scalars and the compile-time switches."""
    batch, heads, sq, head_dim = q.shape
    sk = k.shape[2]
    group = heads // k.shape[1]
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    scalars = dict(GROUP=group, SQ=sq, SK=sk, offset=sk - sq, scale=scale, softcap=softcap or 1.0,
                   window=window or 0, SEQ_BUCKET=min(next_power_of_2(sq), 1 << 16), GROUP_BUCKET=min(group, 8))
    constants = dict(HEAD_DIM=head_dim, BLOCK_D=max(16, next_power_of_2(head_dim)),
                     CAUSAL=causal, SOFTCAP=bool(softcap), WINDOW=bool(window), SEGMENTS=segments is not None,
                     PRECISION=precision)
    if segments is None:
        seg = start = end = q.new_zeros(1, dtype=torch.int32)
    else:
        seg, start, end = segments
    return batch, heads, seg, start, end, scalars, constants


def _interpreter_fp32(tensors):
    """The interpreter's bf16 tl.dot is wrong: there, bf16 operands are computed in fp32 (the GPU
    path rounds p to bf16 before p @ v; the tests' bf16 bands hold either way)."""
    if interpreting() and tensors[0].dtype == torch.bfloat16:
        return [t.float() for t in tensors], True
    return tensors, False


def attention_fwd(q, k, v, causal: bool, scale: float, softcap: float | None = None, window: int | None = None,
                  segments=None):
    """(out, lse): out (B, Hq, Sq, D) in q's dtype, laid out as (B, Sq, Hq, D) in memory (so
    out.transpose(1, 2) is contiguous); lse (B, Hq, Sq) fp32 in base 2. segments: None or
    (run ids, run start, run end), each (B, S) int32 (see fusetune.ops.attention.segments)."""
    (q, k, v), upcast = _interpreter_fp32([q, k, v])
    if upcast:
        out, lse = attention_fwd(q, k, v, causal, scale, softcap, window, segments)
        return out.to(torch.bfloat16), lse
    batch, heads, seg, start, end, scalars, constants = _options(q, k, causal, scale, softcap, window, segments)
    sq, head_dim = q.shape[2], q.shape[3]
    out = torch.empty(batch, sq, heads, head_dim, dtype=q.dtype, device=q.device).transpose(1, 2)
    lse = torch.empty(batch, heads, sq, dtype=torch.float32, device=q.device)

    def grid(meta):
        return triton.cdiv(sq, meta["BLOCK_M"]), heads, batch

    _attention_fwd_kernel[grid](q, k, v, out, lse, seg, start, end, *_strides(q), *_strides(k), *_strides(v),
                                *_strides(out), heads, **scalars, **constants)
    return out, lse


def attention_bwd(dout, q, k, v, out, lse, causal: bool, scale: float, softcap: float | None = None,
                  window: int | None = None, segments=None):
    """(dq, dk, dv), each in its input's dtype and memory layout."""
    (dout, q, k, v, out), upcast = _interpreter_fp32([dout, q, k, v, out])
    if upcast:
        grads = attention_bwd(dout, q, k, v, out, lse, causal, scale, softcap, window, segments)
        return tuple(g.to(torch.bfloat16) for g in grads)
    batch, heads, seg, start, end, scalars, constants = _options(q, k, causal, scale, softcap, window, segments)
    sq, head_dim = q.shape[2], q.shape[3]
    kv_heads, sk = k.shape[1], k.shape[2]
    delta = torch.empty_like(lse)
    block_m = 16 if interpreting() else 64
    _attention_bwd_preprocess_kernel[(triton.cdiv(sq, block_m), heads, batch)](
        out, dout, delta, *_strides(out), *_strides(dout), heads, sq, HEAD_DIM=head_dim,
        BLOCK_D=constants["BLOCK_D"], BLOCK_M=block_m)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    # few key blocks x key heads fill the GPU poorly: split each key head's query heads across programs
    # (fp32 partial sums added up below: deterministic, no atomics)
    group = heads // kv_heads
    split = group if triton.cdiv(sk, 128) * batch * kv_heads < 2 * program_count(q.device, per_sm=1) else 1
    if split > 1:
        dk_parts = torch.empty(batch, kv_heads * split, sk, head_dim, dtype=torch.float32, device=q.device)
        dv_parts = torch.empty_like(dk_parts)
    else:
        dk_parts, dv_parts = dk, dv

    def key_grid(meta):
        return triton.cdiv(sk, meta["BLOCK_N"]), kv_heads * split, batch

    _attention_bwd_dkdv_kernel[key_grid](q, k, v, dout, lse, delta, dk_parts, dv_parts, seg, start, end,
                                         *_strides(q), *_strides(k), *_strides(v), *_strides(dout),
                                         *_strides(dk_parts), *_strides(dv_parts), heads, split,
                                         **scalars, **constants)
    if split > 1:
        dk.copy_(dk_parts.view(batch, kv_heads, split, sk, head_dim).sum(2))
        dv.copy_(dv_parts.view(batch, kv_heads, split, sk, head_dim).sum(2))

    def query_grid(meta):
        return triton.cdiv(sq, meta["BLOCK_M"]), heads, batch

    _attention_bwd_dq_kernel[query_grid](q, k, v, dout, lse, delta, dq, seg, start, end,
                                         *_strides(q), *_strides(k), *_strides(v), *_strides(dout),
                                         *_strides(dq), heads, **scalars, **constants)
    return dq, dk, dv
