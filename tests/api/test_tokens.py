"""Extending a tokenizer with Korean tokens: mean-initialised rows, old tokens untouched, the
embeddings trained through modules_to_save with their own learning rate."""
import pytest
import torch
from peft import LoraConfig, get_peft_model

from fusetune.api.tokens import add_new_tokens, embedding_param_groups
from tests.helpers import word_tokenizer
from tests.tiny_models import VOCAB, tiny_model


def test_add_korean_tokens():
    model, tokenizer = tiny_model("llama"), word_tokenizer()
    ids = torch.randint(2, VOCAB, (1, 8))
    with torch.no_grad():
        before = model(input_ids=ids).logits
        old = model.get_input_embeddings().weight.clone()
    assert add_new_tokens(model, tokenizer, ["안녕", "하세요", "w5"]) == 2  # w5 exists already
    emb = model.get_input_embeddings().weight
    assert emb.shape[0] == len(tokenizer) == VOCAB + 2
    torch.testing.assert_close(emb[VOCAB:], old.mean(0).expand(2, -1))
    torch.testing.assert_close(model.get_output_embeddings().weight[VOCAB], model.lm_head.weight[:VOCAB].mean(0))
    assert tokenizer("안녕 하세요")["input_ids"] == [VOCAB, VOCAB + 1]
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits[..., :VOCAB], before)
    with pytest.raises(TypeError, match="list"):
        add_new_tokens(model, tokenizer, "안녕")


def test_embedding_learning_rate_groups():
    model, tokenizer = tiny_model("llama"), word_tokenizer()
    add_new_tokens(model, tokenizer, ["안녕"])
    model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["embed_tokens", "lm_head"]))
    groups = embedding_param_groups(model, 2e-4, 5e-5, weight_decay=0.0)
    assert [g["lr"] for g in groups] == [2e-4, 5e-5]
    assert len(groups[1]["params"]) == 2 and all(p.shape[0] == VOCAB + 1 for p in groups[1]["params"])
    torch.optim.AdamW(groups).step()  # a valid optimizer configuration


def test_untie_embeddings_gives_the_head_its_own_copy():
    from fusetune.api.tokens import untie_embeddings
    from tests.tiny_models import tiny_model

    model = tiny_model("llama", tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert untie_embeddings(model) and not model.config.tie_word_embeddings
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)
    assert not untie_embeddings(model)  # once is enough


def test_a_reloaded_adapter_keeps_its_trained_head_apart_from_a_tied_embedding(tmp_path):
    """An adapter that trained embed_tokens and lm_head of a tied model (a cpt stage, added tokens)
    reloads with the two apart: training on, merging and the merged save keep the trained head."""
    from fusetune.api import FastLanguageModel
    from fusetune.api.tokens import untie_embeddings
    from tests.helpers import save_model_dir

    base = save_model_dir(tiny_model("llama", tie_word_embeddings=True), tmp_path / "base")
    model, tokenizer = FastLanguageModel.from_pretrained(str(base), dtype=torch.float32)
    untie_embeddings(model)
    model = FastLanguageModel.get_peft_model(model, r=4, target_modules=["q_proj"],
                                             modules_to_save=["embed_tokens", "lm_head"],
                                             use_gradient_checkpointing=False)
    with torch.no_grad():
        model.base_model.model.lm_head.modules_to_save["default"].weight.add_(0.5)  # as training would move it
    head = model.base_model.model.lm_head.modules_to_save["default"].weight.clone()
    model.save_pretrained_merged(str(tmp_path / "adapter"), tokenizer, save_method="lora")
    again, _ = FastLanguageModel.from_pretrained(str(tmp_path / "adapter"), dtype=torch.float32)
    hf = again.base_model.model
    assert not hf.config.tie_word_embeddings
    torch.testing.assert_close(hf.lm_head.modules_to_save["default"].weight, head)
    again.save_pretrained_merged(str(tmp_path / "merged"), tokenizer)
    merged, _ = FastLanguageModel.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32)
    torch.testing.assert_close(merged.lm_head.weight, head.bfloat16().float())  # merged_16bit: bf16
    assert not torch.equal(merged.lm_head.weight, merged.model.embed_tokens.weight)


@pytest.mark.parametrize("trained_rows", ["lora", "trainable_tokens"])
def test_tokens_added_to_a_padded_vocabulary_reload_with_their_adapter(tmp_path, trained_rows):
    """Qwen- and Phi-3-style embeddings have more rows than the tokenizer: added tokens take rows the
    model has (set to the mean row), which PEFT need not save. Reloading the adapter sets those rows
    as add_new_tokens did, so the reloaded model is the trained one."""
    from fusetune import use_backend
    from fusetune.api import FastLanguageModel
    from tests.helpers import save_model_dir

    base = save_model_dir(tiny_model("llama", vocab_size=VOCAB + 16), tmp_path / "base")  # 16 padding rows
    with use_backend("torch"):
        model, tokenizer = FastLanguageModel.from_pretrained(str(base), dtype=torch.float32)
        assert add_new_tokens(model, tokenizer, ["안녕하세요", "fusetune"]) == 2
        new = [len(tokenizer) - 2, len(tokenizer) - 1]
        assert model.get_input_embeddings().weight.shape[0] == VOCAB + 16  # no resize: padding rows taken
        extra = {"trainable_token_indices": new} if trained_rows == "trainable_tokens" else {}
        model = FastLanguageModel.get_peft_model(model, r=4, use_gradient_checkpointing=False,
                                                 init_lora_weights=False, **extra)
        model.save_pretrained_merged(str(tmp_path / "adapter"), tokenizer, save_method="lora")
        again, _ = FastLanguageModel.from_pretrained(str(tmp_path / "adapter"), dtype=torch.float32)
        ids = torch.tensor([[5, new[0], 7, new[1], new[0]]])
        model.eval(), again.eval()
        with torch.no_grad():
            torch.testing.assert_close(again(input_ids=ids).logits, model(input_ids=ids).logits)
