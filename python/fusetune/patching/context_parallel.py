"""Context parallelism: one sequence sharded over the processes of a group (the Ulysses scheme).

Every part of a decoder works token by token except attention. With context parallelism each of W
processes holds a contiguous 1/W of the sequence (fusetune.training.context_parallel.shard_batch
cuts a batch so), and at every attention layer an all-to-all trades that split for a split of the
heads: each process receives the whole sequence for Hq/W query heads and Hk/W key/value heads, runs
fusetune's attention on it (the documents come from the gathered position ids, so packed rows stay
packed, and windows and softcaps apply as on one process), and a second all-to-all trades back.
Everything else, activations and checkpoints included, is 1/W per process; per layer each process
sends and receives 3/W of q/k/v and 1/W of the output. Key/value heads fewer than W are repeated up
to W (W must then be a multiple of them). Built on torch.distributed's all_to_all_single (NCCL,
gloo): both exchanges are differentiable, each one's gradient is the exchange the other way.
"""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

ATTRIBUTE = "_fusetune_context_parallel"  # the process group, on each attention module while enabled


def _exchange(x: torch.Tensor, split_dim: int, join_dim: int, group) -> torch.Tensor:
    """All-to-all: x cut into W pieces along split_dim, piece r sent to rank r; the pieces received
    are joined along join_dim in rank order."""
    world = dist.get_world_size(group)
    send = x.movedim(split_dim, 0)
    send = send.reshape(world, send.shape[0] // world, *send.shape[1:]).contiguous()
    received = torch.empty_like(send)
    dist.all_to_all_single(received, send, group=group)
    shape = list(x.shape)
    shape[split_dim] //= world
    shape[join_dim] *= world
    # (W, piece...) -> the piece's own dim order, then W just before join_dim, merged with it
    return received.movedim(1, split_dim + 1).movedim(0, join_dim).reshape(shape)


class ExchangeFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, split_dim, join_dim, group):
        ctx.dims = (split_dim, join_dim, group)
        return _exchange(x, split_dim, join_dim, group)

    @staticmethod
    def backward(ctx, grad):
        split_dim, join_dim, group = ctx.dims
        return _exchange(grad, join_dim, split_dim, group), None, None, None


def gather_sequence(t: torch.Tensor, group) -> torch.Tensor:
    """The whole sequence of a (..., S/W) tensor the processes hold in rank order (no gradient)."""
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts, dim=-1)


def check_heads(heads: int, kv_heads: int, world: int) -> None:
    """The heads split over `world` processes: query heads evenly, key/value heads evenly or repeated."""
    if heads % world or (kv_heads % world and world % kv_heads):
        raise ValueError(f"context parallel over {world} processes splits the attention heads: the model's {heads} "
                         f"query and {kv_heads} key/value heads need a process count that divides the query heads "
                         f"and divides or is a multiple of the key/value heads; change the process count (--nproc)")


def sharded_attention(group, attend, module, query, key, value, attention_mask, position_ids, **kwargs):
    """`attend` (Hugging Face's attention-function contract) over the whole sequence for this
    process's share of the heads; query/key/value (B, H, S/W, D) hold this process's tokens."""
    world = dist.get_world_size(group)
    heads, kv_heads = query.shape[1], key.shape[1]
    check_heads(heads, kv_heads, world)
    if query.shape[2] != key.shape[2] or (attention_mask is not None and attention_mask.dim() != 2):
        raise ValueError("context parallel is for training forwards (as many keys as queries, no KV cache); "
                         "generate outside fusetune.training.context_parallel")
    if position_ids is None:
        raise ValueError("context parallel needs each shard's position ids (its place in the whole sequence); "
                         "pass the batch that fusetune.training.context_parallel.shard_batch returns")
    if kv_heads % world:
        key, value = (t.repeat_interleave(world // kv_heads, 1) for t in (key, value))
    query, key, value = (ExchangeFunction.apply(t, 1, 2, group) for t in (query, key, value))
    positions = gather_sequence(position_ids, group)
    # every process gathers a mask (transformers passes none for a shard without padding, which may be
    # another's case): collectives must match; no padding anywhere gives no mask
    batch, shard = query.shape[0], position_ids.shape[-1]
    local = attention_mask if attention_mask is not None else \
        torch.ones(batch, shard, dtype=torch.int32, device=query.device)
    mask = gather_sequence(local.to(torch.int32), group)
    # one host sync per layer (DESIGN.md's rule bends here): without padding anywhere the rows keep SDPA's
    # fast causal path; an all-ones mask would send them to the padded route
    mask = None if bool(mask.all()) else mask
    kwargs.pop("fusetune_documents", None)  # those of this shard: the whole sequence's come from positions
    out, weights = attend(module, query, key, value, mask, position_ids=positions, **kwargs)
    return ExchangeFunction.apply(out, 1, 2, group), weights  # (B, S, Hq/W, D) -> (B, S/W, Hq, D)


@contextlib.contextmanager
def context_parallel(model, group=None):
    """Inside the block, every attention layer of a patched model runs sharded over the processes of
    `group` (default: all of them): each process passes its own contiguous shard of the sequence
    (shard_batch). Run the backward inside the block too: layers under activation checkpointing
    recompute their attention then. Outside it the model is as before. One process: nothing changes."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("context parallel runs over a torch.distributed process group: launch with torchrun and "
                           "call torch.distributed.init_process_group first")
    group = group or dist.group.WORLD
    # the attention modules patch_model switched to fusetune's attention (it marks each with its mode)
    modules = [m for m in model.modules() if m.__dict__.get("_fusetune_attention") not in (None, False)]
    if not modules:
        raise ValueError(f"context parallel runs through fusetune's attention, and {type(model).__name__} has none: "
                         f"patch it with fusetune.patch_model(model) (attention on, the default)")
    if dist.get_world_size(group) == 1:
        yield model
        return
    for module in modules:
        module.__dict__[ATTRIBUTE] = group
    try:
        yield model
    finally:
        for module in modules:
            module.__dict__.pop(ATTRIBUTE, None)
