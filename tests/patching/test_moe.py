"""Mixtral and Qwen3-MoE: their norms, RoPE attention and loss patched as Mistral's and Qwen3's,
and the experts' act(gate) * up fused (through transformers' `_apply_gate` hook of its grouped_mm
experts). The unpatched model is the truth: fp32 loss, logits and every gradient (LoRA on the
attention, the routers and experts frozen or trained in full) within 1e-5."""
import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model

from fusetune import patch_model, unpatch_model, use_backend
from tests.numerics import assert_close
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


@pytest.mark.gpu
@pytest.mark.parametrize("family", MOE)
def test_moe_bf16_experts_within_band_of_float64(family):
    """bf16 on the GPU: the patched model's loss and gradients are no further from the float64
    truth than twice HF's own bf16 error (plus 2e-3)."""
    from tests.numerics import rel_err

    ref = tiny_model(family, dtype=torch.bfloat16).cuda()
    truth = copy.deepcopy(ref).double()
    truth.config._experts_implementation = "eager"  # grouped GEMMs take no float64 on the GPU
    fused = patch_model(copy.deepcopy(ref))
    ids, labels = random_batch(device="cuda")
    (loss, _, grads), (hf_loss, _, hf_grads), (true_loss, _, true_grads) = (
        _loss_logits_grads(fused, ids, labels, "triton"), _loss_logits_grads(ref, ids, labels),
        _loss_logits_grads(truth, ids, labels))
    for name, out, hf, true in [("loss", loss, hf_loss, true_loss)] + [
            (n, grads[n], hf_grads[n], true_grads[n]) for n in true_grads]:
        assert rel_err(out, true) <= 2 * rel_err(hf, true) + 2e-3, name
