"""fusetune's attention: a packed row (position ids restarting per example) gives the loss and every
gradient of the same examples padded, in every family; the routes, generation and unpatching."""
import copy

import pytest
import torch

import fusetune
from fusetune.training.packing import pack_examples
from tests.numerics import assert_close
from tests.tiny_models import FAMILIES, add_lora, tiny_model

LENGTHS = [5, 12, 1, 3, 9]  # a 1-token example, and examples longer than the sliding window (8)


def _examples(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(2, 257, (n,), generator=gen).tolist()} for n in LENGTHS]


def _padded(examples):
    width = max(LENGTHS)
    ids = torch.zeros(len(examples), width, dtype=torch.long)
    mask, labels = torch.zeros_like(ids), torch.full_like(ids, -100)
    for row, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[row, :n] = labels[row, :n] = torch.tensor(e["input_ids"])
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _loss_and_grads(model, batch, device):
    model.zero_grad(set_to_none=True)
    batch = {k: v.to(device) for k, v in batch.items()}
    loss = model(**batch, num_items_in_batch=sum(n - 1 for n in LENGTHS)).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_equals_padded_in_every_family(family, device):
    reference = tiny_model(family).to(device)  # transformers' own model, padded rows
    patched = fusetune.patch_model(copy.deepcopy(reference))
    assert patched.config._attn_implementation == "fusetune"
    examples = _examples()
    loss, grads = _loss_and_grads(reference, _padded(examples), device)
    packed_loss, packed_grads = _loss_and_grads(patched, pack_examples(examples), device)
    padded_loss, padded_grads = _loss_and_grads(patched, _padded(examples), device)
    assert_close(packed_loss, loss, torch.float32, "packed loss")
    assert_close(padded_loss, loss, torch.float32, "padded loss (patched)")
    assert packed_grads.keys() == grads.keys()
    for name in grads:
        assert_close(packed_grads[name], grads[name], torch.float32, f"packed grad {name}")
        assert_close(padded_grads[name], grads[name], torch.float32, f"padded grad {name}")


def test_packed_lora_equals_padded(device):
    reference = add_lora(tiny_model("qwen3"), "qwen3").to(device)
    patched = fusetune.patch_model(copy.deepcopy(reference))
    loss, grads = _loss_and_grads(reference, _padded(_examples(1)), device)
    packed_loss, packed_grads = _loss_and_grads(patched, pack_examples(_examples(1)), device)
    assert_close(packed_loss, loss, torch.float32, "loss")
    for name in grads:
        assert_close(packed_grads[name], grads[name], torch.float32, name)


def test_kernel_always_equals_sdpa_on_plain_rows(device):
    ids = torch.randint(2, 257, (2, 16), device=device)
    reference = tiny_model("llama").to(device)
    always = fusetune.patch_model(copy.deepcopy(reference), attention="always")
    with torch.no_grad():
        assert_close(always(input_ids=ids).logits, reference(input_ids=ids).logits, torch.float32, "logits")


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_generation_through_the_cache_matches_transformers(family, device):
    """Decoding (a KV cache: the dense fallback) and left-padded prompts give transformers' tokens."""
    reference = tiny_model(family).to(device).eval()
    patched = fusetune.patch_model(copy.deepcopy(reference))
    ids = torch.randint(2, 257, (2, 7), device=device)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding
    kwargs = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(patched.generate(ids, **kwargs), reference.generate(ids, **kwargs))


def test_unpatch_restores_the_implementation_and_saving_keeps_it(tmp_path):
    model = tiny_model("mistral")
    before = model.config._attn_implementation
    fusetune.patch_model(model)
    model.save_pretrained(tmp_path)
    assert "fusetune" not in (tmp_path / "config.json").read_text()
    fusetune.unpatch_model(model)
    assert model.config._attn_implementation == before


def test_attention_switch_off_and_bad_value(capsys):
    model = fusetune.patch_model(tiny_model("llama"), attention=False)
    assert model.config._attn_implementation != "fusetune"
    assert "attention: switched off" in capsys.readouterr().out
    with pytest.raises(ValueError, match="attention='maybe'; choose True"):
        fusetune.patch_model(tiny_model("llama"), attention="maybe")
