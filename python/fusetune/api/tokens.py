"""Extending a tokenizer (e.g. with Korean words) and training the new embeddings.

add_new_tokens adds the tokens, resizes the model's input (and untied output) embeddings and
starts every new row at the mean of the existing rows: a new token begins as an "average" token
instead of noise, so the first steps do not disturb the rest of the model. Train the embeddings
through PEFT's modules_to_save=["embed_tokens", "lm_head"], usually with their own, smaller
learning rate: embedding_param_groups builds the optimizer groups.
"""
from __future__ import annotations

import torch

from fusetune.patching import hf_model


def special_ids(tokenizer) -> set[int]:
    """The ids of the tokenizer's special tokens: its named ones and those added as special."""
    return set(tokenizer.all_special_ids) | {i for i, token in tokenizer.added_tokens_decoder.items() if token.special}


def add_new_tokens(model, tokenizer, new_tokens: list[str], special: bool = False) -> int:
    """Add new_tokens to the tokenizer and the model (before get_peft_model); returns how many were new."""
    if isinstance(new_tokens, str):
        raise TypeError("add_new_tokens takes a list of tokens, got a string")
    before = len(tokenizer)
    tokenizer.add_tokens(list(new_tokens), special_tokens=special)
    added = len(tokenizer) - before  # add_tokens' own count includes tokens the vocabulary already had
    if added:
        fit_embeddings(model, tokenizer, before)
    return added


def fit_embeddings(model, tokenizer, first_new: int) -> None:
    """The model's embeddings (input, and output when untied) grown to the tokenizer where it is
    larger, rows first_new.. set to the mean of the rows before them (for tokens added to the
    tokenizer before the model was loaded)."""
    hf = hf_model(model)
    rows = hf.get_input_embeddings().weight.shape[0]  # may exceed the tokenizer (padded vocabularies)
    if len(tokenizer) > rows:
        hf.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    with torch.no_grad():
        embeddings = [hf.get_input_embeddings().weight]
        head = hf.get_output_embeddings()
        if head is not None and head.weight is not embeddings[0]:
            embeddings.append(head.weight)
        for weight in embeddings:
            weight[first_new:len(tokenizer)] = weight[:first_new].float().mean(0).to(weight.dtype)


def untie_embeddings(model) -> bool:
    """Give the output layer its own copy of a tied input embedding (returns whether it was tied):
    trained apart (added tokens), the two must be saved, merged and exported apart too."""
    hf = hf_model(model)
    head, embed = hf.get_output_embeddings(), hf.get_input_embeddings()
    if head is None or head.weight is not embed.weight:
        return False
    head.weight = torch.nn.Parameter(embed.weight.detach().clone(), requires_grad=embed.weight.requires_grad)
    hf.config.tie_word_embeddings = False
    hf.config.get_text_config().tie_word_embeddings = False  # the same object, or a multimodal model's text part
    return True


def embedding_param_groups(model, learning_rate: float, embedding_learning_rate: float, **options):
    """Optimizer parameter groups: trainable embed_tokens / lm_head weights at embedding_learning_rate,
    every other trainable parameter at learning_rate (options, e.g. weight_decay, go to both)."""
    embedding, other = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (embedding if "embed_tokens" in name or "lm_head" in name else other).append(p)
    groups = [dict(params=other, lr=learning_rate, **options)]
    if embedding:
        groups.append(dict(params=embedding, lr=embedding_learning_rate, **options))
    return groups
