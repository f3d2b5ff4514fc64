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
query blocks that can see it. Offsets are int64 (a 600k-token row of 32 x 128 heads passes 2^31).
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
    _FWD = _configs((128, 64, 8, 3), (128, 128, 8, 2), (128, 64, 4, 3), (64, 64, 4, 3))
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
def _scores(q, k, scale, softcap, SOFTCAP: tl.constexpr, PRECISION: tl.constexpr):
    """(s in base 2, tanh(x / c) for the softcap's derivative, or 0) of one (rows x cols) tile."""
    x = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
    if SOFTCAP:
        t = _tanh(x / softcap)
        return t * (softcap * 1.4426950408889634), t
    return x * 1.4426950408889634, x * 0.0


@triton.jit
def _allowed(rows, cols, SQ, SK, offset, window, seg_rows, seg_cols,
             CAUSAL: tl.constexpr, WINDOW: tl.constexpr, SEGMENTS: tl.constexpr):
    """The (rows x cols) mask of key cols each query row may see."""
    ok = (rows[:, None] < SQ) & (cols[None, :] < SK)
    pos = rows + offset
    if CAUSAL:
        ok &= cols[None, :] <= pos[:, None]
    if WINDOW:
        ok &= pos[:, None] - cols[None, :] < window
    if SEGMENTS:
        ok &= seg_rows[:, None] == seg_cols[None, :]
    return ok


@triton.jit
def _key_span(m0, SQ, SK, offset, window, START, END, seg_b,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              CAUSAL: tl.constexpr, WINDOW: tl.constexpr, SEGMENTS: tl.constexpr):
    """[lo, hi) of the keys the query block at m0 can see (lo a multiple of BLOCK_N)."""
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
    return (lo // BLOCK_N) * BLOCK_N, hi


@triton.jit
def _query_block(Q, SEG, START, END, sq_b, sq_h, sq_m, H, GROUP, SQ, SK, offset, window,
                 HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
                 SEGMENTS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """What a (query block, batch x head) program starts from: its indices, q tile, segment ids and
    the span [lo, hi) of keys it visits."""
    m0 = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    hk = h // GROUP
    rows = m0 + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims[None, :] < HEAD_DIM
    q = tl.load(Q + b * sq_b + h * sq_h + rows[:, None].to(tl.int64) * sq_m + dims[None, :],
                mask=(rows[:, None] < SQ) & dim_ok, other=0.0)
    seg_b = b * SQ
    seg_rows = rows
    if SEGMENTS:
        seg_rows = tl.load(SEG + seg_b + rows, mask=rows < SQ, other=-1)
    lo, hi = _key_span(m0, SQ, SK, offset, window, START, END, seg_b, BLOCK_M, BLOCK_N, CAUSAL, WINDOW, SEGMENTS)
    return bh, b, h, hk, rows, dims, dim_ok, q, seg_b, seg_rows, lo, hi


@triton.autotune(configs=_FWD, key=_KEY, prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _attention_fwd_kernel(Q, K, V, O, LSE, SEG, START, END,
                          sq_b, sq_h, sq_m, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, so_b, so_h, so_m,
                          H, GROUP, SQ, SK, offset, scale, softcap, window,
                          HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, SEQ_BUCKET,
                          GROUP_BUCKET, CAUSAL: tl.constexpr, SOFTCAP: tl.constexpr,
                          WINDOW: tl.constexpr, SEGMENTS: tl.constexpr, PRECISION: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """O and base-2 LSE of one (query block, batch x head). Gradient: the two kernels below."""
    bh, b, h, hk, rows, dims, dim_ok, q, seg_b, seg_rows, lo, hi = _query_block(
        Q, SEG, START, END, sq_b, sq_h, sq_m, H, GROUP, SQ, SK, offset, window,
        HEAD_DIM, BLOCK_D, CAUSAL, WINDOW, SEGMENTS, BLOCK_M, BLOCK_N)

    k_base = K + b * sk_b + hk * sk_h
    v_base = V + b * sv_b + hk * sv_h
    m_i = tl.full([BLOCK_M], _NEG_INIT, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for n0 in range(lo, hi, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols[:, None] < SK
        k = tl.load(k_base + cols[:, None].to(tl.int64) * sk_n + dims[None, :], mask=col_ok & dim_ok, other=0.0)
        v = tl.load(v_base + cols[:, None].to(tl.int64) * sv_n + dims[None, :], mask=col_ok & dim_ok, other=0.0)
        s, _ = _scores(q, k, scale, softcap, SOFTCAP, PRECISION)
        seg_cols = cols
        if SEGMENTS:
            seg_cols = tl.load(SEG + seg_b + cols, mask=cols < SK, other=-2)
        s = tl.where(_allowed(rows, cols, SQ, SK, offset, window, seg_rows, seg_cols, CAUSAL, WINDOW, SEGMENTS),
                     s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    row_ok = rows < SQ
    l_i = tl.where(row_ok, l_i, 1.0)  # rows past the end saw no key
    acc = acc / l_i[:, None]
    tl.store(O + b * so_b + h * so_h + rows[:, None].to(tl.int64) * so_m + dims[None, :],
             acc.to(O.dtype.element_ty), mask=row_ok[:, None] & dim_ok)
    tl.store(LSE + bh.to(tl.int64) * SQ + rows, m_i + tl.log2(l_i), mask=row_ok)


@triton.jit
def _attention_bwd_preprocess_kernel(O, DO, DELTA, so_b, so_h, so_m, sdo_b, sdo_h, sdo_m, H, SQ,
                                     HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta_i = sum_d dO_id * O_id (fp32) of one (query block, batch x head)."""
    m0 = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    rows = m0 + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    mask = (rows[:, None] < SQ) & (dims[None, :] < HEAD_DIM)
    o = tl.load(O + b * so_b + h * so_h + rows[:, None].to(tl.int64) * so_m + dims[None, :], mask=mask, other=0.0)
    do = tl.load(DO + b * sdo_b + h * sdo_h + rows[:, None].to(tl.int64) * sdo_m + dims[None, :], mask=mask,
                 other=0.0)
    tl.store(DELTA + bh.to(tl.int64) * SQ + rows, tl.sum(o.to(tl.float32) * do.to(tl.float32), 1), mask=rows < SQ)


@triton.autotune(configs=_DKDV, key=_KEY, prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _attention_bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, SEG, START, END,
                               sq_b, sq_h, sq_m, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n,
                               sdo_b, sdo_h, sdo_m, sdk_b, sdk_h, sdk_n, sdv_b, sdv_h, sdv_n,
                               H, HK, SPLIT, GROUP, SQ, SK, offset, scale, softcap, window,
                               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, SEQ_BUCKET,
                               GROUP_BUCKET, CAUSAL: tl.constexpr, SOFTCAP: tl.constexpr,
                               WINDOW: tl.constexpr, SEGMENTS: tl.constexpr, PRECISION: tl.constexpr,
                               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dk, dv of one (key block, batch x key head x part), summed over the query heads of its part:
    the GROUP query heads reading a key head in SPLIT parts of GROUP / SPLIT each (SPLIT > 1 writes
    each part's sums to its own slot, head index hk * SPLIT + part, for the launcher to add up)."""
    n0 = tl.program_id(0) * BLOCK_N
    bhs = tl.program_id(1)
    b = (bhs // (HK * SPLIT)).to(tl.int64)
    slot = bhs % (HK * SPLIT)
    hk = slot // SPLIT
    per_part = GROUP // SPLIT
    first_head = hk * GROUP + (slot % SPLIT) * per_part
    cols = n0 + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims[None, :] < HEAD_DIM
    col_ok = cols[:, None] < SK
    k = tl.load(K + b * sk_b + hk.to(tl.int64) * sk_h + cols[:, None].to(tl.int64) * sk_n + dims[None, :],
                mask=col_ok & dim_ok, other=0.0)
    v = tl.load(V + b * sv_b + hk.to(tl.int64) * sv_h + cols[:, None].to(tl.int64) * sv_n + dims[None, :],
                mask=col_ok & dim_ok, other=0.0)
    seg_b = b * SQ
    seg_cols = cols
    if SEGMENTS:
        seg_cols = tl.load(SEG + seg_b + cols, mask=cols < SK, other=-2)

    # the queries that can see this key block
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

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for g in range(0, per_part):
        h = first_head + g
        bh = b * H + h
        q_base = Q + b * sq_b + h.to(tl.int64) * sq_h
        do_base = DO + b * sdo_b + h.to(tl.int64) * sdo_h
        for m0 in range(lo, hi, BLOCK_M):
            rows = m0 + tl.arange(0, BLOCK_M)
            row_ok = rows[:, None] < SQ
            q = tl.load(q_base + rows[:, None].to(tl.int64) * sq_m + dims[None, :], mask=row_ok & dim_ok, other=0.0)
            do = tl.load(do_base + rows[:, None].to(tl.int64) * sdo_m + dims[None, :], mask=row_ok & dim_ok,
                         other=0.0)
            lse = tl.load(LSE + bh * SQ + rows, mask=rows < SQ, other=0.0)
            delta = tl.load(DELTA + bh * SQ + rows, mask=rows < SQ, other=0.0)
            seg_rows = rows
            if SEGMENTS:
                seg_rows = tl.load(SEG + seg_b + rows, mask=rows < SQ, other=-1)
            s, t = _scores(q, k, scale, softcap, SOFTCAP, PRECISION)  # (rows, cols)
            ok = _allowed(rows, cols, SQ, SK, offset, window, seg_rows, seg_cols, CAUSAL, WINDOW, SEGMENTS)
            p = tl.where(ok, tl.exp2(s - lse[:, None]), 0.0)
            dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
            ds = p * (dp - delta[:, None])
            if SOFTCAP:
                ds = ds * (1.0 - t * t)
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)
    out_ok = col_ok & dim_ok
    tl.store(DK + b * sdk_b + slot.to(tl.int64) * sdk_h + cols[:, None].to(tl.int64) * sdk_n + dims[None, :],
             (dk * scale).to(DK.dtype.element_ty), mask=out_ok)
    tl.store(DV + b * sdv_b + slot.to(tl.int64) * sdv_h + cols[:, None].to(tl.int64) * sdv_n + dims[None, :],
             dv.to(DV.dtype.element_ty), mask=out_ok)


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
    """dq of one (query block, batch x head)."""
    bh, b, h, hk, rows, dims, dim_ok, q, seg_b, seg_rows, lo, hi = _query_block(
        Q, SEG, START, END, sq_b, sq_h, sq_m, H, GROUP, SQ, SK, offset, window,
        HEAD_DIM, BLOCK_D, CAUSAL, WINDOW, SEGMENTS, BLOCK_M, BLOCK_N)
    row_ok = rows[:, None] < SQ
    do = tl.load(DO + b * sdo_b + h * sdo_h + rows[:, None].to(tl.int64) * sdo_m + dims[None, :],
                 mask=row_ok & dim_ok, other=0.0)
    lse = tl.load(LSE + bh.to(tl.int64) * SQ + rows, mask=rows < SQ, other=0.0)
    delta = tl.load(DELTA + bh.to(tl.int64) * SQ + rows, mask=rows < SQ, other=0.0)

    k_base = K + b * sk_b + hk * sk_h
    v_base = V + b * sv_b + hk * sv_h
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for n0 in range(lo, hi, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols[:, None] < SK
        k = tl.load(k_base + cols[:, None].to(tl.int64) * sk_n + dims[None, :], mask=col_ok & dim_ok, other=0.0)
        v = tl.load(v_base + cols[:, None].to(tl.int64) * sv_n + dims[None, :], mask=col_ok & dim_ok, other=0.0)
        seg_cols = cols
        if SEGMENTS:
            seg_cols = tl.load(SEG + seg_b + cols, mask=cols < SK, other=-2)
        s, t = _scores(q, k, scale, softcap, SOFTCAP, PRECISION)
        ok = _allowed(rows, cols, SQ, SK, offset, window, seg_rows, seg_cols, CAUSAL, WINDOW, SEGMENTS)
        p = tl.where(ok, tl.exp2(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        if SOFTCAP:
            ds = ds * (1.0 - t * t)
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    tl.store(DQ + b * sdq_b + h * sdq_h + rows[:, None].to(tl.int64) * sdq_m + dims[None, :],
             (dq * scale).to(DQ.dtype.element_ty), mask=row_ok & dim_ok)


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
        return triton.cdiv(sq, meta["BLOCK_M"]), batch * heads

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
    _attention_bwd_preprocess_kernel[(triton.cdiv(sq, block_m), batch * heads)](
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
        return triton.cdiv(sk, meta["BLOCK_N"]), batch * kv_heads * split

    _attention_bwd_dkdv_kernel[key_grid](q, k, v, dout, lse, delta, dk_parts, dv_parts, seg, start, end,
                                         *_strides(q), *_strides(k), *_strides(v), *_strides(dout),
                                         *_strides(dk_parts), *_strides(dv_parts), heads, kv_heads, split,
                                         **scalars, **constants)
    if split > 1:
        dk.copy_(dk_parts.view(batch, kv_heads, split, sk, head_dim).sum(2))
        dv.copy_(dv_parts.view(batch, kv_heads, split, sk, head_dim).sum(2))

    def query_grid(meta):
        return triton.cdiv(sq, meta["BLOCK_M"]), batch * heads

    _attention_bwd_dq_kernel[query_grid](q, k, v, dout, lse, delta, dq, seg, start, end,
                                         *_strides(q), *_strides(k), *_strides(v), *_strides(dout),
                                         *_strides(dq), heads, **scalars, **constants)
    return dq, dk, dv
