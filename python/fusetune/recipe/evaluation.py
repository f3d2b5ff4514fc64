"""Multiple-choice accuracy from log-likelihoods (the way KMMLU-style benchmarks are scored), for
`fusetune train` (before and after) and `fusetune eval`.

A question file is JSONL (or .json/.csv) of {"question", "choices": [...], "answer"}, the answer an
index (0-based), a letter (A, B, ...) or the text of the right choice. Each choice is scored by the
sum of the log-probabilities of its tokens as the assistant's reply to the question (a one-turn
chat with the tokenizer's template); the highest-scoring choice is the model's answer.
"""
from __future__ import annotations

import string

import torch

from fusetune.recipe.config import ConfigError
from fusetune.recipe.data import read_rows


def read_run_data(config) -> tuple[list[dict], list[dict], list[dict]]:
    """(training rows, held-out rows, multiple-choice questions) of a config, checked: what
    `fusetune train` trains and measures on, and `fusetune eval` measures again."""
    from fusetune.recipe.data import check_rows, split_rows

    d = config.data
    rows = read_rows(d.path)
    check_rows(rows, d.path)
    rows, eval_rows = split_rows(rows, d.eval_split, config.training.seed)
    if d.eval_path:
        eval_rows = read_rows(d.eval_path, "data.eval_path")
        check_rows(eval_rows, d.eval_path, "data.eval_path")
    return rows, eval_rows, read_questions(d.choices_path) if d.choices_path else []


def read_questions(path: str) -> list[dict]:
    """The questions of `path` as {"question", "choices", "answer": index}; ConfigError naming the
    file and row otherwise."""
    out = []
    for index, row in enumerate(read_rows(path, "data.choices_path")):
        where = f"data.choices_path {path!r} row {index}"
        question, choices, answer = row.get("question"), row.get("choices"), row.get("answer")
        if not isinstance(question, str) or not isinstance(choices, list) or len(choices) < 2 \
                or not all(isinstance(c, str) for c in choices):
            raise ConfigError(f"{where}: needs a question (text) and choices (a list of at least two texts), got keys "
                              f"{sorted(row)}")
        if isinstance(answer, str) and answer in choices:
            answer = choices.index(answer)
        elif isinstance(answer, str) and len(answer.strip()) == 1 and answer.strip().upper() in string.ascii_uppercase:
            answer = string.ascii_uppercase.index(answer.strip().upper())
        elif isinstance(answer, str) and answer.strip().isdigit():
            answer = int(answer)
        if not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer < len(choices):
            raise ConfigError(f"{where}: answer {row.get('answer')!r} is not a choice: give its index (0 to "
                              f"{len(choices) - 1}), its letter (A to {string.ascii_uppercase[len(choices) - 1]}) "
                              f"or its text")
        out.append({"question": question, "choices": choices, "answer": answer})
    return out


def choice_logprobs(model, tokenizer, question: str, choices: list[str]) -> list[float]:
    """Sum of log P(choice tokens | the chat prompt of the question), for each choice."""
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                           tokenize=False)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    device = next(model.parameters()).device
    scores = []
    for choice in choices:
        choice_ids = tokenizer(choice, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([prompt_ids + choice_ids], device=device)
        logits = model(input_ids=ids).logits[0, len(prompt_ids) - 1:-1].double()
        picked = torch.log_softmax(logits, -1).gather(-1, ids[0, len(prompt_ids):, None].to(logits.device))
        scores.append(picked.sum().item())
    return scores


def multiple_choice_accuracy(model, tokenizer, questions: list[dict]) -> dict:
    """{"accuracy", "correct", "total"} of the model's highest-likelihood choices."""
    was_training = model.training
    model.eval()
    correct = 0
    with torch.no_grad():
        for q in questions:
            scores = choice_logprobs(model, tokenizer, q["question"], q["choices"])
            correct += max(range(len(scores)), key=scores.__getitem__) == q["answer"]
    model.train(was_training)
    return {"accuracy": correct / len(questions), "correct": correct, "total": len(questions)}


def run_eval(config, log=print) -> dict:
    """`fusetune eval CONFIG`: the adapter `fusetune train` saved in output.dir (or, with none, the
    base model) on the config's held-out rows (eval loss, perplexity) and multiple-choice
    questions; the report goes to output.dir/eval.json."""
    import json
    import math
    from pathlib import Path

    from fusetune.api import FastLanguageModel, get_chat_template
    from fusetune.api.loading import resolve_dtype
    from fusetune.api.tokens import fit_embeddings
    from fusetune.atomic import atomic_write
    from fusetune.recipe.chat import trained_model_path
    from fusetune.recipe.data import tokenize_rows
    from fusetune.recipe.loop import evaluate

    m, d, t = config.model, config.data, config.training
    _, eval_rows, questions = read_run_data(config)  # the rows `fusetune train` held out
    if not eval_rows and not questions:
        raise ConfigError("nothing to evaluate: set data.eval_split (the rows training held out), data.eval_path or "
                          "data.choices_path")
    out = Path(config.output.dir)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = resolve_dtype(m.dtype, device.type)
    source = trained_model_path(str(out))
    if source is None:
        source = m.name
        log(f"no trained adapter or model in {out}: evaluating the base model {m.name}")
    model, tokenizer = FastLanguageModel.from_pretrained(source, max_seq_length=m.max_seq_length, dtype=dtype,
                                                         load_in_4bit=m.load_in_4bit, load_in_8bit=m.load_in_8bit,
                                                         gguf_file=m.gguf_file if source == m.name else None,
                                                         trust_remote_code=m.trust_remote_code)
    if source == m.name and m.chat_template:  # the base, laid out as training laid it out
        get_chat_template(tokenizer, m.chat_template)
        if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
            fit_embeddings(model, tokenizer, model.get_input_embeddings().weight.shape[0])
    report = {"model": source}
    if eval_rows:
        examples = tokenize_rows(eval_rows, tokenizer, m.max_seq_length, d.train_on_responses_only)
        micro = t.micro_batch_size if isinstance(t.micro_batch_size, int) else min(t.effective_batch_size, 4)
        loss = evaluate(model, examples, tokenizer.pad_token_id, micro, device)
        report["eval"] = {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "rows": len(examples)}
        log(f"eval loss {loss:.4f}, perplexity {report['eval']['perplexity']:,.2f} ({len(examples)} held-out rows)")
    if questions:
        report["multiple_choice"] = multiple_choice_accuracy(model, tokenizer, questions)
        r = report["multiple_choice"]
        log(f"multiple choice ({d.choices_path}): accuracy {r['accuracy']:.1%} ({r['correct']} of {r['total']})")
    out.mkdir(parents=True, exist_ok=True)
    log(f"report: {atomic_write(out / 'eval.json', json.dumps(report, indent=1, ensure_ascii=False))}")
    return report
