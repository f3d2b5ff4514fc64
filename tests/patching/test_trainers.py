"""A fusetune-patched model under trainers: TRL's SFT, DPO, GRPO, KTO and ORPO trainers (where TRL is installed)
and a plain loop whose gradient accumulation equals the large batch (num_items_in_batch, fused loss)."""
import copy

import pytest
import torch

import fusetune
from fusetune import use_backend
from fusetune.training.checkpoint import enable_offloaded_checkpointing, offloaded_checkpoint
from tests.helpers import word_tokenizer
from tests.numerics import assert_close
from tests.tiny_models import add_lora, random_batch, tiny_model


def test_gradient_accumulation_equals_the_large_batch(device):
    model = fusetune.patch_model(add_lora(tiny_model("llama"), "llama").to(device))
    ids, labels = random_batch(batch=4, seq=16, device=device)
    labels[0, 5:9] = -100  # micro-batches with different token counts
    big = copy.deepcopy(model)
    big(input_ids=ids, labels=labels).loss.backward()
    n_items = (labels[:, 1:] != -100).sum()
    for half in (slice(0, 2), slice(2, 4)):
        model(input_ids=ids[half], labels=labels[half], num_items_in_batch=n_items).loss.backward()
    for (name, p), q in zip(model.named_parameters(), big.parameters()):
        if p.requires_grad:
            assert_close(p.grad, q.grad, torch.float32, name)


def _words(g, n):
    return " ".join(f"w{int(i)}" for i in torch.randint(2, 40, (n,), generator=g))


def _train(trainer_cls, config_cls, rows, tmp_path, tokenizer=None, trainer_args=None, model=None, **config):
    """Train `model` (default: a patched LoRA tiny Llama) with a TRL trainer on `rows`; returns the
    logged losses. The torch backend runs the ops (the trainers' use of a patched model is under
    test; the interpreter would run every kernel of every step, and the kernels have their own tests)."""
    from datasets import Dataset

    model = model or fusetune.patch_model(add_lora(tiny_model("llama"), "llama"))
    args = config_cls(output_dir=str(tmp_path), per_device_train_batch_size=4, learning_rate=1e-2, logging_steps=1,
                      save_strategy="no", report_to=[], use_cpu=not torch.cuda.is_available(),
                      dataloader_num_workers=0, **config)
    trainer = trainer_cls(model=model, args=args, train_dataset=Dataset.from_list(rows),
                          processing_class=tokenizer or word_tokenizer(), **(trainer_args or {}))
    with use_backend("torch"):
        trainer.train()
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def test_sft_trainer_trains_a_patched_model_and_says_which_loss_runs(tmp_path, monkeypatch, capsys):
    trl = pytest.importorskip("trl")
    import fusetune.patching.modules as modules

    fused_losses = []
    real = modules.linear_cross_entropy
    monkeypatch.setattr(modules, "linear_cross_entropy", lambda *a, **k: fused_losses.append(1) or real(*a, **k))
    g = torch.Generator().manual_seed(0)
    rows = [{"text": _words(g, 24)} for _ in range(16)]
    model = fusetune.patch_model(add_lora(tiny_model("llama"), "llama"))
    enable_offloaded_checkpointing(model)
    # (TRL's configs turn gradient checkpointing on by default: the offloaded one stays)
    losses = _train(trl.SFTTrainer, trl.SFTConfig, rows, tmp_path, model=model, max_steps=4, max_length=24)
    assert {layer._gradient_checkpointing_func for layer in model.get_base_model().model.layers} == \
        {offloaded_checkpoint}
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]
    # TRL's SFTTrainer computes the loss with its own fused LM head: fusetune's does not run, and says so
    assert not fused_losses
    assert "fusetune: TRL's fused LM head now computes the loss of LlamaForCausalLM" in capsys.readouterr().out


def test_dpo_trainer_trains_a_patched_model(tmp_path):
    """DPO needs log-probabilities of whole sequences (forwards without labels: the logits path)
    and a reference (PEFT's disabled adapters: the fused LoRA falls back there)."""
    trl = pytest.importorskip("trl")
    g = torch.Generator().manual_seed(0)
    rows = [{"prompt": _words(g, 6), "chosen": _words(g, 5), "rejected": _words(g, 5)} for _ in range(8)]
    losses = _train(trl.DPOTrainer, trl.DPOConfig, rows, tmp_path, max_steps=3, max_length=24)
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))


def test_grpo_trainer_trains_a_patched_model(tmp_path):
    """GRPO generates completions with the patched model (KV cache) and trains on their rewards."""
    trl = pytest.importorskip("trl")
    g = torch.Generator().manual_seed(0)
    rows = [{"prompt": _words(g, 6)} for _ in range(4)]

    def reward_len(completions, **kwargs):
        return [float(len(c.split())) for c in completions]

    losses = _train(trl.GRPOTrainer, trl.GRPOConfig, rows, tmp_path, trainer_args={"reward_funcs": reward_len},
                    max_steps=2, num_generations=4, max_completion_length=6)
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))


def test_kto_trainer_trains_a_patched_model(tmp_path):
    """KTO: unpaired desirable / undesirable completions, a KL term from mismatched pairs."""
    trl = pytest.importorskip("trl")
    g = torch.Generator().manual_seed(0)
    rows = [{"prompt": _words(g, 6), "completion": _words(g, 5), "label": i % 2 == 0} for i in range(8)]
    losses = _train(trl.KTOTrainer, trl.KTOConfig, rows, tmp_path, max_steps=2, max_length=24)
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))


def test_orpo_trainer_trains_a_patched_model(tmp_path):
    """ORPO (TRL keeps it in trl.experimental): the odds-ratio term on paired preferences, no reference."""
    pytest.importorskip("trl")
    orpo = pytest.importorskip("trl.experimental.orpo")
    tokenizer = word_tokenizer()
    tokenizer.pad_token = tokenizer.eos_token  # as FastLanguageModel.from_pretrained sets it
    g = torch.Generator().manual_seed(0)
    rows = [{"prompt": _words(g, 6), "chosen": _words(g, 5), "rejected": _words(g, 5)} for _ in range(8)]
    losses = _train(orpo.ORPOTrainer, orpo.ORPOConfig, rows, tmp_path, tokenizer=tokenizer, max_steps=2,
                    max_length=24)
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
