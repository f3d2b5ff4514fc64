"""training.report_to: every step's numbers reach TensorBoard (read back from its event files)
and W&B (a stand-in module records the calls: the real one needs an account)."""
import dataclasses
import sys
import types

import pytest
import torch

from fusetune.backend import use_backend
from fusetune.recipe import loop
from fusetune.recipe.config import ConfigError, TrainingConfig, build_config
from fusetune.recipe.data import tokenize_rows
from fusetune.recipe.objectives import LanguageModeling
from fusetune.recipe.reporting import check_reporters
from tests.tiny_models import byte_level_tokenizer, tiny_model

ROWS = [{"messages": [{"role": "user", "content": "Who are you?"}, {"role": "assistant", "content": "I am Tuna."}]},
        {"prompt": "The quick brown", "completion": "fox jumps"}] * 2


def _train(tmp_path, report_to):
    from fusetune.api import FastLanguageModel

    tokenizer = byte_level_tokenizer()
    model = tiny_model("llama", vocab_size=len(tokenizer))
    model.requires_grad_(False)
    model = FastLanguageModel.get_peft_model(model, r=4, use_gradient_checkpointing=False)
    cfg = TrainingConfig(max_steps=3, effective_batch_size=2, save_steps=0, report_to=report_to, eval_steps=2)
    examples = tokenize_rows(ROWS, tokenizer, 64)
    with use_backend("torch"):
        return loop.train_loop(model, examples, LanguageModeling(tokenizer.pad_token_id), cfg, tmp_path,
                               torch.device("cpu"), 2, lambda line: None, fingerprint=dataclasses.asdict(cfg),
                               eval_examples=examples[:1])


def test_tensorboard_gets_every_step_and_eval(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    record = _train(tmp_path, ["tensorboard"])
    events = EventAccumulator(str(tmp_path / "runs"))
    events.Reload()
    loss = events.Scalars("train/loss")
    assert [e.step for e in loss] == [1, 2, 3]
    assert [e.value for e in loss] == pytest.approx(record["losses"], rel=1e-6)
    assert [e.step for e in events.Scalars("eval/loss")] == [0, 2, 3]
    assert {"train/learning_rate", "train/tokens_per_s", "train/grad_norm", "train/peak_memory_gib",
            "eval/perplexity"} <= set(events.Tags()["scalars"])


def test_wandb_gets_every_step_in_one_resumable_run(tmp_path, monkeypatch):
    calls = []

    class Run:
        def log(self, values, step):
            calls.append(("log", step, dict(values)))

        def finish(self):
            calls.append(("finish",))

    fake = types.SimpleNamespace(init=lambda **kw: calls.append(("init", kw)) or Run())
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setenv("WANDB_PROJECT", "tuna")
    _train(tmp_path, ["wandb"])
    (_, init), *logs, last = calls
    assert init["project"] == "tuna" and init["resume"] == "allow" and init["config"]["max_steps"] == 3
    assert last == ("finish",)
    assert [step for kind, step, values in logs if "train/loss" in values] == [1, 2, 3]


def test_report_to_is_checked_before_anything_loads(monkeypatch):
    assert build_config({"training": {"report_to": "none"}}).training.report_to == []
    assert build_config({"training": {"report_to": "tensorboard"}}).training.report_to == ["tensorboard"]
    with pytest.raises(ConfigError, match="training.report_to: 'tensorbord' unknown; choose from tensorboard, wandb"):
        build_config({"training": {"report_to": ["tensorbord"]}})
    monkeypatch.setitem(sys.modules, "wandb", None)  # not installed
    with pytest.raises(ConfigError, match="report_to has wandb, which is not installed: pip install wandb"):
        check_reporters(["wandb"])
