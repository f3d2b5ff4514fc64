"""patch_model / unpatch_model on tiny random models of every family: the unpatched Hugging Face
model is the truth; the patched side runs the Triton kernels (the interpreter on CPU).

Tolerances: fp32 loss and every gradient within 1e-5 relative norm (tests/numerics.py); 20-step
AdamW curves within 1e-5 per step. bf16: the patched model's error against the float64 truth
(the unpatched model on the same bf16-rounded weights, run in float64) is at most BF16_BAND times
the unpatched bf16 model's own error, plus BF16_FLOOR (tests/numerics.py says why).
"""
import contextlib
import copy
import os

import pytest
import torch

from fusetune import patch_model, unpatch_model, use_backend
from fusetune.backend import triton_interpreting as interpreting
from fusetune.lora.adapters import keep_training_layout
from fusetune.training.checkpoint import enable_checkpointing
from fusetune.patching import UnsupportedModelError
from tests.helpers import train_steps
from tests.numerics import BF16_BAND, assert_close, assert_within_bf16_band
from tests.tiny_models import FAMILIES, add_lora, random_batch, tiny_config, tiny_model

# a bf16 training curve drifts step by step from the float64 one along its own rounding path; over
# 20 AdamW steps two correct bf16 implementations end up ~1% apart (seen: 0.96% for Phi3 + LoRA
# against HF's own 0.14%), while a wrong kernel misses by O(1) or stops the loss from falling
BF16_CURVE_FLOOR = 1.5e-2
# the interpreter runs each kernel on the CPU: 6 steps there keep CI short, 20 on a GPU
CURVE_STEPS, CURVE_RTOL, CURVE_BATCH = (6 if interpreting() else 20), 1e-5, (1, 12)
ALL = list(FAMILIES) + ["phi3_partial"]
# LoRA curves for every family, and Phi3 with partial rotary; the order of get_peft_model and
# patch_model alternates between them
LORA_CURVE_FAMILIES = list(FAMILIES) + ["phi3_partial"]


# CI's lowest-releases subset checks those releases' API, not the kernels again (the main tier does):
# it sets FUSETUNE_TEST_PATCHED_BACKEND=torch, which the interpreter would run several times slower
PATCHED_BACKEND = os.environ.get("FUSETUNE_TEST_PATCHED_BACKEND", "triton")


def _backend(name):
    """The patched side runs under use_backend("triton") (or FUSETUNE_TEST_PATCHED_BACKEND); the
    unpatched HF model needs none."""
    return use_backend(PATCHED_BACKEND if name == "triton" else name) if name else contextlib.nullcontext()


def _patched(model):
    patch_model(model)
    return model


def _loss_and_grads(model, ids, labels, backend=None):
    model.zero_grad(set_to_none=True)
    with _backend(backend):
        with torch.no_grad():  # given labels, the patched model returns no logits
            logits = model(input_ids=ids).logits
        out = model(input_ids=ids, labels=labels)
        out.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None for g in grads.values())
    return out.loss.detach(), logits, grads


def _assert_grads(grads, ref_grads, dtype):
    assert grads.keys() == ref_grads.keys()
    for name, g in grads.items():
        assert_close(g, ref_grads[name], dtype, f"grad {name}")


@pytest.mark.parametrize("family", ALL)
def test_loss_logits_and_grads_match_fp32(family, device):
    ref = tiny_model(family).to(device)
    fused = _patched(tiny_model(family).to(device))
    ids, labels = random_batch(device=device)
    loss, logits, grads = _loss_and_grads(fused, ids, labels, "triton")
    ref_loss, ref_logits, ref_grads = _loss_and_grads(ref, ids, labels)
    assert_close(loss, ref_loss, torch.float32, "loss")
    assert_close(logits, ref_logits, torch.float32, "logits")
    _assert_grads(grads, ref_grads, torch.float32)


@pytest.mark.parametrize("family", FAMILIES)
def test_loss_and_grads_bf16_within_band(family, device):
    ref = tiny_model(family, dtype=torch.bfloat16).to(device)
    truth = copy.deepcopy(ref).double()
    fused = _patched(copy.deepcopy(ref))
    ids, labels = random_batch(device=device)
    loss, _, grads = _loss_and_grads(fused, ids, labels, "triton")
    ref_loss, _, ref_grads = _loss_and_grads(ref, ids, labels)
    true_loss, _, true_grads = _loss_and_grads(truth, ids, labels)
    _assert_within_band(family, (loss, grads), (ref_loss, ref_grads), (true_loss, true_grads))


def _assert_within_band(family, fused, hf, truth):
    """Each of (loss, grads) of the patched bf16 model is at most BF16_BAND times as far from the
    float64 truth as HF's own bf16 model is, plus BF16_FLOOR."""
    (loss, grads), (ref_loss, ref_grads), (true_loss, true_grads) = fused, hf, truth
    for name, out, ref, true in [("loss", loss, ref_loss, true_loss)] + [
            (f"grad {n}", grads[n], ref_grads[n], true_grads[n]) for n in true_grads]:
        assert_within_bf16_band(out, ref, true, f"{family} {name}")


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_loss_and_grads_bf16_within_band(family, device):
    ref = add_lora(tiny_model(family, dtype=torch.bfloat16).to(device), family)
    truth = copy.deepcopy(ref).double()
    fused = _patched(copy.deepcopy(ref))
    ids, labels = random_batch(device=device)
    _assert_within_band(family, _loss_and_grads(fused, ids, labels, "triton")[::2],
                        _loss_and_grads(ref, ids, labels)[::2], _loss_and_grads(truth, ids, labels)[::2])


# full fine-tuning (the same kernels, trainable base weights: every family's weight gradients are
# checked in one step by test_loss_logits_and_grads_match_fp32) in one SwiGLU and one GeGLU + softcap family
FULL_CURVE_FAMILIES = ["llama", "gemma2"]
# bf16 LoRA curves where the kernels differ (SwiGLU, GeGLU + softcap, sliding windows + QK norm, fused
# qkv, QK norm); the fp32 LoRA curves run in every family
BF16_LORA_CURVE_FAMILIES = ["llama", "gemma2", "gemma3", "phi3", "qwen3"]
BF16_CURVES = [(family, True) for family in BF16_LORA_CURVE_FAMILIES] + \
    [(family, False) for family in FULL_CURVE_FAMILIES]


@pytest.mark.slow
@pytest.mark.parametrize("family,lora", BF16_CURVES, ids=[f"{f}-{'lora' if lora else 'full'}" for f, lora in BF16_CURVES])
def test_training_curve_bf16_within_band(family, lora, device):
    """CURVE_STEPS bf16 AdamW steps: the patched curve stays as close to the float64 curve (same initial
    bf16 weights) as HF's own bf16 curve, within the band."""
    ids, labels = random_batch(*CURVE_BATCH, device=device)
    ref = tiny_model(family, dtype=torch.bfloat16).to(device)
    if lora:
        ref = add_lora(ref, family)
    truth = _curve(copy.deepcopy(ref).double(), ids, labels)
    fused_curve = _curve(_patched(copy.deepcopy(ref)), ids, labels, "triton")
    ref_curve = _curve(ref, ids, labels)
    err = ((fused_curve - truth).abs() / truth.abs()).max().item()
    hf_err = ((ref_curve - truth).abs() / truth.abs()).max().item()
    assert err <= BF16_BAND * hf_err + BF16_CURVE_FLOOR, f"{family}: curve error {err:.2e} vs HF bf16 {hf_err:.2e}"
    assert fused_curve[-1] < fused_curve[0]


def _curve(model, ids, labels, backend=None):
    losses = train_steps(model, CURVE_STEPS, (ids, labels), lr=1e-3, backend=backend)
    return torch.tensor(losses, dtype=torch.float64)


def _assert_curves(curve, ref_curve):
    err = ((curve - ref_curve).abs() / ref_curve.abs()).max().item()
    assert err <= CURVE_RTOL, f"loss curves differ by {err:.2e} (relative)\n{curve}\n{ref_curve}"
    assert ref_curve[-1] < ref_curve[0]  # it did train


@pytest.mark.slow
@pytest.mark.parametrize("family", FULL_CURVE_FAMILIES)
def test_training_curve_fp32(family, device):
    ids, labels = random_batch(*CURVE_BATCH, device=device)
    ref_curve = _curve(tiny_model(family).to(device), ids, labels)
    curve = _curve(_patched(tiny_model(family).to(device)), ids, labels, "triton")
    _assert_curves(curve, ref_curve)


@pytest.mark.slow
@pytest.mark.parametrize("family", LORA_CURVE_FAMILIES)
def test_training_curve_lora_fp32(family, device):
    ids, labels = random_batch(*CURVE_BATCH, device=device)
    ref_curve = _curve(add_lora(tiny_model(family).to(device), family), ids, labels)
    # alternate the order of get_peft_model and patch_model
    if LORA_CURVE_FAMILIES.index(family) % 2:
        model = add_lora(_patched(tiny_model(family).to(device)), family)
    else:
        model = _patched(add_lora(tiny_model(family).to(device), family))
    _assert_curves(_curve(model, ids, labels, "triton"), ref_curve)


# both orders in a plain, a softcapped and a fused-qkv family (the LoRA curves alternate the order in all)
@pytest.mark.parametrize("family", ["llama", "gemma2", "phi3"])
def test_peft_before_and_after_patching(family, device):
    ids, labels = random_batch(device=device)
    ref = add_lora(tiny_model(family).to(device), family)
    keys = list(ref.state_dict())
    ref_loss, _, ref_grads = _loss_and_grads(ref, ids, labels)
    assert all("lora_" in n for n in ref_grads)
    before = add_lora(_patched(tiny_model(family).to(device)), family)
    after = _patched(add_lora(tiny_model(family).to(device), family))
    for model in (before, after):
        assert list(model.state_dict()) == keys
        loss, _, grads = _loss_and_grads(model, ids, labels, "triton")
        assert_close(loss, ref_loss, torch.float32, "loss")
        _assert_grads(grads, ref_grads, torch.float32)
    unpatch_model(after)
    loss, _, grads = _loss_and_grads(after, ids, labels)
    assert torch.equal(loss, ref_loss)


def test_lora_with_gradient_checkpointing(device):
    """The benchmark set-up: LoRA on every projection, gradient checkpointing on (the fused
    modules run again in the recomputation)."""
    ids, labels = random_batch(device=device)
    ref = add_lora(tiny_model("llama").to(device), "llama")
    fused = _patched(add_lora(tiny_model("llama").to(device), "llama"))
    for model in (ref, fused):
        enable_checkpointing(model)
    ref_loss, _, ref_grads = _loss_and_grads(ref, ids, labels)
    loss, _, grads = _loss_and_grads(fused, ids, labels, "triton")
    assert_close(loss, ref_loss, torch.float32, "loss")
    _assert_grads(grads, ref_grads, torch.float32)


@pytest.mark.parametrize("family", FAMILIES)
def test_unpatch_restores_exactly(family, device):
    model = tiny_model(family).to(device)
    classes = {n: type(m) for n, m in model.named_modules()}
    keys = list(model.state_dict())
    ids, labels = random_batch(device=device)
    loss, logits, grads = _loss_and_grads(model, ids, labels)
    patch_model(model)
    assert all(type(m).__name__.startswith("Fused") for n, m in model.named_modules()
               if n.endswith(("norm", "mlp", "self_attn")))
    assert list(model.state_dict()) == keys
    with _backend("triton"), torch.no_grad():
        model(input_ids=ids, labels=labels)
    assert unpatch_model(model) is model
    assert {n: type(m) for n, m in model.named_modules()} == classes
    assert "_loss_function" not in model.__dict__
    assert list(model.state_dict()) == keys
    loss2, logits2, grads2 = _loss_and_grads(model, ids, labels)
    assert torch.equal(loss2, loss) and torch.equal(logits2, logits)
    assert all(torch.equal(grads2[n], g) for n, g in grads.items())


# with the KV cache in every family; without it (each step the whole sequence, as the loss tests'
# forward) in one plain and one softcapped family
GENERATE = [(family, True) for family in FAMILIES] + [("llama", False), ("gemma2", False)]


@pytest.mark.parametrize("family,use_cache", GENERATE,
                         ids=[f"{f}-{'cache' if cache else 'no_cache'}" for f, cache in GENERATE])
def test_generate_matches_greedy(family, use_cache, device):
    ref = tiny_model(family).to(device).eval()
    fused = _patched(tiny_model(family).to(device).eval())
    prompt = random_batch(batch=2, seq=6, device=device)[0]
    kwargs = dict(max_new_tokens=5, do_sample=False, use_cache=use_cache, pad_token_id=0,
                  output_logits=True, return_dict_in_generate=True)
    ref_out = ref.generate(prompt, **kwargs)
    with _backend("triton"):
        out = fused.generate(prompt, **kwargs)
    assert torch.equal(out.sequences, ref_out.sequences)
    for step, (a, b) in enumerate(zip(out.logits, ref_out.logits)):
        assert_close(a, b, torch.float32, f"logits of step {step}")


def test_generate_on_a_4bit_base_matches_greedy(tmp_path, device):
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    # intermediate 128: bitsandbytes' CPU dequantisation needs rows in whole blocks of 64
    tiny_model("llama", intermediate_size=128).save_pretrained(tmp_path)
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    load = lambda: AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=config, dtype=torch.float32,
                                                        device_map=device.type).eval()
    # the reference on bitsandbytes' NF4 matmul, as patch_model leaves the bare Linear4bits: not
    # its CPU inference kernel (bf16 arithmetic, which greedy decoding can tell apart)
    ref, fused = load(), _patched(load())
    keep_training_layout(ref)
    prompt = random_batch(batch=2, seq=6, device=device)[0]
    for use_cache in (True, False):
        kwargs = dict(max_new_tokens=5, do_sample=False, use_cache=use_cache, pad_token_id=0)
        with _backend("triton"):
            assert torch.equal(fused.generate(prompt, **kwargs), ref.generate(prompt, **kwargs))


def test_a_4bit_base_trains_the_same_after_an_eval_pass(tmp_path, device):
    """bitsandbytes repacks a CPU Linear4bit for its inference kernel at an eval forward without
    grad, and that kernel has no backward: after patch_model an eval pass (an eval loss, a
    generate) changes neither the training loss nor a LoRA gradient."""
    pytest.importorskip("bitsandbytes")
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    tiny_model("llama", intermediate_size=128).save_pretrained(tmp_path)
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    ids, labels = random_batch(batch=2, seq=6, device=device)

    def trained(eval_first: bool):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=config, dtype=torch.float32,
                                                     device_map=device.type)
        # q and v adapters: their gradients pass through o_proj, a bare Linear4bit
        model = _patched(get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"])))
        with _backend("triton"):
            if eval_first:
                model.eval()
                with torch.no_grad():
                    model(input_ids=ids)
            model.train()
            loss = model(input_ids=ids, labels=labels).loss
            loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        return loss.detach(), grads

    loss, grads = trained(eval_first=False)
    loss_after_eval, grads_after_eval = trained(eval_first=True)
    assert torch.equal(loss_after_eval, loss)
    assert grads.keys() == grads_after_eval.keys() and grads
    for name, grad in grads.items():
        assert grads_after_eval[name] is not None and torch.equal(grads_after_eval[name], grad), name


def test_a_4bit_base_repacked_for_inference_is_refused(tmp_path):
    """A Linear4bit that bitsandbytes already repacked for its CPU inference kernel (lossy, and with
    no backward) is named, with the fix, instead of trained on."""
    bnb = pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    tiny_model("llama", intermediate_size=128).save_pretrained(tmp_path)
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=config, dtype=torch.float32)
    layer = model.model.layers[0].self_attn.o_proj
    # what bitsandbytes' eval-mode forward does on a CPU with AVX512-BF16 (pure torch: any host)
    layer.weight.data, layer.weight.quant_state = bnb.functional._convert_weight_packed_for_cpu(
        layer.weight.data, layer.weight.quant_state)
    with pytest.raises(ValueError, match="1 of the model's 14 4-bit layers were repacked .* load the model again and "
                                         "patch it first"):
        patch_model(model)


def test_loss_honours_num_items_in_batch_shift_labels_and_ignore_index(device):
    ref = tiny_model("gemma2").to(device)
    fused = _patched(tiny_model("gemma2").to(device))
    ids, labels = random_batch(device=device)
    shifted = torch.randint(2, 257, labels.shape, device=device)
    shifted[0, 5:] = -1
    for kwargs in [dict(num_items_in_batch=torch.tensor(50)),
                   dict(shift_labels=shifted, ignore_index=-1)]:
        with torch.no_grad():
            want = ref(input_ids=ids, labels=labels, **kwargs).loss
            with _backend("triton"):
                got = fused(input_ids=ids, labels=labels, **kwargs).loss
        assert_close(got, want, torch.float32, f"loss with {sorted(kwargs)}")


@pytest.mark.parametrize("family", FAMILIES)
def test_the_fused_forward_shows_the_original_signature(family):
    """transformers reads forward's parameters (Trainer drops dataset columns it does not name,
    generate builds position_ids and logits_to_keep only where the signature has them)."""
    import inspect

    model = tiny_model(family)
    want = inspect.signature(type(model).forward)
    patch_model(model)
    assert inspect.signature(type(model).forward) == want
    assert inspect.signature(model.forward).parameters.keys() >= {"input_ids", "attention_mask", "position_ids",
                                                                   "labels", "logits_to_keep"}


def test_summary_line(capsys):
    patch_model(tiny_model("llama"))
    assert capsys.readouterr().out.strip() == (
        "fusetune: patched LlamaForCausalLM [Llama]: rms_norm 5, rope 2, attention (flash kernel: packed, padded, "
        "softcap, window; SDPA: plain causal), mlp 2 (swiglu), cross_entropy 1 (fused linear, no logits); "
        "left alone: nothing")
    patch_model(tiny_model("gemma3"), fused_linear_cross_entropy=False)
    assert "rms_norm 13, rope 2, attention (flash kernel: packed, padded, softcap, window; SDPA: plain causal), " \
           "mlp 2 (geglu), cross_entropy 1 (on logits);" in capsys.readouterr().out


def test_summary_names_what_was_left_alone_and_why(capsys):
    model = tiny_model("llama", hidden_act="relu")
    patch_model(model, rope=False)
    out = capsys.readouterr().out
    assert out.count("\n") == 1
    assert "rms_norm 5, attention (flash kernel: packed, padded, softcap, window; SDPA: plain causal), " \
           "cross_entropy 1 (fused linear, no logits);" in out
    assert "rope: switched off" in out and "mlp: hidden_act 'relu' has no fused kernel (2 modules)" in out
    patch_model(model, rope=False, attention=False, mlp=False, rms_norm=False, cross_entropy=False)
    assert "patched LlamaForCausalLM [Llama]: nothing; left alone: rms_norm: switched off" in capsys.readouterr().out

    from transformers import LlamaModel

    patch_model(LlamaModel(tiny_config("llama")))
    assert "cross_entropy: LlamaModel computes no causal-LM loss" in capsys.readouterr().out


def test_patching_twice_is_a_no_op(capsys):
    model = tiny_model("qwen3")
    patch_model(model)
    classes = {n: type(m) for n, m in model.named_modules()}
    loss_function = model.loss_function
    patch_model(model)
    assert "rms_norm 9 (9 already), rope 2 (2 already)" in capsys.readouterr().out
    assert {n: type(m) for n, m in model.named_modules()} == classes
    assert model.loss_function is loss_function
    unpatch_model(model)
    assert not any(type(m).__name__.startswith("Fused") for m in model.modules())


def test_unsupported_family_names_the_supported_ones():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64))
    with pytest.raises(UnsupportedModelError, match=r"GPT2LMHeadModel \(model_type 'gpt2'\).*Llama, Mistral, "
                                                    r"Qwen2, Qwen3, Gemma, Gemma2, Gemma3.*Phi3"):
        patch_model(model)
    with pytest.raises(TypeError, match="PreTrainedModel"):
        patch_model(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_loss_on_logits_path_matches(family, device):
    """fused_linear_cross_entropy=False: HF makes the logits (Gemma2 softcaps them), the fused
    loss runs on them, and backward overwrites outputs.logits."""
    ref = tiny_model(family).to(device)
    fused = tiny_model(family).to(device)
    patch_model(fused, fused_linear_cross_entropy=False)
    ids, labels = random_batch(device=device)
    with _backend("triton"):
        out = fused(input_ids=ids, labels=labels)
    assert out.logits is not None
    want = ref(input_ids=ids, labels=labels)
    assert_close(out.logits.detach(), want.logits.detach(), torch.float32, "logits")
    assert_close(out.loss.detach(), want.loss.detach(), torch.float32, "loss")
    with _backend("triton"):
        out.loss.backward()
    want.loss.backward()
    grads = {n: p.grad for n, p in fused.named_parameters()}
    _assert_grads(grads, {n: p.grad for n, p in ref.named_parameters()}, torch.float32)


def test_fused_linear_loss_returns_no_logits_and_keeps_the_class_name(device, tmp_path, monkeypatch):
    model = _patched(tiny_model("llama").to(device))
    ids, labels = random_batch(device=device)
    with _backend("triton"):
        out = model(input_ids=ids, labels=labels)
        assert out.logits is None  # training: no logits held
        with pytest.raises(KeyError, match="set the environment variable FUSETUNE_RETURN_LOGITS=1"):
            out["logits"]
        assert torch.equal(out["loss"], out.loss) and out.to_tuple()[0] is out.loss
        with torch.no_grad():
            assert model(input_ids=ids).logits.shape == (*ids.shape, model.config.vocab_size)
        monkeypatch.setenv("FUSETUNE_RETURN_LOGITS", "1")  # the documented switch
        both = model(input_ids=ids, labels=labels)
        assert both["logits"].shape == (*ids.shape, model.config.vocab_size)
        assert_close(both.loss.detach(), out.loss.detach(), torch.float32, "loss with logits")
        logits = both.logits.detach().clone()
        both.loss.backward()
        assert torch.equal(both.logits.detach(), logits)  # the backward left them as they were
    assert type(model).__name__ == "LlamaForCausalLM"  # save_pretrained writes it into config.json
    model.save_pretrained(tmp_path)
    assert '"LlamaForCausalLM"' in (tmp_path / "config.json").read_text()


# real widths on the GPU: Llama-3.1-8B's hidden 4096, 32 q / 8 kv heads of 128, intermediate
# 14336, vocab 128256, one decoder layer, 1 x 2048 tokens, bf16 (the float64 truth in between)
REAL_WIDTHS = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                   head_dim=128, vocab_size=128256, num_hidden_layers=1, max_position_embeddings=4096,
                   initializer_range=0.02)


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma2", "phi3_partial"])
def test_real_widths_bf16_within_band_gpu(family):
    overrides = dict(REAL_WIDTHS)
    if family == "gemma2":
        overrides.update(query_pre_attn_scalar=128, layer_types=["sliding_attention"], sliding_window=1024)
    ref = tiny_model(family, dtype=torch.bfloat16, **overrides).cuda()
    ids, labels = random_batch(batch=1, seq=2048, device="cuda")
    truth = copy.deepcopy(ref).double()
    true_loss, _, true_grads = _loss_and_grads(truth, ids, labels)
    del truth
    ref_loss, _, ref_grads = _loss_and_grads(ref, ids, labels)
    fused = _patched(ref)  # in place: the same weights
    loss, _, grads = _loss_and_grads(fused, ids, labels, "triton")
    for name, out, hf, true in [("loss", loss, ref_loss, true_loss)] + [
            (f"grad {n}", grads[n], ref_grads[n], true_grads[n]) for n in true_grads]:
        assert_within_bf16_band(out, hf, true, f"{family} {name}")


def test_fused_linear_loss_under_autocast_tuples_and_eval(device):
    """The Trainer set-ups: fp32 weights under bf16 autocast, return_dict=False, and evaluation
    under no_grad, where callers read the logits (HF's forward then runs, with the fused loss)."""
    ref, fused = tiny_model("llama").to(device), _patched(tiny_model("llama").to(device))
    ids, labels = random_batch(device=device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        want = ref(input_ids=ids, labels=labels).loss
        with _backend("triton"):
            got = fused(input_ids=ids, labels=labels).loss
    assert abs(got.item() - want.item()) <= 2e-2 * abs(want.item())
    with _backend("triton"):
        loss, *rest = fused(input_ids=ids, labels=labels, return_dict=False)
        with torch.no_grad():
            out = fused(input_ids=ids, labels=labels)
    assert loss.dim() == 0 and out.logits is not None
    assert_close(out.loss, ref(input_ids=ids, labels=labels).loss.detach(), torch.float32, "eval loss")
