"""Saved tensors by name for the fused LoRA autograd Functions.

A Function describes what it keeps for backward as a NamedTuple whose fields are tensors (or None)
or lists of them (one entry per projection). save() flattens it into ctx.save_for_backward, so
that saved-tensor hooks (checkpointing, offloading) see every tensor, masks included; load()
rebuilds the NamedTuple in backward.
"""
from __future__ import annotations

from typing import NamedTuple


def _is_group(field) -> bool:
    return isinstance(field, (list, tuple))


def save(ctx, tensors: NamedTuple) -> None:
    ctx.saved_layout = type(tensors), [len(f) if _is_group(f) else None for f in tensors]
    ctx.save_for_backward(*(t for f in tensors for t in (f if _is_group(f) else (f,))))


def load(ctx) -> NamedTuple:
    """The NamedTuple given to save(), groups as lists."""
    kind, sizes = ctx.saved_layout
    flat = iter(ctx.saved_tensors)
    return kind(*(next(flat) if size is None else [next(flat) for _ in range(size)] for size in sizes))
