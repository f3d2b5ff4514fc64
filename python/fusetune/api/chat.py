"""Chat templates and training on the assistant's turns only.

get_chat_template(tokenizer, "llama-3" | "chatml" | "qwen" | "gemma" | "phi" | "mistral") installs
the format's Jinja template (the layout those model families are trained with), adds its
special tokens where the tokenizer lacks them (then resize the embeddings: the function says so)
and makes the token that ends its turns the EOS, so that generation stops at the end of a reply.
train_on_responses_only(trainer or collator) makes every label outside the assistant's replies
-100, so the loss covers only what the model should learn to answer.
"""
from __future__ import annotations

import logging

import torch

from fusetune.api.tokens import special_ids

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
# name -> the token that ends an assistant turn: where the model stops generating
END_OF_TURN = {"chatml": "<|im_end|>", "qwen": "<|im_end|>", "llama-3": "<|eot_id|>", "gemma": "<end_of_turn>",
               "phi": "<|end|>", "mistral": "</s>"}


def get_chat_template(tokenizer, chat_template: str = "chatml"):
    """Install `chat_template` on the tokenizer (in place; returned). Special tokens the tokenizer
    lacks are added; resize the model's embeddings afterwards (model.resize_token_embeddings(len(tokenizer))).

    The template's end-of-turn token (<|im_end|>, <|eot_id|>, ...) becomes the EOS when the vocabulary
    holds it (not when it was just added: the model has no row for it yet), so the saved tokenizer and
    a GGUF export stop at the end of a reply; the old EOS becomes the pad token where the pad was
    missing or is the new EOS (a collator masks every label equal to the pad: with pad == EOS the model
    never learns to stop). model.generate stops at the model's generation_config.eos_token_id, which
    this function cannot reach: set it to tokenizer.eos_token_id, or pass eos_token_id=tokenizer.eos_token_id
    (save_pretrained_merged with the tokenizer writes it into the saved generation config)."""
    if chat_template not in TEMPLATES:
        raise ValueError(f"unknown chat_template {chat_template!r}; choose one of {', '.join(sorted(TEMPLATES))}")
    template, specials, _, _ = TEMPLATES[chat_template]
    end = END_OF_TURN[chat_template]
    missing = [t for t in specials if tokenizer.convert_tokens_to_ids(t) in (None, tokenizer.unk_token_id)]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing})
        eos = (f"; the EOS stays {tokenizer.eos_token!r} (the model has no row for {end!r} yet), so generation "
               f"does not stop at the end of a reply until you set tokenizer.eos_token = {end!r} after resizing"
               if end in missing else "")
        logger.warning("fusetune: added %d special tokens for %s (%s): resize the model's embeddings with "
                       "model.resize_token_embeddings(len(tokenizer))%s", len(missing), chat_template,
                       ", ".join(missing), eos)
    if end not in missing and end != tokenizer.eos_token:
        _end_sequences_at(tokenizer, end)
    tokenizer.chat_template = template
    tokenizer.fusetune_chat_parts = TEMPLATES[chat_template][2:]
    return tokenizer


def _end_sequences_at(tokenizer, end: str) -> None:
    """Make `end`, a token of the vocabulary, the EOS (marked special, so that its text encodes as that one
    token: no new row); the old EOS pads where the pad was missing or is `end`, so pad != EOS."""
    old = tokenizer.eos_token
    tokenizer.add_special_tokens({"eos_token": end})
    if old is not None and tokenizer.pad_token in (None, end):
        tokenizer.pad_token = old


def _find(seq: list[int], part: list[int], start: int, stop: int) -> int:
    """The first i in [start, stop) where part begins in seq, or stop."""
    for i in range(start, stop - len(part) + 1):
        if seq[i:i + len(part)] == part:
            return i
    return stop


class Markers:
    """How train_on_responses_only finds replies in token ids, from the two parts' text.

    A marker is matched without its trailing whitespace ("<|start_header_id|>assistant<|end_header_id|>"
    for Llama-3's "...\n\n"): a byte-level BPE tokenizes "\n\n" alone as one token but as two before
    the reply's first word, so the whole part, tokenized alone, may never occur in a row. The reply then
    starts after up to that much whitespace (spaces: the tokenizer's text of a whitespace-only token,
    its length). A reply ends at the next instruction or response marker, at the next turn of any
    other role (the two parts' common leading tokens: "<|im_start|>", "<start_of_turn>", ...; a tool
    result is no reply) or where a packed row's next example begins (its position ids restart)."""

    def __init__(self, tokenizer, instruction_part: str, response_part: str):
        encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
        self.instruction = encode(instruction_part.rstrip())
        self.response = encode(response_part.rstrip())
        if not self.instruction or not self.response:
            raise ValueError("train_on_responses_only: instruction_part and response_part must hold more than "
                             "whitespace")
        self.space_after = len(response_part) - len(response_part.rstrip())
        common = 0
        while (common < min(len(self.instruction), len(self.response))
               and self.instruction[common] == self.response[common]):
            common += 1
        # only special tokens start a turn: shared plain text ("###" of "### Instruction:" and "### Response:")
        # may occur inside a reply
        special = special_ids(tokenizer)
        self.turn = self.instruction[:common] if all(t in special for t in self.instruction[:common]) else []
        self._tokenizer, self._spaces = tokenizer, {}

    def spaces(self, token: int) -> int:
        """The length of the token's text if it is whitespace only, else 0."""
        if token not in self._spaces:
            text = self._tokenizer.decode([token])
            self._spaces[token] = len(text) if text and not text.strip() else 0
        return self._spaces[token]

    def replies(self, ids: list[int], stop: int):
        """(begin, end) of each reply in ids[:stop]."""
        pos = 0
        while (start := _find(ids, self.response, pos, stop)) < stop:
            begin, left = start + len(self.response), self.space_after
            while begin < stop and left > 0 and 0 < self.spaces(ids[begin]) <= left:
                left -= self.spaces(ids[begin])
                begin += 1
            end = min(_find(ids, part, begin, stop) for part in (self.instruction, self.response, self.turn) if part)
            yield begin, end
            pos = end


def mask_non_responses(input_ids: torch.Tensor, labels: torch.Tensor, markers: Markers, *,
                       position_ids: torch.Tensor | None = None, ignore_index: int = -100) -> torch.Tensor:
    """labels with everything but the assistant's replies (markers.replies) set to ignore_index;
    position_ids of input_ids' shape (packed rows) mark where each example begins."""
    out = labels.clone()
    packed = position_ids is not None and position_ids.shape == input_ids.shape
    starts = position_ids.eq(0).tolist() if packed else None
    for row, ids in enumerate(input_ids.tolist()):
        keep = torch.zeros(len(ids), dtype=torch.bool)
        bounds = [i for i, first in enumerate(starts[row]) if first and i] if starts else []
        for lo, hi in zip([0] + bounds, bounds + [len(ids)]):
            for begin, end in markers.replies(ids[lo:hi], hi - lo):
                keep[lo + begin:lo + end] = True
        out[row][~keep.to(out.device)] = ignore_index
    return out


def train_on_responses_only(trainer_or_collator, instruction_part: str | None = None,
                            response_part: str | None = None, tokenizer=None):
    """Wrap a data collator (or a Trainer's, in place) so labels cover only the assistant's replies.
    The parts default to those of the template get_chat_template installed. Parts that do not find the
    reply in a conversation the tokenizer's chat template renders are an error here, before any step
    trains on nothing; a batch without a reply (cut off by the maximum length) gets a warning."""
    trainer = trainer_or_collator if hasattr(trainer_or_collator, "data_collator") else None
    collator = trainer.data_collator if trainer is not None else trainer_or_collator
    tokenizer = tokenizer or getattr(trainer, "processing_class", None) or getattr(trainer, "tokenizer", None)
    if tokenizer is None:
        raise ValueError("train_on_responses_only needs the tokenizer (pass tokenizer=...)")
    parts = getattr(tokenizer, "fusetune_chat_parts", None)
    given = bool(instruction_part or response_part)
    instruction_part = instruction_part or (parts[0] if parts else None)
    response_part = response_part or (parts[1] if parts else None)
    if not instruction_part or not response_part:
        raise ValueError("train_on_responses_only: give instruction_part and response_part (or install a template "
                         "with get_chat_template first)")
    markers = Markers(tokenizer, instruction_part, response_part)
    _check_parts(tokenizer, markers, response_part, given)

    def collate(features):
        batch = collator(features)
        labels = batch["labels"]
        batch["labels"] = mask_non_responses(batch["input_ids"], labels, markers,
                                             position_ids=batch.get("position_ids"))
        if labels.ne(-100).any() and not batch["labels"].ne(-100).any():
            logger.warning("fusetune: train_on_responses_only: no assistant reply in this batch (the response part "
                           "%r does not occur in its rows: replies cut off by the maximum length?), so it trains on "
                           "nothing", response_part)
        return batch

    if trainer is not None:
        trainer.data_collator = collate
        return trainer
    return collate


def _check_parts(tokenizer, markers: Markers, response_part: str, given: bool) -> None:
    """The parts find the reply of a short conversation as the tokenizer's chat template renders it (a
    tokenizer without a template: nothing to check against). Parts the caller gave may describe rows
    laid out otherwise (a warning); those of the installed template must (an error)."""
    from jinja2 import TemplateError

    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    try:
        text = tokenizer.apply_chat_template(chat, tokenize=False)
    except (TemplateError, ValueError):
        return
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if any(begin < end for begin, end in markers.replies(ids, len(ids))):
        return
    message = (f"train_on_responses_only: the response part {response_part!r} does not occur where the tokenizer's "
               f"chat template writes a reply ({text!r:.200})")
    if not given:
        raise ValueError(f"{message}; pass response_part= (and instruction_part=) as the template writes them")
    logger.warning("fusetune: %s: unless your rows are laid out otherwise, every label will be masked", message)
