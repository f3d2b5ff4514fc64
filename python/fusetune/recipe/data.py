"""Training data for `fusetune train`: read rows from a file, turn them into conversations, and
tokenize them with the chat template, labels on the assistant's replies only.

Files: .jsonl, .json (a list of rows), .csv; .parquet, a `datasets` save_to_disk directory and a
Hub dataset (owner/name[:split]) need the datasets package. "builtin:NAME" reads a file bundled in
fusetune/data.
Rows: {"messages": [{"role", "content"}, ...], "tools"?} (OpenAI / TRL: every field of a message,
reasoning_content and tool_calls too, and the row's tools reach the chat template; roles in any case,
human / gpt / model read as user / assistant), {"conversations": [{"from", "value"}, ...]} (ShareGPT),
{"instruction", "input"?, "output", "system"?} (Alpaca), {"prompt", "completion"} (texts, or TRL's lists
of messages), or {"text"} (plain text: every token is a label; a text that starts with the BOS token gets
no second one).
"""
from __future__ import annotations

import csv
import functools
import io
import json
import logging
import os
import re
from importlib import resources
from pathlib import Path

import torch

from fusetune.api.tokens import special_ids
from fusetune.recipe.config import ConfigError

logger = logging.getLogger("fusetune")

IGNORE_INDEX = -100
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system"}
# other names of the roles in "messages" rows (Gemma's data says "model"); a role is read in any case
ROLE_ALIASES = {**SHAREGPT_ROLES, "model": "assistant", "bot": "assistant", "ai": "assistant", "chatbot": "assistant"}
# the roles chat templates know; another would be rendered as a turn of its own name and never learned
ROLES = {"user", "assistant", "system", "tool", "function", "developer", "ipython"}


def _decode(raw: bytes, path: str, key: str) -> str:
    try:
        return raw.decode("utf-8-sig")  # -sig: Excel's "CSV UTF-8" and Notepad start with a byte-order mark
    except UnicodeDecodeError as err:
        line = raw[:err.start].count(b"\n") + 1
        raise ConfigError(f"{key} {path!r} is not UTF-8 text (byte 0x{raw[err.start]:02x} on line {line}): save "
                          f"it as UTF-8, e.g. iconv -f cp949 -t utf-8 {path} > fixed{Path(path).suffix} (cp949: "
                          f"Korean Windows; name your file's encoding)") from err


def _parse(text: str, path: str, suffix: str, key: str) -> list:
    try:
        if suffix == ".jsonl":
            rows = []
            # (lines end at \n alone: str.splitlines also breaks at U+2028, form feeds... which JSON strings hold)
            for number, line in enumerate(text.split("\n"), 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as err:
                        raise ConfigError(f"{key} {path!r}: line {number} is not valid JSON ({err.msg} at "
                                          f"column {err.colno}): fix or remove that line") from err
            return rows
        if suffix == ".json":
            rows = json.loads(text)
            if not isinstance(rows, list):
                raise ConfigError(f"{key} {path!r}: a .json file must hold a list of rows")
            return rows
    except json.JSONDecodeError as err:
        raise ConfigError(f"{key} {path!r}: not valid JSON ({err})") from err
    if suffix == ".csv":
        # (newline="": the csv module reads the line breaks inside quoted fields as part of the text)
        reader = csv.DictReader(io.StringIO(text, newline=""))
        rows = []
        try:
            for row in reader:
                if None in row or None in row.values():  # more fields than the header names, or fewer
                    count = len(reader.fieldnames) + len(row.get(None, [])) - list(row.values()).count(None)
                    raise ConfigError(f"{key} {path!r}: line {reader.line_num} has {count} fields where the header "
                                      f"names {len(reader.fieldnames)}: put a field that holds a comma or a line "
                                      f"break in double quotes")
                rows.append(row)
        except csv.Error as err:
            raise ConfigError(f"{key} {path!r}: line {reader.line_num} is not valid CSV ({err}); a text over "
                              f"{csv.field_size_limit()} characters in one field reads better from .jsonl") from err
        return rows
    raise ConfigError(f"{key} {path!r}: unknown file type {suffix!r} (use .jsonl, .json, .csv or .parquet)")


def read_rows(path: str, key: str = "data.path") -> list[dict]:
    """The rows of a data file (the config's `key`), each a dict; ConfigError naming the file and
    the fix when it cannot be read (missing, empty, not UTF-8, not valid JSON or CSV, rows that are
    not objects)."""
    if path.startswith("builtin:"):
        name = path.removeprefix("builtin:")
        file = resources.files("fusetune.data").joinpath(name)
        if not file.is_file():
            raise ConfigError(f"{key} {path!r}: fusetune bundles no file {name!r}")
        rows = _parse(file.read_text(encoding="utf-8"), path, Path(name).suffix, key)
    else:
        p = Path(path)
        if not p.exists() and HUB_NAME.fullmatch(path) and p.suffix not in (".jsonl", ".json", ".csv", ".parquet"):
            rows = _read_hub(path, key)
        elif not p.exists():
            raise ConfigError(f"{key} {path!r} not found: give a .jsonl, .json, .csv or .parquet file, a datasets "
                              f"directory, or a Hugging Face Hub dataset (owner/name)")
        elif p.is_dir() or p.suffix == ".parquet":
            rows = _read_datasets(p, path, key)
        else:
            try:
                raw = p.read_bytes()
            except OSError as err:
                raise ConfigError(f"{key} {path!r} cannot be read: {err.strerror}") from err
            rows = _parse(_decode(raw, path, key), path, p.suffix, key)
    if not rows:
        raise ConfigError(f"{key} {path!r} holds no rows: give a file with at least one example")
    for index, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ConfigError(f"{key} {path!r}: row {index} is {type(row).__name__} {str(row)[:40]!r}, not an "
                              f"object of fields (e.g. {{\"messages\": [...]}})")
    return [Row(row, index) for index, row in enumerate(rows)]


class Row(dict):
    """A data file's row, which knows its number in the file: messages name it after eval_split has
    split the rows."""

    def __init__(self, fields: dict, number: int):
        super().__init__(fields)
        self.number = number


def row_number(row: dict, position: int) -> int:
    """The row's number in its file where it knows it (read_rows), else its position."""
    return getattr(row, "number", position)


HUB_NAME = re.compile(r"[\w.-]+/[\w.-]+(:[\w.-]+)?")  # owner/name, or owner/name:split


def _read_hub(name: str, key: str) -> list[dict]:
    """A Hub dataset's split (owner/name:split, train by default), through the datasets library."""
    try:
        import datasets
    except ImportError as err:
        raise ConfigError(f"{key} {name!r} is no local file; reading it from the Hugging Face Hub needs the datasets "
                          f"package: pip install datasets") from err
    repo, _, split = name.partition(":")
    try:
        return list(datasets.load_dataset(repo, split=split or "train"))
    except Exception as err:  # datasets raises many kinds: no network, no such dataset, no such split
        raise ConfigError(f"{key} {name!r} is no local file, and the Hugging Face Hub could not provide it as a "
                          f"dataset ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}): check the "
                          f"name and the network, or download it and give the file") from err


def _read_datasets(p: Path, path: str, key: str) -> list[dict]:
    try:
        import datasets
    except ImportError as err:
        raise ConfigError(f"{key} {path!r}: reading parquet files and datasets directories needs the datasets "
                          f"package: pip install datasets") from err
    ds = datasets.load_from_disk(str(p)) if p.is_dir() else datasets.Dataset.from_parquet(str(p))
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise ConfigError(f"{key} {path!r}: the dataset has splits {list(ds)} but no 'train'")
        ds = ds["train"]
    return list(ds)


def trained(message: dict) -> bool:
    """Whether a reply is learned: OpenAI's fine-tuning format marks context-only turns "weight": 0 (as
    fusetune marks the assistant turns of a prompt/completion row's prompt)."""
    return message.get("weight", 1) != 0


def _message(message: dict, where: str) -> dict:
    """A message for the chat template: every field as given (reasoning_content, tool_calls, name, ...)
    but those that are None (a parquet or Hub dataset gives every message every column; transformers
    5.17 hands them to the template as they are), the role with its aliases resolved."""
    fields = {k: v for k, v in message.items() if v is not None}
    role = ROLE_ALIASES.get(message["role"].lower(), message["role"].lower())
    if fields.get("weight", 1) not in (0, 1):
        raise ConfigError(f"{where}: a message's weight is 0 (context, not learned) or 1, got {fields['weight']!r}")
    if role not in ROLES:
        raise ConfigError(f"{where}: role {message['role']!r} is none of {', '.join(sorted(ROLES))} (nor an alias: "
                          f"{', '.join(sorted(ROLE_ALIASES))}): rename it; a reply under another name would be "
                          f"rendered as prompt and never learned")
    return {**fields, "role": role}


def row_tools(row: dict, index: int) -> list | None:
    """The row's tools for the chat template: a list (a JSON text of one, as Hub datasets store it), or
    None where it has none."""
    tools = row.get("tools")
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as err:
            raise ConfigError(f"data row {index}: tools is a text but no JSON ({err})") from err
    if tools is not None and not isinstance(tools, list):
        raise ConfigError(f"data row {index}: tools must be a list of tool schemas, got {type(tools).__name__}")
    return tools or None


def to_messages(row: dict, index: int) -> list[dict] | str:
    """A row as a list of chat messages, or as a plain string for {"text"} rows."""
    messages = _row_messages(row, index)
    row_tools(row, index)
    if isinstance(messages, list) and messages[0]["role"] == "assistant":
        raise ConfigError(f"data row {index}: the conversation starts with an assistant turn: there is nothing it "
                          f"answers")
    return messages


def _row_messages(row: dict, index: int) -> list[dict] | str:
    if "messages" in row:
        messages = row["messages"]
        if not isinstance(messages, list) or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str)
                and (isinstance(m.get("content"), str) or (m.get("content") is None and m.get("tool_calls")))
                for m in messages):
            raise ConfigError(f"data row {index}: each message needs a role and a content (text; none only beside "
                              f"tool_calls)")
        if not messages:
            raise ConfigError(f"data row {index}: no messages")
        return [_message(m, f"data row {index}") for m in messages]
    if "conversations" in row:
        turns = row["conversations"]
        if not isinstance(turns, list) or not turns or not all(
                isinstance(m, dict) and isinstance(m.get("value"), str) for m in turns):
            raise ConfigError(f"data row {index}: conversations must be a list of turns, each a from and a value "
                              f"(text)")
        try:
            return [_message({"role": SHAREGPT_ROLES[m["from"]], "content": m["value"], "weight": m.get("weight")},
                             f"data row {index}") for m in turns]
        except KeyError as err:
            raise ConfigError(f"data row {index}: ShareGPT role {err} not known ({', '.join(SHAREGPT_ROLES)})") from err
    if "instruction" in row and "output" in row:
        if not all(isinstance(row.get(k), str) for k in ("instruction", "output")) or \
                not isinstance(row.get("input") or "", str):
            raise ConfigError(f"data row {index}: instruction, input and output must be texts")
        prompt = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
        system = [{"role": "system", "content": row["system"]}] if isinstance(row.get("system"), str) else []
        return system + [{"role": "user", "content": prompt}, {"role": "assistant", "content": row["output"]}]
    if "prompt" in row and "completion" in row:  # texts, or TRL's conversational layout (message lists)
        # as TRL, the completion is learned, not the replies inside the prompt (its context)
        prompt = [{**m, "weight": 0} if m["role"] == "assistant" else m
                  for m in _chat(row["prompt"], "user", f"data row {index} prompt")]
        return prompt + _chat(row["completion"], "assistant", f"data row {index} completion")
    if "text" in row:
        if not isinstance(row["text"], str):
            raise ConfigError(f"data row {index}: text must be a text, got {type(row['text']).__name__}")
        return row["text"]
    raise ConfigError(f"data row {index} has keys {sorted(row)}: fusetune reads messages, conversations, "
                      f"instruction/output, prompt/completion or text rows")


ROW_FIELDS = {"cpt": ("text",), "dpo": ("prompt", "chosen", "rejected"), "orpo": ("prompt", "chosen", "rejected"),
              "grpo": ("prompt",)}  # the fields a stage kind reads (sft: any conversation format above)


def _chat(value, role: str, where: str) -> list[dict]:
    """A prompt or reply as chat messages: a text becomes one message of `role`."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, list) and value and all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                                 and isinstance(m.get("content"), str) for m in value):
        return [_message(m, where) for m in value]
    raise ConfigError(f"{where}: a text or a list of messages (each a role and a content), got {value!r:.60}")


def check_rows(rows: list[dict], path: str, key: str = "data.path", kind: str = "sft") -> None:
    """Every row is something a stage of this kind can train on (before any model is loaded)."""
    fields = ROW_FIELDS.get(kind)
    for index, row in enumerate(rows):
        try:
            if fields is None:
                to_messages(row, index)
                continue
            missing = [f for f in fields if f not in row]
            if missing:
                raise ConfigError(f"data row {index} has keys {sorted(row)} but a {kind} stage reads "
                                  f"{', '.join(fields)} (missing: {', '.join(missing)})")
            if kind == "cpt" and not isinstance(row["text"], str):
                raise ConfigError(f"data row {index}: text must be a text")
            for field in fields if kind != "cpt" else ():
                _chat(row[field], "user" if field == "prompt" else "assistant", f"data row {index} {field}")
        except ConfigError as err:
            raise ConfigError(f"{key} {path!r}: {err}") from err


def _render(tokenizer, messages: list[dict], index: int, tools: list | None = None, **kwargs) -> str:
    from jinja2 import TemplateError

    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, tools=tools, **kwargs)
    except (TemplateError, TypeError, ValueError) as err:  # the template's own checks, and fields it cannot take
        raise ConfigError(f"data row {index}: the chat template refuses this conversation ({err}); fix the row or "
                          f"choose another model.chat_template") from err


def end_of_turn(tokenizer) -> int | None:
    """The special token the chat template closes an assistant turn with (ChatML's <|im_end|>, Gemma's
    <end_of_turn>, ...), or None (no template, or text follows the reply)."""
    from jinja2 import TemplateError

    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "?"},
                                              {"role": "assistant", "content": "REPLY"}], tokenize=False)
    except (TemplateError, ValueError):
        return None
    after = tokenizer(text[text.rindex("REPLY") + len("REPLY"):], add_special_tokens=False)["input_ids"]
    return after[0] if after and after[0] in special_ids(tokenizer) else None


def _unstable(index: int, why: str) -> ConfigError:
    # (not "train on every token": that trains the prompts, and what the template dropped stays dropped)
    return ConfigError(f"data row {index}: the chat template renders the start of the conversation differently from "
                       f"the whole, and {why}, so the replies cannot be located; set model.chat_template to one that "
                       f"renders turn by turn (chatml for Qwen, phi for Phi-3: fusetune get_chat_template's layouts)")


def _tool_names(messages: list[dict], tools: list | None) -> list[str]:
    """The function names of a conversation's tool calls and of its row's tools."""
    calls = [call for m in messages for call in (m.get("tool_calls") or []) if isinstance(call, dict)]
    named = [call.get("function", call) for call in calls] + [t.get("function", t) for t in tools or []
                                                              if isinstance(t, dict)]
    return [f["name"] for f in named if isinstance(f, dict) and isinstance(f.get("name"), str) and f["name"]]


def _assistant_spans(tokenizer, messages: list[dict], index: int, tools: list | None,
                     turn_end) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of each trained assistant turn (its reply
    and the end-of-turn marker: the model must learn to stop).

    A turn starts where the render of the conversation before it, with the generation prompt, parts
    from the whole; it ends where the render up to it does, if that is a prefix of the whole. Templates
    whose renders are not prefixes of each other (Qwen3 drops the reasoning of turns before the last
    question and writes an empty think block after it, Phi-3 closes every render with its end of text,
    DeepSeek-R1's generation prompt opens a think block its turns do not have) end the turn at the
    template's end-of-turn token (its text: turn_end(), "" for none) instead, provided the message
    before the turn ends before it (a template that moves text across turns, as Mistral's puts the
    system prompt in the last question, is refused)."""
    text = _render(tokenizer, messages, index, tools)
    spans, done = [], 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant" or not trained(message):
            continue
        prompt = _render(tokenizer, messages[:i], index, tools, add_generation_prompt=True)
        upto = _render(tokenizer, messages[:i + 1], index, tools)
        if text.startswith(upto) and upto.startswith(prompt):
            spans.append((len(prompt), len(upto)))
            done = len(upto)
            continue
        start = len(os.path.commonprefix([text, prompt]))
        before = (messages[i - 1].get("content") or "").strip()
        if start < done or (before and not 0 <= text.find(before, done) <= start - len(before)):
            raise _unstable(index, "the turn before a reply does not end before it")
        marker = turn_end()
        close = text.find(marker, start) if marker else -1
        if close < 0:
            raise _unstable(index, "it closes a reply with no special token")
        end = close + len(marker)
        while end < len(text) and text[end] == "\n":  # the newline after the marker, as the template writes it
            end += 1
        spans.append((start, end))
        done = end
    return text, spans


def tokenize_rows(rows: list[dict], tokenizer, max_seq_length: int, responses_only: bool = True,
                  source: str = "data.path") -> list[dict]:
    """Each row -> {"input_ids", "labels"} (lists), cut to max_seq_length; `source` names the rows in
    errors (the held-out rows are data.eval_path's, or eval_split's part of data.path)."""
    if tokenizer.chat_template is None and any("text" not in r for r in rows):
        raise ConfigError("the tokenizer has no chat template: set model.chat_template (e.g. chatml) or use text rows")
    out, needed, no_reply, empty, unrendered, cut = [], [], [], [], [], 0

    @functools.cache
    def turn_end() -> str:  # once for all the rows, and only for a template that needs it
        token = end_of_turn(tokenizer)
        return "" if token is None else tokenizer.decode([token])

    for position, row in enumerate(rows):
        index = row_number(row, position)
        conversation = to_messages(row, index)
        tools = row_tools(row, index)
        if isinstance(conversation, str):
            # a text that starts with the BOS (a chat rendered already) does not get a second one
            bos = tokenizer.bos_token
            ids = tokenizer(conversation, add_special_tokens=not (bos and conversation.startswith(bos)))["input_ids"]
            # (nor a second EOS: a rendered chat ends with its EOS and the template's newline after it)
            ends = ids[-1:] == [tokenizer.eos_token_id] or conversation.rstrip().endswith(tokenizer.eos_token or "\0")
            if tokenizer.eos_token_id is not None and not ends:
                ids = ids + [tokenizer.eos_token_id]
            labels = list(ids)
        else:
            if responses_only and not any(m["role"] == "assistant" and trained(m) for m in conversation):
                no_reply.append(position)
                continue
            if any(m["role"] == "assistant" and trained(m) and not (m.get("content") or "").strip()
                   and not m.get("tool_calls") for m in conversation):
                empty.append(index)
            if responses_only:
                text, spans = _assistant_spans(tokenizer, conversation, index, tools, turn_end)
                enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
                ids = enc["input_ids"]
                labels = [t if any(b <= start < e for b, e in spans) else IGNORE_INDEX
                          for t, (start, _) in zip(ids, enc["offset_mapping"])]
            else:
                text = _render(tokenizer, conversation, index, tools)
                ids = tokenizer(text, add_special_tokens=False)["input_ids"]
                labels = list(ids)
            if any(name not in text for name in _tool_names(conversation, tools)):
                unrendered.append(index)
        first = next((i for i, label in enumerate(labels) if i > 0 and label != IGNORE_INDEX), None)
        if first is None:
            continue  # nothing to learn in this row at any length
        needed.append(first + 1)
        if first < max_seq_length:
            cut += len(ids) > max_seq_length
            out.append({"input_ids": ids[:max_seq_length], "labels": labels[:max_seq_length]})
    if cut:
        logger.warning("fusetune data: %d of %d rows are longer than model.max_seq_length = %d and are cut there: "
                       "what follows, the end-of-turn token that teaches the model to stop included, is not learned; "
                       "raise model.max_seq_length to keep it", cut, len(rows), max_seq_length)
    if no_reply:
        roles = sorted({m["role"] for i in no_reply[:100] for m in to_messages(rows[i], i)})
        logger.warning("fusetune data: %d rows have no assistant turn to learn (the first: row %d, roles %s; turns of "
                       "weight 0 are context), so nothing to learn; they are left out", len(no_reply),
                       row_number(rows[no_reply[0]], no_reply[0]), ", ".join(roles))
    if unrendered:
        logger.warning("fusetune data: %d rows have tool calls or tools the chat template does not render (the first: "
                       "row %d): the model never sees them, and learns replies that stop short of their calls; use a "
                       "model or model.chat_template whose template renders tool_calls and tools",
                       len(unrendered), unrendered[0])
    if empty:
        logger.warning("fusetune data: %d rows have an empty assistant reply (the first: row %d): the model learns to "
                       "answer those turns with nothing; fill them in or drop them", len(empty), empty[0])
    if not out and needed:
        raise ConfigError(f"model.max_seq_length = {max_seq_length} cuts every row before its first answer token "
                          f"(the shortest row needs {min(needed)} tokens): raise model.max_seq_length to at least "
                          f"{min(needed)}, better to the length of most rows")
    if not out:
        raise ConfigError(f"no row has an answer to learn (every row's labels are masked): check {source} and "
                          f"data.train_on_responses_only")
    return out


def pack_texts(rows: list[dict], tokenizer, block: int) -> list[dict]:
    """cpt: the text rows tokenized (each ending with the end-of-sequence token) and joined into rows
    of `block` tokens, every token a label: no padding, and documents meet at their end-of-sequence
    token as in pre-training (a short last row is kept)."""
    stream = [t for e in tokenize_rows(rows, tokenizer, 1 << 62, responses_only=False) for t in e["input_ids"]]
    blocks = [stream[i:i + block] for i in range(0, len(stream), block)]
    return [{"input_ids": b, "labels": list(b)} for b in blocks if len(b) > 1]


def _labelled_reply(tokenizer, prompt: list[dict], reply: list[dict], index: int, max_len: int) -> dict | None:
    """prompt + reply rendered with the chat template and tokenized, the reply's tokens labelled
    (None when the cut to max_len leaves none of them)."""
    head = _render(tokenizer, prompt, index, add_generation_prompt=True)
    text = _render(tokenizer, prompt + reply, index)
    if not text.startswith(head):
        raise ConfigError(f"data row {index}: the chat template renders the prompt differently once a reply follows, "
                          f"so the reply cannot be located; choose another model.chat_template")
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    labels = [t if start >= len(head) else IGNORE_INDEX for t, (start, _) in zip(enc["input_ids"], enc["offset_mapping"])]
    ids, labels = enc["input_ids"][:max_len], labels[:max_len]
    return {"input_ids": ids, "labels": labels} if any(label != IGNORE_INDEX for label in labels[1:]) else None


def _require_template(tokenizer):
    if tokenizer.chat_template is None:
        raise ConfigError("the tokenizer has no chat template: set model.chat_template (e.g. chatml)")


def tokenize_pairs(rows: list[dict], tokenizer, max_seq_length: int) -> list[dict]:
    """dpo / orpo rows (prompt, chosen, rejected) -> {"chosen": {input_ids, labels}, "rejected": ...},
    the labels on the reply only; a pair is dropped when either reply is cut away entirely."""
    _require_template(tokenizer)
    out = []
    for position, row in enumerate(rows):
        index = row_number(row, position)
        prompt = _chat(row["prompt"], "user", f"data row {index} prompt")
        pair = {side: _labelled_reply(tokenizer, prompt, _chat(row[side], "assistant", f"data row {index} {side}"),
                                      index, max_seq_length) for side in ("chosen", "rejected")}
        if pair["chosen"] is not None and pair["rejected"] is not None:
            out.append(pair)
    if not out:
        raise ConfigError(f"model.max_seq_length = {max_seq_length} cuts every pair's replies away: raise it")
    return out


def tokenize_prompts(rows: list[dict], tokenizer, max_prompt_length: int) -> list[dict]:
    """grpo rows -> {"prompt": as written, "prompt_ids", "columns": the other fields, for the reward
    function}; a prompt longer than max_prompt_length (max_seq_length less the completion) is dropped."""
    _require_template(tokenizer)
    out = []
    for position, row in enumerate(rows):
        index = row_number(row, position)
        text = _render(tokenizer, _chat(row["prompt"], "user", f"data row {index} prompt"), index,
                       add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) <= max_prompt_length:
            out.append({"prompt": row["prompt"], "prompt_ids": ids,
                        "columns": {k: v for k, v in row.items() if k != "prompt"}})
    if not out:
        raise ConfigError(f"every prompt is longer than model.max_seq_length less stage.max_completion_length "
                          f"({max_prompt_length} tokens): raise model.max_seq_length")
    return out


def stage_examples(kind: str, rows: list[dict], tokenizer, config, held_out: bool = False) -> list[dict]:
    """The rows tokenized as a stage of this kind trains on them (held_out: the eval rows)."""
    m, d, stage = config.model, config.data, config.stage
    if kind == "cpt":
        return pack_texts(rows, tokenizer, m.max_seq_length)
    if kind in ("dpo", "orpo"):
        return tokenize_pairs(rows, tokenizer, m.max_seq_length)
    if kind == "grpo":
        return tokenize_prompts(rows, tokenizer, m.max_seq_length - stage.max_completion_length)
    source = ("data.eval_path" if d.eval_path else "the rows data.eval_split holds out of data.path") if held_out \
        else "data.path"
    return tokenize_rows(rows, tokenizer, m.max_seq_length, d.train_on_responses_only, source)


def read_new_tokens(value: list[str] | str) -> list[str]:
    """model.new_tokens: a list, or a UTF-8 file of one token per line."""
    if isinstance(value, list):
        return value
    path = Path(value)
    if not path.is_file():
        raise ConfigError(f"model.new_tokens {value!r} is not a file: give a list of tokens or a file of one per line "
                          f"(fusetune tokenizer DATA --add N --out DIR writes DIR/new_tokens.txt)")
    tokens = [line.strip() for line in _decode(path.read_bytes(), value, "model.new_tokens").splitlines()
              if line.strip()]
    if not tokens:
        raise ConfigError(f"model.new_tokens {value!r} lists no token")
    return tokens


def split_rows(rows: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, eval): round(fraction * rows) rows, drawn with the seed, held out for the eval loss."""
    held = round(fraction * len(rows))
    if fraction and not 1 <= held < len(rows):
        raise ConfigError(f"data.eval_split = {fraction} of {len(rows)} rows holds out {held}: choose a fraction "
                          f"that leaves at least one row on each side")
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)).tolist()
    chosen = set(order[:held])
    train, held_out = [r for i, r in enumerate(rows) if i not in chosen], [r for i, r in enumerate(rows) if i in chosen]
    trained = {json.dumps(r, sort_keys=True) for r in train}
    seen = sum(json.dumps(r, sort_keys=True) in trained for r in held_out)
    if seen:
        logger.warning("fusetune data: %d of the %d rows data.eval_split holds out are also among the training rows "
                       "(the file repeats them): the eval loss is partly a training loss; remove the duplicates, or "
                       "give held-out rows in data.eval_path", seen, len(held_out))
    return train, held_out


def collate(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch; padding is masked in the attention and in the labels."""
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[row, :n] = torch.tensor(e["input_ids"])
        labels[row, :n] = torch.tensor(e["labels"])
        mask[row, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def label_count(examples: list[dict]) -> int:
    """Tokens that carry a loss (labels are shifted by one inside the model)."""
    return sum(sum(1 for label in e["labels"][1:] if label != IGNORE_INDEX) for e in examples)
