import pytest
import torch

from fusetune import use_backend
from fusetune.ops import rope
from fusetune.reference.rope import rope as reference
from tests.helpers import BACKENDS, on_backend
from tests.numerics import assert_close, leaf

# (batch, q heads, k heads, seq, head_dim, rotary dims, cos/sin form)
CASES = [
    (2, 6, 2, 17, 64, 64, "per-batch"),
    (2, 6, 2, 17, 64, 48, "shared"),     # partial rotary
    (1, 4, 4, 5, 128, 128, "2-d"),
    (3, 3, 1, 7, 128, 96, "per-batch"),  # phi-4-mini style: 96 of 128, a half that is not 2^k
]


def hf_cos_sin(batch, seq, rd, form, dtype, device, theta=10000.0):
    """cos/sin as Hugging Face's rotary embedding gathers them: per-batch forms get different
    (random, packed-like) positions per sequence, the others one shared arange."""
    if form == "per-batch":
        pos = torch.randint(0, 4096, (batch, seq), device=device)
    else:
        pos = torch.arange(seq, device=device)[None] + int(torch.randint(0, 100, ()))
    inv_freq = 1.0 / theta ** (torch.arange(0, rd, 2, device=device, dtype=torch.float64) / rd)
    freqs = pos[..., None].double() * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    return (cos[0], sin[0]) if form == "2-d" else (cos, sin)


def make_qk(batch, hq, hk, seq, d, dtype, device, transposed):
    """Leaves in memory layout, and (B, H, S, D) views of them (HF's transposed views if asked)."""
    if transposed:
        qb = leaf(torch.randn(batch, seq, hq, d, device=device, dtype=dtype))
        kb = leaf(torch.randn(batch, seq, hk, d, device=device, dtype=dtype))
        return qb, kb, qb.transpose(1, 2), kb.transpose(1, 2)
    qb = leaf(torch.randn(batch, hq, seq, d, device=device, dtype=dtype))
    kb = leaf(torch.randn(batch, hk, seq, d, device=device, dtype=dtype))
    return qb, kb, qb, kb


def not_a_view(t):
    """A copy of t with t's strides that is no view (autograd allows it to be modified in place)."""
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device).copy_(t)


def check_against_reference(qb, kb, cos, sin, outs, grads, transposed, dtype):
    """outs = rope(q, k, cos, sin) for q, k built by make_qk from the leaves qb, kb; grads were
    back-propagated through outs."""
    (q_out, k_out), (dq_out, dk_out) = outs, grads
    qb64, kb64 = leaf(qb.double()), leaf(kb.double())
    q64, k64 = (qb64.transpose(1, 2), kb64.transpose(1, 2)) if transposed else (qb64, kb64)
    ref = reference(q64, k64, cos.double(), sin.double())
    torch.autograd.backward(ref, [dq_out.double(), dk_out.double()])
    assert q_out.dtype == qb.dtype and k_out.dtype == kb.dtype
    assert_close(q_out, ref[0], dtype, "q_out")
    assert_close(k_out, ref[1], dtype, "k_out")
    assert_close(qb.grad, qb64.grad, dtype, "dq")
    assert_close(kb.grad, kb64.grad, dtype, "dk")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", CASES)
def test_matches_float64_reference(backend, inplace, transposed, dtype, case, device, poison):
    batch, hq, hk, seq, d, rd, form = case
    qb, kb, q, k = make_qk(batch, hq, hk, seq, d, dtype, device, transposed)
    cos, sin = hf_cos_sin(batch, seq, rd, form, dtype, device)  # HF casts cos/sin to q's dtype
    if inplace:
        q, k = not_a_view(q), not_a_view(k)
    q_before, k_before = q.detach().clone(), k.detach().clone()
    with on_backend(backend):
        q_out, k_out = rope(q, k, cos, sin, inplace=inplace)
    if inplace:
        assert q_out.data_ptr() == q.data_ptr() and k_out.data_ptr() == k.data_ptr()
    else:
        assert torch.equal(q, q_before) and torch.equal(k, k_before), "inputs were modified"
    dq_out, dk_out = torch.randn_like(q_out) * 0.5, torch.randn_like(k_out) * 2  # grad_output != 1
    torch.autograd.backward([q_out, k_out], [dq_out, dk_out])
    check_against_reference(qb, kb, cos, sin, (q_out, k_out), (dq_out, dk_out), transposed, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_arbitrary_cos_sin(backend, device, poison):
    """cos/sin whose halves differ (not HF's): the backward must be the exact transposed map."""
    qb, kb, q, k = make_qk(2, 4, 2, 9, 64, torch.float32, device, transposed=True)
    cos, sin = torch.randn(2, 9, 40, device=device), torch.randn(2, 9, 40, device=device)
    with on_backend(backend):
        q_out, k_out = rope(q, k, cos, sin)
    dq_out, dk_out = torch.randn_like(q_out), torch.randn_like(k_out)
    torch.autograd.backward([q_out, k_out], [dq_out, dk_out])
    check_against_reference(qb, kb, cos, sin, (q_out, k_out), (dq_out, dk_out), True, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("q_dtype, cos_dtype", [(torch.bfloat16, torch.float32),
                                                (torch.float32, torch.bfloat16)])
def test_cos_sin_dtype_differs_from_q(backend, q_dtype, cos_dtype, device, poison):
    qb, kb, q, k = make_qk(2, 4, 1, 6, 64, q_dtype, device, transposed=True)
    cos, sin = hf_cos_sin(2, 6, 64, "per-batch", cos_dtype, device)
    with on_backend(backend):
        q_out, k_out = rope(q, k, cos, sin)
    dq_out, dk_out = torch.randn_like(q_out), torch.randn_like(k_out)
    torch.autograd.backward([q_out, k_out], [dq_out, dk_out])
    check_against_reference(qb, kb, cos, sin, (q_out, k_out), (dq_out, dk_out), True, q_dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_on_hf_views_without_grad(backend, device):
    """Inference: HF's transposed views are rotated in place."""
    q = torch.randn(2, 5, 4, 64, device=device).transpose(1, 2)
    k = torch.randn(2, 5, 2, 64, device=device).transpose(1, 2)
    cos, sin = hf_cos_sin(2, 5, 64, "per-batch", torch.float32, device)
    ref = reference(q.double(), k.double(), cos.double(), sin.double())
    with on_backend(backend), torch.no_grad():
        q_out, k_out = rope(q, k, cos, sin, inplace=True)
    assert q_out.data_ptr() == q.data_ptr()
    assert_close(q, ref[0], torch.float32, "q rotated in place")
    assert_close(k, ref[1], torch.float32, "k rotated in place")


def test_only_q_needs_grad(device):
    q = leaf(torch.randn(1, 4, 3, 32, device=device))
    k = torch.randn(1, 2, 3, 32, device=device)
    cos, sin = hf_cos_sin(1, 3, 32, "shared", torch.float32, device)
    with use_backend("triton"):
        q_out, k_out = rope(q, k, cos, sin)
    (q_out.sum() + k_out.sum()).backward()
    assert q.grad is not None and k.grad is None


def _bad(device, q=(2, 4, 5, 64), k=(2, 2, 5, 64), cos=(2, 5, 64), sin=None):
    t = lambda shape: torch.randn(shape, device=device)  # noqa: E731
    return t(q), t(k), t(cos), t(sin or cos)


@pytest.mark.parametrize("shapes, match", [
    (dict(q=(2, 5, 256)), "must be 4-D"),
    (dict(k=(2, 2, 6, 64)), "must agree in batch, seq and head_dim"),
    (dict(k=(1, 2, 5, 64)), "must agree in batch, seq and head_dim"),
    (dict(k=(2, 2, 5, 32)), "must agree in batch, seq and head_dim"),
    (dict(sin=(2, 5, 32)), "must have one shape"),
    (dict(cos=(2, 6, 64)), r"must be \(2, 5, rd\), \(1, 5, rd\) or \(5, rd\)"),
    (dict(cos=(3, 5, 64)), r"must be \(2, 5, rd\)"),
    (dict(cos=(2, 1, 5, 64)), r"must be \(2, 5, rd\)"),
    (dict(cos=(2, 5, 63)), "must be even"),
    (dict(cos=(2, 5, 128)), "between 2 and head_dim=64"),
])
def test_bad_shapes_name_the_problem(shapes, match, device):
    with pytest.raises(ValueError, match=match):
        rope(*_bad(device, **shapes))


def test_device_mismatch(device):
    q, k, cos, sin = _bad(device)
    with pytest.raises(ValueError, match="one device"):
        rope(q, k, cos.to("meta"), sin)


def test_last_dim_stride_must_be_one(device):
    q, k, cos, sin = _bad(device)
    with use_backend("triton"), pytest.raises(ValueError, match=r"q.contiguous\(\)"):
        rope(q.transpose(2, 3).contiguous().transpose(2, 3), k, cos, sin)


def test_cos_sin_requiring_grad_is_refused_by_triton(device):
    q, k, cos, sin = _bad(device)
    with use_backend("triton"), pytest.raises(ValueError, match="no gradient to cos/sin"):
        rope(q, k, cos.requires_grad_(), sin)


def test_inplace_refusals(device):
    q, k, cos, sin = _bad(device, k=(2, 4, 5, 64))
    with pytest.raises(ValueError, match="sharing memory"):
        rope(q, q, cos, sin, inplace=True)
    with pytest.raises(ValueError, match="expanded"):
        rope(q, k[:, :1].expand(2, 4, 5, 64), cos, sin, inplace=True)
    base = leaf(torch.randn(2, 5, 4, 64, device=device))
    with pytest.raises(ValueError, match="not views"):
        rope(base.clone().transpose(1, 2), k, cos, sin, inplace=True)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_real_shape_bf16_on_gpu(backend):
    batch, hq, hk, seq, d = 1, 32, 8, 2048, 128
    device = torch.device("cuda")
    qb, kb, q, k = make_qk(batch, hq, hk, seq, d, torch.bfloat16, device, transposed=True)
    cos, sin = hf_cos_sin(batch, seq, d, "per-batch", torch.bfloat16, device, theta=500000.0)
    with on_backend(backend):
        q_out, k_out = rope(q, k, cos, sin)
    dq_out, dk_out = torch.randn_like(q_out), torch.randn_like(k_out)
    torch.autograd.backward([q_out, k_out], [dq_out, dk_out])
    check_against_reference(qb, kb, cos, sin, (q_out, k_out), (dq_out, dk_out), True,
                            torch.bfloat16)
