"""from_pretrained / get_peft_model with the arguments users pass: rope scaling, their own
bitsandbytes config, LoftQ, 8-bit bases, and families fusetune has no kernels for (which load
unpatched, train through PEFT and say so)."""
import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

import fusetune
from fusetune import FastLanguageModel
from tests.helpers import load_model, save_model_dir, train_steps
from tests.tiny_models import VOCAB, random_batch, tiny_model

_SMALL = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=4096, pad_token_id=0, bos_token_id=1,
              eos_token_id=1, tie_word_embeddings=False)
# families fusetune does not patch: a mixture of experts and a Llama variant with its own multipliers
UNPATCHED = {"olmo2": ("Olmo2Config", {}),
             "granite": ("GraniteConfig", dict(embedding_multiplier=2.0, logits_scaling=4.0))}


def test_rope_scaling_keeps_theta_and_scales_positions(tmp_path):
    path = save_model_dir(tiny_model("llama"), tmp_path / "llama")
    plain, _ = load_model(path)
    for scaling in ({"rope_type": "linear", "factor": 2.0}, {"type": "linear", "factor": 2.0}):
        model, _ = load_model(path, rope_scaling=scaling)
        params = model.config.rope_parameters
        assert params["rope_type"] == "linear" and params["factor"] == 2.0 and params["rope_theta"] == 10000.0
        assert torch.allclose(model.model.rotary_emb.inv_freq, plain.model.rotary_emb.inv_freq / 2)
        ids, labels = random_batch(device=model.device)
        with torch.no_grad():
            assert torch.isfinite(model(input_ids=ids, labels=labels).loss)


def test_rope_scaling_of_gemma3_scales_its_full_attention_layers(tmp_path):
    model, _ = load_model(save_model_dir(tiny_model("gemma3"), tmp_path / "gemma3"),
                          rope_scaling={"rope_type": "linear", "factor": 8.0})
    params = model.config.rope_parameters
    assert params["full_attention"]["factor"] == 8.0 and params["full_attention"]["rope_theta"] == 1e6
    assert params["sliding_attention"]["rope_type"] == "default"


def test_the_users_own_bitsandbytes_config_is_used(tmp_path):
    pytest.importorskip("bitsandbytes")
    from bitsandbytes.nn import Linear4bit
    from transformers import BitsAndBytesConfig

    path = save_model_dir(tiny_model("llama", intermediate_size=128), tmp_path / "llama")
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32,
                                llm_int8_skip_modules=["o_proj", "lm_head"])
    model, _ = load_model(path, quantization_config=config)
    attention = model.model.layers[0].self_attn
    assert isinstance(attention.q_proj, Linear4bit) and type(attention.o_proj) is nn.Linear
    with pytest.raises(ValueError, match="load_in_8bit=True but quantization_config loads 4-bit"):
        load_model(path, load_in_8bit=True, quantization_config=config)
    model = FastLanguageModel.get_peft_model(model, r=4, use_gradient_checkpointing=False)
    losses = train_steps(model, 4)
    assert losses[-1] < losses[0]


def test_an_8bit_base_says_it_runs_unfused(tmp_path, capsys):
    pytest.importorskip("bitsandbytes")
    model, _ = load_model(save_model_dir(tiny_model("llama"), tmp_path / "llama"), load_in_8bit=True)
    assert "14 bitsandbytes 8-bit linears keep bitsandbytes' int8 matmul" in capsys.readouterr().out
    model = FastLanguageModel.get_peft_model(model, r=4, use_gradient_checkpointing=False)
    assert "lora: base layer Linear8bitLt runs PEFT's path, unfused" in capsys.readouterr().out
    assert torch.isfinite(torch.tensor(train_steps(model, 2))).all()


def test_loftq_config_is_applied_or_refused(tmp_path):
    from peft import LoftQConfig

    path = save_model_dir(tiny_model("llama"), tmp_path / "llama")
    model, _ = load_model(path)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="LoftQ initialisation .* runs on a CUDA GPU"):
            FastLanguageModel.get_peft_model(model, r=4, loftq_config=LoftQConfig(loftq_bits=4))
    else:
        pytest.importorskip("bitsandbytes")
        model = FastLanguageModel.get_peft_model(model, r=4, loftq_config=LoftQConfig(loftq_bits=4),
                                                 use_gradient_checkpointing=False)
        b = model.base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"].weight
        assert b.abs().sum() > 0  # LoftQ's B; PEFT's default starts B at zero
    with pytest.raises(ValueError, match="init_lora_weights='loftq'"):
        FastLanguageModel.get_peft_model(model, r=4, loftq_config=LoftQConfig(), init_lora_weights="gaussian")


def test_loftq_refuses_a_quantised_base(tmp_path):
    pytest.importorskip("bitsandbytes")
    from peft import LoftQConfig

    model, _ = load_model(save_model_dir(tiny_model("llama", intermediate_size=128), tmp_path / "llama"),
                          load_in_4bit=True)
    with pytest.raises(ValueError, match="load it with load_in_4bit=False"):
        FastLanguageModel.get_peft_model(model, r=4, loftq_config=LoftQConfig())


@pytest.mark.parametrize("family", sorted(UNPATCHED))
def test_a_family_without_kernels_loads_unpatched_and_trains(family, tmp_path, capsys):
    import transformers

    name, extra = UNPATCHED[family]
    config = getattr(transformers, name)(**_SMALL, **extra)
    torch.manual_seed(0)
    path = save_model_dir(transformers.AutoModelForCausalLM.from_config(config), tmp_path / family)
    model, _ = load_model(path)
    out = capsys.readouterr().out
    assert f"fusetune: left {type(model).__name__} unpatched: fusetune has no fused kernels" in out
    assert "it trains through transformers and PEFT, unfused" in out
    assert not any(type(m).__name__.startswith("Fused") for m in model.modules())
    model = FastLanguageModel.get_peft_model(model, r=4, use_gradient_checkpointing=False)
    assert set(model.peft_config["default"].target_modules) >= {"q_proj", "k_proj", "v_proj", "o_proj"}
    losses = train_steps(model, 4)
    assert losses[-1] < losses[0]
    FastLanguageModel.for_inference(model)
    ids, _ = random_batch(device=model.device)
    assert model.generate(input_ids=ids[:1, :4], max_new_tokens=3, do_sample=False).shape == (1, 7)


def test_max_seq_length_past_the_native_context_scales_rope(tmp_path, capsys):
    path = save_model_dir(tiny_model("llama", max_position_embeddings=128), tmp_path / "llama")
    model, _ = load_model(path, max_seq_length=128)
    assert model.config.rope_parameters["rope_type"] == "default" and "RoPE scaled" not in capsys.readouterr().out
    model, _ = load_model(path)  # the default length (2048) was not asked for: the native 128, RoPE as trained
    assert model.config.rope_parameters["rope_type"] == "default" and model.max_seq_length == 128
    assert "RoPE scaled" not in capsys.readouterr().out
    model, tokenizer = load_model(path, max_seq_length=512)
    assert model.config.rope_parameters["rope_type"] == "linear" and model.config.rope_parameters["factor"] == 4.0
    assert "max_seq_length 512 is past " in capsys.readouterr().out
    # the adapter remembers: loading it (default max_seq_length) scales its base the same way
    lora = FastLanguageModel.get_peft_model(model, r=4, use_gradient_checkpointing=False, init_lora_weights=False)
    # (saved by fusetune, or by PEFT's own save_pretrained, as the other libraries' guides do)
    lora.save_pretrained(tmp_path / "peft-saved")
    tokenizer.save_pretrained(tmp_path / "peft-saved")
    for adapter in (lora.save_pretrained_merged(tmp_path / "adapter", tokenizer, save_method="lora"),
                    tmp_path / "peft-saved"):
        again, _ = FastLanguageModel.from_pretrained(str(adapter), dtype=torch.float32)
        assert again.config.rope_parameters["factor"] == 4.0
        ids, _ = random_batch(device=lora.device)
        lora.eval(), again.eval()
        with torch.no_grad():
            torch.testing.assert_close(again(input_ids=ids).logits, lora(input_ids=ids).logits)
    llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 64, "rope_theta": 10000.0}
    path = save_model_dir(tiny_model("llama", max_position_embeddings=128, rope_parameters=llama3), tmp_path / "l3")
    model, _ = load_model(path, max_seq_length=512)  # the model scales its own: left as it is
    assert model.config.rope_parameters["rope_type"] == "llama3" and "RoPE scaled" not in capsys.readouterr().out
    with pytest.raises(ValueError, match="max_seq_length=1024 is past the 512 the model was loaded for"):
        FastLanguageModel.get_peft_model(model, max_seq_length=1024)
    assert FastLanguageModel.get_peft_model(model, r=4, max_seq_length=512, use_gradient_checkpointing=False)
    # dynamic NTK scales past max_position_embeddings: the model as transformers runs it, whatever max_seq_length
    dynamic = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
    path = save_model_dir(tiny_model("llama", max_position_embeddings=16, rope_parameters=dynamic), tmp_path / "ntk")
    model, _ = load_model(path, max_seq_length=64)
    plain = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = torch.randint(0, VOCAB, (1, 40))
    with torch.no_grad(), fusetune.use_backend("torch"):
        torch.testing.assert_close(model.eval()(input_ids=ids).logits, plain(input_ids=ids).logits)


def test_hub_keywords_reach_the_config_tokenizer_and_weights(tmp_path, monkeypatch):
    """revision, subfolder, cache_dir, local_files_only choose the files: the config, the tokenizer and
    the weights (with the generation config) all come from the same place. The folder itself holds
    another model, tokenizer and generation config, as another revision would."""
    import transformers
    from transformers import GenerationConfig

    from fusetune.api.loading import load_tokenizer
    from tests.tiny_models import byte_level_tokenizer

    save_model_dir(tiny_model("qwen2"), tmp_path)  # what a load without subfolder= would find
    GenerationConfig(max_new_tokens=99).save_pretrained(tmp_path)
    tiny_model("llama").save_pretrained(tmp_path / "sub")
    byte_level_tokenizer().save_pretrained(tmp_path / "sub")
    GenerationConfig(max_new_tokens=7).save_pretrained(tmp_path / "sub")
    seen = {}
    for auto in (transformers.AutoConfig, transformers.AutoTokenizer, transformers.AutoModelForCausalLM):
        def recording(name, *args, _auto=auto, _load=auto.from_pretrained, **kwargs):
            seen[_auto.__name__] = name, kwargs
            return _load(name, *args, **kwargs)
        monkeypatch.setattr(auto, "from_pretrained", recording)
    source = dict(revision="main", cache_dir=str(tmp_path / "cache"), local_files_only=True)
    model, tokenizer = load_model(tmp_path, subfolder="sub", **source)
    assert type(model).__name__ == "LlamaForCausalLM" and tokenizer.eos_token == "<|im_end|>"
    assert model.generation_config.max_new_tokens == 7 and model.name_or_path == str(tmp_path / "sub")
    for auto in ("AutoConfig", "AutoTokenizer", "AutoModelForCausalLM"):
        name, kwargs = seen[auto]
        assert name == str(tmp_path / "sub") and source.items() <= kwargs.items(), auto
    assert load_tokenizer(str(tmp_path), subfolder="sub", **source).eos_token == "<|im_end|>"
    assert seen["AutoTokenizer"] == (str(tmp_path / "sub"), {"token": None, "trust_remote_code": False, **source})


def test_unsloth_keywords_are_refused_or_ignored_by_name(tmp_path, caplog):
    """Code written for Unsloth passes keywords fusetune does not implement: one clear error where
    ignoring one would mislead, a warning where it is harmless, silence where it asks for nothing."""
    import inspect

    from fusetune.api.loading import UNSLOTH_ONLY

    assert not UNSLOTH_ONLY.keys() & inspect.signature(FastLanguageModel.from_pretrained).parameters.keys()
    path = save_model_dir(tiny_model("llama"), tmp_path / "llama")
    with pytest.raises(ValueError, match=r"^from_pretrained\(fast_inference=True\): fusetune has no vLLM inference; "
                                         r"drop fast_inference=True: generation uses transformers' generate"):
        load_model(path, fast_inference=True, gpu_memory_utilization=0.6)
    with pytest.raises(ValueError, match=r"resize_model_vocab=300\): drop it and resize after loading"):
        load_model(path, resize_model_vocab=300)
    caplog.clear()  # (the refused calls above may have warned already)
    with caplog.at_level("WARNING", logger="fusetune"):
        model, _ = load_model(path, fast_inference=False, use_exact_model_name=True, gpu_memory_utilization=0.6,
                              max_lora_rank=32, random_state=3407, float8_kv_cache=True)
    ignored = sorted(r.getMessage() for r in caplog.records if "is ignored" in r.getMessage())
    assert [m.split("(", 1)[1].split("=")[0] for m in ignored] == ["float8_kv_cache", "gpu_memory_utilization",
                                                                    "max_lora_rank", "random_state"]
    assert "fusetune: from_pretrained(max_lora_rank=32) is ignored: it configures Unsloth's vLLM engine" in ignored[2]
    assert model.max_seq_length == 2048


def _special_tokenizer(specials: list[str], **roles):
    """A word-level tokenizer over a few words and `specials` (added as special tokens), with the
    roles (eos_token=..., unk_token=...) given."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate([*specials, "hello", "world"])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=roles.get("unk_token", specials[0])))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens(specials)
    return PreTrainedTokenizerFast(tokenizer_object=backend, **roles)


@pytest.mark.parametrize("specials, roles, pad", [
    (["<|begin_of_text|>", "<|eot_id|>", "<|reserved_special_token_0|>", "<|finetune_right_pad_id|>"],
     dict(bos_token="<|begin_of_text|>", eos_token="<|eot_id|>"), "<|finetune_right_pad_id|>"),  # Llama-3.1
    (["<|begin_of_text|>", "<|eot_id|>", "<|reserved_special_token_0|>"],
     dict(bos_token="<|begin_of_text|>", eos_token="<|eot_id|>"), "<|reserved_special_token_0|>"),  # Llama-3
    (["<|endoftext|>", "<|im_start|>", "<|im_end|>"], dict(eos_token="<|im_end|>"), "<|endoftext|>"),  # Qwen
    (["<unk>", "<s>", "</s>"], dict(unk_token="<unk>", bos_token="<s>", eos_token="</s>"), "<unk>"),  # Mistral
    (["<s>", "</s>", "<pad>"], dict(bos_token="<s>", eos_token="</s>", pad_token="<s>"), "<s>"),  # its own: kept
])
def test_the_pad_token_is_one_the_vocabulary_has_other_than_eos(specials, roles, pad):
    """transformers' language-modelling collator masks every label equal to the pad id: a pad other
    than EOS keeps the EOS in the labels (the model learns to stop), and no token is added."""
    from transformers import DataCollatorForLanguageModeling

    from fusetune.api.loading import set_pad_token

    tokenizer = _special_tokenizer(specials, **roles)
    size = len(tokenizer)
    set_pad_token(tokenizer)
    assert tokenizer.pad_token == pad and len(tokenizer) == size
    eos = tokenizer.eos_token_id
    hello = tokenizer.convert_tokens_to_ids("hello")
    batch = DataCollatorForLanguageModeling(tokenizer, mlm=False)([{"input_ids": [hello, eos]}, {"input_ids": [eos]}])
    assert batch["labels"].tolist() == [[hello, eos], [eos, -100]]


def test_a_vocabulary_without_another_token_pads_with_eos_and_warns_once(tmp_path, caplog, monkeypatch):
    """GPT-2's vocabulary: <|endoftext|> is BOS, EOS and unk, nothing else pads. EOS pads, and one
    warning explains what that costs with transformers' collator; through load_tokenizer too."""
    from fusetune.api import loading

    monkeypatch.setattr(loading, "_pad_is_eos_said", False)
    gpt2 = dict(unk_token="<|endoftext|>", bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    _special_tokenizer(["<|endoftext|>"], **gpt2).save_pretrained(tmp_path)
    with caplog.at_level("WARNING", logger="fusetune"):
        tokenizers = [loading.load_tokenizer(str(tmp_path)) for _ in range(2)]
    assert all(t.pad_token == "<|endoftext|>" and len(t) == 3 for t in tokenizers)
    said = [r.getMessage() for r in caplog.records if "padding with EOS" in r.getMessage()]
    assert len(said) == 1 and "a Trainer with it never trains the EOS" in said[0]
