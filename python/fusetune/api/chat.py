"""Chat templates and training on the assistant's turns only.

get_chat_template(tokenizer, "llama-3" | "chatml" | "qwen" | "gemma" | "phi" | "mistral") installs
the format's Jinja template (the layout those model families are trained with) and adds its
special tokens where the tokenizer lacks them (then resize the embeddings: the function says so).
train_on_responses_only(trainer or collator) makes every label outside the assistant's replies
-100, so the loss covers only what the model should learn to answer.
"""
from __future__ import annotations

import logging

import torch

logger = logging.getLogger("fusetune")


def _quote(text: str) -> str:
    """text as a Jinja string literal."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


def _turns(start: str, end: str, assistant: str = "assistant", bos: str = "", system_in_user: bool = False) -> str:
    """A Jinja chat template: bos, then start (with ROLE replaced by the role) + content + end for
    each message, then the generation prompt. assistant: the format's name of the assistant role
    (Gemma: "model"). system_in_user: the format has no system role; a system message goes in
    front of the first user turn."""
    before, after = start.split("ROLE")
    role = "(message['role'] if message['role'] != 'assistant' else " + _quote(assistant) + ")"
    content = "message['content']"
    if system_in_user:
        content = "(ns.system if message['role'] == 'user' else '') + message['content']"
    turn = "{{ " + " + ".join([_quote(before), role, _quote(after), content, _quote(end)]) + " }}"
    if system_in_user:
        turn = ("{% if message['role'] == 'system' %}{% set ns.system = message['content'] + '\\n\\n' %}{% else %}"
                + turn + "{% if message['role'] == 'user' %}{% set ns.system = '' %}{% endif %}{% endif %}")
    return ("{% set ns = namespace(system='') %}" + ("{{ " + _quote(bos) + " }}" if bos else "")
            + "{% for message in messages %}" + turn + "{% endfor %}"
            + "{% if add_generation_prompt %}{{ " + _quote(before + assistant + after) + " }}{% endif %}")


# name -> (template, special tokens, instruction part, response part)
TEMPLATES = {
    "chatml": (_turns("<|im_start|>ROLE\n", "<|im_end|>\n"),
               ["<|im_start|>", "<|im_end|>"], "<|im_start|>user\n", "<|im_start|>assistant\n"),
    "llama-3": (_turns("<|start_header_id|>ROLE<|end_header_id|>\n\n", "<|eot_id|>", bos="<|begin_of_text|>"),
                ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
                "<|start_header_id|>user<|end_header_id|>\n\n", "<|start_header_id|>assistant<|end_header_id|>\n\n"),
    "gemma": (_turns("<start_of_turn>ROLE\n", "<end_of_turn>\n", assistant="model", bos="<bos>", system_in_user=True),
              ["<bos>", "<start_of_turn>", "<end_of_turn>"], "<start_of_turn>user\n", "<start_of_turn>model\n"),
    "phi": (_turns("<|ROLE|>\n", "<|end|>\n"),
            ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"], "<|user|>\n", "<|assistant|>\n"),
    "mistral": (
        "{% set ns = namespace(system='') %}{{ '<s>' }}{% for message in messages %}"
        "{% if message['role'] == 'system' %}{% set ns.system = message['content'] + '\\n\\n' %}"
        "{% elif message['role'] == 'user' %}{{ '[INST] ' + ns.system + message['content'] + ' [/INST]' }}"
        "{% set ns.system = '' %}{% else %}{{ message['content'] + '</s>' }}{% endif %}{% endfor %}",
        ["<s>", "</s>", "[INST]", "[/INST]"], "[INST]", "[/INST]"),
}
TEMPLATES["qwen"] = TEMPLATES["chatml"]  # Qwen2/2.5/3 speak ChatML


def get_chat_template(tokenizer, chat_template: str = "chatml"):
    """Install `chat_template` on the tokenizer (in place; returned). Special tokens the tokenizer
    lacks are added; resize the model's embeddings afterwards (model.resize_token_embeddings(len(tokenizer)))."""
    if chat_template not in TEMPLATES:
        raise ValueError(f"unknown chat_template {chat_template!r}; choose one of {', '.join(sorted(TEMPLATES))}")
    template, specials, _, _ = TEMPLATES[chat_template]
    missing = [t for t in specials if tokenizer.convert_tokens_to_ids(t) in (None, tokenizer.unk_token_id)]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing})
        logger.warning("fusetune: added %d special tokens for %s (%s): resize the model's embeddings with "
                       "model.resize_token_embeddings(len(tokenizer))", len(missing), chat_template, ", ".join(missing))
    tokenizer.chat_template = template
    tokenizer.fusetune_chat_parts = TEMPLATES[chat_template][2:]
    return tokenizer


def _find(seq: list[int], part: list[int], start: int) -> int:
    for i in range(start, len(seq) - len(part) + 1):
        if seq[i:i + len(part)] == part:
            return i
    return -1


def mask_non_responses(input_ids: torch.Tensor, labels: torch.Tensor, instruction_ids: list[int],
                       response_ids: list[int], ignore_index: int = -100) -> torch.Tensor:
    """labels with everything but the assistant's replies set to ignore_index: a reply runs from
    the end of each response marker to the next instruction marker (or the end of the row)."""
    out = labels.clone()
    for row, ids in enumerate(input_ids.tolist()):
        keep = torch.zeros(len(ids), dtype=torch.bool)
        pos = 0
        while (start := _find(ids, response_ids, pos)) >= 0:
            begin = start + len(response_ids)
            end = _find(ids, instruction_ids, begin)
            end = len(ids) if end < 0 else end
            keep[begin:end] = True
            pos = end
        out[row][~keep.to(out.device)] = ignore_index
    return out


def train_on_responses_only(trainer_or_collator, instruction_part: str | None = None,
                            response_part: str | None = None, tokenizer=None):
    """Wrap a data collator (or a Trainer's, in place) so labels cover only the assistant's replies.
    The parts default to those of the template get_chat_template installed."""
    trainer = trainer_or_collator if hasattr(trainer_or_collator, "data_collator") else None
    collator = trainer.data_collator if trainer is not None else trainer_or_collator
    tokenizer = tokenizer or getattr(trainer, "processing_class", None) or getattr(trainer, "tokenizer", None)
    if tokenizer is None:
        raise ValueError("train_on_responses_only needs the tokenizer (pass tokenizer=...)")
    parts = getattr(tokenizer, "fusetune_chat_parts", None)
    instruction_part = instruction_part or (parts[0] if parts else None)
    response_part = response_part or (parts[1] if parts else None)
    if not instruction_part or not response_part:
        raise ValueError("train_on_responses_only: give instruction_part and response_part (or install a template "
                         "with get_chat_template first)")
    instruction_ids = tokenizer(instruction_part, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(response_part, add_special_tokens=False)["input_ids"]

    def collate(features):
        batch = collator(features)
        batch["labels"] = mask_non_responses(batch["input_ids"], batch["labels"], instruction_ids, response_ids)
        return batch

    if trainer is not None:
        trainer.data_collator = collate
        return trainer
    return collate
