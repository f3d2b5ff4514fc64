"""Fused LoRA projection groups (lora_linear) and the fused gate_up MLP, against PEFT's own layers;
4-bit (NF4) base weights; adapters kept in fp32 under bf16 activations.

The reference is PEFT's lora.Linear evaluated in float64 on the same (rounded or dequantised)
weights, with the dropout masks the fused op was given (see tests/lora/test_mlp.py for why).
"""
import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from fusetune.lora import LoRAProjection, lora_linear, lora_mlp
from fusetune.quant.nf4 import NF4Weight, dequantize_nf4, quantize_nf4
from tests.helpers import FixedMask
from tests.numerics import LORA_SCALE, assert_close, leaf

IN, OUTS = 64, {"q": 48, "k": 16, "v": 16}
CONFIGS = {
    "plain": dict(lora=dict(r=8, lora_alpha=16, target_modules=["q", "k", "v"]), bias=False, dropout=0.0),
    # per-module r / alpha, rsLoRA, biases, dropout, and k without an adapter (only q and v targeted)
    "mixed": dict(lora=dict(r=8, lora_alpha=16, rank_pattern={"v": 4}, alpha_pattern={"q": 5}, use_rslora=True,
                            target_modules=["q", "v"]), bias=True, dropout=0.25),
}


class Projections(nn.Module):
    def __init__(self, bias):
        super().__init__()
        for name, out in OUTS.items():
            setattr(self, name, nn.Linear(IN, out, bias=bias))


def _peft(config):
    return get_peft_model(Projections(config["bias"]), LoraConfig(
        lora_dropout=config["dropout"], init_lora_weights=False, **config["lora"])).train()


def _layer(model, name):
    return getattr(model.base_model.model, name)


def _spec(layer, dtype, mask, adapter_dtype=None, weight=None):
    """LoRAProjection of a PEFT layer (or a plain Linear), weights in dtype, A/B as fresh leaves."""
    base = getattr(layer, "base_layer", layer)
    spec = LoRAProjection(weight if weight is not None else base.weight.detach().to(dtype),
                          bias=None if base.bias is None else base.bias.detach().to(dtype))
    if hasattr(layer, "lora_A"):
        spec.lora_A = leaf(layer.lora_A["default"].weight.to(adapter_dtype or dtype))
        spec.lora_B = leaf(layer.lora_B["default"].weight.to(adapter_dtype or dtype))
        spec.scaling = layer.scaling["default"]
        spec.dropout = getattr(layer.lora_dropout["default"], "p", 0.0)
        spec.dropout_mask = mask if spec.dropout else None
    return spec


def _reference(layers, specs, x, dys):
    """PEFT's layers in float64 on the specs' values: (outputs, dx, [dA, dB of every adapter])."""
    x64 = leaf(x.double())
    outs, params = [], []
    for layer, spec in zip(layers, specs):
        ref = copy.deepcopy(layer).double()
        base = getattr(ref, "base_layer", ref)
        base.weight.data.copy_(spec.weight if isinstance(spec.weight, torch.Tensor)
                               else dequantize_nf4(spec.weight.packed, spec.weight.state, torch.float64))
        if spec.bias is not None:
            base.bias.data.copy_(spec.bias)
        if spec.lora_A is not None:
            ref.lora_A["default"].weight.data.copy_(spec.lora_A)
            ref.lora_B["default"].weight.data.copy_(spec.lora_B)
            params += [ref.lora_A["default"].weight, ref.lora_B["default"].weight]
            if spec.dropout_mask is not None:
                ref.lora_dropout["default"] = FixedMask(spec.dropout_mask, spec.dropout)
        outs.append(ref(x64))
    grads = torch.autograd.grad(outs, [x64, *params], [dy.double() for dy in dys])
    return outs, grads[0], grads[1:]


def _check_group(config, dtype, device, adapter_dtype=None, nf4=False, scale=None):
    model = _peft(CONFIGS[config]).to(device)
    layers = [_layer(model, name) for name in OUTS]
    x = leaf(torch.randn(2, 9, IN, device=device).to(dtype))
    mask = torch.rand(x.shape, device=device) >= CONFIGS[config]["dropout"]
    specs = []
    for layer in layers:
        weight = None
        if nf4:
            packed, state = quantize_nf4(getattr(layer, "base_layer", layer).weight.detach(), blocksize=64)
            weight = NF4Weight(packed, state)
        specs.append(_spec(layer, dtype, mask, adapter_dtype, weight))
    outs = lora_linear(x, *specs)
    dys = [torch.randn_like(y) * 0.5 for y in outs]
    lora = [t for s in specs if s.lora_A is not None for t in (s.lora_A, s.lora_B)]
    dx, *grads = torch.autograd.grad(outs, [x, *lora], dys)
    ref_outs, ref_dx, ref_grads = _reference(layers, specs, x, dys)
    scale = scale or LORA_SCALE[dtype]
    for i, (y, want) in enumerate(zip(outs, ref_outs)):
        assert y.dtype == dtype and y.shape == want.shape
        assert_close(y, want, dtype, f"y{i}", scale)
    assert_close(dx, ref_dx, dtype, "dx", scale)
    for i, (got, want) in enumerate(zip(grads, ref_grads)):
        assert got.dtype == (adapter_dtype or dtype)
        assert_close(got, want, dtype, f"d lora {i}", scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_group_matches_peft(config, dtype, device):
    _check_group(config, dtype, device)


def test_fp32_adapters_under_bf16_activations(device):
    """PEFT's default: fp32 A/B, bf16 base. The products run in bf16, the gradients come back fp32."""
    _check_group("mixed", torch.bfloat16, device, adapter_dtype=torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_group_on_nf4_weights(dtype, device):
    """4-bit base weights: the same as PEFT on the dequantised weight."""
    _check_group("mixed", dtype, device, nf4=True)


def test_single_projection_and_unused_output(device):
    """o_proj alone; a group whose second output gets no gradient."""
    model = _peft(CONFIGS["plain"]).to(device)
    q, k = (_spec(_layer(model, name), torch.float32, None) for name in ("q", "k"))
    x = leaf(torch.randn(5, IN, device=device))
    (y,) = lora_linear(x, q)
    y2, _ = lora_linear(x, q, k)
    dx1, = torch.autograd.grad(y.sum(), x)
    dx2, = torch.autograd.grad(y2.sum(), x)
    torch.testing.assert_close(dx1, dx2)


def test_group_validation(device):
    model = _peft(CONFIGS["plain"]).to(device)
    q = _spec(_layer(model, "q"), torch.float32, None)
    x = torch.randn(4, IN, device=device)
    with pytest.raises(ValueError, match="at least one"):
        lora_linear(x)
    with pytest.raises(ValueError, match="weight has shape"):
        lora_linear(torch.randn(4, IN + 1, device=device), q)
    with pytest.raises(ValueError, match="both lora_A and lora_B"):
        lora_linear(x, LoRAProjection(q.weight, q.lora_A))
    with pytest.raises(TypeError, match="NF4Weight"):
        lora_linear(x, LoRAProjection(q.weight.tolist()))


# ---- the MLP block with a fused gate_up projection (Phi-3) and with NF4 weights ----------------

HIDDEN, INTER = 64, 48


class GateUpMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate_up_proj = nn.Linear(HIDDEN, 2 * INTER, bias=False)
        self.down_proj = nn.Linear(INTER, HIDDEN, bias=False)

    def forward(self, x):
        g, u = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(nn.functional.silu(g) * u)


@pytest.mark.parametrize("nf4", [False, True], ids=["dense", "nf4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gate_up_mlp_matches_peft(dtype, nf4, device):
    model = get_peft_model(GateUpMLP(), LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1, init_lora_weights=False,
                                                   target_modules=["gate_up_proj", "down_proj"])).train()
    model = model.to(device)
    x = leaf(torch.randn(3, 7, HIDDEN, device=device).to(dtype))
    masks = [torch.rand(x.shape, device=device) >= 0.1, torch.rand(3, 7, INTER, device=device) >= 0.1]
    layers = [_layer(model, "gate_up_proj"), _layer(model, "down_proj")]
    specs = []
    for layer, mask in zip(layers, masks):
        weight = NF4Weight(*quantize_nf4(layer.base_layer.weight.detach())) if nf4 else None
        specs.append(_spec(layer, dtype, mask, weight=weight))
    y = lora_mlp(x, None, None, specs[1], gate_up=specs[0])
    dy = torch.randn_like(y)
    lora = [t for s in specs for t in (s.lora_A, s.lora_B)]
    dx, *grads = torch.autograd.grad(y, [x, *lora], dy)

    ref = copy.deepcopy(model).double()
    for layer, spec, mask in zip([_layer(ref, "gate_up_proj"), _layer(ref, "down_proj")], specs, masks):
        w = spec.weight if not nf4 else dequantize_nf4(spec.weight.packed, spec.weight.state, torch.float64)
        layer.base_layer.weight.data.copy_(w)
        layer.lora_A["default"].weight.data.copy_(spec.lora_A)
        layer.lora_B["default"].weight.data.copy_(spec.lora_B)
        layer.lora_dropout["default"] = FixedMask(mask, 0.1)
    x64 = leaf(x.double())
    y64 = ref(x64)
    ref_params = [t for layer in (_layer(ref, "gate_up_proj"), _layer(ref, "down_proj"))
                  for t in (layer.lora_A["default"].weight, layer.lora_B["default"].weight)]
    dx64, *grads64 = torch.autograd.grad(y64, [x64, *ref_params], dy.double())
    assert_close(y, y64, dtype, "y", LORA_SCALE[dtype])
    assert_close(dx, dx64, dtype, "dx", LORA_SCALE[dtype])
    for i, (got, want) in enumerate(zip(grads, grads64)):
        assert_close(got, want, dtype, f"d lora {i}", LORA_SCALE[dtype])


def test_mlp_argument_errors(device):
    model = get_peft_model(GateUpMLP(), LoraConfig(r=4, target_modules=["gate_up_proj", "down_proj"]))
    gate_up, down = (_spec(_layer(model, n), torch.float32, None) for n in ("gate_up_proj", "down_proj"))
    x = torch.randn(2, HIDDEN)
    with pytest.raises(ValueError, match="gate and up, or gate_up alone"):
        lora_mlp(x, gate_up, None, down)
    odd = LoRAProjection(gate_up.weight[:-1], gate_up.lora_A, gate_up.lora_B[:-1], 1.0)
    with pytest.raises(ValueError, match="even number"):
        lora_mlp(x, None, None, down, gate_up=odd)


# ---- GPU tier: Llama-3.1-8B shapes in bf16 ---------------------------------------------------

def _truth(x, spec):
    """float64 x W^T + b + s (x A^T) B^T (no dropout)."""
    w = spec.weight if isinstance(spec.weight, torch.Tensor) else dequantize_nf4(
        spec.weight.packed, spec.weight.state, torch.float32)
    y = x.double() @ w.double().t()
    if spec.lora_A is not None:
        y += spec.scaling * (x.double() @ spec.lora_A.double().t()) @ spec.lora_B.double().t()
    return y


def _peft_like(x, spec):
    """What PEFT computes in bf16 with bf16 adapters: base(x) + B(A(x)) * s."""
    w = spec.weight if isinstance(spec.weight, torch.Tensor) else dequantize_nf4(
        spec.weight.packed, spec.weight.state, x.dtype)
    return nn.functional.linear(x, w) + nn.functional.linear(nn.functional.linear(x, spec.lora_A),
                                                             spec.lora_B) * spec.scaling


def _real_spec(out, inp, nf4, r=16):
    w = torch.randn(out, inp, device="cuda", dtype=torch.bfloat16) / inp ** 0.5
    weight = NF4Weight(*quantize_nf4(w)) if nf4 else w
    return LoRAProjection(weight, leaf(torch.randn(r, inp, device="cuda") / inp ** 0.5),
                          leaf(torch.randn(out, r, device="cuda") / r ** 0.5), scaling=1.0)


@pytest.mark.gpu
@pytest.mark.parametrize("nf4", [False, True], ids=["bf16", "nf4"])
def test_llama8b_shapes_bf16_gpu(nf4):
    """q/k/v group, o alone and the MLP block at hidden 4096, 32/8 heads of 128, intermediate
    14336, 4096 tokens, r=16 with fp32 adapters (PEFT's default): forward and gradients within 2x
    the error of PEFT's own bf16 computation (or the bf16 table entry) against float64."""
    h, inter, kv = 4096, 14336, 1024
    x = leaf(torch.randn(4096, h, device="cuda", dtype=torch.bfloat16))
    q, k, v = _real_spec(h, h, nf4), _real_spec(kv, h, nf4), _real_spec(kv, h, nf4)
    outs = lora_linear(x, q, k, v)
    dys = [torch.randn_like(y) for y in outs]
    dx, *grads = torch.autograd.grad(outs, [x, q.lora_A, q.lora_B, v.lora_A, v.lora_B], dys)
    for y, spec in zip(outs, (q, k, v)):
        truth = _truth(x, spec)
        peft_err = (_peft_like(x, _bf16_adapters(spec)).double() - truth).norm() / truth.norm()
        assert_close(y, truth, torch.bfloat16, "y", max(1.0, 2 * peft_err.item() / 1e-2))
    # a few rows (decoding): a 4-bit base weight goes through the fused dequantise-GEMV kernel
    with torch.no_grad():
        (few,) = lora_linear(x[:8], q)
    assert_close(few, _truth(x[:8], q), torch.bfloat16, "y (8 rows)", 2.0)
    x64 = leaf(x.detach().double())
    specs64 = [_spec64(s) for s in (q, k, v)]
    ref = [_truth(x64, s64) for s64 in specs64]
    want = torch.autograd.grad(ref, [x64, specs64[0].lora_A, specs64[0].lora_B, specs64[2].lora_A,
                                     specs64[2].lora_B], [dy.double() for dy in dys])
    for got, w_, name in zip([dx, *grads], want, ["dx", "dA_q", "dB_q", "dA_v", "dB_v"]):
        assert_close(got, w_, torch.bfloat16, name)

    gate, up, down = _real_spec(inter, h, nf4), _real_spec(inter, h, nf4), _real_spec(h, inter, nf4)
    y = lora_mlp(x, gate, up, down)
    dy = torch.randn_like(y)
    got = torch.autograd.grad(y, [x, gate.lora_A, up.lora_B, down.lora_A, down.lora_B], dy)
    gate64, up64, down64 = _spec64(gate), _spec64(up), _spec64(down)
    y64 = _truth(nn.functional.silu(_truth(x64, gate64)) * _truth(x64, up64), down64)
    # five bf16 roundings in a row (g, u, h, the LoRA products, y): twice the one-rounding entry
    assert_close(y, y64, torch.bfloat16, "mlp y", 2.0)
    want = torch.autograd.grad(y64, [x64, gate64.lora_A, up64.lora_B, down64.lora_A, down64.lora_B], dy.double())
    for g_, w_, name in zip(got, want, ["dx", "dA_gate", "dB_up", "dA_down", "dB_down"]):
        assert_close(g_, w_, torch.bfloat16, f"mlp {name}", 2.0)


def _spec64(spec):
    """The same projection in float64 with leaf adapters (the base weight dequantised if 4-bit)."""
    w = spec.weight if isinstance(spec.weight, torch.Tensor) else dequantize_nf4(
        spec.weight.packed, spec.weight.state, torch.float32)
    return LoRAProjection(w.double(), leaf(spec.lora_A.detach().double()), leaf(spec.lora_B.detach().double()),
                          spec.scaling)


def _bf16_adapters(spec):
    return LoRAProjection(spec.weight, spec.lora_A.detach().bfloat16(), spec.lora_B.detach().bfloat16(),
                          spec.scaling)


def test_dropout_masks_are_saved_tensors(device):
    """Masks go through save_for_backward, so checkpointing's saved-tensor hooks drop them too."""
    model = _peft(CONFIGS["mixed"]).to(device)
    q = _spec(_layer(model, "q"), torch.float32, None)
    x = torch.randn(4, IN, device=device, requires_grad=True)
    packed = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t.dtype) or t, lambda t: t):
        lora_linear(x, q)
        lora_mlp(torch.randn(4, HIDDEN, device=device, requires_grad=True), *[
            LoRAProjection(torch.randn(o, i, device=device), leaf(torch.randn(2, i, device=device)),
                           leaf(torch.randn(o, 2, device=device)), 1.0, dropout=0.5)
            for o, i in ((INTER, HIDDEN), (INTER, HIDDEN), (HIDDEN, INTER))])
    assert packed.count(torch.bool) == 1 + 3


def test_autocast_does_not_reach_inside(device):
    """fp32 inputs under bf16 autocast: the block computes in fp32, as its inputs are."""
    model = _peft(CONFIGS["plain"]).to(device)
    q = _spec(_layer(model, "q"), torch.float32, None)
    x = leaf(torch.randn(4, IN, device=device))
    with torch.autocast(device.type, dtype=torch.bfloat16):
        (y,) = lora_linear(x, q)
    (want,) = lora_linear(x, q)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, want)
    y.sum().backward()


def test_shared_casts_reuse_within_a_scope_per_thread():
    """cast_lora inside shared_casts casts each tensor once per scope and dtype, sees in-place
    updates (a new version), and a scope entered in one thread is not seen by another."""
    import threading

    from fusetune.lora.projection import CastScope, cast_lora, shared_casts

    a, b = torch.randn(4, 8), torch.randn(8, 4)
    scope = CastScope()
    with shared_casts(scope):
        first = cast_lora((a, b), torch.bfloat16)[0][0]
        assert cast_lora((a, b), torch.bfloat16)[0][0] is first
        assert cast_lora((a, b), torch.float16)[0][0].dtype == torch.float16
        a.add_(1.0)
        assert torch.equal(cast_lora((a, b), torch.bfloat16)[0][0], a.to(torch.bfloat16))
        seen = []
        worker = threading.Thread(target=lambda: seen.append(cast_lora((a, b), torch.bfloat16)[0][0]))
        worker.start()
        worker.join()
        assert seen[0] is not cast_lora((a, b), torch.bfloat16)[0][0]
    assert cast_lora((a, b), torch.bfloat16)[0][0] is not cast_lora((a, b), torch.bfloat16)[0][0]
