"""Multiple-choice accuracy from log-likelihoods: the scores against a hand computation on a
bigram model whose probabilities are known, answers given as index, letter or text, and bad
question files named with the row and the fix."""
import json
import math

import pytest
import torch
from torch import nn

from fusetune.recipe.config import ConfigError
from fusetune.recipe.evaluation import choice_logprobs, multiple_choice_accuracy, read_questions
from tests.tiny_models import byte_level_tokenizer


class Bigram(nn.Module):
    """logits at position t = table[token t]: P(next | previous) is a row of softmax(table)."""

    def __init__(self, vocab: int):
        super().__init__()
        self.table = nn.Parameter(torch.randn(vocab, vocab, dtype=torch.float64))

    def forward(self, input_ids):
        return type("Out", (), {"logits": self.table[input_ids]})()


def test_choice_scores_are_the_log_likelihood_of_the_reply():
    tokenizer = byte_level_tokenizer()
    model = Bigram(len(tokenizer))
    question, choices = "Capital of France?", ["Paris", "Rome", "서울"]
    prompt = tokenizer(tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                                     add_generation_prompt=True, tokenize=False),
                       add_special_tokens=False)["input_ids"]
    probs = torch.softmax(model.table.detach(), -1)
    for choice, got in zip(choices, choice_logprobs(model, tokenizer, question, choices)):
        ids = prompt + tokenizer(choice, add_special_tokens=False)["input_ids"]
        want = sum(math.log(probs[ids[i - 1], ids[i]].item()) for i in range(len(prompt), len(ids)))
        assert got == pytest.approx(want, rel=1e-12)
    scores = choice_logprobs(model, tokenizer, question, choices)
    best = max(range(3), key=scores.__getitem__)
    questions = [{"question": question, "choices": choices, "answer": a} for a in range(3)]
    result = multiple_choice_accuracy(model, tokenizer, questions)
    assert result == {"accuracy": 1 / 3, "correct": 1, "total": 3}
    assert multiple_choice_accuracy(model, tokenizer, [questions[best]])["accuracy"] == 1.0


def test_question_files(tmp_path):
    rows = [{"question": "2+2?", "choices": ["3", "4"], "answer": 1},
            {"question": "수도는?", "choices": ["서울", "부산", "대구"], "answer": "A"},
            {"question": "Red?", "choices": ["blue", "red"], "answer": "red"},
            {"question": "One?", "choices": ["1", "2"], "answer": "0"}]
    (tmp_path / "q.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows))
    assert [q["answer"] for q in read_questions(str(tmp_path / "q.jsonl"))] == [1, 0, 1, 0]
    for row, message in (({"question": "?", "choices": ["a", "b"], "answer": 2},
                          r"row 0: answer 2 is not a choice: give its index \(0 to 1\), its letter \(A to B\)"),
                         ({"question": "?", "choices": ["a"], "answer": 0}, "choices .a list of at least two texts"),
                         ({"prompt": "?", "answer": 0}, r"needs a question \(text\) and choices")):
        (tmp_path / "bad.jsonl").write_text(json.dumps(row))
        with pytest.raises(ConfigError, match=f"data.choices_path '.*bad.jsonl' .*{message}"):
            read_questions(str(tmp_path / "bad.jsonl"))
