"""Flash attention against its float64 reference: forward and every gradient, every feature."""
import pytest
import torch

from fusetune import use_backend
from fusetune.ops.attention import attention, segments
from fusetune.reference.attention import attention as reference
from tests.numerics import assert_close, leaf


def random_documents(batch, seq, lengths=None):
    """(B, S) segment ids: documents of the given lengths (cycled), else random lengths 1..17."""
    rows = []
    for _ in range(batch):
        ids, doc = [], 0
        while len(ids) < seq:
            n = lengths[doc % len(lengths)] if lengths else int(torch.randint(1, 18, ()))
            ids += [doc] * n
            doc += 1
        rows.append(ids[:seq])
    return torch.tensor(rows)


def check(batch, hq, hk, sq, sk, d, dtype, device, *, causal=True, scale=None, softcap=None, window=None,
          segment_ids=None, layout="hf"):
    """Run the kernel on fresh inputs and compare output and dq, dk, dv with float64."""
    if layout == "hf":  # Hugging Face's (B, S, H, D) memory, transposed views
        qb = leaf(torch.randn(batch, sq, hq, d, dtype=dtype, device=device))
        kb = leaf(torch.randn(batch, sk, hk, d, dtype=dtype, device=device))
        vb = leaf(torch.randn(batch, sk, hk, d, dtype=dtype, device=device))
        views = lambda t: t.transpose(1, 2)  # noqa: E731
    elif layout == "nan-margins":  # views into NaN-filled buffers: a read past seq or head_dim poisons the result
        def inside(seq, heads):
            buffer = torch.full((batch, seq + 17, heads, d + 16), float("nan"), dtype=dtype, device=device)
            buffer[:, :seq, :, :d] = torch.randn(batch, seq, heads, d, dtype=dtype, device=device)
            return buffer[:, :seq, :, :d].detach().requires_grad_()  # a leaf that keeps the margins
        qb, kb, vb = inside(sq, hq), inside(sk, hk), inside(sk, hk)
        views = lambda t: t.transpose(1, 2)  # noqa: E731
    else:
        qb = leaf(torch.randn(batch, hq, sq, d, dtype=dtype, device=device))
        kb = leaf(torch.randn(batch, hk, sk, d, dtype=dtype, device=device))
        vb = leaf(torch.randn(batch, hk, sk, d, dtype=dtype, device=device))
        views = lambda t: t  # noqa: E731
    if segment_ids is not None:
        segment_ids = segment_ids.to(device)
    out = attention(views(qb), views(kb), views(vb), causal, scale, softcap, window, segment_ids)
    grad = torch.randn_like(out) * 0.5 + 0.25  # grad_output != 1
    out.backward(grad)
    q64, k64, v64 = (leaf(t.double()) for t in (qb, kb, vb))
    ref, _ = reference(views(q64), views(k64), views(v64), causal, scale, softcap, window, segment_ids)
    ref.backward(grad.double())
    assert out.shape == (batch, hq, sq, d) and out.dtype == dtype
    assert out.transpose(1, 2).is_contiguous()
    assert_close(out, ref, dtype, "out")
    for name, ours, truth in (("dq", qb, q64), ("dk", kb, k64), ("dv", vb, v64)):
        assert_close(ours.grad, truth.grad, dtype, name)


CASES = [  # (batch, q heads, kv heads, seq, head_dim)
    (2, 4, 2, 37, 64),   # GQA, seq not a block multiple
    (1, 3, 1, 17, 80),   # MQA, head dim 80 (padded to 128 in the tile)
    (1, 2, 2, 33, 96),
    (1, 2, 1, 20, 128),
]


@pytest.mark.parametrize("shape", CASES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_matches_float64(shape, causal, device, poison):
    batch, hq, hk, seq, d = shape
    check(batch, hq, hk, seq, seq, d, torch.float32, device, causal=causal)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_softcap_and_query_scale(dtype, device):
    # Gemma-2: scale = query_pre_attn_scalar ** -0.5 (not head_dim's), softcap 50 (small here, so it bites)
    check(1, 4, 2, 29, 29, 64, dtype, device, scale=144 ** -0.5, softcap=2.0)


@pytest.mark.parametrize("window", [1, 5, 16])
def test_sliding_window(window, device):
    check(2, 2, 1, 40, 40, 64, torch.float32, device, window=window)


def test_sliding_window_with_softcap_and_documents(device):
    ids = random_documents(2, 45)
    check(2, 4, 2, 45, 45, 64, torch.float32, device, softcap=3.0, window=7, segment_ids=ids)


@pytest.mark.parametrize("lengths", [[1], [2], [17], [1, 2, 17, 5], None], ids=["1", "2", "17", "mixed", "random"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_packed_documents(lengths, causal, device):
    check(2, 4, 2, 50, 50, 64, torch.float32, device, causal=causal, segment_ids=random_documents(2, 50, lengths))


def test_documents_equal_separate_calls(device):
    """Each packed document's output is the attention of that document alone (nothing crosses)."""
    lengths = [7, 1, 19, 4]
    seq = sum(lengths)
    ids = random_documents(1, seq, lengths).to(device)
    q, k, v = (torch.randn(1, 2, seq, 64, device=device) for _ in range(3))
    packed = attention(q, k, v, segment_ids=ids)
    start = 0
    for n in lengths:
        part = slice(start, start + n)
        alone = attention(q[:, :, part], k[:, :, part], v[:, :, part])
        assert_close(packed[:, :, part], alone, torch.float32, f"document at {start}")
        start += n


def test_rows_long_enough_for_one_program_per_key_head(device):
    """Enough key blocks that the backward runs one program per key head (short rows split each key
    head's query heads across programs): both paths are covered."""
    check(2, 4, 2, 300, 300, 64, torch.float32, device, segment_ids=random_documents(2, 300, [90, 7, 130]))


def test_queries_after_a_cache(device):
    """Sq < Sk: the queries are the last positions (a block appended to a KV cache)."""
    check(2, 4, 2, 9, 30, 64, torch.float32, device)
    check(1, 2, 1, 1, 21, 64, torch.float32, device, window=6)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("sq", [70, 41, 1])
def test_mask_edges_and_blocks_seen_whole(sq, causal, device):
    """Key blocks every query of a block sees whole skip the mask, the rest (causal diagonal, the
    window's edge, a partial last block, queries after a cache) keep it: rows of several blocks,
    windows of random widths."""
    for window in (None, int(torch.randint(1, 70, ()))):
        check(1, 2, 1, sq, 70, 64, torch.float32, device, causal=causal, window=window, layout="nan-margins")
    check(1, 2, 1, sq, 70, 80, torch.float32, device, causal=causal, layout="nan-margins")  # head dim padded in the tile


def test_fp16_matches_float64(device):
    check(2, 4, 2, 37, 37, 64, torch.float16, device, segment_ids=random_documents(2, 37))


def test_head_major_layout(device):
    check(1, 4, 1, 19, 19, 64, torch.float32, device, layout="bhsd")


def test_segments_metadata():
    ids = torch.tensor([[5, 5, 5, 2, 7, 7], [0, 0, 0, 0, 0, 0]])
    runs, start, end = segments(ids)
    assert runs.tolist() == [[0, 0, 0, 1, 2, 2], [0] * 6]
    assert start.tolist() == [[0, 0, 0, 3, 4, 4], [0] * 6]
    assert end.tolist() == [[3, 3, 3, 4, 6, 6], [6] * 6]
    assert runs.dtype == torch.int32


def test_torch_backend_is_the_reference(device):
    q, k, v = (torch.randn(1, 2, 11, 64, device=device) for _ in range(3))
    with use_backend("torch"):
        out = attention(q, k, v, softcap=5.0, window=4)
    assert_close(out, reference(q, k, v, True, None, 5.0, 4)[0], torch.float32, "torch backend")


@pytest.mark.parametrize("bad, message", [
    (dict(q=torch.randn(1, 3, 8, 64), k=torch.randn(1, 2, 8, 64)), "not a multiple"),
    (dict(q=torch.randn(1, 2, 8, 512), k=torch.randn(1, 2, 8, 512)), "head_dim 512"),
    (dict(q=torch.randn(1, 2, 8, 64, dtype=torch.float64)), "float16, bfloat16 or float32"),
    (dict(q=torch.randn(1, 2, 9, 64), k=torch.randn(1, 2, 8, 64)), "only 8 keys"),
    (dict(segment_ids=torch.zeros(1, 7, dtype=torch.long)), "segment_ids"),
    (dict(segment_ids=torch.zeros(1, 8)), "must be integers"),
    (dict(window=0), "window"),
    (dict(softcap=-1.0), "softcap"),
])
def test_bad_input_is_named(bad, message):
    args = dict(q=torch.randn(1, 2, 8, 64), k=torch.randn(1, 2, 8, 64), segment_ids=None, window=None, softcap=None)
    args.update(bad)
    k = args.pop("k")
    with pytest.raises((ValueError, TypeError), match=message):
        attention(args.pop("q"), k, k, **args)


@pytest.mark.gpu
@pytest.mark.parametrize("d", [64, 80, 96, 128, 256])
def test_real_shapes_bf16_on_gpu(d, device):
    ids = random_documents(1, 4099, [700, 1, 2, 1400, 33])
    heads = (32, 8) if d <= 128 else (8, 4)
    check(1, *heads, 4099, 4099, d, torch.bfloat16, device, segment_ids=ids)
    check(1, *heads, 4099, 4099, d, torch.bfloat16, device)  # plain causal: most key blocks seen whole
    check(2, *heads, 1000, 3001, d, torch.bfloat16, device, causal=False)
    check(2, 16, 8, 2048, 2048, d, torch.bfloat16, device, softcap=50.0, window=1024, scale=0.0625)
