"""Cleaning a training corpus before `fusetune train` (`fusetune data IN OUT`): each piece usable alone.

- normalize(text): Unicode NFKC (full-width letters and digits; Hangul compatibility jamo such as
  ㅋㅋ are kept as typed), HTML tags dropped and entities decoded, spaces collapsed and runs of blank
  lines cut to one. Code is left as written: fenced blocks and `inline code` untouched, each line's
  indentation kept, and only HTML's own elements count as tags (List<String>, #include <vector> stay).
- quality: too short, too little Hangul (for a Korean corpus), too repetitive (the share of
  repeated word 3-grams, as web-corpus filters measure it).
- dedup: exact duplicates after normalisation, and near duplicates by MinHash over character
  5-grams with locality-sensitive hashing (the datasketch library; pip install datasketch).

Rows keep their format (messages, conversations, instruction/output, prompt/completion, text):
every text field is normalised in place; the quality measures and the dedup read all of a row's
text together.
"""
from __future__ import annotations

import hashlib
import html
import json
import re
import unicodedata
from dataclasses import dataclass

from fusetune.recipe.config import ConfigError

# an HTML element's tag: a known name after < or </, attributes, > (not "x<5 and y>3", not List<String>)
HTML_ELEMENTS = ("a|abbr|address|article|aside|b|big|blockquote|body|br|caption|center|cite|code|dd|del|div|dl|dt|"
                 "em|figcaption|figure|font|footer|h[1-6]|head|header|hr|html|i|img|ins|kbd|li|main|mark|nav|ol|p|"
                 "pre|q|s|section|small|span|strike|strong|sub|sup|table|tbody|td|tfoot|th|thead|title|tr|tt|u|ul")
TAG = re.compile(rf"</?(?:{HTML_ELEMENTS})(?:\s[^<>]*)?/?>", re.IGNORECASE)
# code that must reach training as written: ``` or ~~~ fenced blocks (to their closing fence or the
# end of the text) and `inline` spans
CODE = re.compile(r"(^[ \t]*(```|~~~).*?(?:^[ \t]*\2[^\n]*$|\Z)|`[^`\n]+`)", re.MULTILINE | re.DOTALL)
HIDDEN = re.compile("\ue000([0-9]+)\ue001")
INDENT = re.compile(r"^[ \t]*")
SPACES = re.compile(r"[ \t\u00a0\u3000]+")
BLANK_LINES = re.compile(r"\n[ \t]*\n(?:[ \t]*\n)+")
LEADING_BLANK_LINES = re.compile(r"\A(?:[ \t]*\n)+")
HANGUL = re.compile(r"[\uac00-\ud7a3\u1100-\u11ff\u3130-\u318f]")
# Hangul compatibility jamo (ㅋㅋ, ㅠㅠ) stay as typed: NFKC would turn them into conjoining jamo
COMPATIBILITY_JAMO = re.compile(r"([\u3130-\u318f]+)")


def _nfkc(text: str) -> str:
    parts = COMPATIBILITY_JAMO.split(text)  # odd indices: the jamo runs
    return "".join(part if i % 2 else unicodedata.normalize("NFKC", part) for i, part in enumerate(parts))


def normalize(text: str) -> str:
    """Outside code: tags dropped (before entities are decoded, so "&lt;br&gt;" stays as the text
    "<br>"), entities decoded, NFKC (but compatibility jamo), runs of spaces after a line's
    indentation collapsed, trailing spaces and runs of blank lines cut. Code is kept as written."""
    code = []

    def hide(match: re.Match) -> str:  # a private-use mark, which nothing below changes
        code.append(match.group())
        return f"\ue000{len(code) - 1}\ue001"

    # a dropped tag leaves a space between words, none where it began a line
    text = _nfkc(html.unescape(TAG.sub("\ue002", CODE.sub(hide, text))))
    lines = []
    for line in text.split("\n"):
        indent = INDENT.match(line).group()  # kept: indented code and nested lists mean something
        lines.append(indent + SPACES.sub(" ", line[len(indent):].replace("\ue002", " ")).strip())
    text = LEADING_BLANK_LINES.sub("", BLANK_LINES.sub("\n\n", "\n".join(lines))).rstrip()
    return HIDDEN.sub(lambda match: code[int(match.group(1))], text)


def hangul_ratio(text: str) -> float:
    """Hangul syllables and jamo among the letters (0 for a text without letters)."""
    letters = sum(ch.isalpha() for ch in text)
    return len(HANGUL.findall(text)) / letters if letters else 0.0


def repetition(text: str, n: int = 3) -> float:
    """The share of word n-grams that repeat an earlier one (0: none repeats)."""
    words = text.split()
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return 1 - len(set(grams)) / len(grams) if grams else 0.0


def _texts(row: dict) -> list[tuple[object, object]]:
    """(container, key) of every text a row holds, in the row formats fusetune reads."""
    found = []
    for key in ("messages", "conversations"):
        for message in row.get(key) or []:
            if isinstance(message, dict):
                found += [(message, k) for k in ("content", "value") if isinstance(message.get(k), str)]
    found += [(row, k) for k in ("instruction", "input", "output", "prompt", "completion", "text")
              if isinstance(row.get(k), str)]
    return found


def row_text(row: dict) -> str:
    return "\n".join(container[key] for container, key in _texts(row))


def normalize_row(row: dict) -> dict:
    row = json.loads(json.dumps(row))  # a deep copy: the caller's rows stay as they were
    for container, key in _texts(row):
        container[key] = normalize(container[key])
    return row


@dataclass
class Filters:
    min_chars: int = 1                 # shorter rows (all their text) are dropped
    min_hangul: float | None = None    # e.g. 0.3 for a Korean corpus
    max_repetition: float | None = 0.5  # the share of repeated word 3-grams
    near_duplicates: float | None = None  # MinHash Jaccard threshold, e.g. 0.85 (needs datasketch)


def _near_duplicate_index(threshold: float):
    try:
        from datasketch import MinHash, MinHashLSH
    except ImportError as err:
        raise ConfigError("near-duplicate removal uses MinHash from the datasketch library: pip install datasketch "
                          "(or leave --near-duplicates off)") from err
    lsh = MinHashLSH(threshold=threshold, num_perm=128)

    def seen(key: str, text: str) -> bool:
        signature = MinHash(num_perm=128)
        for i in range(max(1, len(text) - 4)):
            signature.update(text[i:i + 5].encode("utf-8"))
        if lsh.query(signature):
            return True
        lsh.insert(key, signature)
        return False

    return seen


def clean_rows(rows: list[dict], filters: Filters) -> tuple[list[dict], dict]:
    """(kept rows, normalised; the report: rows read and kept, and per reason the count dropped and
    the first few row numbers)."""
    near = _near_duplicate_index(filters.near_duplicates) if filters.near_duplicates else None
    kept, exact = [], set()
    dropped: dict[str, list[int]] = {}
    for index, row in enumerate(rows):
        row = normalize_row(row)
        text = row_text(row)
        if len(text) < filters.min_chars:
            reason = "too_short"
        elif filters.min_hangul is not None and hangul_ratio(text) < filters.min_hangul:
            reason = "too_little_hangul"
        elif filters.max_repetition is not None and repetition(text) > filters.max_repetition:
            reason = "repetitive"
        elif (digest := hashlib.sha256(text.encode("utf-8")).hexdigest()) in exact:
            reason = "exact_duplicate"
        elif near is not None and near(str(index), text):
            reason = "near_duplicate"
        else:
            exact.add(digest)
            kept.append(row)
            continue
        dropped.setdefault(reason, []).append(index)
    report = {"read": len(rows), "kept": len(kept),
              "dropped": {reason: {"rows": len(found), "first": found[:5]} for reason, found in dropped.items()}}
    return kept, report


def run_clean(source: str, target: str, filters: Filters, log=print) -> dict:
    """`fusetune data`: read any data file fusetune reads, write the kept rows to `target` (JSONL,
    atomically) and the report beside it (TARGET.report.json)."""
    from pathlib import Path

    from fusetune.atomic import atomic_write
    from fusetune.recipe.data import read_rows

    if Path(target).resolve() == Path(source).resolve():
        raise ConfigError(f"{target} is the file being cleaned: write the cleaned rows to another file")
    kept, report = clean_rows(read_rows(source, "the input"), filters)
    Path(target).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(target, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in kept))
    atomic_write(f"{target}.report.json", json.dumps({"source": source, **report}, indent=1))
    reasons = ", ".join(f"{r['rows']} {reason.replace('_', ' ')}" for reason, r in report["dropped"].items())
    log(f"{report['kept']} of {report['read']} rows kept in {target}" + (f"; dropped: {reasons}" if reasons else "")
        + f" (report: {target}.report.json)")
    return report
