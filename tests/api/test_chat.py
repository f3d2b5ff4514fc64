"""Chat templates (the layout each family is trained with) and train_on_responses_only."""
import pytest
import torch
from transformers import PreTrainedTokenizerFast

from fusetune.api.chat import (END_OF_TURN, TEMPLATES, Markers, get_chat_template, mask_non_responses,
                               train_on_responses_only)

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


def _tokenizer_with(tokens, eos="<|endoftext|>", pad="<|endoftext|>"):
    """A word-level tokenizer whose vocabulary holds `tokens` as plain entries (not special: their text
    splits into pieces until they are marked so), EOS <|endoftext|>."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<unk>", "<|endoftext|>", "hi", *tokens]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token=eos, pad_token=pad)


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_the_end_of_turn_token_becomes_the_eos(name):
    """Generation and a GGUF export stop at the tokenizer's EOS: it must be the token that ends the
    template's turns, and one token when the template's text is encoded (no new row: same length);
    the old EOS, the pad before, stays the pad, so pad != EOS."""
    tokenizer = _tokenizer_with(TEMPLATES[name][1])
    size = len(tokenizer)
    get_chat_template(tokenizer, name)
    end = END_OF_TURN[name]
    assert tokenizer.eos_token == end and len(tokenizer) == size
    assert tokenizer("hi" + end, add_special_tokens=False)["input_ids"] == [tokenizer.convert_tokens_to_ids("hi"),
                                                                            tokenizer.eos_token_id]
    assert tokenizer.pad_token == "<|endoftext|>" != tokenizer.eos_token
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hi"}],
                                         tokenize=False)
    assert end in text


@pytest.mark.parametrize("pad", [None, "<|im_end|>"])
def test_a_missing_pad_or_one_that_is_the_new_eos_becomes_the_old_eos(pad):
    """A collator masks every label equal to the pad id: with pad == EOS the model never learns to stop."""
    tokenizer = get_chat_template(_tokenizer_with(["<|im_start|>", "<|im_end|>"], pad=pad), "chatml")
    assert (tokenizer.eos_token, tokenizer.pad_token) == ("<|im_end|>", "<|endoftext|>")


def test_an_end_of_turn_token_the_vocabulary_lacks_leaves_the_eos_with_one_warning(caplog):
    """Added here, the token has no row in the model until the user resizes: the EOS stays, and the
    warning says so, naming the token."""
    tokenizer = _tokenizer_with(["<|im_start|>"])
    with caplog.at_level("WARNING", logger="fusetune"):
        get_chat_template(tokenizer, "chatml")
    assert tokenizer.eos_token == tokenizer.pad_token == "<|endoftext|>"
    assert len(caplog.records) == 1
    assert "(<|im_end|>): resize the model's embeddings" in caplog.text
    assert "the EOS stays '<|endoftext|>'" in caplog.text and "tokenizer.eos_token = '<|im_end|>'" in caplog.text


def test_unknown_template():
    with pytest.raises(ValueError, match="choose one of"):
        get_chat_template(_tokenizer(), "vicuna")


def test_mask_non_responses_keeps_only_replies():
    tokenizer = get_chat_template(_tokenizer(), "chatml")
    markers = Markers(tokenizer, *TEMPLATES["chatml"][2:])
    start, end, user, assistant, system, hi, hello = tokenizer.convert_tokens_to_ids(
        ["<|im_start|>", "<|im_end|>", "user", "assistant", "system", "hi", "hello"])
    ids = torch.tensor([[start, user, hi, end, start, assistant, hello, hi, end, start, user, hi, end, start,
                         assistant, hello, end]])
    labels = mask_non_responses(ids, ids, markers)
    assert labels.tolist() == [[-100] * 6 + [hello, hi, end] + [-100] * 6 + [hello, end]]
    # a packed row: the first example's reply stops where the second (a system prompt first) begins
    ids = torch.tensor([[start, user, hi, end, start, assistant, hello, end, start, system, hi, end]])
    positions = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3]])
    assert mask_non_responses(ids, ids, markers, position_ids=positions).tolist() == [
        [-100] * 6 + [hello, end] + [-100] * 4]


def _byte_level_tokenizer():
    """A GPT-2-style byte-level BPE (as SmolLM2's): "\n\n" alone is one token, before a word two."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {c: i for i, c in enumerate(sorted(alphabet))}
    vocab["ĊĊ"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab, [("Ċ", "Ċ")]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="!")


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_replies_are_found_whatever_the_tokenizer_makes_of_the_markers_whitespace(name):
    """Llama-3's response part ends in "\n\n": one token alone, two before the reply on a byte-level
    BPE. The replies (each up to the next turn) are labelled, and a tool turn is not."""
    tokenizer = get_chat_template(_byte_level_tokenizer(), name)
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "Weather?"}, {"role": "assistant", "content": "call"}]
    if name in ("chatml", "qwen", "llama-3"):  # tool results are turns of their own role in these layouts
        chat += [{"role": "tool", "content": "sunny"}, {"role": "assistant", "content": "Sunny."}]
    ids = tokenizer.apply_chat_template(chat, tokenize=True, return_dict=False)

    def collator(features):
        input_ids = torch.tensor([f["input_ids"] for f in features])
        return {"input_ids": input_ids, "labels": input_ids.clone()}

    labels = train_on_responses_only(collator, tokenizer=tokenizer)([{"input_ids": ids}])["labels"][0]
    kept = tokenizer.decode([i for i, label in zip(ids, labels.tolist()) if label != -100])
    end = {"chatml": "<|im_end|>\n", "qwen": "<|im_end|>\n", "llama-3": "<|eot_id|>", "gemma": "<end_of_turn>\n",
           "phi": "<|end|>\n", "mistral": "</s>"}[name]
    replies = [m["content"] for m in chat if m["role"] == "assistant"]
    assert kept == "".join(reply + end for reply in replies)


def test_a_response_part_that_never_matches_is_an_error_not_a_run_that_learns_nothing(caplog):
    tokenizer = get_chat_template(_tokenizer(), "chatml")
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "bye"}],
                                        tokenize=True, return_dict=False)

    def collator(features):
        input_ids = torch.tensor([f["input_ids"] for f in features])
        return {"input_ids": input_ids, "labels": input_ids.clone()}

    with caplog.at_level("WARNING", logger="fusetune"):  # given parts may describe rows laid out otherwise
        train_on_responses_only(collator, tokenizer=tokenizer, response_part="<|im_start|>model\n")
    assert "'<|im_start|>model\\n' does not occur where the tokenizer's chat template writes a reply" in caplog.text
    tokenizer.fusetune_chat_parts = ("<|im_start|>user\n", "<|im_start|>model\n")  # the installed ones must
    with pytest.raises(ValueError, match="does not occur where the tokenizer's chat template writes a reply"):
        train_on_responses_only(collator, tokenizer=tokenizer)
    tokenizer.fusetune_chat_parts = TEMPLATES["chatml"][2:]
    caplog.clear()
    collate = train_on_responses_only(collator, tokenizer=tokenizer)
    assert collate([{"input_ids": ids}])["labels"].ne(-100).any()
    prompt_only = ids[:ids.index(tokenizer.convert_tokens_to_ids("assistant")) - 1]  # a reply cut off
    with caplog.at_level("WARNING", logger="fusetune"):
        assert collate([{"input_ids": prompt_only}])["labels"].eq(-100).all()
    assert "trains on nothing" in caplog.text


def test_plain_text_markers_do_not_end_a_reply_at_their_shared_words():
    """Alpaca's "### Instruction:" / "### Response:" share "###", which a reply may hold (a heading):
    only special tokens start a turn, so the reply runs to the next instruction marker."""
    tokenizer = _byte_level_tokenizer()
    text = "### Instruction:\nHi\n\n### Response:\n# Title\n\n### Install\nrun it\n\n### Instruction:\nBye"
    ids = tokenizer(text)["input_ids"]
    markers = Markers(tokenizer, "### Instruction:\n", "### Response:\n")
    assert markers.turn == []
    labels = mask_non_responses(torch.tensor([ids]), torch.tensor([ids]), markers)[0]
    assert tokenizer.decode([i for i, label in zip(ids, labels.tolist()) if label != -100]) == \
        "# Title\n\n### Install\nrun it\n\n"


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
