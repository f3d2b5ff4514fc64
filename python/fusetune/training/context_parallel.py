"""Context parallelism for long sequences: each process trains a contiguous shard of every row.

    import torch.distributed as dist
    from fusetune.training.context_parallel import context_parallel, shard_batch

    dist.init_process_group("nccl")                      # torchrun --nproc-per-node W train.py
    model = fusetune.patch_model(model)
    with context_parallel(model):
        batch = shard_batch({"input_ids": ids, "labels": labels}, pad_token_id=tokenizer.pad_token_id)
        loss = model(**batch, use_cache=False).loss      # this shard's part of the whole batch's mean
        loss.backward()                                  # inside too: checkpointed layers recompute attention
    # sum the trainable gradients over the processes (all_reduce), or let DDP / FSDP2 average them
    # and multiply the loss by W first

Every process passes the same whole batch to shard_batch and gets its 1/W of the tokens; the
attention layers exchange heads for tokens (fusetune.patching.context_parallel), so the sum of the
processes' losses and gradients is the loss and gradient of the unsharded batch.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from fusetune.patching.context_parallel import context_parallel

__all__ = ["context_parallel", "shard_batch"]


def shard_batch(batch: dict, group=None, pad_token_id: int = 0, ignore_index: int = -100) -> dict:
    """This process's shard of a batch: input_ids (B, S) and, when given, labels, position_ids
    (default 0..S-1; packed rows restart them per document) and a 2-D attention_mask, the same on
    every process of `group` (default: all). Rank r of W gets tokens [r*S/W, (r+1)*S/W) of
    input_ids, position_ids, attention_mask and labels, and the labels shifted (`shift_labels`, which
    the loss reads before labels: token t's target is token t+1's label, which a shard may not hold),
    with num_items_in_batch, the
    whole batch's label count, so each shard's loss is its part of the batch mean. Rows are padded
    at the end to a multiple of W (pad_token_id, positions carrying on, no labels): causal attention
    keeps those tokens out of every real token's view."""
    group = group or dist.group.WORLD
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    input_ids = batch["input_ids"]
    if input_ids.dim() != 2:
        raise ValueError(f"shard_batch: input_ids must be (batch, seq), got {tuple(input_ids.shape)}")
    rows, seq = input_ids.shape
    pad = -seq % world
    positions = batch.get("position_ids")
    if positions is None:
        positions = torch.arange(seq, device=input_ids.device).expand(rows, seq)
    labels = batch.get("labels")
    whole = {"input_ids": input_ids, "position_ids": positions.expand(rows, seq)}
    if labels is not None:
        shifted = torch.full_like(labels, ignore_index)
        shifted[:, :-1] = labels[:, 1:]
        whole["labels"], whole["shift_labels"] = labels, shifted
    if batch.get("attention_mask") is not None:
        whole["attention_mask"] = batch["attention_mask"]
    if pad:
        fill = {"input_ids": pad_token_id, "labels": ignore_index, "shift_labels": ignore_index, "attention_mask": 0}
        for name, t in list(whole.items()):
            tail = (whole["position_ids"][:, -1:] + torch.arange(1, pad + 1, device=t.device) if name == "position_ids"
                    else torch.full((rows, pad), fill[name], dtype=t.dtype, device=t.device))
            whole[name] = torch.cat([t, tail.to(t.dtype)], dim=1)
    shard = (seq + pad) // world
    out = {name: t[:, rank * shard:(rank + 1) * shard].contiguous() for name, t in whole.items()}
    if labels is not None:
        out["num_items_in_batch"] = int((whole["shift_labels"] != ignore_index).sum())
    return out
