"""Kernels on tensors of more than 2^31 elements (GPU tier; issue 11's long context: a 600k-token
RMSNorm input or q is 2.5e9 elements): every offset must be 64-bit. Each test runs the op forward
and backward in bf16 and checks the rows at the end of the tensor, where a 32-bit offset would have
wrapped, against the float64 reference on those rows (their outputs and input gradients depend on
those rows only)."""
import pytest
import torch

from fusetune.ops import cross_entropy, rms_norm, rope, swiglu
from fusetune.reference import cross_entropy as ce_reference
from fusetune.reference import glu as glu_reference
from fusetune.reference import rms_norm as rms_reference
from fusetune.reference import rope as rope_reference
from tests.helpers import on_backend
from tests.numerics import assert_close

pytestmark = pytest.mark.gpu
ELEMENTS = 2**31 + 2**22  # past int32's range by 4M elements
KERNELS = ["triton", "cuda"]
TAIL = 3


def _tail_grads(fn, inputs, dout, tail):
    """Outputs and input gradients of fn on the tail rows (sliced along dim `tail[0]`), in float64."""
    dim, rows = tail
    parts = [t.narrow(dim, t.shape[dim] - rows, rows).double().requires_grad_() for t in inputs]
    out = fn(*parts)
    out = out if isinstance(out, tuple) else (out,)
    grads = torch.autograd.grad(out, parts, [d.narrow(dim, d.shape[dim] - rows, rows).double() for d in dout])
    return out, grads


@pytest.mark.parametrize("backend", KERNELS)
def test_rms_norm(backend):
    hidden = 4096
    x = torch.randn(ELEMENTS // hidden + 1, hidden, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(hidden, device="cuda", dtype=torch.bfloat16) * 0.1 + 1
    with on_backend(backend):
        y = rms_norm(x, w, 1e-5)
    dy = torch.randn_like(y)
    (dx,) = torch.autograd.grad(y, x, dy)
    (ref,), (ref_dx,) = _tail_grads(lambda t: rms_reference.rms_norm(t, w.double(), 1e-5), [x], [dy], (0, TAIL))
    assert_close(y[-TAIL:], ref, torch.bfloat16, "y")
    assert_close(dx[-TAIL:], ref_dx, torch.bfloat16, "dx")


@pytest.mark.parametrize("backend", KERNELS)
def test_swiglu(backend):
    cols = 14336
    gate, up = (torch.randn(ELEMENTS // cols + 1, cols, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                for _ in range(2))
    with on_backend(backend):
        y = swiglu(gate, up)
    dy = torch.randn_like(y)
    dgate, dup = torch.autograd.grad(y, (gate, up), dy)
    (ref,), (ref_dgate, ref_dup) = _tail_grads(glu_reference.swiglu, [gate, up], [dy], (0, TAIL))
    assert_close(y[-TAIL:], ref, torch.bfloat16, "y")
    assert_close(dgate[-TAIL:], ref_dgate, torch.bfloat16, "dgate")
    assert_close(dup[-TAIL:], ref_dup, torch.bfloat16, "dup")


@pytest.mark.parametrize("backend", KERNELS)
def test_rope(backend):
    """q of 32 heads x 128 at 524k positions (2^31 + elements), k of 8 heads; the last positions."""
    heads, kv_heads, head_dim = 32, 8, 128
    seq = ELEMENTS // (heads * head_dim) + 1
    q = torch.randn(1, seq, heads, head_dim, device="cuda", dtype=torch.bfloat16).transpose(1, 2).requires_grad_()
    k = torch.randn(1, seq, kv_heads, head_dim, device="cuda", dtype=torch.bfloat16).transpose(1, 2).requires_grad_()
    angles = torch.arange(seq, device="cuda", dtype=torch.float32)[:, None] * torch.rand(head_dim // 2, device="cuda")
    angles = torch.cat([angles, angles], -1)[None]
    cos, sin = angles.cos(), angles.sin()
    with on_backend(backend):
        q_out, k_out = rope(q, k, cos, sin)
    dq_out, dk_out = torch.randn_like(q_out), torch.randn_like(k_out)
    dq, dk = torch.autograd.grad((q_out, k_out), (q, k), (dq_out, dk_out))
    tail_cos, tail_sin = cos[:, -TAIL:].double(), sin[:, -TAIL:].double()
    (ref_q, ref_k), (ref_dq, ref_dk) = _tail_grads(lambda a, b: rope_reference.rope(a, b, tail_cos, tail_sin),
                                                   [q, k], [dq_out, dk_out], (2, TAIL))
    assert_close(q_out[:, :, -TAIL:], ref_q, torch.bfloat16, "q_out")
    assert_close(k_out[:, :, -TAIL:], ref_k, torch.bfloat16, "k_out")
    assert_close(dq[:, :, -TAIL:], ref_dq, torch.bfloat16, "dq")
    assert_close(dk[:, :, -TAIL:], ref_dk, torch.bfloat16, "dk")


@pytest.mark.parametrize("backend", KERNELS)
def test_cross_entropy(backend):
    """Logits over Llama-3's vocabulary for 16.8k tokens (2^31 + elements); per-row losses and the
    gradient of the last rows."""
    vocab = 128256
    logits = torch.randn(ELEMENTS // vocab + 1, vocab, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    targets = torch.randint(0, vocab, (logits.shape[0],), device="cuda")
    with on_backend(backend):
        losses = cross_entropy(logits, targets, reduction="none")
    dlosses = torch.randn_like(losses)
    (dlogits,) = torch.autograd.grad(losses, logits, dlosses)
    tail = targets[-TAIL:]
    (ref,), (ref_dlogits,) = _tail_grads(lambda t: ce_reference.cross_entropy(t, tail, reduction="none"),
                                         [logits], [dlosses], (0, TAIL))
    assert_close(losses[-TAIL:], ref, torch.float32, "losses")
    assert_close(dlogits[-TAIL:], ref_dlogits, torch.bfloat16, "dlogits")
