"""`fusetune chat OUTPUT_DIR`: talk to what `fusetune train` trained, in the terminal. The adapter
in OUTPUT_DIR/adapter (or a merged model folder, or any model name) answers each line typed, the
conversation kept; an empty line or Ctrl-D ends it, /reset starts a new conversation."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch


def reply(model, tokenizer, messages: list[dict], max_new_tokens: int) -> str:
    """The model's greedy reply to a conversation (the tokenizer's chat template)."""
    device = next(model.parameters()).device
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True).to(device)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def trained_model_path(source: str) -> str | None:
    """OUTPUT_DIR of `fusetune train` -> its adapter folder (LoRA) or model folder (full fine-tuning),
    a recipe's the result of its last stage (stages.json); None when `source` holds neither."""
    folder = Path(source)
    try:
        result = json.loads((folder / "stages.json").read_text(encoding="utf-8"))["result"]
        # relative to the recipe's folder (earlier fusetune: to where the recipe ran)
        return str(folder / result) if (folder / result).exists() else result
    except (OSError, ValueError, KeyError, TypeError):
        pass
    if (folder / "adapter" / "adapter_config.json").is_file():
        return str(folder / "adapter")
    if (folder / "model" / "config.json").is_file():
        return str(folder / "model")
    return None


def run_chat(source: str, max_new_tokens: int = 256, system: str | None = None, lines=None, write=print) -> int:
    from fusetune.api import FastLanguageModel

    path = trained_model_path(source) or source  # else an adapter, a model folder or a name itself
    model, tokenizer = FastLanguageModel.from_pretrained(path)
    FastLanguageModel.for_inference(model)
    start = [{"role": "system", "content": system}] if system else []
    messages = list(start)
    interactive = lines is None and sys.stdin.isatty()
    write(f"chatting with {path} (empty line or Ctrl-D: quit, /reset: a new conversation)")
    for line in lines if lines is not None else sys.stdin:
        text = line.strip()
        if not text:
            break
        if text == "/reset":
            messages = list(start)
            continue
        messages.append({"role": "user", "content": text})
        answer = reply(model, tokenizer, messages, max_new_tokens)
        messages.append({"role": "assistant", "content": answer})
        write(f"{answer}" if interactive else f"> {text}\n{answer}")
    return 0
