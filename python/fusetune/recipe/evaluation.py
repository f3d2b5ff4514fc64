"""Multiple-choice accuracy from log-likelihoods (the way KMMLU-style benchmarks are scored) and
ROUGE of generated answers, for `fusetune train` (before and after) and `fusetune eval`.

A question file is JSONL (or .json/.csv) of {"question", "choices": [...], "answer"}, the answer an
index (0-based), a letter (A, B, ...) or the text of the right choice. Each choice is scored by the
sum of the log-probabilities of its tokens as the assistant's reply to the question (a one-turn
chat with the tokenizer's template); the highest-scoring choice is the model's answer.

A generation file (data.generation_path) is JSONL of {"prompt", "reference"}: the model answers each
prompt greedily as a one-turn chat, and the answer is scored against the reference by ROUGE-1, -2
and -L F1 (Google's rouge-score package) over Unicode words, so Korean text counts.
"""
from __future__ import annotations

import json
import string
import unicodedata
from pathlib import Path

import torch

from fusetune.recipe.config import ConfigError
from fusetune.recipe.data import read_rows
from fusetune.recipe.objectives import LanguageModeling, evaluating

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


def read_run_data(config, training: bool = True) -> tuple[list[dict], list[dict], list[dict]]:
    """(training rows, held-out rows, multiple-choice questions) of a config, checked: what
    `fusetune train` trains and measures on, and `fusetune eval` measures again (training=False:
    data.path is read only for the rows eval_split holds out of it)."""
    from fusetune.recipe.data import check_rows, split_rows

    d = config.data
    rows, eval_rows = [], []
    if training or d.eval_split:
        rows = read_rows(d.path)
        check_rows(rows, d.path, kind=config.stage.kind)
        rows, eval_rows = split_rows(rows, d.eval_split, config.training.seed)
    if d.eval_path:
        eval_rows = read_rows(d.eval_path, "data.eval_path")
        check_rows(eval_rows, d.eval_path, "data.eval_path", config.stage.kind)
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
    correct = 0
    with evaluating(model):
        for q in questions:
            scores = choice_logprobs(model, tokenizer, q["question"], q["choices"])
            correct += max(range(len(scores)), key=scores.__getitem__) == q["answer"]
    return {"accuracy": correct / len(questions), "correct": correct, "total": len(questions)}


class UnicodeWords:
    """A tokenizer for rouge-score (it calls .tokenize): its default keeps only [a-z0-9] runs, so
    Korean, or any text outside ASCII, has no tokens and scores 0. Here a word is a run of Unicode
    letters and digits (Hangul syllables included; a combining mark stays with the letter before it,
    as Devanagari vowel signs and Thai tone marks must), after NFKC (full-width forms, Hangul typed
    as separate jamo composed) and lowercasing. stem: Porter stemming, as rouge-score's use_stemmer,
    but on ASCII words only: its suffix rules are English ones."""

    def __init__(self, stem: bool = False):
        self._stemmer = None
        if stem:
            from nltk.stem import porter  # a rouge-score dependency

            self._stemmer = porter.PorterStemmer()

    def tokenize(self, text: str) -> list[str]:
        words, word = [], []
        for ch in unicodedata.normalize("NFKC", text).lower() + " ":  # the space ends the last word
            if ch.isalnum() or (word and unicodedata.category(ch).startswith("M")):
                word.append(ch)
            elif word:
                words.append("".join(word))
                word = []
        if self._stemmer:  # rouge-score stems words longer than 3 characters only; so does this
            words = [self._stemmer.stem(w) if len(w) > 3 and w.isascii() and w.isalpha() else w for w in words]
        return words


def _rouge_scorer(stem: bool = False):
    try:
        from rouge_score import rouge_scorer
    except ImportError as err:
        raise ConfigError("ROUGE (data.generation_path) is computed by Google's rouge-score package: pip install "
                          "rouge-score (or leave data.generation_path unset)") from err
    return rouge_scorer.RougeScorer(list(ROUGE_TYPES), tokenizer=UnicodeWords(stem))


def rouge(references: list[str], predictions: list[str], stem: bool = False) -> dict:
    """ROUGE-1/2/L F1 of each prediction against its reference ("per_row") and their means."""
    scorer = _rouge_scorer(stem)
    per_row = []
    for reference, prediction in zip(references, predictions, strict=True):
        scores = scorer.score(reference, prediction)  # rouge-score's order: (target, prediction)
        per_row.append({name: float(scores[name].fmeasure) for name in ROUGE_TYPES})  # an int 0 for no words
    means = {name: sum(r[name] for r in per_row) / len(per_row) if per_row else 0.0 for name in ROUGE_TYPES}
    return {**means, "rows": len(per_row), "per_row": per_row}


def read_generations(path: str) -> list[dict]:
    """The {"prompt", "reference"} rows of `path` (data.generation_path, read as data.path is);
    ConfigError naming the file and row otherwise. It checks that rouge-score is installed too, so
    that `fusetune train` stops before the model loads rather than after training."""
    words = UnicodeWords()
    rows = []
    for index, row in enumerate(read_rows(path, "data.generation_path")):
        where = f"data.generation_path {path!r} row {index}"
        missing = [name for name in ("prompt", "reference") if not isinstance(row.get(name), str)]
        if missing:
            raise ConfigError(f"{where}: needs {' and '.join(repr(m) for m in missing)} (text), got keys "
                              f"{sorted(row)}")
        if not row["prompt"].strip():
            raise ConfigError(f"{where}: the prompt is empty")
        if not words.tokenize(row["reference"]):  # it would score 0 whatever the model said
            raise ConfigError(f"{where}: the reference {row['reference']!r:.40} has no letters or digits to score")
        rows.append({"prompt": row["prompt"], "reference": row["reference"]})
    _rouge_scorer()
    return rows


def generation_rouge(model, tokenizer, rows: list[dict], max_new_tokens: int) -> dict:
    """The model's greedy one-turn-chat answer to each row's prompt, scored by ROUGE against its
    reference: the means and, per row, the prompt, reference, prediction and scores."""
    from fusetune.api import FastLanguageModel
    from fusetune.recipe.chat import reply

    was_training = model.training
    FastLanguageModel.for_inference(model)
    predictions = [reply(model, tokenizer, [{"role": "user", "content": r["prompt"]}], max_new_tokens) for r in rows]
    model.train(was_training)
    report = rouge([r["reference"] for r in rows], predictions)
    report["per_row"] = [{**row, "prediction": p, **scores}
                         for row, p, scores in zip(rows, predictions, report["per_row"])]
    return report


def rouge_line(path: str, before: dict, after: dict | None = None) -> str:
    """The log line of a ROUGE measurement (and of the one after training, if given)."""
    def f1(r: dict) -> str:
        return "/".join(f"{r[name]:.3f}" for name in ROUGE_TYPES)

    measured = f"{f1(before)} before, {f1(after)} after" if after else f1(before)
    return f"ROUGE-1/2/L F1 ({path}, {before['rows']} prompts): {measured}"


def run_eval(config, log=print) -> dict:
    """`fusetune eval CONFIG`: the adapter `fusetune train` saved in output.dir (or, with none, the
    base model) on the config's held-out rows (eval loss, perplexity), multiple-choice questions and
    generation prompts (ROUGE); the report goes to output.dir/eval.json."""
    import math

    from fusetune.api import FastLanguageModel, get_chat_template
    from fusetune.api.loading import resolve_dtype
    from fusetune.api.tokens import fit_embeddings
    from fusetune.atomic import atomic_write
    from fusetune.recipe.chat import trained_model_path
    from fusetune.recipe.checkpoints import read_summary, rows_digest
    from fusetune.recipe.data import stage_examples

    m, d, t = config.model, config.data, config.training
    _, eval_rows, questions = read_run_data(config, training=False)  # the rows `fusetune train` held out
    generations = read_generations(d.generation_path) if d.generation_path else []
    if not eval_rows and not questions and not generations:
        raise ConfigError("nothing to evaluate: set data.eval_split (the rows training held out), data.eval_path, "
                          "data.choices_path or data.generation_path")
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
        # as training measured its eval loss (cpt: blocks of packed text, sft: the replies)
        examples = stage_examples("cpt" if config.stage.kind == "cpt" else "sft", eval_rows, tokenizer, config,
                                  held_out=True)
        measured = (read_summary(out) or {}).get("eval_rows")
        if measured and measured != rows_digest(examples):
            if not d.eval_path:  # eval_split draws from data.path as it is now: trained rows may be among them
                raise ConfigError(f"the rows data.eval_split holds out of {d.path} now are not those training held "
                                  f"out ({measured}; the file, data.eval_split or training.seed changed since): some "
                                  f"may have been trained on. Restore them, or give held-out rows in data.eval_path")
            log(f"note: {d.eval_path} is not what training measured its eval loss on ({measured})")
        micro = t.micro_batch_size if isinstance(t.micro_batch_size, int) else min(t.effective_batch_size, 4)
        loss = LanguageModeling(tokenizer.pad_token_id).evaluate(model, examples, micro, device)
        report["eval"] = {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "rows": len(examples)}
        log(f"eval loss {loss:.4f}, perplexity {report['eval']['perplexity']:,.2f} ({len(examples)} held-out rows)")
    if questions:
        report["multiple_choice"] = multiple_choice_accuracy(model, tokenizer, questions)
        r = report["multiple_choice"]
        log(f"multiple choice ({d.choices_path}): accuracy {r['accuracy']:.1%} ({r['correct']} of {r['total']})")
    if generations:
        report["rouge"] = generation_rouge(model, tokenizer, generations, d.max_new_tokens)
        log(rouge_line(d.generation_path, report["rouge"]))
    out.mkdir(parents=True, exist_ok=True)
    log(f"report: {atomic_write(out / 'eval.json', json.dumps(report, indent=1, ensure_ascii=False))}")
    return report
