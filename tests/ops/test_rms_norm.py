import pytest
import torch

from fusetune import rms_norm, use_backend
from tests.helpers import check_rms_norm_against_float64
from tests.numerics import leaf

SHAPES = [(17, 1000), (2, 17, 64), (3, 5, 4, 128), (1, 1, 4096)]  # 4-D: (b, s, heads, head_dim)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("variant", ["llama", "gemma"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_float64_reference(backend, variant, dtype, shape, device, poison):
    check_rms_norm_against_float64(backend, variant, dtype, shape, device)


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
    check_rms_norm_against_float64("triton", variant, torch.bfloat16, shape, torch.device("cuda"), eps=1e-5)
