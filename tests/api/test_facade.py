"""The facade: FastLanguageModel.from_pretrained on a local directory, get_peft_model (family
target names, checkpointing choices), for_inference / for_training, and atomic saving (merged
16-bit weights that load as the plain model with the adapter model's logits; the adapter alone)."""
import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

import fusetune.api.saving as saving
from fusetune import FastLanguageModel
from fusetune.training.checkpoint import offloaded_checkpoint
from tests.helpers import load_model, save_model_dir, train_steps
from tests.numerics import assert_close
from tests.tiny_models import random_batch, tiny_model


@pytest.fixture
def model_dir(tmp_path_factory, request):
    family = getattr(request, "param", "llama")
    path = tmp_path_factory.mktemp(family)
    return save_model_dir(tiny_model(family), path)


def _logits(model, ids):
    """Logits on the CPU (from_pretrained puts the model on the GPU where there is one)."""
    with torch.no_grad():
        return model(input_ids=ids.to(model.device)).logits.cpu()


def test_from_pretrained_patches_and_trains(model_dir, capsys):
    model, tokenizer = load_model(model_dir)
    assert "fusetune: patched LlamaForCausalLM" in capsys.readouterr().out
    assert model.training and tokenizer.pad_token == "<unk>" != tokenizer.eos_token and model.max_seq_length == 2048
    model = FastLanguageModel.get_peft_model(model, r=4, use_gradient_checkpointing="unsloth")
    assert "lora 14 projections" in capsys.readouterr().out
    assert model.base_model.model.model.layers[0]._gradient_checkpointing_func is offloaded_checkpoint
    ids, labels = random_batch(device=model.device)
    losses = train_steps(model, 5, (ids, labels))
    assert losses[-1] < losses[0]
    FastLanguageModel.for_inference(model)
    out = model.generate(input_ids=ids[:1, :5], max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 9) and not model.training
    assert FastLanguageModel.for_training(model).training


@pytest.mark.parametrize("model_dir", ["phi3"], indirect=True)
def test_target_names_follow_the_family(model_dir):
    model, _ = load_model(model_dir)
    model = FastLanguageModel.get_peft_model(model, r=4, use_gradient_checkpointing=False)
    targets = set(model.peft_config["default"].target_modules)
    assert targets == {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}


def test_bad_arguments(model_dir, tmp_path):
    with pytest.raises(OSError, match="no such folder"):
        FastLanguageModel.from_pretrained(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="full_finetuning"):
        FastLanguageModel.from_pretrained(str(model_dir), full_finetuning=True, load_in_4bit=True)
    model, tokenizer = load_model(model_dir)
    with pytest.raises(ValueError, match="use_gradient_checkpointing"):
        FastLanguageModel.get_peft_model(model, use_gradient_checkpointing="yes")
    with pytest.raises(ValueError, match="save_method"):
        FastLanguageModel.save_pretrained_merged(model, tmp_path / "out", tokenizer, save_method="merged_8bit")


def test_merged_16bit_loads_as_the_plain_model_with_the_same_logits(model_dir, tmp_path):
    model, tokenizer = load_model(model_dir)
    model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing=False,
                                             init_lora_weights=False)
    FastLanguageModel.for_inference(model)
    ids, _ = random_batch()
    want = _logits(model, ids)
    from safetensors import safe_open

    out = model.save_pretrained_merged(tmp_path / "merged", tokenizer)  # the bound form users call
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    with safe_open(out / "model.safetensors", "pt") as f:  # 16 bits, as the name says, from an fp32 model
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    plain = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert not any("lora" in k for k in plain.state_dict())
    out32 = model.save_pretrained_merged(tmp_path / "merged32", tokenizer, dtype=torch.float32)
    plain32 = AutoModelForCausalLM.from_pretrained(out32, dtype=torch.float32).eval()
    assert_close(_logits(plain32, ids), want, torch.float32, "merged fp32 logits")
    with torch.no_grad():  # the 16-bit save is the fp32 merge's weights rounded, nothing else
        for p in plain32.parameters():
            p.copy_(p.bfloat16().float())
    assert_close(_logits(plain, ids), _logits(plain32, ids), torch.float32, "merged 16-bit logits")


def test_merged_state_dict_moved_as_it_is_made_keeps_ties():
    """device=: every merged tensor goes there as soon as it is made (a save holds one layer's merge on
    the GPU at a time); tied embeddings stay one tensor there, and nothing else is shared."""
    model = tiny_model("llama", tie_word_embeddings=True)
    model = FastLanguageModel.get_peft_model(model, r=4, use_gradient_checkpointing=False, init_lora_weights=False)
    here, moved = saving.merged_state_dict(model), saving.merged_state_dict(model, device="meta")
    assert here.keys() == moved.keys()
    assert all(t.device.type == "meta" and t.shape == here[k].shape and t.dtype == here[k].dtype
               for k, t in moved.items())
    assert moved["lm_head.weight"] is moved["model.embed_tokens.weight"]
    others = [t for k, t in moved.items() if k != "lm_head.weight"]
    assert len({id(t) for t in others}) == len(others)


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64))


@pytest.mark.parametrize("case", ["lora_bias", "conv1d", "embedding"])
def test_merged_weights_are_peft_merge_and_unload(case):
    """The merges PEFT itself makes: lora_bias adds B's bias to the base's (dropped before), GPT-2's
    Conv1D keeps (in, out) weights (fan_in_fan_out: merged untransposed before), LoRA on an embedding
    (its lora_embedding_A/B: a crash before)."""
    from peft import LoraConfig, get_peft_model

    model, config = {
        "lora_bias": (tiny_model("qwen2"), LoraConfig(r=4, target_modules=["q_proj", "k_proj"], lora_bias=True,
                                                       init_lora_weights=False)),
        "conv1d": (_gpt2(), LoraConfig(r=4, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True,
                                       init_lora_weights=False)),
        "embedding": (tiny_model("llama"), LoraConfig(r=4, target_modules=["embed_tokens", "q_proj"],
                                                      init_lora_weights=False)),
    }[case]
    torch.manual_seed(1)
    peft_model = get_peft_model(model, config)
    for name, p in peft_model.named_parameters():
        if "lora_" in name:
            p.data.normal_(0, 0.1)  # (lora_B's bias too)
    merged = saving.merged_state_dict(peft_model)
    want = copy.deepcopy(peft_model).merge_and_unload().state_dict()
    assert merged.keys() == want.keys()
    for key, tensor in want.items():
        torch.testing.assert_close(merged[key], tensor, rtol=1e-5, atol=1e-6, msg=lambda m: f"{key}: {m}")


def test_get_peft_model_leaves_a_model_with_adapters_or_a_full_fine_tune_as_it_is(model_dir, tmp_path, caplog):
    """A second call (a notebook cell run again) would let PEFT re-initialise the trained adapters in
    place; a full fine-tune would quietly become a LoRA one. Both come back as they are, with a warning;
    a save into the folder the base was loaded from is refused."""
    model, tokenizer = FastLanguageModel.from_pretrained(str(model_dir))
    model = FastLanguageModel.get_peft_model(model, r=4, use_gradient_checkpointing=False, init_lora_weights=False)
    ids = random_batch()[0]
    before = _logits(model, ids)
    with caplog.at_level("WARNING", logger="fusetune"):
        assert FastLanguageModel.get_peft_model(model, r=8) is model
    assert "has LoRA adapters already (default): returned as it is" in caplog.text
    assert torch.equal(_logits(model, ids), before)
    with pytest.raises(ValueError, match="is the folder the base model was loaded from"):
        model.save_pretrained_merged(str(model_dir), tokenizer, save_method="lora")
    full, _ = FastLanguageModel.from_pretrained(str(model_dir), full_finetuning=True)
    with caplog.at_level("WARNING", logger="fusetune"):
        assert FastLanguageModel.get_peft_model(full, r=4) is full
    assert "loaded with full_finetuning=True" in caplog.text
    assert all(p.requires_grad for p in full.parameters())


def test_merged_4bit_loads_quantised_with_nf4_rounded_logits(tmp_path):
    pytest.importorskip("bitsandbytes")
    # intermediate 128: bitsandbytes 0.50's CPU dequantisation is wrong for rows not a multiple of its block of 64
    model, tokenizer = load_model(save_model_dir(tiny_model("llama", intermediate_size=128), tmp_path / "base"))
    model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing=False,
                                             init_lora_weights=False)
    merged = saving.merged_state_dict(model)
    out = model.save_pretrained_merged(tmp_path / "merged4", tokenizer, save_method="merged_4bit")
    assert not (out / ".merged_16bit").exists()
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert loaded.config.quantization_config.load_in_4bit
    import bitsandbytes.functional as bnbf

    quantised = {n: m for n, m in loaded.named_modules() if type(m).__name__ == "Linear4bit"}
    assert len(quantised) == 14  # every decoder projection; embeddings and head stay 16-bit as transformers does
    for name, module in quantised.items():
        got = bnbf.dequantize_4bit(module.weight.data, module.weight.quant_state).float()
        want = merged[name + ".weight"].float()
        # NF4: within half the widest gap between its levels (0.152) of each 64-block's absmax
        blocks = want.reshape(-1, 64)
        bound = 0.16 * blocks.abs().amax(1, keepdim=True)
        assert ((got.reshape(-1, 64) - blocks).abs() <= bound).all(), name
        assert not torch.equal(got, want)


def test_lora_save_and_atomic_replacement(model_dir, tmp_path, monkeypatch):
    from peft import PeftModel

    model, tokenizer = load_model(model_dir)
    model = FastLanguageModel.get_peft_model(model, r=4, use_gradient_checkpointing=False, init_lora_weights=False)
    target = tmp_path / "adapter"
    FastLanguageModel.save_pretrained_merged(model, target, tokenizer, save_method="lora")
    assert (target / "adapter_model.safetensors").is_file()
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), target).eval()
    ids, _ = random_batch()
    assert_close(_logits(reloaded, ids), _logits(model.eval(), ids), torch.float32, "logits")

    # a save that dies half way leaves the previous one whole, and no temporary directory behind
    def broken(*args, **kwargs):
        raise RuntimeError("disk full")
    monkeypatch.setattr(saving, "merged_state_dict", broken)
    before = sorted(p.name for p in target.iterdir())
    with pytest.raises(RuntimeError, match="disk full"):
        FastLanguageModel.save_pretrained_merged(model, target, tokenizer)
    assert sorted(p.name for p in target.iterdir()) == before
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]
    # a directory that holds something else is never replaced
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="holds no earlier model save"):
        FastLanguageModel.save_pretrained_merged(model, tmp_path / "mine", tokenizer, save_method="lora")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_cli_export_merges_a_saved_adapter(model_dir, tmp_path, capsys):
    from fusetune.cli import main

    model, tokenizer = load_model(model_dir)
    model = FastLanguageModel.get_peft_model(model, r=4, use_gradient_checkpointing=False, init_lora_weights=False)
    FastLanguageModel.save_pretrained_merged(model, tmp_path / "adapter", tokenizer, save_method="lora")
    assert main(["export", str(tmp_path / "adapter"), str(tmp_path / "merged"), "--base", str(model_dir),
                 "--dtype", "float32"]) == 0
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    ids, _ = random_batch()
    assert_close(_logits(plain, ids), _logits(model.eval(), ids), torch.float32, "logits")
    assert main(["export", str(tmp_path / "nothing"), str(tmp_path / "x")]) == 2
    assert "no adapter_config.json" in capsys.readouterr().err
    # exporting into the base model's own folder (holding the user's notes too) is refused, nothing lost
    (model_dir / "NOTES.md").write_text("mine")
    before = sorted(p.name for p in model_dir.iterdir())
    assert main(["export", str(tmp_path / "adapter"), str(model_dir), "--base", str(model_dir)]) == 2
    assert "is the folder of the base model or the adapter it reads" in capsys.readouterr().err
    assert sorted(p.name for p in model_dir.iterdir()) == before and (model_dir / "NOTES.md").read_text() == "mine"
    # and a model folder with files a save did not write is never replaced
    (tmp_path / "merged" / "NOTES.md").write_text("mine")
    assert main(["export", str(tmp_path / "adapter"), str(tmp_path / "merged"), "--base", str(model_dir)]) == 2
    assert "NOTES.md, which a save did not write" in capsys.readouterr().err
    assert (tmp_path / "merged" / "NOTES.md").read_text() == "mine"


def test_an_adapter_folder_loads_its_base_and_the_adapter(model_dir, tmp_path, capsys):
    import json

    model, tokenizer = load_model(model_dir)
    model = FastLanguageModel.get_peft_model(model, r=4, use_gradient_checkpointing=False, init_lora_weights=False)
    ids, _ = random_batch()
    want = _logits(model, ids)
    adapter = model.save_pretrained_merged(tmp_path / "lora_model", tokenizer, save_method="lora")
    # the base is recorded as the user named it
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(model_dir)
    loaded, _ = FastLanguageModel.from_pretrained(str(adapter), dtype=torch.float32)
    assert f"{adapter} is a LoRA adapter of {model_dir}: loaded the base and attached it" in capsys.readouterr().out
    assert_close(_logits(loaded, ids), want, torch.float32, "adapter logits")
    assert any(p.requires_grad for n, p in loaded.named_parameters() if "lora_" in n)
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "/gone/base"}))
    with pytest.raises(OSError, match=r"is a LoRA adapter of '/gone/base', which cannot be loaded: .*no such folder"):
        FastLanguageModel.from_pretrained(str(adapter))


def test_for_inference_turns_the_cache_on_for_generate_and_for_training_puts_it_back():
    """A model saved with use_cache off (common for fine-tuned checkpoints): generate() reads the
    generation config's setting, so for_inference sets both; for_training restores both (a cache in
    a training forward drops transformers' packed-row mask)."""
    from transformers import GenerationConfig

    model = tiny_model("llama")
    model.config.use_cache = False
    model.generation_config = GenerationConfig(use_cache=False, pad_token_id=0)
    seen = []
    model.model.layers[0].self_attn.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["hidden_states"].shape[1]), with_kwargs=True)
    for _ in range(2):  # twice: the settings of before the first call are the ones put back
        FastLanguageModel.for_inference(model)
    assert model.config.use_cache and model.generation_config.use_cache and not model.training
    prompt = random_batch(batch=1, seq=6)[0]
    with torch.no_grad():
        model.generate(prompt, max_new_tokens=4, do_sample=False)
    assert seen == [6, 1, 1, 1]  # the prompt, then one new token a step: the cache is used
    FastLanguageModel.for_training(model)
    assert model.config.use_cache is False and model.generation_config.use_cache is False and model.training
    FastLanguageModel.for_training(model)  # without for_inference before it: nothing to put back
    assert model.config.use_cache is False


def test_a_qlora_adapter_reloads_and_exports_on_the_4bit_base_it_trained_on(tmp_path, capsys):
    """An adapter trained on a 4-bit base comes back on a 4-bit base (fusetune.json records it), so
    from_pretrained(adapter) and `fusetune export` give the model that trained, not the 16-bit base
    plus an adapter fitted to the quantised weights; asking for 16 bits is done and said."""
    pytest.importorskip("bitsandbytes")
    from fusetune.cli import main

    # intermediate 128: bitsandbytes' CPU dequantisation needs rows in whole blocks of 64
    base = save_model_dir(tiny_model("llama", intermediate_size=128), tmp_path / "base")
    model, tokenizer = load_model(base, load_in_4bit=True)
    model = FastLanguageModel.get_peft_model(model, r=4, use_gradient_checkpointing=False, init_lora_weights=False)
    ids, _ = random_batch(batch=1)
    want = _logits(model, ids)
    adapter = model.save_pretrained_merged(tmp_path / "adapter", tokenizer, save_method="lora")
    again, _ = FastLanguageModel.from_pretrained(str(adapter), dtype=torch.float32)
    assert "trained on a 4-bit base: its base loads in 4 bits again" in capsys.readouterr().out
    assert_close(_logits(again, ids), want, torch.float32, "4-bit base reloaded")
    assert main(["export", str(adapter), str(tmp_path / "merged"), "--dtype", "float32"]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    assert_close(_logits(merged, ids), want, torch.float32, "merged from the 4-bit base")
    sixteen, _ = FastLanguageModel.from_pretrained(str(adapter), dtype=torch.float32, load_in_4bit=False)
    assert "trained on a 4-bit base, loaded in 16 bits as asked" in capsys.readouterr().out
    assert ((_logits(sixteen, ids) - want).norm() / want.norm()) > 1e-3  # the quantisation's error
