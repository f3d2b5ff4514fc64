"""Chat templates (the layout each family is trained with) and train_on_responses_only."""
import pytest
import torch
from transformers import PreTrainedTokenizerFast

from fusetune.api.chat import TEMPLATES, get_chat_template, mask_non_responses, train_on_responses_only

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi 'there'"},
            {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"}]
EXPECTED = {
    "chatml": "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi 'there'<|im_end|>\n"
              "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n",
    "llama-3": "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
               "<|start_header_id|>user<|end_header_id|>\n\nHi 'there'<|eot_id|><|start_header_id|>assistant"
               "<|end_header_id|>\n\nHello!<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n2+2?<|eot_id|>"
               "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "gemma": "<bos><start_of_turn>user\nBe brief.\n\nHi 'there'<end_of_turn>\n<start_of_turn>model\nHello!"
             "<end_of_turn>\n<start_of_turn>user\n2+2?<end_of_turn>\n<start_of_turn>model\n",
    "phi": "<|system|>\nBe brief.<|end|>\n<|user|>\nHi 'there'<|end|>\n<|assistant|>\nHello!<|end|>\n<|user|>\n"
           "2+2?<|end|>\n<|assistant|>\n",
    "mistral": "<s>[INST] Be brief.\n\nHi 'there' [/INST]Hello!</s>[INST] 2+2? [/INST]",
}
EXPECTED["qwen"] = EXPECTED["chatml"]


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<unk>", "user", "assistant", "system", "model", "hi", "hello", "bye"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<unk>")


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_templates_render_the_family_layout(name):
    tokenizer = get_chat_template(_tokenizer(), name)
    generation = name != "mistral"  # mistral's prompt ends with [/INST] already
    text = tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=generation)
    assert text == EXPECTED[name]
    for token in TEMPLATES[name][1]:  # the special tokens exist now, as single tokens
        assert tokenizer.convert_tokens_to_ids(token) != tokenizer.unk_token_id


def test_unknown_template():
    with pytest.raises(ValueError, match="choose one of"):
        get_chat_template(_tokenizer(), "vicuna")


def test_mask_non_responses_keeps_only_replies():
    ids = torch.tensor([[9, 1, 5, 9, 2, 6, 7, 9, 1, 5, 9, 2, 6]])
    labels = mask_non_responses(ids, ids, instruction_ids=[9, 1], response_ids=[9, 2])
    assert labels.tolist() == [[-100] * 5 + [6, 7] + [-100] * 5 + [6]]


def test_train_on_responses_only_wraps_a_collator():
    tokenizer = get_chat_template(_tokenizer(), "chatml")
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello bye"},
            {"role": "user", "content": "bye"}, {"role": "assistant", "content": "bye"}]
    ids = tokenizer.apply_chat_template(chat, tokenize=True, return_dict=False)

    def collator(features):
        input_ids = torch.tensor([f["input_ids"] for f in features])
        return {"input_ids": input_ids, "labels": input_ids.clone()}

    batch = train_on_responses_only(collator, tokenizer=tokenizer)([{"input_ids": ids}])
    kept = [tokenizer.convert_ids_to_tokens(i) for i, l in zip(ids, batch["labels"][0].tolist()) if l != -100]
    assert kept == ["hello", "bye", "<|im_end|>", "bye", "<|im_end|>"]
    with pytest.raises(ValueError, match="tokenizer"):
        train_on_responses_only(collator)
