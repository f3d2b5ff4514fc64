"""Guides' TRL code (tokenizer=, max_seq_length=, dataset_text_field= on the trainer) runs on
today's TRL once fusetune is imported: in a fresh interpreter, importing TRL after fusetune (the
import hook), and in this one, where TRL may be loaded already; disable() restores TRL."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("trl")
ROOT = Path(__file__).resolve().parents[2]

GUIDE = """
from fusetune import FastLanguageModel  # the only line a guide changes
import fusetune
from datasets import Dataset
from trl import SFTConfig, SFTTrainer
from tests.helpers import word_tokenizer
from tests.tiny_models import add_lora, tiny_model

config = SFTConfig(output_dir=OUT, max_seq_length=32, per_device_train_batch_size=2, max_steps=2, report_to=[],
                   use_cpu=True, save_strategy="no", logging_steps=1, dataloader_num_workers=0)
assert config.max_length == 32
model = fusetune.patch_model(add_lora(tiny_model("llama"), "llama"))
rows = Dataset.from_list([{"body": " ".join(f"w{i}" for i in range(2, 30))}] * 4)
trainer = SFTTrainer(model=model, tokenizer=word_tokenizer(), train_dataset=rows, args=config,
                     dataset_text_field="body", max_seq_length=16, dataset_num_proc=1)
assert trainer.args.max_length == 16 and trainer.args.dataset_text_field == "body"
trainer.train()
print("LOSSES", [e["loss"] for e in trainer.state.log_history if "loss" in e])
fusetune.api.trl_compat.disable()
try:
    SFTConfig(output_dir=OUT, max_seq_length=32)
except TypeError as err:
    print("OFF", err)
"""


def test_a_guides_trl_code_runs_with_only_the_import_changed(tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "0",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-c", f"OUT = {str(tmp_path)!r}\n" + GUIDE], capture_output=True,
                          text=True, env=env, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for said in ("fusetune: SFTConfig(max_seq_length=...) is max_length in the installed TRL",
                 "fusetune: SFTTrainer(tokenizer=...) is processing_class in the installed TRL",
                 "fusetune: SFTTrainer(dataset_text_field=...) is args.dataset_text_field",
                 "fusetune: SFTTrainer(max_seq_length=...) is args.max_length"):
        assert said in proc.stdout, proc.stdout
    losses = eval(proc.stdout.split("LOSSES", 1)[1].splitlines()[0])
    assert len(losses) == 2 and all(loss == loss for loss in losses)
    assert "OFF" in proc.stdout and "unexpected keyword argument 'max_seq_length'" in proc.stdout


def test_translation_in_a_session_that_loaded_trl_first():
    from trl import SFTConfig, SFTTrainer

    from fusetune.api import trl_compat

    trl_compat.enable()  # TRL's modules are loaded: patched now
    try:
        assert SFTConfig(output_dir="unused", max_seq_length=8, report_to=[], use_cpu=True).max_length == 8
        with pytest.raises(TypeError, match=r"SFTTrainer\(packing=...\): the installed TRL takes these in its config: "
                                            r"pass args=SFTConfig"):
            SFTTrainer(model=None, packing=True)
        # a plain TrainingArguments, given by position, as older guides write it: the moved values survive
        import fusetune
        from datasets import Dataset
        from transformers import TrainingArguments

        from tests.helpers import word_tokenizer
        from tests.tiny_models import add_lora, tiny_model

        plain = TrainingArguments(output_dir="unused", report_to=[], use_cpu=True, max_steps=1)
        rows = Dataset.from_list([{"body": " ".join(f"w{i}" for i in range(2, 30))}] * 2)
        trainer = SFTTrainer(fusetune.patch_model(add_lora(tiny_model("llama"), "llama")), plain, train_dataset=rows,
                             processing_class=word_tokenizer(), dataset_text_field="body", max_seq_length=12)
        assert trainer.args.max_length == 12 and trainer.args.dataset_text_field == "body"
        assert not hasattr(plain, "max_length")  # the caller's object is unchanged
    finally:
        trl_compat.disable()
    with pytest.raises(TypeError, match="max_seq_length"):
        SFTConfig(output_dir="unused", max_seq_length=8, use_cpu=True)
    trl_compat.enable()  # as the package leaves it


def test_sft_trainer_padding_free_trains_a_patched_model_as_padded(tmp_path):
    """TRL's padding-free batches (one row, position ids restarting per example) on a patched model:
    the first step's loss equals the padded run's (nothing attends across examples)."""
    import torch
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    import fusetune
    from tests.helpers import word_tokenizer
    from tests.tiny_models import add_lora, tiny_model

    rows = Dataset.from_list([{"text": " ".join(f"w{i}" for i in range(2, n))} for n in (9, 20, 4, 14)])
    losses = {}
    for padding_free in (False, True):
        torch.manual_seed(0)
        model = fusetune.patch_model(add_lora(tiny_model("llama"), "llama"))
        config = SFTConfig(output_dir=str(tmp_path / str(padding_free)), per_device_train_batch_size=4, max_steps=1,
                           report_to=[], use_cpu=True, save_strategy="no", logging_steps=1, padding_free=padding_free,
                           dataloader_num_workers=0, learning_rate=0.0, max_length=None)
        trainer = SFTTrainer(model=model, processing_class=word_tokenizer(), train_dataset=rows, args=config)
        batch = next(iter(trainer.get_train_dataloader()))
        assert ("position_ids" in batch) == padding_free
        losses[padding_free] = trainer.train().training_loss
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)


def test_sft_trainer_truncates_at_the_max_seq_length_the_model_was_loaded_with(tmp_path, capsys):
    """TRL's default max_length (1024) would cut a longer conversation silently: a model loaded with
    max_seq_length=4096 keeps a 1500-token row whole; a length the user gave wins, TRL's default
    value included, by either name."""
    datasets = pytest.importorskip("datasets")
    from trl import SFTConfig, SFTTrainer

    from fusetune import FastLanguageModel
    from fusetune.api import trl_compat
    from tests.helpers import load_model, save_model_dir
    from tests.tiny_models import tiny_model

    trl_compat.enable()  # (on since fusetune's import; another test may have switched it)
    model, tokenizer = load_model(save_model_dir(tiny_model("llama"), tmp_path / "llama"), max_seq_length=4096)
    model = FastLanguageModel.get_peft_model(model, r=4, use_gradient_checkpointing=False)
    rows = datasets.Dataset.from_list([{"text": " ".join(f"w{2 + i % 250}" for i in range(1500))}] * 2)

    def built(on_trainer: dict | None = None, **on_config):
        """(max_length, the row's length) of a trainer given these arguments."""
        config = SFTConfig(output_dir=str(tmp_path / "out"), report_to=[], use_cpu=True, **on_config)
        trainer = SFTTrainer(model, config, processing_class=tokenizer, train_dataset=rows, **(on_trainer or {}))
        return trainer.args.max_length, len(trainer.train_dataset[0]["input_ids"])

    assert built() == (4096, 1501)  # the row and its EOS
    assert "SFTTrainer: max_length=4096, the max_seq_length the model was loaded with" in capsys.readouterr().out
    assert built(max_length=1024) == (1024, 1024)
    assert built(max_seq_length=2000) == (2000, 1501)
    assert built(on_trainer={"max_seq_length": 1200}) == (1200, 1200)
    assert "SFTTrainer: max_length=" not in capsys.readouterr().out


def test_a_trainer_that_adds_lora_itself_saves_the_load_settings(tmp_path):
    """SFTTrainer(peft_config=...) on a model loaded past its native context (RoPE scaled): the
    adapter it saves reloads as the model that trained (fusetune.json beside it), not the base's
    unscaled RoPE."""
    datasets = pytest.importorskip("datasets")
    import torch
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from fusetune import FastLanguageModel
    from fusetune.api import trl_compat
    from tests.helpers import load_model, save_model_dir
    from tests.tiny_models import tiny_model

    trl_compat.enable()
    model, tokenizer = load_model(save_model_dir(tiny_model("llama", max_position_embeddings=64), tmp_path / "base"),
                                  max_seq_length=128)
    assert model.config.rope_parameters["rope_type"] == "linear"
    rows = datasets.Dataset.from_list([{"text": " ".join(f"w{2 + i}" for i in range(20))}] * 2)
    config = SFTConfig(output_dir=str(tmp_path / "out"), report_to=[], use_cpu=True, max_steps=1, save_strategy="no",
                       per_device_train_batch_size=2, bf16=False)
    trainer = SFTTrainer(model, config, processing_class=tokenizer, train_dataset=rows,
                         peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    trainer.save_model(str(tmp_path / "adapter"))
    again, _ = FastLanguageModel.from_pretrained(str(tmp_path / "adapter"), dtype=torch.float32)
    assert again.config.rope_parameters == trainer.model.config.rope_parameters and again.max_seq_length == 128
    ids = torch.randint(2, 200, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(input_ids=ids).logits, trainer.model.eval()(input_ids=ids).logits)


@pytest.mark.parametrize("trainer", ["DPO", "KTO"])
def test_preference_trainers_truncate_at_the_loaded_max_seq_length(trainer, tmp_path, capsys):
    """As SFTTrainer: TRL's default max_length (1024) gives way to the length the model was loaded with,
    and a length the user gave wins."""
    datasets = pytest.importorskip("datasets")
    import trl

    from fusetune import FastLanguageModel
    from fusetune.api import trl_compat
    from tests.helpers import load_model, save_model_dir
    from tests.tiny_models import tiny_model

    trl_compat.enable()
    folder = save_model_dir(tiny_model("llama"), tmp_path / "llama")
    rows = [{"prompt": "w2 w3", "chosen": " w4", "rejected": " w5"}] * 2
    if trainer == "KTO":
        rows = [{"prompt": "w2 w3", "completion": " w4", "label": True}, {"prompt": "w2", "completion": " w5",
                                                                            "label": False}]
    config_cls, trainer_cls = getattr(trl, f"{trainer}Config"), getattr(trl, f"{trainer}Trainer")
    for given, expected in (({}, 4096), ({"max_length": 1024}, 1024)):
        model, tokenizer = load_model(folder, max_seq_length=4096)
        model = FastLanguageModel.get_peft_model(model, r=4, use_gradient_checkpointing=False)
        config = config_cls(output_dir=str(tmp_path / "out"), report_to=[], use_cpu=True, bf16=False, **given)
        built = trainer_cls(model=model, args=config, processing_class=tokenizer,
                            train_dataset=datasets.Dataset.from_list(rows))
        assert built.args.max_length == expected
    assert f"{trainer}Trainer: max_length=4096, the max_seq_length the model was loaded with" in capsys.readouterr().out


def test_a_model_prepared_without_checkpointing_trains_without_it_under_trl(tmp_path, capsys):
    """TRL's configs default to gradient_checkpointing=True: a model get_peft_model prepared with
    use_gradient_checkpointing=False keeps it off unless the config asks for it."""
    datasets = pytest.importorskip("datasets")
    from trl import SFTConfig, SFTTrainer

    from fusetune import FastLanguageModel
    from fusetune.api import trl_compat
    from tests.helpers import load_model, save_model_dir
    from tests.tiny_models import tiny_model

    trl_compat.enable()
    folder = save_model_dir(tiny_model("llama"), tmp_path / "llama")
    rows = datasets.Dataset.from_list([{"text": "w2 w3 w4"}] * 2)
    for choice, given, expected in ((False, {}, False), (False, {"gradient_checkpointing": True}, True),
                                    (True, {}, True)):
        model, tokenizer = load_model(folder)
        model = FastLanguageModel.get_peft_model(model, r=4, use_gradient_checkpointing=choice)
        config = SFTConfig(output_dir=str(tmp_path / "out"), report_to=[], use_cpu=True, **given)
        trainer = SFTTrainer(model, config, processing_class=tokenizer, train_dataset=rows)
        assert trainer.args.gradient_checkpointing is expected, (choice, given)
        said = "SFTTrainer: gradient_checkpointing=False, as get_peft_model" in capsys.readouterr().out
        assert said is (choice is False and not given)
