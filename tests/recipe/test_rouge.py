"""ROUGE-1/2/L of generated answers (data.generation_path): the scores against hand counts in
English and Korean, the Unicode tokenizer (rouge-score's own drops Hangul), bad generation files
named with the line and the fix, and `fusetune eval` / `fusetune train` on a tiny model."""
import json
import os
import subprocess
import sys
import unicodedata

import pytest
import torch

from fusetune.recipe.config import ConfigError, build_config
from fusetune.recipe.evaluation import UnicodeWords, read_generations, rouge
from tests.tiny_models import byte_level_tokenizer, tiny_model

pytest.importorskip("rouge_score", reason="pip install rouge-score")


def f1(p, r):
    return 2 * p * r / (p + r) if p + r else 0.0


def test_rouge_against_hand_counts():
    # reference the cat sat on the mat (6 words), prediction the cat on the mat (5):
    # unigrams: all 5 predicted match -> P 5/5, R 5/6; bigrams: the-cat, on-the, the-mat of 4 predicted and
    # 5 in the reference; longest common subsequence: the cat on the mat, 5 words
    english = rouge(["The cat sat on the mat."], ["the cat on the mat"])
    assert english["rouge1"] == pytest.approx(f1(1, 5 / 6)) == pytest.approx(10 / 11)
    assert english["rouge2"] == pytest.approx(f1(3 / 4, 3 / 5)) == pytest.approx(2 / 3)
    assert english["rougeL"] == pytest.approx(10 / 11)
    # 나는 학교에 간다 / 나는 집에 간다: 2 of 3 words match each way; neither bigram (나는 학교에, 학교에 간다)
    # is predicted; the common subsequence is 나는 ... 간다
    korean = rouge(["나는 학교에 간다"], ["나는 집에 간다"])
    assert (korean["rouge1"], korean["rouge2"], korean["rougeL"]) == pytest.approx((2 / 3, 0.0, 2 / 3))
    # 나는 학교에 갔다: the bigram 나는 학교에 matches, 1 of 2 each way
    both = rouge(["나는 학교에 간다", "나는 학교에 간다"], ["나는 집에 간다", "나는 학교에 갔다"])
    assert [r["rouge2"] for r in both["per_row"]] == pytest.approx([0.0, 0.5])
    assert (both["rouge1"], both["rouge2"], both["rougeL"], both["rows"]) == pytest.approx((2 / 3, 0.25, 2 / 3, 2))
    empty = rouge(["서울"], ["!"])["per_row"][0]  # a prediction without words scores 0, as a float in the JSON
    assert empty == {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0} and all(type(v) is float for v in empty.values())
    assert rouge(["Paris!"], ["paris"])["rougeL"] == 1.0


def test_the_tokenizer_keeps_every_script():
    from rouge_score import rouge_scorer

    # why it exists: rouge-score's default tokenizer sees no word in Korean
    assert rouge_scorer.RougeScorer(["rouge1"]).score("나는 학교에 간다", "나는 학교에 간다")["rouge1"].fmeasure == 0
    words = UnicodeWords()
    assert words.tokenize("나는 학교에 간다.") == ["나는", "학교에", "간다"]
    assert words.tokenize(unicodedata.normalize("NFD", "한국어")) == ["한국어"]  # jamo typed apart, composed
    assert words.tokenize("Ｈｅｌｌｏ, World! 2024년 snake_case café") == ["hello", "world", "2024년", "snake", "case",
                                                                          "café"]
    assert words.tokenize("हिन्दी ไทย") == ["हिन्दी", "ไทย"]  # vowel signs and tone marks stay in their word
    assert UnicodeWords(stem=True).tokenize("Running cats 달리는 cafés") == ["run", "cat", "달리는", "cafés"]


@pytest.mark.parametrize("text, message", [
    ('{"prompt": "Hi", "reference": "Hello"}\n{"prompt": "Bye"}\n', r"row 1: needs 'reference' \(text\), got keys "
                                                                    r"\['prompt'\]"),
    ('{"question": "Hi", "answer": "Hello"}\n', r"row 0: needs 'prompt' and 'reference' \(text\)"),
    ('{"prompt": "Hi", "reference": "Hello"}\n\n{"prompt": "Bye", "reference": }\n',
     r"line 3 is not valid JSON \(Expecting value at column 32\): fix or remove that line"),
    ("\n  \n", "holds no rows: give a file with at least one example"),
    ('["Hi", "Hello"]\n', "row 0 is list .*, not an object of fields"),
    ('{"prompt": "Hi", "reference": "..."}\n', "row 0: the reference '...' has no letters or digits to score"),
])
def test_bad_generation_files_name_the_row_and_the_fix(tmp_path, text, message):
    (tmp_path / "gen.jsonl").write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError, match=f"^data.generation_path '.*gen.jsonl'.*{message}") as err:
        read_generations(str(tmp_path / "gen.jsonl"))
    assert "\n" not in str(err.value)


def test_generation_path_config_and_a_missing_package(tmp_path, monkeypatch):
    assert build_config({"data": {"generation_path": "gen.jsonl"}}).data.generation_path == "gen.jsonl"
    with pytest.raises(ConfigError, match="data.generation_path 'nowhere.jsonl' not found"):
        read_generations("nowhere.jsonl")
    (tmp_path / "gen.jsonl").write_text('{"prompt": "Hi", "reference": "Hello"}')
    monkeypatch.setitem(sys.modules, "rouge_score", None)  # as if not installed
    with pytest.raises(ConfigError, match="rouge-score package: pip install rouge-score"):
        read_generations(str(tmp_path / "gen.jsonl"))


ROWS = [{"prompt": "Who are you?", "reference": "I am Tuna."}, {"prompt": "인사해 주세요", "reference": "안녕하세요"}]


def _base(tmp_path):
    tokenizer = byte_level_tokenizer()
    tiny_model("llama", vocab_size=len(tokenizer)).save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    (tmp_path / "gen.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in ROWS), encoding="utf-8")


def test_eval_command_reports_rouge(tmp_path):
    from fusetune.api import FastLanguageModel
    from fusetune.backend import use_backend
    from fusetune.recipe.evaluation import generation_rouge

    _base(tmp_path)
    (tmp_path / "run.yaml").write_text(f"model: {{name: {tmp_path / 'base'}, max_seq_length: 64}}\n"
                                       "data: {generation_path: gen.jsonl, max_new_tokens: 3, path: not-here.jsonl}\n"
                                       "output: {dir: out}\n")  # eval reads no training data it does not measure
    proc = subprocess.run([sys.executable, "-m", "fusetune.cli", "eval", "run.yaml"], capture_output=True, text=True,
                          cwd=tmp_path, env={**os.environ, "TRITON_INTERPRET": "0"}, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ROUGE-1/2/L F1 (gen.jsonl, 2 prompts): " in proc.stdout, proc.stdout
    report = json.loads((tmp_path / "out" / "eval.json").read_text(encoding="utf-8"))["rouge"]
    assert report["rows"] == 2 and [r["prompt"] for r in report["per_row"]] == [r["prompt"] for r in ROWS]
    # the same model answering in this process (greedy, one-turn chat) gives the same answers and scores,
    # and is left in the mode it was in
    model, tokenizer = FastLanguageModel.from_pretrained(str(tmp_path / "base"), max_seq_length=64,
                                                         dtype=torch.float32)
    model.train()
    with use_backend("torch"):
        here = generation_rouge(model, tokenizer, ROWS, 3)
    assert model.training and here == pytest.approx(report)


def test_train_reports_rouge_before_and_after(tmp_path):
    from fusetune.backend import use_backend
    from fusetune.recipe.train import run_train

    _base(tmp_path)
    config = build_config({"model": {"name": str(tmp_path / "base"), "max_seq_length": 64},
                           "data": {"generation_path": str(tmp_path / "gen.jsonl"), "max_new_tokens": 3},
                           "lora": {"r": 4},
                           "training": {"max_steps": 1, "effective_batch_size": 2, "micro_batch_size": 2,
                                        "save_steps": 0},
                           "output": {"dir": str(tmp_path / "out")}})
    log = []
    with use_backend("torch"):
        summary = run_train(config, log.append)
    assert set(summary["rouge"]) == {"before", "after"}
    assert all(summary["rouge"][when]["rows"] == 2 and len(summary["rouge"][when]["per_row"]) == 2
               for when in ("before", "after"))
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["rouge"] == summary["rouge"]
    line = [entry for entry in log if entry.startswith("ROUGE-1/2/L F1 (")]
    assert len(line) == 1 and line[0].endswith(" after") and " before, " in line[0], log
