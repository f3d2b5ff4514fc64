"""Offloaded activation checkpointing: each decoder layer keeps only its input, and keeps it in
pinned CPU memory instead of on the GPU.

Plain checkpointing (recompute every layer in backward) still holds one (batch, seq, hidden)
input per layer on the GPU: 32 x 67 MB for Llama-3.1-8B at 2 x 4096 tokens. Here the forward
copies that input to the host on a side stream (overlapping the next layers' compute) and frees
the GPU copy; backward brings it back (prefetched on the side stream while the layer after it
runs its backward), replays the layer with the RNG state of the forward (LoRA
dropout draws the same masks) and backpropagates through it. The outputs of fusetune's attention
kernel (output and log-sum-exp, fusetune.ops.attention.KeptAttention) are offloaded beside the
input, so the replay skips the attention forward (at long context most of a layer's FLOPs). The
pinned memory is budgeted (HOST_BUDGET): past the budget, layer inputs stay on the GPU and the
attention outputs are not kept (recomputed), rather than swap the host. On a CPU model there is
nothing to offload: the tensors are kept as they are (the recompute logic is the same, which is
what CPU tests check).

Hugging Face decoder layers call `module._gradient_checkpointing_func(layer_forward, *args)`;
enable_offloaded_checkpointing(model) turns checkpointing on and installs `offloaded_checkpoint`
as that function.
"""
from __future__ import annotations

import functools
import logging
import os
import types
import weakref

import torch

from fusetune.lora.projection import cast_together, shared_casts
from fusetune.ops.attention import KeptAttention, keeping_attention
from fusetune.ops.tiling import ForwardState

logger = logging.getLogger("fusetune")

_COPY_STREAMS: dict[torch.device, torch.cuda.Stream] = {}
_LAST_SLOT: dict[torch.device, weakref.ref] = {}  # the slot of the latest offload per device
HOST_SHARE = 0.8  # of the host memory available at the first offload, split between a host's processes


class HostBudget:
    """Pinned host memory the offloaded tensors may hold at once. Required ones (layer inputs) are
    refused only past the budget: such an input stays on the GPU (plain checkpointing for that
    layer) instead of driving the host into swap, and the first time a warning says so. Optional
    ones (kept attention outputs) are taken only while they leave room for the inputs still to come
    in this step: as many as the last completed step offloaded, each the size of this step's last
    (a step longer than any before needs more than the last one held), and none before a step has
    completed, so they never push an input onto the GPU. The budget is taken once, at the first
    offload (host_share); set_limit replaces it."""

    def __init__(self):
        self.limit, self.held, self.warned = None, 0, False
        self.required_held = 0  # the inputs' part of held
        self.required_step = None  # the most input bytes a completed step held at once
        self.last_step_inputs = 0  # the input bytes the last completed step held at once
        self._inputs_per_step = None  # how many inputs the last completed step offloaded (or tried to)
        self._required_peak = self._inputs_this_step = self._last_input = 0

    def set_limit(self, limit_bytes: int | None) -> None:
        self.limit, self.warned = limit_bytes, False

    def reserve(self, nbytes: int, required: bool = True) -> bool:
        if self.limit is None:
            self.limit = host_share()
        if not required:
            if self._inputs_per_step is None:
                return False
            to_come = max(self.required_step - self.required_held,
                          self._last_input * (self._inputs_per_step - self._inputs_this_step))
            if self.held + nbytes + max(0, to_come) > self.limit:
                return False
            self.held += nbytes
            return True
        self._inputs_this_step += 1
        self._last_input = nbytes
        if self.held + nbytes > self.limit:
            if not self.warned:
                self.warned = True
                logger.warning("fusetune: offloaded checkpoints hold %.1f GB of pinned host memory, their budget "
                               "(%.1f GB); further layer inputs stay on the GPU. Free host memory or use a "
                               "shorter sequence if the GPU runs out", self.held / 1e9, self.limit / 1e9)
            return False
        self.held += nbytes
        self.required_held += nbytes
        self._required_peak = max(self._required_peak, self.required_held)
        return True

    def release(self, nbytes: int, required_bytes: int = 0) -> None:
        self.held -= nbytes
        self.required_held -= required_bytes
        if required_bytes and self.required_held == 0:  # a step's backward has taken every input back
            self.required_step = max(self.required_step or 0, self._required_peak)
            self.last_step_inputs, self._inputs_per_step = self._required_peak, self._inputs_this_step
            self._required_peak = self._inputs_this_step = 0


def host_share(processes: int | None = None) -> int:
    """The pinned bytes one process's offloaded checkpoints may hold: HOST_SHARE of MemAvailable,
    divided among `processes` (default: the launch's LOCAL_WORLD_SIZE) on this host."""
    processes = processes or int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return _available_host_bytes() * HOST_SHARE // processes


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


def _block_bytes(t: torch.Tensor) -> int:
    """What a pinned copy of t holds: torch's pinned allocator hands out power-of-two blocks."""
    return 1 << max(0, t.numel() * t.element_size() - 1).bit_length()


class _Slot:
    """One layer's tensors kept for its backward: its input, and what its forward kept for the
    recompute (the attention outputs). Forward copies them to pinned host memory on the side
    stream; backward takes them back, and first starts bringing back those of the layer before
    (the next one backward will need), so the host-to-device copy overlaps this layer's backward."""

    def __init__(self, hidden: torch.Tensor):
        self.device = hidden.device
        self.prev = _LAST_SLOT.get(self.device)
        _LAST_SLOT[self.device] = weakref.ref(self)
        self.entries = []  # (tensor, on_host): a tensor kept as it is, or its pinned host copy
        self.back = None  # the host copies back on the GPU, one per entry (None for those kept as they are)
        self.ready = None  # the side stream's event after its last copy
        self.reserved = self.reserved_required = 0
        self.budget = HOST_BUDGET  # (kept: a slot may be collected after the module's globals, at exit)
        self.add([hidden], required=True)

    def add(self, tensors, required: bool) -> bool:
        """Keep `tensors` (detached) for backward: CUDA tensors go to pinned host memory when the
        budget takes them all; past it a required tensor stays on the GPU, optional ones are not
        kept (False). CPU tensors are kept as they are."""
        tensors = [t.detach() for t in tensors]
        if not tensors or not tensors[0].is_cuda:
            self.entries += [(t, False) for t in tensors]
            return True
        nbytes = sum(_block_bytes(t) for t in tensors)
        if not self.budget.reserve(nbytes, required):
            if required:
                self.entries += [(t, False) for t in tensors]
            return required
        self.reserved += nbytes
        self.reserved_required += nbytes if required else 0
        stream = _copy_stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for t in tensors:
                host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                host.copy_(t, non_blocking=True)
                t.record_stream(stream)  # its memory is not reused before the copy has read it
                self.entries.append((host, True))
            self.ready = torch.cuda.Event()
            self.ready.record(stream)
        return True

    def prefetch(self):
        if self.ready is None or self.back is not None or self.entries is None:
            return
        stream = _copy_stream(self.device)
        with torch.cuda.stream(stream):
            stream.wait_event(self.ready)
            self.back = [t.to(self.device, non_blocking=True) if on_host else None for t, on_host in self.entries]
            self.ready = torch.cuda.Event()
            self.ready.record(stream)

    def take(self) -> list[torch.Tensor]:
        """The kept tensors, in the order they were added, on their device."""
        if self.entries is None:
            raise RuntimeError("offloaded_checkpoint: a second backward through the same layers; their saved "
                               "inputs were handed back in the first (retain_graph=True is unsupported: use "
                               "fusetune.training.checkpoint.enable_checkpointing for it)")
        prev = self.prev() if self.prev is not None else None
        self.prev = None
        back = [None] * len(self.entries)
        if self.ready is not None:
            self.prefetch()
            current = torch.cuda.current_stream(self.device)
            current.wait_event(self.ready)
            back = self.back
            for t in back:
                if t is not None:
                    t.record_stream(current)
        tensors = [b if on_host else t for (t, on_host), b in zip(self.entries, back)]
        self.entries = self.back = None
        self._release()
        if prev is not None:
            prev.prefetch()
        return tensors

    def _release(self):
        if self.reserved:
            self.budget.release(self.reserved, self.reserved_required)
            self.reserved = self.reserved_required = 0

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
        layer = _layer_of(function)
        casts = cast_together(_CAST.get(layer, ()) if layer is not None else (), hidden.dtype, hidden.device)
        with torch.no_grad(), shared_casts(casts), keeping_attention(KeptAttention()) as attention:
            outputs = function(hidden, *args)
        # the recompute casts what this forward cast, again: held until the backward, the copies would add
        # to the peak
        ctx.cast = list(casts.used.values())
        if layer is not None:
            _CAST[layer] = ctx.cast
        del casts
        # the attention outputs spare the recompute its attention forward, where the host budget takes them
        ctx.slot.add(attention.tensors, required=False)
        ctx.attention_kinds = attention.kinds
        return outputs

    @staticmethod
    def backward(ctx, *grads):
        hidden, *kept = ctx.slot.take()
        hidden = hidden.requires_grad_()
        attention = KeptAttention(kept, ctx.attention_kinds) if kept else None
        casts = cast_together(ctx.cast, hidden.dtype, hidden.device)
        with ctx.state.replay(), shared_casts(casts), keeping_attention(attention):
            outputs = ctx.function(hidden, *ctx.args)
        if attention is not None:
            attention.check_all_taken()
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        pairs = [(o, g) for o, g in zip(outputs, grads) if torch.is_tensor(o) and o.requires_grad and g is not None]
        with shared_casts(casts):
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        return (None, None, hidden.grad) + (None,) * len(ctx.args)


def _layer_of(function) -> torch.nn.Module | None:
    """The module whose forward `function` runs, as Hugging Face layers pass it (`partial(forward,
    layer, ...)` in transformers 5.25, a partial of the bound `layer.__call__` before), or None."""
    module = None
    while isinstance(function, functools.partial) and module is None:
        if function.args and isinstance(function.args[0], torch.nn.Module):
            module = function.args[0]
        function = function.func
    module = module or getattr(function, "__self__", None)
    return module if isinstance(module, torch.nn.Module) else None


# layer -> the tensors its last forward cast to the compute dtype (its adapters), to cast ahead of the next
_CAST: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def offloaded_checkpoint(function, hidden, *args, **kwargs):
    """Drop-in for torch.utils.checkpoint.checkpoint as Hugging Face layers call it: function's
    first positional argument is the hidden states (the only one that may require grad)."""
    if kwargs:
        function = functools.partial(function, **kwargs)
    if not torch.is_grad_enabled():  # nothing will run backward: no copy, no replay
        return function(hidden, *args)
    anchor = torch.empty(0, requires_grad=True)
    return OffloadedCheckpointFunction.apply(function, anchor, hidden, *args)


def _base_model(model):
    """The transformers model inside a PEFT model (or the model itself)."""
    return model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model


def set_checkpointing(model, choice) -> None:
    """A checkpointing choice (lora.gradient_checkpointing, get_peft_model's use_gradient_checkpointing):
    "fusetune" or its alias "unsloth" offloaded, another true value Hugging Face's, false none."""
    if choice in ("fusetune", "unsloth"):
        enable_offloaded_checkpointing(model)
    elif choice:
        enable_checkpointing(model)


def enable_checkpointing(model) -> None:
    """Hugging Face's (non-reentrant) gradient checkpointing for a transformers model, under the
    installed release's name: activation_checkpointing_enable where it exists (newer releases
    deprecate gradient_checkpointing_enable), gradient_checkpointing_enable before. It replaces
    offloaded checkpointing where that was on."""
    vars(_base_model(model)).pop("_set_gradient_checkpointing", None)  # offloaded checkpointing's, if it was on
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def enable_offloaded_checkpointing(model) -> None:
    """Turn on Hugging Face gradient checkpointing for `model` (a transformers model, or a PEFT
    model around one) with offloaded_checkpoint as the checkpoint function of every layer."""
    base = _base_model(model)
    if not getattr(base, "supports_gradient_checkpointing", False):
        raise ValueError(f"{type(base).__name__} does not support gradient checkpointing")
    # (bound to the model: a deep copy's is bound to the copy)
    base._set_gradient_checkpointing = types.MethodType(_offloaded_stays, base)
    base._set_gradient_checkpointing(enable=True)


def _offloaded_stays(self, enable: bool = True, **kwargs) -> None:
    """A model's _set_gradient_checkpointing once offloaded checkpointing is on. Trainers turn
    checkpointing on again with torch's checkpoint (transformers' Trainer, TRL's, whose configs
    default to gradient_checkpointing=True), and TRL's DPO, GRPO, KTO and RLOO turn it off and on
    around every no-grad forward: the layers keep offloaded_checkpoint through all of it, until
    fusetune's enable_checkpointing chooses Hugging Face's."""
    if enable:
        if kwargs.get("gradient_checkpointing_func", offloaded_checkpoint) is not offloaded_checkpoint:
            logger.info("fusetune: checkpointing turned on again (e.g. by a trainer's gradient_checkpointing): the "
                        "layers keep fusetune's offloaded checkpointing")
        kwargs["gradient_checkpointing_func"] = offloaded_checkpoint
    type(self)._set_gradient_checkpointing(self, enable=enable, **kwargs)
