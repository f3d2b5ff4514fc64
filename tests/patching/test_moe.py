"""Mixtral and Qwen3-MoE: their norms, RoPE attention and loss patched as Mistral's and Qwen3's,
and the experts' act(gate) * up fused (through transformers' `_apply_gate` hook of its grouped_mm
experts). The unpatched model is the truth: fp32 loss, logits and every gradient (LoRA on the
attention, the routers and experts frozen or trained in full) within 1e-5."""
import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model

from fusetune import patch_model, unpatch_model, use_backend
from fusetune.patching.core import fused_class
from fusetune.patching.modules import FusedExperts
from tests.numerics import assert_close, assert_within_bf16_band
from tests.tiny_models import random_batch, tiny_model

MOE = ("mixtral", "qwen3_moe")


def _loss_logits_grads(model, ids, labels, backend=None):
    model.zero_grad(set_to_none=True)
    with use_backend(backend) if backend else torch.enable_grad():
        with torch.no_grad():
            logits = model(input_ids=ids).logits
        out = model(input_ids=ids, labels=labels)
        out.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None for g in grads.values())
    return out.loss.detach(), logits, grads


@pytest.mark.parametrize("lora", [False, True])
@pytest.mark.parametrize("family", MOE)
def test_moe_families_patched_match_unpatched_fp32(family, lora, device, capsys):
    ref = tiny_model(family).to(device)
    if lora:
        ref.requires_grad_(False)
        ref = get_peft_model(ref, LoraConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                             init_lora_weights=False))
    fused = patch_model(copy.deepcopy(ref))
    summary = capsys.readouterr().out
    assert "rms_norm" in summary and "rope 2" in summary and "mlp 2 (swiglu)" in summary, summary
    assert "cross_entropy 1 (fused linear, no logits)" in summary, summary
    ids, labels = random_batch(device=device)
    loss, logits, grads = _loss_logits_grads(fused, ids, labels, "triton")
    ref_loss, ref_logits, ref_grads = _loss_logits_grads(ref, ids, labels)
    assert_close(loss, ref_loss, torch.float32, "loss")
    assert_close(logits, ref_logits, torch.float32, "logits")
    assert grads.keys() == ref_grads.keys()
    for name, g in grads.items():
        assert_close(g, ref_grads[name], torch.float32, f"grad {name}")
    unpatch_model(fused)
    assert type(fused.get_base_model() if lora else fused) is type(ref.get_base_model() if lora else ref)


def test_the_summary_names_the_mlps_left_to_transformers(capsys):
    model = tiny_model("qwen3_moe", mlp_only_layers=[0])
    model.config._experts_implementation = "eager"
    patch_model(model)
    summary = capsys.readouterr().out
    assert "the experts' eager implementation computes act(gate) * up itself" in summary, summary
    assert "the dense layers [0] (mlp_only_layers) keep transformers' MLP" in summary, summary


def test_router_logits_keep_their_auxiliary_loss(device):
    """Asked for its router logits, a MoE model runs Hugging Face's forward (which adds the
    load-balancing loss) with the fused loss function inside it."""
    ref = tiny_model("mixtral", output_router_logits=True, router_aux_loss_coef=0.5).to(device)
    fused = patch_model(copy.deepcopy(ref))
    ids, labels = random_batch(device=device)
    with use_backend("triton"):
        out = fused(input_ids=ids, labels=labels)
    expected = ref(input_ids=ids, labels=labels)
    assert out.aux_loss is not None and out.logits is not None
    assert_close(out.loss.detach(), expected.loss.detach(), torch.float32, "loss with the auxiliary loss")


@pytest.mark.parametrize("family", MOE)
def test_fused_experts_bf16_within_band_of_float64(family, device):
    """The experts alone in bf16, routing given (a whole model's bf16 loss is no measure: a rounding
    difference flips a token's top-k experts, a discrete jump; seen on an H100 for tiny Mixtral):
    the fused gate's output and input gradient are no further from the float64 truth than
    BF16_BAND times transformers' own bf16 experts, plus BF16_FLOOR."""
    hf = tiny_model(family, dtype=torch.bfloat16).to(device).model.layers[0].mlp.experts
    truth = copy.deepcopy(hf).double()
    truth.config = copy.copy(truth.config)
    truth.config._experts_implementation = "eager"  # grouped GEMMs take no float64 on the GPU
    fused = copy.deepcopy(hf)
    fused.__class__ = fused_class(type(hf), FusedExperts, (("_fusetune_activation", "silu"),))
    tokens, k = 64, 2
    x = torch.randn(tokens, hf.hidden_dim, device=device, dtype=torch.bfloat16)
    top_k = torch.stack([torch.randperm(hf.num_experts, device=device)[:k] for _ in range(tokens)])
    weights = torch.softmax(torch.randn(tokens, k, device=device), -1).to(torch.bfloat16)
    dy = torch.randn_like(x)
    results = {}
    for name, module, dtype in (("fused", fused, torch.bfloat16), ("hf", hf, torch.bfloat16),
                                ("truth", truth, torch.float64)):
        xi = x.detach().clone().to(dtype).requires_grad_()
        with use_backend("triton"):
            y = module(xi, top_k, weights.to(dtype))
        y.backward(dy.to(dtype))
        results[name] = (y.detach(), xi.grad)
    for i, what in enumerate(("output", "input gradient")):
        assert_within_bf16_band(results["fused"][i], results["hf"][i], results["truth"][i], f"{family} {what}")
