"""The fused LoRA MLP block against PEFT's own LoRA layers on a tiny LlamaMLP.

The reference is the PEFT-wrapped module evaluated in float64 on the same (rounded) weights and
input. Dropout: nn.Dropout's bits for a seed cannot be reproduced outside it (torch draws them in
its fused native_dropout kernel), so each test draws the masks itself, hands them to lora_mlp and
swaps PEFT's lora_dropout modules for ones that apply the same mask with the same 1 / (1 - p)
scaling; PEFT's forward (lora_B(lora_A(dropout(x))) * scaling) is otherwise untouched.
"""
import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaMLP

from fusetune.lora import LoRAProjection, lora_mlp
from tests.helpers import BACKENDS, FixedMask, on_backend
from tests.numerics import LORA_SCALE, assert_close, leaf

pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")

HIDDEN, INTER = 64, 96
HF_ACT = {"silu": "silu", "gelu_tanh": "gelu_pytorch_tanh", "gelu_erf": "gelu"}
MODULES = ("gate_proj", "up_proj", "down_proj")
CONFIGS = {
    "plain": dict(lora=dict(r=8, lora_alpha=16), bias=False, dropout=0.0),
    # different r / alpha per module, rsLoRA, a bias on the base layers, dropout
    "mixed": dict(lora=dict(r=8, lora_alpha=16, rank_pattern={"up_proj": 4, "down_proj": 12},
                            alpha_pattern={"gate_proj": 5, "down_proj": 32}, use_rslora=True),
                  bias=True, dropout=0.25),
}


def _peft_mlp(config, activation):
    base = LlamaMLP(LlamaConfig(hidden_size=HIDDEN, intermediate_size=INTER, hidden_act=HF_ACT[activation],
                                mlp_bias=config["bias"]))
    lora = LoraConfig(target_modules=list(MODULES), lora_dropout=config["dropout"], init_lora_weights=False,
                      **config["lora"])
    return get_peft_model(base, lora).train()


def _layers(model):
    return [getattr(model.base_model.model, name) for name in MODULES]


def _masks(x_shape, p, device):
    if p == 0:
        return [None] * 3
    inner = (*x_shape[:-1], INTER)
    return [torch.rand(shape, device=device) >= p for shape in (x_shape, x_shape, inner)]


def _specs(model, dtype, masks):
    """LoRAProjection per PEFT layer, weights cast to dtype; A and B as fresh leaves."""
    specs = []
    for layer, mask in zip(_layers(model), masks):
        base = layer.base_layer
        specs.append(LoRAProjection(
            weight=base.weight.detach().to(dtype),
            bias=None if base.bias is None else base.bias.detach().to(dtype),
            lora_A=leaf(layer.lora_A["default"].weight.to(dtype)),
            lora_B=leaf(layer.lora_B["default"].weight.to(dtype)),
            scaling=layer.scaling["default"], dropout=getattr(layer.lora_dropout["default"], "p", 0.0),
            dropout_mask=mask))
    return specs


def _reference(model, specs, x, dy, masks):
    """PEFT in float64 on the rounded weights: (y, dx, [(dA, dB) per module])."""
    ref = copy.deepcopy(model).double()
    for layer, spec, mask in zip(_layers(ref), specs, masks):
        layer.base_layer.weight.data.copy_(spec.weight)
        if spec.bias is not None:
            layer.base_layer.bias.data.copy_(spec.bias)
        layer.lora_A["default"].weight.data.copy_(spec.lora_A)
        layer.lora_B["default"].weight.data.copy_(spec.lora_B)
        if mask is not None:
            layer.lora_dropout["default"] = FixedMask(mask, spec.dropout)
    x64 = leaf(x.double())
    y64 = ref(x64)
    lora = [ab["default"].weight for layer in _layers(ref) for ab in (layer.lora_A, layer.lora_B)]
    dx64, *dlora = torch.autograd.grad(y64, [x64, *lora], dy.double())
    return y64, dx64, dlora


def _check(config, activation, backend, dtype, device, x_grad=True):
    model = _peft_mlp(CONFIGS[config], activation).to(device)
    x = leaf(torch.randn(2, 17, HIDDEN, device=device).to(dtype), grad=x_grad)
    masks = _masks(x.shape, CONFIGS[config]["dropout"], device)
    specs = _specs(model, dtype, masks)
    with on_backend(backend):
        y = lora_mlp(x, *specs, activation=activation)
    dy = torch.randn_like(y) * 0.5  # grad_output != 1
    lora = [t for s in specs for t in (s.lora_A, s.lora_B)]
    grads = torch.autograd.grad(y, ([x] if x_grad else []) + lora, dy)
    y64, dx64, dlora64 = _reference(model, specs, x, dy, masks)
    assert y.dtype == dtype and y.shape == x.shape
    assert_close(y, y64, dtype, "y", LORA_SCALE[dtype])
    if x_grad:
        dx, *grads = grads
        assert_close(dx, dx64, dtype, "dx", LORA_SCALE[dtype])
    for name, got, want in zip([f"{m}.lora_{ab}" for m in MODULES for ab in "AB"], grads, dlora64):
        assert_close(got, want, dtype, f"d {name}", LORA_SCALE[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_matches_peft(config, activation, backend, dtype, device, poison):
    _check(config, activation, backend, dtype, device)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gelu_erf_and_frozen_input(backend, device):
    """Exact-erf GeGLU; an input that needs no gradient (only A and B do)."""
    _check("mixed", "gelu_erf", backend, torch.float32, device, x_grad=False)


def test_peft_module_matches_fp32(device):
    """The float64 reference is PEFT itself: its fp32 forward agrees with lora_mlp's directly."""
    model = _peft_mlp(CONFIGS["plain"], "silu").to(device)
    x = torch.randn(3, HIDDEN, device=device)
    with torch.no_grad():
        assert_close(lora_mlp(x, *_specs(model, torch.float32, [None] * 3)), model(x), torch.float32, "y")


def test_drawn_dropout_mask_is_replayed_by_seed(device):
    """With dropout and no mask, the draw follows torch's default generator: same seed, same output."""
    model = _peft_mlp(CONFIGS["mixed"], "silu").to(device)
    specs = _specs(model, torch.float32, [None] * 3)
    x = torch.randn(5, HIDDEN, device=device)
    torch.manual_seed(1)
    a = lora_mlp(x, *specs)
    torch.manual_seed(1)
    b = lora_mlp(x, *specs)
    torch.manual_seed(2)
    c = lora_mlp(x, *specs)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_backward_twice_is_an_error(device):
    model = _peft_mlp(CONFIGS["plain"], "silu").to(device)
    specs = _specs(model, torch.float32, [None] * 3)
    y = lora_mlp(torch.randn(4, HIDDEN, device=device), *specs)
    y.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="ran twice"):
        y.sum().backward()


def test_validation_errors(device):
    model = _peft_mlp(CONFIGS["plain"], "silu").to(device)
    gate, up, down = _specs(model, torch.float32, [None] * 3)
    x = torch.randn(4, HIDDEN, device=device)
    with pytest.raises(ValueError, match="activation"):
        lora_mlp(x, gate, up, down, activation="relu")
    with pytest.raises(ValueError, match=r"gate.weight has shape"):
        lora_mlp(torch.randn(4, HIDDEN + 1, device=device), gate, up, down)
    with pytest.raises(TypeError, match="cast the input"):
        lora_mlp(x.double(), gate, up, down)
    bad_b = LoRAProjection(gate.weight, gate.lora_A, gate.lora_B[:, :4], gate.scaling)
    with pytest.raises(ValueError, match="lora_B has shape"):
        lora_mlp(x, bad_b, up, down)
    trainable = LoRAProjection(leaf(gate.weight), gate.lora_A, gate.lora_B, gate.scaling)
    with pytest.raises(ValueError, match="must be frozen"):
        lora_mlp(x, trainable, up, down)
    with pytest.raises(ValueError, match="dropout_mask has shape"):
        masked = LoRAProjection(gate.weight, gate.lora_A, gate.lora_B, gate.scaling, dropout=0.1,
                                dropout_mask=torch.ones(4, HIDDEN + 1, dtype=torch.bool, device=device))
        lora_mlp(x, masked, up, down)
    with pytest.raises(TypeError, match="bool tensor"):
        masked = LoRAProjection(gate.weight, gate.lora_A, gate.lora_B, gate.scaling, dropout=0.1,
                                dropout_mask=torch.ones(4, HIDDEN, device=device))
        lora_mlp(x, masked, up, down)
