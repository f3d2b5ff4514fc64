"""FastModel: a causal LM, image-text-to-text model or encoder-decoder LM of any family transformers
loads comes from a folder with its tokenizer (or processor), takes LoRA (get_peft_model) and trains;
fusetune patches the families it has kernels for (Gemma-3's language model, T5, Mixtral, Qwen3-MoE)
and says why it leaves the others (gpt-oss, Qwen2.5-VL) unpatched."""
import copy

import numpy as np
import pytest
import torch
import transformers

import fusetune
from fusetune import FastLanguageModel, FastModel
from tests.helpers import save_model_dir
from tests.numerics import assert_close, assert_within_bf16_band
from tests.tiny_models import VOCAB

_TEXT = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, pad_token_id=0, bos_token_id=1, eos_token_id=1)

# family -> (config class, fields): mixture-of-experts causal LMs
_MOE = {
    "mixtral": ("MixtralConfig", dict(num_local_experts=4, num_experts_per_tok=2)),
    "qwen3_moe": ("Qwen3MoeConfig", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)),
    "gpt_oss": ("GptOssConfig", dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=64,
                                     sliding_window=8, layer_types=["sliding_attention", "full_attention"])),
}


def _perturb_norms(model):
    """Norm weights start at exactly 1 (or 0); perturb them so a norm that loses its weight shows."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def _train_step(model, **batch):
    """One forward with labels and backward: the loss is finite and every LoRA B matrix (A's
    gradient is 0 while B starts at 0) gets a finite, non-zero gradient."""
    loss = model(**{k: v.to(model.device) for k, v in batch.items()}).loss  # on a GPU machine: the GPU
    loss.backward()
    assert torch.isfinite(loss), loss
    grads = {n: p.grad for n, p in model.named_parameters() if "lora_B" in n}
    assert grads, "no LoRA adapters"
    for name, grad in grads.items():
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name
    return loss


@pytest.mark.parametrize("family", sorted(_MOE))
def test_moe_causal_lms_load_and_train(family, tmp_path, capsys):
    name, fields = _MOE[family]
    hf = getattr(transformers, name)(**{**_TEXT, **fields})
    folder = save_model_dir(transformers.AutoModelForCausalLM.from_config(hf), tmp_path / family)
    model, tokenizer = FastModel.from_pretrained(str(folder), dtype=torch.float32)
    out = capsys.readouterr().out
    if family == "gpt_oss":  # its experts' gate clamps and scales: no spec
        assert f"left {type(model).__name__} unpatched: fusetune has no fused kernels" in out
        assert f"(model_type {family!r})" in out
    else:
        assert f"patched {type(model).__name__}" in out and "mlp 2 (swiglu)" in out, out
    assert tokenizer.pad_token == "<unk>"  # not EOS ("<s>"): a collator masking the pad id keeps the EOS labels
    model = FastModel.get_peft_model(model, r=4)
    # the experts are 3-D parameters, not linear layers: LoRA goes on the attention projections
    assert set(model.peft_config["default"].target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    ids = torch.randint(2, VOCAB, (2, 12))
    _train_step(model, input_ids=ids, labels=ids)


def _gemma3_processor(image_size: int, image_tokens: int):
    """Gemma3Processor over a word-level tokenizer with Gemma-3's image tokens (ids VOCAB..VOCAB+2)
    and the PIL image processor (no torchvision needed)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    specials = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}
    vocab = {"<unk>": 0, "<s>": 1, **{f"w{i}": i for i in range(2, VOCAB)},
             **{token: VOCAB + i for i, token in enumerate(specials.values())}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="<s>",
                                        extra_special_tokens=specials)
    images = Gemma3ImageProcessorPil(size={"height": image_size, "width": image_size})
    return transformers.Gemma3Processor(image_processor=images, tokenizer=tokenizer, image_seq_length=image_tokens)


def test_gemma3_image_text_is_patched_and_trains_on_images(tmp_path, capsys):
    from PIL import Image

    config = transformers.Gemma3Config(
        text_config={**_TEXT, "vocab_size": VOCAB + 3, "sliding_window": 8, "query_pre_attn_scalar": 24,
                     "layer_types": ["sliding_attention", "full_attention"]},
        vision_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                           image_size=28, patch_size=7, vision_use_head=False),
        mm_tokens_per_image=4, boi_token_index=VOCAB, eoi_token_index=VOCAB + 1, image_token_index=VOCAB + 2)
    ref = _perturb_norms(transformers.Gemma3ForConditionalGeneration(config))
    with torch.no_grad():  # initialised to 0: the image would add nothing
        ref.model.multi_modal_projector.mm_input_projection_weight.normal_(0, 0.1)
    ref.save_pretrained(tmp_path)
    _gemma3_processor(28, 4).save_pretrained(tmp_path)

    model, processor = FastModel.from_pretrained(str(tmp_path), dtype=torch.float32)
    out = capsys.readouterr().out
    assert isinstance(processor, transformers.Gemma3Processor)
    assert type(model).__name__ == "Gemma3ForConditionalGeneration"
    assert ("patched Gemma3ForConditionalGeneration [Gemma3]: rms_norm 14, rope 2, mlp 2 (geglu), cross_entropy 1 "
            "(fused linear, no logits)") in out  # norms: 2 layers x (4 + q/k), the final one, the projector's

    image = Image.fromarray((np.random.rand(28, 28, 3) * 255).astype("uint8"))
    batch = processor(text=["w5 w6 <start_of_image> w7 w8", "w9 <start_of_image> w10 w11 w12"],
                      images=[[image], [image]], return_tensors="pt")
    assert batch["pixel_values"].shape == (2, 3, 28, 28) and (batch["token_type_ids"] == 1).sum() == 8
    labels = batch["input_ids"].masked_fill(batch["token_type_ids"] == 1, -100)
    ref.train()
    assert_close(model(**batch, labels=labels).loss, ref(**batch, labels=labels).loss, torch.float32, "loss")

    model = FastModel.get_peft_model(model, r=4)
    out = capsys.readouterr().out
    assert "lora 14 projections" in out  # the language model's 7 per layer
    assert "lora: k_proj, v_proj, q_proj: outside fused attention/MLP, PEFT's path (3 projections)" in out  # SigLIP's
    _train_step(model, **batch, labels=labels)


def test_qwen2_5_vl_loads_unpatched_with_its_tokenizer_and_trains_on_images(tmp_path, capsys):
    start, end, image_token = VOCAB, VOCAB + 1, VOCAB + 2
    config = transformers.Qwen2_5_VLConfig(
        text_config={**_TEXT, "vocab_size": VOCAB + 4,
                     "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}},
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=64,
                           patch_size=4, spatial_merge_size=2, temporal_patch_size=2, window_size=16,
                           fullatt_block_indexes=[1]),
        vision_start_token_id=start, vision_end_token_id=end, image_token_id=image_token, video_token_id=VOCAB + 3)
    save_model_dir(transformers.Qwen2_5_VLForConditionalGeneration(config), tmp_path)  # a tokenizer, no processor

    model, tokenizer = FastModel.from_pretrained(str(tmp_path), dtype=torch.float32)
    out = capsys.readouterr().out
    assert f"no processor loads from {tmp_path}" in out and "returning its tokenizer" in out
    assert isinstance(tokenizer, transformers.PreTrainedTokenizerBase)
    assert "left Qwen2_5_VLForConditionalGeneration unpatched: fusetune has no fused kernels" in out
    model = FastModel.get_peft_model(model, r=4)

    # one 16x16 image: a 4x4 grid of 4x4 patches, merged 2x2 into 4 tokens
    ids = torch.randint(2, VOCAB, (2, 12))
    ids[:, 2], ids[:, 3:7], ids[:, 7] = start, image_token, end
    labels = ids.masked_fill(ids == image_token, -100)
    grid = torch.tensor([[1, 4, 4], [1, 4, 4]])
    pixel_values = torch.randn(2 * 16, 3 * 2 * 4 * 4)
    _train_step(model, input_ids=ids, pixel_values=pixel_values, image_grid_thw=grid, labels=labels)


def _t5_folder(path):
    # initializer_factor 0.5: T5's default init gives logits so large (loss ~24) that HF's own fp32
    # gradients are 1e-4 from float64; at 0.5 both models land within 5e-6 of it, so 1e-5 is tight
    config = transformers.T5Config(vocab_size=VOCAB, d_model=64, d_kv=16, d_ff=96, num_layers=2, num_decoder_layers=2,
                                   num_heads=4, feed_forward_proj="gated-gelu", dropout_rate=0.0,
                                   tie_word_embeddings=False, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
                                   initializer_factor=0.5)
    return save_model_dir(_perturb_norms(transformers.T5ForConditionalGeneration(config)), path)


def _t5_batch():
    ids = torch.randint(2, VOCAB, (2, 10))
    labels = torch.randint(2, VOCAB, (2, 7))
    labels[1, -3:] = -100  # padding of the shorter target
    return ids, labels


def test_t5_is_patched_and_matches_the_unpatched_model(tmp_path, capsys):
    from peft import LoraConfig, get_peft_model

    folder = _t5_folder(tmp_path)
    model, _ = FastModel.from_pretrained(str(folder), dtype=torch.float32)
    out = capsys.readouterr().out
    assert ("patched T5ForConditionalGeneration [T5]: rms_norm 12, mlp 4 (geglu), cross_entropy 1 (on logits); "
            "left alone: rope: T5's attention has no RoPE") in out
    model = FastModel.get_peft_model(model, r=4, use_gradient_checkpointing=False, init_lora_weights=False)
    assert type(model).__name__ == "PeftModelForSeq2SeqLM"
    targets = {"q", "k", "v", "o", "wi_0", "wi_1", "wo"}
    assert set(model.peft_config["default"].target_modules) == targets
    out = capsys.readouterr().out
    assert "lora 12 projections" in out  # wi_0, wi_1, wo of 4 FFN blocks; attention runs PEFT's path
    assert "lora: q, k, v, o: outside fused attention/MLP, PEFT's path (24 projections)" in out

    # the unpatched model with the same adapters (get_peft_model seeds them with random_state 3407)
    ref = transformers.T5ForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).train()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3407)
        ref = get_peft_model(ref, LoraConfig(r=4, lora_alpha=16, target_modules=sorted(targets),
                                             task_type="SEQ_2_SEQ_LM", init_lora_weights=False))
    ids, labels = _t5_batch()
    loss, ref_loss = model(input_ids=ids, labels=labels).loss, ref(input_ids=ids, labels=labels).loss
    assert_close(loss, ref_loss, torch.float32, "loss")
    loss.backward()
    ref_loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    ref_grads = {n: p.grad for n, p in ref.named_parameters() if p.requires_grad}
    # A and B of 7 targets per encoder block, 11 per decoder block (its cross-attention too)
    assert grads.keys() == ref_grads.keys() and len(grads) == 2 * (2 * 7 + 2 * 11)
    # the encoder's gradients come back through the whole decoder and its cross-attention: fp32 reordering in
    # the fused norms, GeGLU and loss reaches 1e-5 relative there (seen: 1.007e-5; a wrong kernel misses by O(1))
    for name, grad in grads.items():
        assert grad.abs().sum() > 0, name
        assert_close(grad, ref_grads[name], torch.float32, f"grad {name}", scale=4.0)

    # Trainer's num_items_in_batch (gradient accumulation): the sum over the batch divided by it
    with torch.no_grad():
        total = model(input_ids=ids, labels=labels, num_items_in_batch=torch.tensor(40)).loss * 40
    assert_close(total, loss.detach() * (labels != -100).sum(), torch.float32, "summed loss")

    FastModel.for_inference(model)  # generation runs HF's forward (no labels)
    assert 2 <= model.generate(input_ids=ids[:1], max_new_tokens=3, do_sample=False).shape[1] <= 4
    fusetune.unpatch_model(model)
    assert type(model.get_base_model()) is transformers.T5ForConditionalGeneration
    assert not any(type(m).__name__.startswith("Fused") for m in model.modules())


def test_t5_trains_with_gradient_checkpointing(tmp_path):
    model, _ = FastModel.from_pretrained(str(_t5_folder(tmp_path)), dtype=torch.float32)
    model = FastModel.get_peft_model(model, r=4)
    ids, labels = _t5_batch()
    _train_step(model, input_ids=ids, labels=labels)


def test_t5_bf16_with_wo_kept_in_fp32(tmp_path):
    """transformers may keep T5's wo in fp32 (_keep_in_fp32_modules): the residual stream turns fp32
    and each T5LayerNorm casts back to its bf16 weight's dtype; the patched norms do the same. The
    loss is within the bf16 band of the float64 truth (the same rounded weights); against HF's bf16
    loss directly, its rounding (steps of 0.125 at 16) alone reaches the 1e-2 tolerance."""
    folder = _t5_folder(tmp_path)
    model, _ = FastModel.from_pretrained(str(folder), dtype=torch.bfloat16)
    ref = transformers.T5ForConditionalGeneration.from_pretrained(folder, dtype=torch.bfloat16).train()
    for m in (model, ref):
        for name, module in m.named_modules():
            if name.endswith(".wo"):
                module.float()
    truth = copy.deepcopy(ref).double()
    ids, labels = _t5_batch()
    with torch.no_grad():
        losses = [m(input_ids=ids, labels=labels).loss for m in (model, ref, truth)]
    assert_within_bf16_band(*losses, "loss")
    model = FastModel.get_peft_model(model, r=4, use_gradient_checkpointing=False)
    _train_step(model, input_ids=ids, labels=labels)


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["t5", "mixtral"])
def test_qlora_t5_and_mixtral_train_on_the_gpu(family, tmp_path, capsys):
    """QLoRA (NF4 base through bitsandbytes) for the encoder-decoder and a MoE model, bf16, with
    the fused kernels: a finite loss and non-zero LoRA gradients."""
    pytest.importorskip("bitsandbytes")
    if family == "t5":
        folder, (ids, labels) = _t5_folder(tmp_path), _t5_batch()
    else:
        name, fields = _MOE[family]
        hf = getattr(transformers, name)(**{**_TEXT, **fields})
        folder = save_model_dir(transformers.AutoModelForCausalLM.from_config(hf), tmp_path / family)
        ids = labels = torch.randint(2, VOCAB, (2, 12))
    model, _ = FastModel.from_pretrained(str(folder), load_in_4bit=True)
    assert "patched" in capsys.readouterr().out
    model = FastModel.get_peft_model(model, r=4)
    _train_step(model, input_ids=ids.cuda(), labels=labels.cuda())


def test_a_model_without_an_auto_class_is_one_clear_line(tmp_path):
    vit = transformers.ViTModel(transformers.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                       intermediate_size=37, image_size=8, patch_size=4))
    vit.save_pretrained(tmp_path / "vit")  # no tokenizer either: the model's kind is checked first
    with pytest.raises(ValueError) as err:
        FastModel.from_pretrained(str(tmp_path / "vit"))
    assert str(err.value) == (f"FastModel loads causal LMs, image-text-to-text models and encoder-decoder LMs; "
                              f"transformers has none of these for model_type 'vit' (ViTConfig) of {tmp_path / 'vit'}")
    # FastLanguageModel (causal LMs) names FastModel where that loads it
    with pytest.raises(ValueError, match=r"^FastLanguageModel loads causal LMs; transformers has none for model_type "
                                         r"'t5' \(T5Config\) of .*; load it with fusetune.FastModel \(image-text and "
                                         r"encoder-decoder models\)$"):
        FastLanguageModel.from_pretrained(str(_t5_folder(tmp_path / "t5")))


def test_exports_and_shared_methods():
    assert fusetune.FastModel is fusetune.api.FastModel is FastModel and "FastModel" in fusetune.__all__
    assert FastModel.get_peft_model is FastLanguageModel.get_peft_model  # one implementation, same signature
