import pytest
import torch

from fusetune import use_backend
from fusetune.ops import geglu, swiglu
from fusetune.ops.glu import HF_ACTIVATIONS, glu
from fusetune.reference import glu as reference
from fusetune.reference.glu import ACTIVATIONS
from tests.helpers import BACKENDS, on_backend
from tests.numerics import assert_close, leaf

# the interpreter's numpy exp overflows to inf for very negative gates; the result (0) is right
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")

SHAPES = [(17, 1000), (2, 17, 333), (3, 5, 7)]


def _check_against_float64(activation, gate, up, backend, dtype):
    """Run op on (gate, up) leaves or views of leaves; compare y, dgate, dup with float64."""
    with on_backend(backend):
        y = glu(gate, up, activation)
    dy = torch.randn_like(y) * 0.5  # grad_output != 1
    dgate, dup = torch.autograd.grad(y, (gate, up), dy)
    gate64, up64 = leaf(gate.double()), leaf(up.double())
    y64 = reference.glu(gate64, up64, activation)
    dgate64, dup64 = torch.autograd.grad(y64, (gate64, up64), dy.double())
    assert y.dtype == dtype and y.shape == gate.shape
    assert_close(y, y64, dtype, "y")
    assert_close(dgate, dgate64, dtype, "dgate")
    assert_close(dup, dup64, dtype, "dup")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", list(ACTIVATIONS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_float64_reference(backend, activation, dtype, shape, device, poison):
    # gate spans the activation's curved region and both tails
    gate = leaf((torch.randn(shape, device=device) * 3).to(dtype))
    up = leaf(torch.randn(shape, device=device, dtype=dtype))
    _check_against_float64(activation, gate, up, backend, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", list(ACTIVATIONS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("inter", [333, 512], ids=["odd", "aligned"])  # 512: the CUDA kernel's 16-byte path
def test_chunked_gate_up_views(backend, activation, dtype, inter, device, poison):
    """Phi-3: gate, up = gate_up.chunk(2, -1), views with row stride 2 * I; grads reach gate_up."""
    gate_up = leaf((torch.randn(2, 17, 2 * inter, device=device) * 2).to(dtype))
    gate, up = gate_up.chunk(2, dim=-1)
    assert not gate.is_contiguous() and gate.stride(-2) == 2 * inter
    _check_against_float64(activation, gate, up, backend, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_views_off_16_byte_alignment(backend, dtype, device, poison):
    """Halves of a buffer shifted by one element: no 16-byte access lines up (the element-wise path)."""
    buffer = leaf((torch.randn(9, 2 * 512 + 1, device=device) * 2).to(dtype))
    gate, up = buffer[:, 1:513], buffer[:, 513:]
    _check_against_float64("silu", gate, up, backend, dtype)


@pytest.mark.parametrize("activation", list(ACTIVATIONS))
def test_transposed_inputs_and_expanded_grad(activation, device):
    """Views with no unit-stride rows are copied; a broadcast grad_output (stride 0) works."""
    gate = leaf(torch.randn(40, 24, device=device))
    up = leaf(torch.randn(24, 40, device=device))
    with use_backend("triton"):
        y = glu(gate.t(), up, activation)
    y.sum().backward()
    gate64, up64 = leaf(gate.double()), leaf(up.double())
    reference.glu(gate64.t(), up64, activation).sum().backward()
    assert_close(y, reference.glu(gate64.t(), up64, activation), torch.float32, "y")
    assert_close(gate.grad, gate64.grad, torch.float32, "dgate")
    assert_close(up.grad, up64.grad, torch.float32, "dup")


def test_only_up_requires_grad(device):
    gate = torch.randn(5, 64, device=device)
    up = leaf(torch.randn(5, 64, device=device))
    with use_backend("triton"):
        swiglu(gate, up).sum().backward()
    assert gate.grad is None
    ones = torch.ones(5, 64, device=device, dtype=torch.float64)
    assert_close(up.grad, reference.swiglu(gate.double(), ones), torch.float32, "dup")


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_input(backend, device):
    gate = leaf(torch.randn(0, 64, device=device))
    with on_backend(backend):
        y = swiglu(gate, torch.randn(0, 64, device=device))
    y.sum().backward()
    assert y.shape == (0, 64) and gate.grad.shape == (0, 64)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("op", "kwargs", "activation"), [(swiglu, {}, "silu"),
                                                          (geglu, {}, "gelu_tanh"),
                                                          (geglu, {"approximate": "tanh"}, "gelu_tanh"),
                                                          (geglu, {"approximate": "none"}, "gelu_erf")])
def test_swiglu_and_geglu_are_glu(backend, op, kwargs, activation, device):
    """The public functional API is glu under the activation it names."""
    gate, up = torch.randn(2, 17, 333, device=device) * 3, torch.randn(2, 17, 333, device=device)
    with on_backend(backend):
        assert torch.equal(op(gate, up, **kwargs), glu(gate, up, activation))


@pytest.mark.parametrize("hf_name", sorted(HF_ACTIVATIONS))
def test_transformers_activation_names(hf_name, device):
    """Every transformers ACT2FN name fusetune fuses maps to the activation that computes it: the
    reference equals transformers' module in float64, the kernel (up = 1) its value and gradient."""
    from transformers.activations import ACT2FN

    activation = HF_ACTIVATIONS[hf_name]
    gate = leaf(torch.randn(17, 333, device=device) * 3)
    gate64 = leaf(gate.double())
    hf = ACT2FN[hf_name](gate64)
    (dhf,) = torch.autograd.grad(hf, gate64, torch.ones_like(hf))
    assert_close(reference.ACTIVATIONS[activation](gate64), hf, torch.float64, hf_name)
    with use_backend("triton"):
        y = glu(gate, torch.ones_like(gate), activation)
    (dgate,) = torch.autograd.grad(y, gate, torch.ones_like(y))
    assert_close(y, hf, torch.float32, f"{hf_name} via {activation}")
    assert_close(dgate, dhf, torch.float32, f"d {hf_name} via {activation}")


def test_unknown_activation(device):
    x = torch.randn(4, 8, device=device)
    with pytest.raises(ValueError, match="activation must be one of silu, gelu_tanh, gelu_erf"):
        glu(x, x, "relu")


@pytest.mark.parametrize("op", [swiglu, geglu])
def test_mismatches_name_the_problem(op, device):
    x = torch.randn(4, 8, device=device)
    with pytest.raises(ValueError, match="same shape"):
        op(x, torch.randn(4, 9, device=device))
    with pytest.raises(TypeError, match="cast both"):
        op(x, x.to(torch.bfloat16))
    with pytest.raises(TypeError, match="floating"):
        op(x.long(), x.long())
    with pytest.raises(ValueError, match="one device"):
        op(x, torch.empty(4, 8, device="meta"))


def test_wrong_approximate(device):
    x = torch.randn(4, 8, device=device)
    with pytest.raises(ValueError, match="'tanh' or 'none'"):
        geglu(x, x, approximate="erf")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("activation", list(ACTIVATIONS))
def test_real_shape_bf16_cuda(backend, activation):
    """The Llama-3-8B MLP at 4096 tokens: (4096, 14336) bf16, also as chunks of a fused gate_up."""
    gate_up = leaf((torch.randn(4096, 2 * 14336, device="cuda") * 3).to(torch.bfloat16))
    _check_against_float64(activation, *gate_up.chunk(2, dim=-1), backend, torch.bfloat16)
    gate = leaf((torch.randn(4096, 14336, device="cuda") * 3).to(torch.bfloat16))
    up = leaf(torch.randn(4096, 14336, device="cuda", dtype=torch.bfloat16))
    _check_against_float64(activation, gate, up, backend, torch.bfloat16)
