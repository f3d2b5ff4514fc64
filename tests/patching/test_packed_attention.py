"""fusetune's attention: a packed row (position ids restarting per example) gives the loss and every
gradient of the same examples padded, in every family; the routes, generation and unpatching."""
import copy

import pytest
import torch

import fusetune
from fusetune.recipe.data import collate
from fusetune.training.packing import pack_examples
from tests.numerics import assert_close
from tests.tiny_models import FAMILIES, add_lora, tiny_model

LENGTHS = [5, 12, 1, 3, 9]  # a 1-token example, and examples longer than the sliding window (8)


def _examples(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(2, 257, (n,), generator=gen).tolist()} for n in LENGTHS]


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
    loss, grads = _loss_and_grads(reference, _padded_rows(examples), device)
    packed_loss, packed_grads = _loss_and_grads(patched, pack_examples(examples), device)
    padded_loss, padded_grads = _loss_and_grads(patched, _padded_rows(examples), device)
    assert_close(packed_loss, loss, torch.float32, "packed loss")
    assert_close(padded_loss, loss, torch.float32, "padded loss (patched)")
    assert packed_grads.keys() == grads.keys()
    for name in grads:
        assert_close(packed_grads[name], grads[name], torch.float32, f"packed grad {name}")
        assert_close(padded_grads[name], grads[name], torch.float32, f"padded grad {name}")


def test_padded_rows_through_the_kernel(device, monkeypatch):
    """Padded rows long enough for the kernel (here: all) match transformers, left and right padding."""
    from fusetune.patching import attention as fused_attention

    monkeypatch.setattr(fused_attention, "PADDED_KERNEL_FROM", 0)
    reference = tiny_model("llama").to(device)
    patched = fusetune.patch_model(copy.deepcopy(reference))
    batch = _padded_rows(_examples())
    loss, grads = _loss_and_grads(reference, batch, device)
    ours, our_grads = _loss_and_grads(patched, batch, device)
    assert_close(ours, loss, torch.float32, "loss")
    for name in grads:
        assert_close(our_grads[name], grads[name], torch.float32, name)
    left = {k: v.flip(1) for k, v in batch.items()}  # left padding (the reversed rows: another input)
    assert_close(_loss_and_grads(patched, left, device)[0], _loss_and_grads(reference, left, device)[0],
                 torch.float32, "left-padded loss")


def test_packed_lora_equals_padded(device):
    reference = add_lora(tiny_model("qwen3"), "qwen3").to(device)
    patched = fusetune.patch_model(copy.deepcopy(reference))
    loss, grads = _loss_and_grads(reference, _padded_rows(_examples(1)), device)
    packed_loss, packed_grads = _loss_and_grads(patched, pack_examples(_examples(1)), device)
    assert_close(packed_loss, loss, torch.float32, "loss")
    for name in grads:
        assert_close(packed_grads[name], grads[name], torch.float32, name)


@pytest.mark.parametrize("rope", [True, False], ids=["rope", "no-rope-patch"])
def test_kernel_always_equals_sdpa_on_plain_rows(rope, device, monkeypatch):
    """attention="always" sends plain causal rows to the kernel, with or without the RoPE patch."""
    from fusetune.patching import attention as fused_attention

    calls = []
    kernel = fused_attention.attention
    monkeypatch.setattr(fused_attention, "attention", lambda *a, **k: calls.append(1) or kernel(*a, **k))
    ids = torch.randint(2, 257, (2, 16), device=device)
    reference = tiny_model("llama").to(device)
    always = fusetune.patch_model(copy.deepcopy(reference), attention="always", rope=rope)
    with torch.no_grad():
        assert_close(always(input_ids=ids).logits, reference(input_ids=ids).logits, torch.float32, "logits")
    assert len(calls) == reference.config.num_hidden_layers
    fusetune.unpatch_model(always)
    assert not any("_fusetune_attention" in m.__dict__ for m in always.modules())


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


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_a_4d_mask_the_caller_built_matches_transformers(family, device):
    """A (B, 1, S, S) mask given to the model (a block-diagonal packing collator's), additive float or
    boolean, as transformers' own attention takes it (Gemma-2's softcap route included)."""
    reference = tiny_model(family).to(device)
    patched = fusetune.patch_model(copy.deepcopy(reference))
    ids = torch.randint(2, 257, (2, 16), device=device)
    doc = torch.tensor([0] * 6 + [1] * 10, device=device)
    allowed = (doc[:, None] == doc[None, :]) & torch.ones(16, 16, dtype=torch.bool, device=device).tril()
    additive = torch.zeros(2, 1, 16, 16, device=device).masked_fill(~allowed, torch.finfo(torch.float32).min)
    expected = reference(input_ids=ids, attention_mask=additive, labels=ids).loss
    for mask in (additive, allowed.expand(2, 1, 16, 16)):
        assert_close(patched(input_ids=ids, attention_mask=mask, labels=ids).loss, expected, torch.float32,
                     f"loss with a {mask.dtype} 4-D mask")


def test_static_cache_generation_matches_transformers(device):
    """A static cache holds empty slots past the filled ones: transformers' SDPA mask keeps them out."""
    reference = tiny_model("llama").to(device).eval()
    patched = fusetune.patch_model(copy.deepcopy(reference))
    ids = torch.randint(2, 257, (2, 7), device=device)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    kwargs = dict(attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0,
                  cache_implementation="static")
    assert torch.equal(patched.generate(ids, **kwargs), reference.generate(ids, **kwargs))


def test_bidirectional_gemma3_keeps_transformers_attention(capsys):
    model = fusetune.patch_model(tiny_model("gemma3", use_bidirectional_attention=True))
    assert model.config._attn_implementation != "fusetune"
    assert "attention: bidirectional attention (its window is two-sided)" in capsys.readouterr().out


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


@pytest.mark.gpu
def test_8b_widths_packed_curve_follows_padded_transformers_in_bf16(device):
    """Llama-3.1-8B widths (4 layers), LoRA, bf16, 20 AdamW steps of 16 conversations from the W8
    length distribution: fusetune packed against transformers + PEFT padded (SDPA), same start."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from bench.sft_real import conversations

    config = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=4, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=128, vocab_size=128256, attn_implementation="sdpa")
    torch.manual_seed(0)
    base = LlamaForCausalLM(config).to(device, torch.bfloat16)
    data = [row[:1024] for row in conversations(320)]
    curves = {}
    for packed in (False, True):
        model = get_peft_model(copy.deepcopy(base), LoraConfig(r=16, lora_alpha=16, target_modules=[
            "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], init_lora_weights=False))
        if packed:
            fusetune.patch_model(model)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        curves[packed] = []
        for step in range(20):
            rows = [{"input_ids": r} for r in data[16 * step:16 * (step + 1)]]
            n_items = sum(len(r["input_ids"]) - 1 for r in rows)
            batches = [pack_examples(rows)] if packed else [_padded_rows(rows[i:i + 4]) for i in range(0, 16, 4)]
            total = 0.0
            for batch in batches:
                loss = model(**{k: v.to(device) for k, v in batch.items()}, num_items_in_batch=n_items,
                             use_cache=False).loss
                loss.backward()
                total += loss.item()
            optimizer.step()
            optimizer.zero_grad()
            curves[packed].append(total)
        del model, optimizer
    padded, ours = torch.tensor(curves[False]), torch.tensor(curves[True])
    assert ((ours - padded).abs() / padded).max() < 1e-2, (curves[False], curves[True])
    assert ours[-1] < ours[0]


def _padded_rows(rows):
    """Right-padded rows, every token a label (the recipe's collate)."""
    return collate([{"input_ids": r["input_ids"], "labels": r["input_ids"]} for r in rows], pad_id=0)


def _left_padded(batch):
    """The right-padded rows rolled so their pads come first (left padding, the tokenizers' default)."""
    pads = (batch["attention_mask"] == 0).sum(1)
    return {key: torch.stack([row.roll(int(n)) for row, n in zip(rows, pads)]) for key, rows in batch.items()}


@pytest.mark.parametrize("route", ["sdpa", "kernel"])
def test_left_padded_rows_match_transformers(route, device, monkeypatch):
    """Left padding: a pad query sees no key, and transformers' SDPA gives it a zero output; the last
    pad's logits count in the loss (they predict the first token), so ours must be the same zero."""
    from fusetune.patching import attention as fused_attention

    if route == "kernel":
        monkeypatch.setattr(fused_attention, "PADDED_KERNEL_FROM", 0)
    reference = tiny_model("llama").to(device)
    patched = fusetune.patch_model(copy.deepcopy(reference))
    left = _left_padded(_padded_rows(_examples(2)))
    assert (left["attention_mask"][:, 0] == 0).any() and (left["labels"][:, -1] != -100).all()
    loss, grads = _loss_and_grads(reference, left, device)
    ours, our_grads = _loss_and_grads(patched, left, device)
    assert_close(ours, loss, torch.float32, "loss")
    for name in grads:
        assert_close(our_grads[name], grads[name], torch.float32, name)


@pytest.mark.parametrize("route", ["dense", "kernel"])
@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_left_pads_see_no_later_token(family, route, device, monkeypatch):
    """The logits at left pads do not change when a later token does (transformers' eager attention,
    which Gemma-2's softcap runs, averages such rows over every key, the future included)."""
    from fusetune.patching import attention as fused_attention

    if route == "kernel":
        monkeypatch.setattr(fused_attention, "PADDED_KERNEL_FROM", 0)
    model = fusetune.patch_model(tiny_model(family).to(device))
    left = _left_padded(_padded_rows(_examples(2)))
    ids, mask = left["input_ids"].to(device), left["attention_mask"].to(device)
    row = int((mask[:, 0] == 0).nonzero()[0])
    changed = ids.clone()
    changed[row, -1] = changed[row, -1] % 200 + 3
    with torch.no_grad():
        pads = mask[row] == 0
        before = model(input_ids=ids, attention_mask=mask).logits[row, pads]
        after = model(input_ids=changed, attention_mask=mask).logits[row, pads]
    torch.testing.assert_close(after, before, rtol=0, atol=0)
