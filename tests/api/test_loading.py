"""from_pretrained / get_peft_model with the arguments users pass: rope scaling, their own
bitsandbytes config, LoftQ, 8-bit bases, and families fusetune has no kernels for (which load
unpatched, train through PEFT and say so)."""
import pytest
import torch
from torch import nn

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
    model, tokenizer = load_model(path, max_seq_length=512)
    assert model.config.rope_parameters["rope_type"] == "linear" and model.config.rope_parameters["factor"] == 4.0
    assert "max_seq_length 512 is past " in capsys.readouterr().out
    # the adapter remembers: loading it (default max_seq_length) scales its base the same way
    lora = FastLanguageModel.get_peft_model(model, r=4, use_gradient_checkpointing=False, init_lora_weights=False)
    adapter = lora.save_pretrained_merged(tmp_path / "adapter", tokenizer, save_method="lora")
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
