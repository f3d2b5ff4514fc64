"""Offloaded activation checkpointing: each decoder layer keeps only its input, and keeps it in
pinned CPU memory instead of on the GPU.

Plain checkpointing (recompute every layer in backward) still holds one (batch, seq, hidden)
input per layer on the GPU: 32 x 67 MB for Llama-3.1-8B at 2 x 4096 tokens. Here the forward
copies that input to the host on a side stream (overlapping the next layers' compute) and frees
the GPU copy; backward brings it back (prefetched on the side stream while the layer after it
runs its backward), replays the layer with the RNG state of the forward (LoRA
dropout draws the same masks) and backpropagates through it. The pinned memory is budgeted
(HOST_BUDGET): past the budget, layer inputs stay on the GPU rather than swap the host. On a CPU model there is nothing to
offload: the input is kept as it is (the recompute logic is the same, which is what CPU tests check).

Hugging Face decoder layers call `module._gradient_checkpointing_func(layer_forward, *args)`;
enable_offloaded_checkpointing(model) turns checkpointing on and installs `offloaded_checkpoint`
as that function.
"""
from __future__ import annotations

import functools
import logging
import os
import weakref

import torch

from fusetune.lora.projection import shared_casts
from fusetune.ops.tiling import ForwardState

logger = logging.getLogger("fusetune")

_COPY_STREAMS: dict[torch.device, torch.cuda.Stream] = {}
_LAST_SLOT: dict[torch.device, weakref.ref] = {}  # the slot of the latest offload per device
HOST_SHARE = 0.8  # of the host memory available at the first offload, split between a host's processes


class HostBudget:
    """Pinned host memory the offloaded layer inputs may hold at once. Past it a layer's input stays
    on the GPU (plain checkpointing for that layer) instead of driving the host into swap; the
    first time, a warning says how much was offloaded and what to change. The budget is taken
    once, at the first offload: HOST_SHARE of MemAvailable, divided among the processes of a
    launch on this host (LOCAL_WORLD_SIZE); set_limit replaces it."""

    def __init__(self):
        self.limit, self.held, self.warned = None, 0, False

    def set_limit(self, limit_bytes: int | None) -> None:
        self.limit, self.warned = limit_bytes, False

    def reserve(self, nbytes: int) -> bool:
        if self.limit is None:
            self.limit = _available_host_bytes() * HOST_SHARE // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        if self.held + nbytes > self.limit:
            if not self.warned:
                self.warned = True
                logger.warning("fusetune: offloaded checkpoints hold %.1f GB of pinned host memory, their budget "
                               "(%.1f GB); further layer inputs stay on the GPU. Free host memory or use a "
                               "shorter sequence if the GPU runs out", self.held / 1e9, self.limit / 1e9)
            return False
        self.held += nbytes
        return True

    def release(self, nbytes: int) -> None:
        self.held -= nbytes


def _available_host_bytes() -> int:
    """MemAvailable of /proc/meminfo; where there is none, the physical memory."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


HOST_BUDGET = HostBudget()


def _copy_stream(device: torch.device) -> torch.cuda.Stream:
    if device not in _COPY_STREAMS:
        _COPY_STREAMS[device] = torch.cuda.Stream(device)
    return _COPY_STREAMS[device]


class _Slot:
    """One offloaded layer input. Forward copies it to pinned host memory on the side stream;
    backward takes it back, and first starts bringing back the input of the layer before (the
    next one backward will need), so the host-to-device copy overlaps this layer's backward."""

    def __init__(self, hidden: torch.Tensor):
        self.device = hidden.device
        self.prev = _LAST_SLOT.get(self.device)
        _LAST_SLOT[self.device] = weakref.ref(self)
        self.host, self.on_gpu, self.ready, self.reserved = hidden.detach(), None, None, 0
        self.budget = HOST_BUDGET  # (kept: a slot may be collected after the module's globals, at exit)
        # torch's pinned allocator hands out power-of-two blocks, which is what the host holds
        nbytes = 1 << max(0, hidden.numel() * hidden.element_size() - 1).bit_length()
        if hidden.is_cuda and self.budget.reserve(nbytes):
            self.reserved = nbytes
            stream = _copy_stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            self.host = torch.empty(hidden.shape, dtype=hidden.dtype, pin_memory=True)
            with torch.cuda.stream(stream):
                self.host.copy_(hidden.detach(), non_blocking=True)
                self.ready = torch.cuda.Event()
                self.ready.record(stream)
            hidden.record_stream(stream)  # its memory is not reused before the copy has read it

    def prefetch(self):
        if self.ready is None or self.on_gpu is not None or self.host is None:
            return
        stream = _copy_stream(self.device)
        with torch.cuda.stream(stream):
            stream.wait_event(self.ready)
            self.on_gpu = self.host.to(self.device, non_blocking=True)
            self.ready = torch.cuda.Event()
            self.ready.record(stream)

    def take(self) -> torch.Tensor:
        prev = self.prev() if self.prev is not None else None
        self.prev = None
        if self.ready is None:  # a CPU tensor: kept as it was
            hidden = self.host
        else:
            self.prefetch()
            current = torch.cuda.current_stream(self.device)
            current.wait_event(self.ready)
            hidden = self.on_gpu
            hidden.record_stream(current)
        self.host = self.on_gpu = None
        self._release()
        if prev is not None:
            prev.prefetch()
        return hidden

    def _release(self):
        if self.reserved:
            self.budget.release(self.reserved)
            self.reserved = 0

    def __del__(self):  # a graph dropped without its backward
        self._release()


class OffloadedCheckpointFunction(torch.autograd.Function):
    """forward(ctx, function, anchor, hidden, *args) -> function(hidden, *args) without a graph.
    `anchor` is an empty tensor that requires grad, so that backward runs even when hidden does
    not (the first layer over frozen embeddings): the layer's own parameters (LoRA) need it."""

    @staticmethod
    def forward(ctx, function, anchor, hidden, *args):
        if any(torch.is_tensor(a) and a.requires_grad for a in args):
            raise ValueError("offloaded_checkpoint: only the first argument (the hidden states) may require "
                             "grad; pass the others as keyword arguments or use torch.utils.checkpoint")
        ctx.function, ctx.args, ctx.state = function, args, ForwardState(hidden.device)
        ctx.slot = _Slot(hidden)
        ctx.casts = {}  # the layer's adapters in the compute dtype, for its recompute and backward
        with torch.no_grad(), shared_casts(ctx.casts):
            return function(hidden, *args)

    @staticmethod
    def backward(ctx, *grads):
        hidden = ctx.slot.take().detach().requires_grad_()
        with ctx.state.replay(), shared_casts(ctx.casts):
            outputs = ctx.function(hidden, *ctx.args)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        pairs = [(o, g) for o, g in zip(outputs, grads) if torch.is_tensor(o) and o.requires_grad and g is not None]
        with shared_casts(ctx.casts):
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        ctx.casts = None
        return (None, None, hidden.grad) + (None,) * len(ctx.args)


def offloaded_checkpoint(function, hidden, *args, **kwargs):
    """Drop-in for torch.utils.checkpoint.checkpoint as Hugging Face layers call it: function's
    first positional argument is the hidden states (the only one that may require grad)."""
    if kwargs:
        function = functools.partial(function, **kwargs)
    if not torch.is_grad_enabled():  # nothing will run backward: no copy, no replay
        return function(hidden, *args)
    anchor = torch.empty(0, requires_grad=True)
    return OffloadedCheckpointFunction.apply(function, anchor, hidden, *args)


def enable_checkpointing(model) -> None:
    """Hugging Face's (non-reentrant) gradient checkpointing for a transformers model, under the
    installed release's name: activation_checkpointing_enable where it exists (newer releases
    deprecate gradient_checkpointing_enable), gradient_checkpointing_enable before."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def enable_offloaded_checkpointing(model) -> None:
    """Turn on Hugging Face gradient checkpointing for `model` (a transformers model, or a PEFT
    model around one) with offloaded_checkpoint as the checkpoint function of every layer."""
    base = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    if not getattr(base, "supports_gradient_checkpointing", False):
        raise ValueError(f"{type(base).__name__} does not support gradient checkpointing")
    base._set_gradient_checkpointing(enable=True, gradient_checkpointing_func=offloaded_checkpoint)
