"""Tokenizer tools for a corpus (`fusetune tokenizer`): how many characters and bytes a token carries,
by script, before and after; training a byte-level BPE tokenizer on the corpus; choosing the words
to add to an existing tokenizer (fusetune.api.tokens.add_new_tokens then adds them to a model, its
new embedding rows starting at the mean of the others).

A Korean text costs most models 2-4x the tokens of an English one of the same length; the report
says so in numbers, per script (Hangul, Latin, digits, other), so an extension can be judged.
"""
from __future__ import annotations

import collections
import re

SCRIPTS = ("hangul", "latin", "digits", "spaces", "other")  # spaces: and punctuation
WORD = re.compile(r"[\uac00-\ud7a3]+|[A-Za-z]+|\d+")


def script_of(ch: str) -> str:
    """The script a character counts for: hangul, latin, digits, spaces (and punctuation), other."""
    if "\uac00" <= ch <= "\ud7a3" or "\u1100" <= ch <= "\u11ff" or "\u3130" <= ch <= "\u318f":
        return "hangul"
    if ch.isascii() and ch.isalpha():
        return "latin"
    if ch.isdigit():
        return "digits"
    return "other" if ch.isalnum() else "spaces"


def token_efficiency(tokenizer, texts: list[str]) -> dict:
    """Per script, and for all text: characters and UTF-8 bytes per token. A token counts for the
    script most of its characters are in (its span in the text, from the fast tokenizer's offsets;
    letters before spaces); a byte-level token holding part of one Hangul syllable carries a
    fraction of a character."""
    chars = collections.Counter()
    nbytes = collections.Counter()
    tokens = collections.Counter()
    for text in texts:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        for start, end in enc["offset_mapping"]:
            span = text[start:end]
            counts = collections.Counter(map(script_of, span))
            letters = [(n, s) for s, n in counts.items() if s != "spaces"]
            script = max(letters)[1] if letters else "spaces"
            tokens[script] += 1
            tokens["all"] += 1
        for ch in text:
            for key in (script_of(ch), "all"):
                chars[key] += 1
                nbytes[key] += len(ch.encode("utf-8"))
    return {key: {"tokens": tokens[key], "chars_per_token": chars[key] / tokens[key] if tokens[key] else 0.0,
                  "bytes_per_token": nbytes[key] / tokens[key] if tokens[key] else 0.0}
            for key in (*SCRIPTS, "all") if tokens[key] or chars[key]}


def train_bpe(texts: list[str], vocab_size: int, special_tokens: list[str] = ("<|endoftext|>",)):
    """A byte-level BPE tokenizer trained on `texts` (the tokenizers library), as a transformers
    PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special_tokens),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=special_tokens[0])


def words_to_add(tokenizer, texts: list[str], count: int, min_frequency: int = 2) -> list[str]:
    """The `count` most frequent words of the corpus (Hangul, Latin or digit runs) that the tokenizer
    splits into more than one token, most tokens saved first: candidates for add_new_tokens."""
    frequency = collections.Counter(WORD.findall("\n".join(texts)))
    saved = {}
    for word, n in frequency.items():
        pieces = len(tokenizer(word, add_special_tokens=False)["input_ids"])
        if n >= min_frequency and pieces > 1:
            saved[word] = n * (pieces - 1)  # tokens the corpus would save with the word as one token
    return sorted(saved, key=lambda w: (-saved[w], w))[:count]


def format_report(before: dict, after: dict | None = None) -> str:
    """The report as a text table (before, and after an extension or a new tokenizer)."""
    lines = [f"{'script':<8} {'tokens':>9} {'chars/token':>12} {'bytes/token':>12}" +
             (f" {'tokens after':>13} {'chars/token after':>18}" if after else "")]
    for key in before:
        row = before[key]
        line = f"{key:<8} {row['tokens']:>9,} {row['chars_per_token']:>12.2f} {row['bytes_per_token']:>12.2f}"
        if after and key in after:
            line += f" {after[key]['tokens']:>13,} {after[key]['chars_per_token']:>18.2f}"
        lines.append(line)
    return "\n".join(lines)


def plot_report(before: dict, after: dict | None, path, title: str):
    """Characters per token by script as a bar chart (None without matplotlib)."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import io

    import matplotlib.pyplot as plt

    from fusetune.atomic import atomic_write

    keys = list(before)
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    width = 0.4 if after else 0.8
    ax.bar([i - (width / 2 if after else 0) for i in range(len(keys))],
           [before[k]["chars_per_token"] for k in keys], width, label="before")
    if after:
        ax.bar([i + width / 2 for i in range(len(keys))], [after.get(k, {}).get("chars_per_token", 0) for k in keys],
               width, label="after")
        ax.legend()
    ax.set_xticks(range(len(keys)), keys)
    ax.set(ylabel="characters per token", title=title)
    fig.tight_layout()
    image = io.BytesIO()
    fig.savefig(image, format="png")
    plt.close(fig)
    return atomic_write(path, image.getvalue())


def run_tokenizer_report(data: str, model: str, add: int = 0, out: str | None = None, log=print) -> dict:
    """`fusetune tokenizer`: the report of the model's tokenizer on the data's text; with add=N, the N
    words that save the most tokens are added (written to OUT/new_tokens.txt, for model.new_tokens)
    and the report compares; OUT/tokens.png plots it."""
    import json
    from pathlib import Path

    from fusetune.api.loading import load_tokenizer
    from fusetune.atomic import atomic_write
    from fusetune.recipe.cleaning import row_text
    from fusetune.recipe.data import read_rows

    texts = [row_text(row) for row in read_rows(data)]
    tokenizer = load_tokenizer(model)
    before = token_efficiency(tokenizer, texts)
    result = {"model": model, "data": data, "before": before}
    after = None
    if add:
        words = words_to_add(tokenizer, texts, add)
        tokenizer.add_tokens(words)
        after = token_efficiency(tokenizer, texts)
        result.update(added=words, after=after)
    log(format_report(before, after))
    if out:
        folder = Path(out)
        folder.mkdir(parents=True, exist_ok=True)
        if add:
            atomic_write(folder / "new_tokens.txt", "".join(f"{w}\n" for w in result["added"]))
            log(f"{len(result['added'])} new tokens in {folder / 'new_tokens.txt'} (set model.new_tokens to it)")
        atomic_write(folder / "tokens.json", json.dumps(result, indent=1, ensure_ascii=False))
        plot = plot_report(before, after, folder / "tokens.png", f"{model}: characters per token")
        log(f"report: {folder / 'tokens.json'}" + (f", plot: {plot}" if plot else ""))
    return result
