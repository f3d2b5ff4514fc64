"""Merged saves: PEFT's trainable tokens merged as PEFT merges them, the GGUF exports in the folder
kept, the chat template's end of turn in the saved generation config."""
import copy
import importlib.util
import json

import pytest
import torch

import fusetune.atomic as atomic
from fusetune.api.chat import get_chat_template
from fusetune.api.saving import merged_state_dict, save_merged
from tests.tiny_models import byte_level_tokenizer


def _trainable_tokens_model(tie: bool):
    """A tiny Llama with LoRA and PEFT's trainable_token_indices, the trained rows away from the base's."""
    import transformers
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=300,
                                      tie_word_embeddings=tie)
    model = get_peft_model(transformers.LlamaForCausalLM(config),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"], trainable_token_indices=[1, 2, 3],
                                      init_lora_weights=False))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "trainable_tokens_delta" in name:
                p.normal_(0, 1)
    return model


@pytest.mark.parametrize("tie", [False, True])
def test_trainable_tokens_are_saved_merged_as_peft_merge_and_unload(tie, tmp_path):
    """The plain model.embed_tokens.weight with the trained rows in it, not PEFT's token_adapter keys;
    a tied head is the same tensor, written once (transformers ties it again on load)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    model = _trainable_tokens_model(tie)
    want = copy.deepcopy(model).merge_and_unload().state_dict()
    out = save_merged(model, tmp_path / "merged", dtype=torch.float32)
    saved = load_file(out / "model.safetensors")
    assert saved.keys() == want.keys() - ({"lm_head.weight"} if tie else set())
    for key, tensor in saved.items():
        torch.testing.assert_close(tensor, want[key], rtol=0, atol=0, msg=lambda m: f"{key}: {m}")
    assert not torch.equal(saved["model.embed_tokens.weight"][1:4],
                           model.get_base_model().model.embed_tokens.token_adapter.base_layer.weight[1:4])
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).state_dict()
    assert all(torch.equal(loaded[key], tensor) for key, tensor in want.items())
    moved = merged_state_dict(model, device="meta")
    assert (moved["lm_head.weight"] is moved["model.embed_tokens.weight"]) == tie


def _gguf_model(tokenizer):
    from tests.api.test_gguf import lora_model

    return lora_model("llama", tokenizer)


def test_a_merged_save_keeps_the_gguf_exports_in_its_folder(tmp_path, monkeypatch, capsys):
    """save_pretrained_gguf's file is another kind of save: a merged save into its folder (then another,
    and one that fails before its folder is in place) leaves it where it was, the same file."""
    pytest.importorskip("gguf")
    from fusetune.api.gguf import save_gguf

    tokenizer = byte_level_tokenizer()
    model = _gguf_model(tokenizer)
    folder = tmp_path / "out"
    gguf = save_gguf(model, folder, tokenizer, "f16")
    data = gguf.read_bytes()
    for method, weights in (("merged_16bit", "model.safetensors"), ("lora", "adapter_model.safetensors")):
        save_merged(model, folder, tokenizer, save_method=method)
        assert {weights, gguf.name} <= {p.name for p in folder.iterdir()}
        assert gguf.read_bytes() == data
        assert f"kept {gguf.name} in {folder}, exported before this save" in capsys.readouterr().out
    # what a killed export left (its temporary file) is cleared by the next save, not taken for a stranger's
    leftover = folder / ".model.Q8_0.gguf.tmp-0123abcd"
    leftover.write_bytes(b"GGUF, half written")
    save_merged(model, folder, tokenizer)
    assert not leftover.exists() and gguf.read_bytes() == data
    # an export into a folder that already holds a merged save joins that save's list of files
    second = save_gguf(model, folder, tokenizer, "q8_0")
    save_merged(model, folder, tokenizer)
    assert {gguf.name, second.name, "model.safetensors"} <= {p.name for p in folder.iterdir()}

    def fail(directory):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(atomic, "_flush_to_disk", fail)
    with pytest.raises(atomic.SaveError, match="the disk is full"):
        save_merged(model, folder, tokenizer)
    assert gguf.read_bytes() == data
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_the_saved_generation_config_stops_at_the_chat_templates_end_of_turn(tmp_path):
    """model.generate reads only the generation config: the EOS get_chat_template set joins its stops."""
    from transformers import GenerationConfig

    tokenizer = byte_level_tokenizer()
    tokenizer.eos_token = "<|endoftext|>"  # a base model's: the template's end of turn is not its EOS
    model = _gguf_model(tokenizer)
    model.get_base_model().generation_config.eos_token_id = tokenizer.eos_token_id
    get_chat_template(tokenizer, "chatml")
    out = save_merged(model, tmp_path / "merged", tokenizer)
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert GenerationConfig.from_pretrained(out).eos_token_id == [tokenizer.convert_tokens_to_ids("<|endoftext|>"),
                                                                  end]
    assert json.loads((out / "tokenizer_config.json").read_text())["eos_token"] == "<|im_end|>"


@pytest.mark.parametrize("how", ["facade", "peft"])
def test_a_head_trained_apart_from_its_tied_embedding_is_saved_and_exported_apart(how, tmp_path):
    """A tied model whose lm_head trains (modules_to_save, as for added tokens): the facade's
    get_peft_model unties it; PEFT's own get_peft_model leaves the config tied, and the merged save
    sees the trained head differ. Either way the merged config is untied and the GGUF has its head."""
    import transformers
    from peft import LoraConfig, get_peft_model

    from fusetune import FastLanguageModel

    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=300,
                                      tie_word_embeddings=True)
    base = transformers.LlamaForCausalLM(config)
    if how == "facade":
        model = FastLanguageModel.get_peft_model(base, r=4, target_modules=["q_proj"], use_gradient_checkpointing=False,
                                                 modules_to_save=["embed_tokens", "lm_head"])
        assert not model.config.tie_word_embeddings
    else:
        model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "modules_to_save" in name and "lm_head" in name:
                p.add_(torch.randn_like(p))  # as training moves it
    save_merged(model, tmp_path / "merged", save_method="merged_16bit", dtype=torch.float32)
    saved = json.loads((tmp_path / "merged" / "config.json").read_text())
    from safetensors.torch import load_file

    weights = load_file(tmp_path / "merged" / "model.safetensors")
    assert saved["tie_word_embeddings"] is False
    assert not torch.equal(weights["lm_head.weight"], weights["model.embed_tokens.weight"])
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    ids = torch.randint(0, 300, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, model.eval()(input_ids=ids).logits)
    if importlib.util.find_spec("gguf") is not None:
        import gguf

        from fusetune.api.gguf import save_gguf

        path = save_gguf(model, tmp_path / "gguf", byte_level_tokenizer(), "f16")
        assert "output.weight" in {t.name for t in gguf.GGUFReader(path).tensors}
