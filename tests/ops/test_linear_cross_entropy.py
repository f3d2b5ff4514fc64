import pytest
import importlib

import torch

from fusetune import linear_cross_entropy, use_backend
from fusetune.reference.linear_cross_entropy import linear_cross_entropy as reference
from tests.helpers import BACKENDS, on_backend
from tests.numerics import assert_close, leaf

lce_module = importlib.import_module("fusetune.ops.linear_cross_entropy")


@pytest.fixture(params=[False, True], ids=["one-chunk", "many-chunks"])
def chunking(request, monkeypatch):
    if request.param:  # 5 tokens per chunk at vocab 1003 fp32: several chunks and a ragged last one
        monkeypatch.setattr(lce_module, "CHUNK_BYTES", 5 * 1003 * 4)
    return request.param


def _inputs(device, dtype, n=17, hidden=48, vocab=1003, bias=False, ignore_index=-100):
    h = leaf(torch.randn(n, hidden, device=device, dtype=dtype))
    w = leaf((torch.randn(vocab, hidden, device=device) / hidden**0.5).to(dtype))
    b = leaf(torch.randn(vocab, device=device, dtype=dtype)) if bias else None
    t = torch.randint(0, vocab, (n,), device=device)
    t[::4] = ignore_index
    return h, w, b, t


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kwargs", [{}, {"reduction": "sum"}, {"softcap": 3.0, "logit_scale": 0.7},
                                    {"num_items_in_batch": 40}, {"bias": True}, {"ignore_index": 0}],
                         ids=["mean", "sum", "softcap-scale", "num-items", "bias", "ignore-0"])
def test_matches_float64_reference(backend, dtype, kwargs, chunking, device, poison):
    kwargs = dict(kwargs)
    h, w, b, t = _inputs(device, dtype, bias=kwargs.pop("bias", False),
                         ignore_index=kwargs.get("ignore_index", -100))
    with on_backend(backend):
        loss = linear_cross_entropy(h, w, t, b, **kwargs)
    (loss * 0.37).backward()  # grad_output != 1
    h64, w64 = leaf(h.double()), leaf(w.double())
    b64 = leaf(b.double()) if b is not None else None
    ref = reference(h64, w64, t, b64, **kwargs)
    (ref * 0.37).backward()
    assert loss.dtype == torch.float32
    assert_close(loss, ref, dtype, "loss")
    assert_close(h.grad, h64.grad, dtype, "d hidden")
    assert_close(w.grad, w64.grad, dtype, "d weight")
    if b is not None:
        assert_close(b.grad, b64.grad, dtype, "d bias")


def test_three_dim_hidden_and_frozen_head(device):
    h = leaf(torch.randn(2, 7, 32, device=device))
    w = torch.randn(300, 32, device=device)
    t = torch.randint(0, 300, (2, 7), device=device)
    with use_backend("triton"):
        linear_cross_entropy(h, w, t).backward()
    ref_h = leaf(h.double())
    reference(ref_h, w.double(), t).backward()
    assert w.grad is None
    assert_close(h.grad, ref_h.grad, torch.float32, "d hidden")


def test_no_grad_gives_the_loss_only(device):
    h, w, _, t = _inputs(device, torch.float32)
    with torch.no_grad(), use_backend("triton"):
        loss = linear_cross_entropy(h, w, t)
    assert_close(loss, reference(h.double(), w.double(), t), torch.float32, "loss")


def test_gradient_accumulation_equals_one_batch(device):
    h, w, _, t = _inputs(device, torch.float32, n=16)
    count = (t != -100).sum()
    with use_backend("triton"):
        for half in (slice(0, 8), slice(8, 16)):
            linear_cross_entropy(h[half], w, t[half], num_items_in_batch=count).backward()
    h1, w1 = leaf(h.detach()), leaf(w.detach())
    with use_backend("triton"):
        linear_cross_entropy(h1, w1, t).backward()
    assert_close(h.grad, h1.grad, torch.float32, "d hidden")
    assert_close(w.grad, w1.grad, torch.float32, "d weight")


def test_bad_inputs_name_the_fix(device):
    h, w, _, t = _inputs(device, torch.float32)
    with pytest.raises(ValueError, match=r"must be \(vocab, 48\)"):
        linear_cross_entropy(h, w[:, :10], t)
    with pytest.raises(ValueError, match="cast and move"):
        linear_cross_entropy(h, w.double(), t)
    with pytest.raises(ValueError, match="per-row losses"):
        linear_cross_entropy(h, w, t, reduction="none")
    with pytest.raises(ValueError, match="do not match"):
        linear_cross_entropy(h, w, t[:3])


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_real_shape_bf16_holds_no_full_logits(backend):
    """4096 tokens, hidden 4096, vocab 128256 in bf16: full logits would be 1 GiB."""
    torch.manual_seed(0)
    n, hidden, vocab = 4096, 4096, 128256
    h = leaf(torch.randn(n, hidden, device="cuda", dtype=torch.bfloat16))
    w = (torch.randn(vocab, hidden, device="cuda") / hidden**0.5).to(torch.bfloat16)
    t = torch.randint(0, vocab, (n,), device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with on_backend(backend):
        loss = linear_cross_entropy(h, w, t)
        loss.backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra < 2**30 * 0.6, f"peak extra {extra / 2**20:.0f} MiB: full logits were materialised"
    rows = slice(0, 256)  # float64 reference on a slice of the rows (sum reduction, same gradient scale)
    h64 = leaf(h.detach()[rows].double())
    ref = reference(h64, w.double(), t[rows], reduction="sum") / n
    ref.backward()
    assert_close(h.grad[rows], h64.grad, torch.bfloat16, "d hidden")
