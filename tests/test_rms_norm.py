import pytest
import torch

from fusetune import rms_norm, use_backend
from fusetune.reference.rms_norm import rms_norm as reference
from tests.numerics import assert_close, leaf

SHAPES = [(17, 1000), (2, 17, 64), (3, 5, 4, 128), (1, 1, 4096)]  # 4-D: (b, s, heads, head_dim)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("variant", ["llama", "gemma"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_float64_reference(backend, variant, dtype, shape, device, poison):
    n = shape[-1]
    x = leaf(torch.randn(shape, device=device, dtype=dtype) * 3)
    w = leaf((torch.randn(n, device=device) * 0.2 + (0.0 if variant == "gemma" else 1.0)).to(dtype))
    with use_backend(backend):
        y = rms_norm(x, w, 1e-6, variant)
    dy = torch.randn_like(y) * 0.5  # grad_output != 1
    y.backward(dy)
    x64, w64 = leaf(x.double()), leaf(w.double())
    y64 = reference(x64, w64, 1e-6, variant)
    y64.backward(dy.double())
    assert y.dtype == dtype
    assert_close(y, y64, dtype, "y")
    assert_close(x.grad, x64.grad, dtype, "dx")
    assert_close(w.grad, w64.grad, dtype, "dw")


def test_frozen_weight_gets_no_gradient(device):
    x = leaf(torch.randn(9, 48, device=device))
    w = torch.ones(48, device=device)
    with use_backend("triton"):
        rms_norm(x, w).sum().backward()
    assert w.grad is None and x.grad is not None


def test_bad_weight_shape_names_the_fix(device):
    with pytest.raises(ValueError, match=r"must be \(64,\)"):
        rms_norm(torch.randn(4, 64, device=device), torch.ones(32, device=device))


def test_unknown_variant(device):
    with pytest.raises(ValueError, match="variant"):
        rms_norm(torch.randn(4, 8, device=device), torch.ones(8, device=device), variant="t5")


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["llama", "gemma"])
@pytest.mark.parametrize("shape", [(1, 2048, 4096), (1, 2048, 32, 128)], ids=["hidden", "head-norm"])
def test_real_shape_bf16_gpu(variant, shape, poison):
    x = leaf(torch.randn(shape, device="cuda", dtype=torch.bfloat16))
    w = leaf((torch.randn(shape[-1], device="cuda") * 0.1 + 1).to(torch.bfloat16))
    with use_backend("triton"):
        y = rms_norm(x, w, 1e-5, variant)
    dy = torch.randn_like(y)
    y.backward(dy)
    x64, w64 = leaf(x.double()), leaf(w.double())
    reference(x64, w64, 1e-5, variant).backward(dy.double())
    assert_close(y, reference(x.double(), w.double(), 1e-5, variant), torch.bfloat16, "y")
    assert_close(x.grad, x64.grad, torch.bfloat16, "dx")
    assert_close(w.grad, w64.grad, torch.bfloat16, "dw")
