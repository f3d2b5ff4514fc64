"""torch's SDPA kernels called with their log-sum-exp (fusetune.ops.sdpa): output and every gradient
against float64, the kept output taken by a recompute, and the same kernel chosen both times."""
import pytest
import torch

from fusetune.ops.attention import KeptAttention, keeping_attention
from fusetune.ops.sdpa import sdpa, sdpa_backend
from fusetune.reference.attention import attention as reference
from tests.numerics import assert_close, leaf


def _inputs(batch, hq, hk, seq, d, dtype, device):
    """Hugging Face's layout: (B, S, H, D) memory, (B, H, S, D) views."""
    return [leaf(torch.randn(batch, seq, h, d, dtype=dtype, device=device)) for h in (hq, hk, hk)]


def _check(outs_and_grads, inputs, dtype, scale):
    q, k, v = (t.detach().double().transpose(1, 2).requires_grad_() for t in inputs)
    ref, _ = reference(q, k, v, True, q.shape[-1] ** -0.5 if scale is None else scale, None, None, None)
    ref.backward(outs_and_grads[1])
    out, dout, grads = outs_and_grads
    assert_close(out, ref, dtype, "out")
    for name, g, r in zip("qkv", grads, (q.grad, k.grad, v.grad)):
        assert_close(g, r.transpose(1, 2), dtype, f"d{name}")


def _forward_and_recompute(inputs, scale):
    """A checkpointed layer's two runs: the forward (no grad) keeps what sdpa computed, the
    recompute (with grad) takes it; returns (out, dout, grads of the (B, S, H, D) inputs)."""
    views = [t.transpose(1, 2) for t in inputs]
    with torch.no_grad(), keeping_attention(KeptAttention()) as store:
        sdpa(*views, scale=scale)
    assert len(store.tensors) == 2
    kept = KeptAttention(store.tensors, store.kinds)
    with keeping_attention(kept):
        out = sdpa(*views, scale=scale)
    kept.check_all_taken()
    dout = torch.randn(out.shape, dtype=out.dtype, device=out.device)  # (B, H, S, D) memory: unlike out's
    out.backward(dout)
    return out, dout.double(), [t.grad for t in inputs]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(2, 4, 2, 37, 16), (1, 3, 1, 5, 8), (1, 2, 2, 64, 32)],
                         ids=["gqa-odd", "mqa", "mha"])
@pytest.mark.parametrize("scale", [None, 0.3])
def test_recompute_takes_the_forwards_output_and_lse(shape, dtype, scale):
    """The CPU flash kernel (what SDPA runs on a CPU): a recompute that takes the forward's output
    and log-sum-exp gets float64's output and gradients."""
    inputs = _inputs(*shape, dtype, "cpu")
    assert sdpa_backend(*(t.transpose(1, 2) for t in inputs), True, scale) == "cpu"
    _check(_forward_and_recompute(inputs, scale), inputs, dtype, scale)


def test_outside_a_checkpointed_layer_it_is_torchs_sdpa(monkeypatch):
    """No layer keeping: F.scaled_dot_product_attention itself, no backend lookup."""
    import fusetune.ops.sdpa as module

    monkeypatch.setattr(module, "sdpa_backend", lambda *a: pytest.fail("looked up a backend"))
    q, k, v = (t.transpose(1, 2) for t in _inputs(1, 4, 2, 9, 8, torch.float32, "cpu"))
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert torch.equal(sdpa(q, k, v), want)


def test_head_dims_its_ops_do_not_take_run_plain_sdpa():
    """A head dim SDPA pads for its kernels (not a multiple of 8) is left to SDPA: recomputed."""
    q, k, v = (t.transpose(1, 2) for t in _inputs(1, 2, 2, 5, 12, torch.float32, "cpu"))
    assert sdpa_backend(q, k, v, True, None) is None
    with torch.no_grad(), keeping_attention(KeptAttention()) as store:
        sdpa(q, k, v)
    assert store.tensors == []


def test_the_recompute_runs_the_kernel_its_forward_ran():
    """SDPA's choice depends on settings (an sdpa_kernel context around the forward only, a backend
    switched off): the recompute runs the kernel whose output its forward kept, not a new choice."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    inputs = _inputs(1, 4, 2, 16, 16, torch.float64, "cpu")
    views = [t.transpose(1, 2) for t in inputs]
    with torch.no_grad(), keeping_attention(KeptAttention()) as store:
        sdpa(*views)
    kept = KeptAttention(store.tensors, store.kinds)
    with keeping_attention(kept), sdpa_kernel(SDPBackend.MATH):  # SDPA alone would run MATH, keeping nothing
        out = sdpa(*views)
    kept.check_all_taken()
    dout = torch.randn_like(out)
    out.backward(dout)
    _check((out, dout, [t.grad for t in inputs]), inputs, torch.float64, None)
    # and a call that kept nothing in its forward runs SDPA again in the recompute, whatever it would keep now
    with torch.no_grad(), keeping_attention(KeptAttention()) as store, sdpa_kernel(SDPBackend.MATH):
        sdpa(*views)
    assert store.kinds == [None] and store.tensors == []


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cudnn", "flash"])
@pytest.mark.parametrize("seq", [2048, 4099])
def test_cuda_kernels_in_bf16(backend, seq):
    """bf16 at Llama-3.1-8B's head shapes, each CUDA backend forced the way users force SDPA's
    (sdpa_kernel): chosen as asked, and the output and gradients in the bf16 band of float64."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    forced = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}[backend]
    inputs = _inputs(1, 32, 8, seq, 128, torch.bfloat16, "cuda")
    with sdpa_kernel(forced):
        chosen = sdpa_backend(*(t.transpose(1, 2) for t in inputs), True, None)
        if chosen is None:
            pytest.skip(f"torch's SDPA does not run {backend} for GQA here")
        assert chosen == backend
        _check(_forward_and_recompute(inputs, None), inputs, torch.bfloat16, None)
