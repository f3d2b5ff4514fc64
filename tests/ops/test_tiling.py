"""Sequence-tiled MLP (fusetune.ops.tiling): the same outputs and gradients as the whole
block (fp64 on a toy block, fp32 on patched tiny models of every family with LoRA, with and
without offloaded checkpointing), the same dropout masks in the recompute, and the chunk choice."""
import copy

import pytest
import torch
from torch import nn

import fusetune
from fusetune.training.checkpoint import enable_offloaded_checkpointing
from fusetune.ops.tiling import chunk_rows_for, mlp_chunk_rows, sequence_tiled
from tests.helpers import assert_same_step
from tests.numerics import assert_close
from tests.tiny_models import FAMILIES, LORA_TARGETS, random_batch, tiny_model


def _block(dropout=0.0):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 40), nn.GELU(), nn.Dropout(dropout), nn.Linear(40, 12)).double()


def _grads(block, x, dy, chunk):
    block.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_(x.requires_grad)
    out = block(x) if chunk is None else sequence_tiled(block, x, chunk, block.parameters())
    out.backward(dy)
    return out.detach(), x.grad, [p.grad.clone() for p in block.parameters()]


@pytest.mark.parametrize("chunk", [1, 5, 36, 37, 100])
@pytest.mark.parametrize("x_grad", [True, False], ids=["x-grad", "frozen-x"])
def test_same_output_and_grads_as_the_whole_block(chunk, x_grad):
    block = _block()
    x = torch.randn(37, 12, dtype=torch.float64).requires_grad_(x_grad)  # odd row count
    dy = torch.randn(37, 12, dtype=torch.float64)
    out, dx, dparams = _grads(block, x, dy, chunk)
    ref, ref_dx, ref_dparams = _grads(block, x, dy, None)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    if x_grad:
        torch.testing.assert_close(dx, ref_dx, rtol=1e-12, atol=1e-12)
    else:
        assert dx is None
    for g, ref_g in zip(dparams, ref_dparams):
        torch.testing.assert_close(g, ref_g, rtol=1e-12, atol=1e-12)


def test_leading_dims_kept_and_no_grad_forward_loops():
    block = _block()
    x = torch.randn(2, 9, 12, dtype=torch.float64)
    with torch.no_grad():
        out = sequence_tiled(block, x, 4, block.parameters())
    assert out.shape == (2, 9, 12) and not out.requires_grad
    torch.testing.assert_close(out, block(x).detach(), rtol=1e-12, atol=1e-12)


def test_recompute_draws_the_forwards_dropout_masks():
    """With dropout the tiled backward must replay the masks its forward drew: the gradient equals
    that of the same chunks run with grad from the same seed."""
    block = _block(dropout=0.5)
    x = torch.randn(23, 12, dtype=torch.float64)
    dy = torch.randn(23, 12, dtype=torch.float64)
    torch.manual_seed(7)
    out, dx, dparams = _grads(block, x.requires_grad_(), dy, 6)
    torch.manual_seed(7)
    block.zero_grad(set_to_none=True)
    leaf = x.detach().requires_grad_()
    ref = torch.cat([block(part) for part in leaf.split(6)])
    ref.backward(dy)
    torch.testing.assert_close(out, ref.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dx, leaf.grad, rtol=1e-12, atol=1e-12)
    for p, g in zip(block.parameters(), dparams):
        torch.testing.assert_close(g, p.grad, rtol=1e-12, atol=1e-12)
    assert torch.rand(1).item() != pytest.approx(0.0)  # the caller's RNG stream goes on


def test_parameters_get_one_gradient_per_backward_through_autograd():
    """DDP and FSDP hook each parameter's gradient accumulation: it must happen once per backward,
    not once per chunk; and torch.autograd.grad can ask for the parameters."""
    block = _block()
    x = torch.randn(23, 12, dtype=torch.float64, requires_grad=True)
    fired = []
    for p in block.parameters():
        p.register_post_accumulate_grad_hook(lambda p: fired.append(p))
    sequence_tiled(block, x, 5, block.parameters()).sum().backward()
    assert len(fired) == len(list(block.parameters()))
    grads = torch.autograd.grad(sequence_tiled(block, x, 5, block.parameters()).sum(), [x, *block.parameters()])
    ref = torch.autograd.grad(block(x).sum(), [x, *block.parameters()])
    for g, r in zip(grads, ref):
        torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-12)


def test_bad_chunk_is_refused():
    with pytest.raises(ValueError, match="chunk_rows must be at least 1"):
        sequence_tiled(_block(), torch.randn(4, 12, dtype=torch.float64), 0)
    with pytest.raises(ValueError, match="tiled_mlp=0"):
        fusetune.patch_model(tiny_model("llama"), tiled_mlp=0)


def test_chunk_choice_from_free_memory():
    gib = 2**30
    per_row = 4 * 14336 * 2  # Llama-3.1-8B's MLP in bf16
    assert chunk_rows_for(32_768, per_row, 60 * gib) is None  # 3.5 GiB: whole
    chunk = chunk_rows_for(600_000, per_row, 40 * gib)  # 69 GiB: chunks of a quarter of 40
    assert chunk % 256 == 0 and chunk * per_row <= 10 * gib < (chunk + 256) * per_row
    assert chunk_rows_for(600_000, per_row, 100 * 2**20) == 1024  # never below 1024 rows
    assert mlp_chunk_rows(torch.empty(600_000, 8, device="meta"), 14336) is None  # not CUDA: whole


def _lora_model(family, tile, dropout):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=LORA_TARGETS[family],
                        init_lora_weights=False)
    torch.manual_seed(0)
    model = get_peft_model(tiny_model(family), config)
    return fusetune.patch_model(model, tiled_mlp=tile)


@pytest.mark.parametrize("offload", [False, True], ids=["plain", "offloaded-checkpoints"])
@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "t5"])
def test_tiled_model_matches_untiled(family, offload, capsys):
    """Every family's patched LoRA model with its MLPs in 7-token chunks (rows 2 x 16: five chunks,
    the last short) against the same model untiled: loss and every gradient (fp32). With offloaded
    checkpointing the tiled backward runs nested in the layer's recompute. No dropout: chunked and
    whole draws of a mask differ."""
    ref = _lora_model(family, False, 0.0)
    model = _lora_model(family, 7, 0.0)
    assert "7 tokens at a time" in capsys.readouterr().out
    if offload:
        enable_offloaded_checkpointing(model)
    assert_same_step(model, ref, *random_batch())


def test_tiled_dropout_replays_under_offloaded_checkpoints():
    """LoRA dropout inside a tiled MLP inside an offloaded checkpoint: the layer's recompute and the
    tiled backward replay the forward's masks, so the gradients are those of a tiled model without
    checkpointing (same chunks, same seed)."""
    ref = _lora_model("llama", 5, 0.2)
    model = copy.deepcopy(ref)
    enable_offloaded_checkpointing(model)
    assert_same_step(model, ref, *random_batch())


@pytest.mark.gpu
def test_long_mlp_tiles_in_bf16_at_8b_width():
    """Llama-3.1-8B's MLP (4096 -> 14336, LoRA r=16 on gate/up/down) in bf16 at 32k tokens: chunks of
    4,864 (the last short) against the whole block, within the bf16 band, with a backward peak
    under a third of the whole one's."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(tiny_model("llama", dtype=torch.bfloat16, hidden_size=4096, intermediate_size=14336,
                                      num_hidden_layers=1, num_attention_heads=32, num_key_value_heads=8,
                                      head_dim=128),
                           LoraConfig(r=16, target_modules=["gate_proj", "up_proj", "down_proj"],
                                      init_lora_weights=False))
    mlp = fusetune.patch_model(model.cuda(), tiled_mlp=False).base_model.model.model.layers[0].mlp
    x = torch.randn(1, 32768, 4096, device="cuda", dtype=torch.bfloat16)
    dy = torch.randn_like(x)
    results = {}
    for tile in (False, 4864):
        mlp._fusetune_tile = tile
        model.zero_grad(set_to_none=True)
        leaf = x.clone().requires_grad_()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        mlp(leaf).backward(dy)
        torch.cuda.synchronize()
        grads = {n: p.grad for n, p in mlp.named_parameters() if p.requires_grad}
        results[tile] = (torch.cuda.max_memory_allocated() - start, leaf.grad, grads)
    (whole_peak, whole_dx, whole_grads), (tiled_peak, tiled_dx, tiled_grads) = results[False], results[4864]
    assert_close(tiled_dx, whole_dx, torch.bfloat16, "dx")
    for name, g in tiled_grads.items():
        assert_close(g, whole_grads[name], torch.bfloat16, name)
    assert tiled_peak < whole_peak / 3, (tiled_peak, whole_peak)
