"""The longest sequence a model can train on this GPU, from measured per-token costs
(`fusetune plan`, or plan_longest_sequence() on a model of one's own).

A training step's peak GPU memory is a fixed part (weights, gradients of the trainable ones,
workspaces) plus a part that grows linearly with the tokens of the row (the layer inputs the
checkpoints keep, one layer's activations in its recompute, the loss's chunks): two steps at short
lengths measure both, and the fixed part plus the optimizer states still to come, subtracted from
what the GPU can hold, over the cost per token, is the longest row that should fit. The offloaded
checkpoints' layer inputs go to pinned host memory instead, under its budget (training/checkpoint.py
HostBudget): their bytes per token bound the length too, as past the budget they stay on the GPU.
A step at the projected length checks it; where it runs out of memory the length steps down by
STEP_DOWN until one fits.
"""
from __future__ import annotations

import gc
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from fusetune.training.checkpoint import HOST_BUDGET

HEADROOM = 0.02  # of the GPU's capacity, left to the allocator's fragmentation
STEP_DOWN = 0.05  # a verification that runs out of memory retries this much shorter


@dataclass
class Probe:
    tokens: int
    gpu_peak: int  # bytes allocated at the step's peak, the model's own included
    host_inputs: int  # pinned host bytes the offloaded layer inputs held at once
    seconds: float | None = None


@dataclass
class SequencePlan:
    probes: list[Probe]
    gpu_capacity: int  # bytes this process may allocate
    reserved: int  # bytes held back for the optimizer states a step will add
    host_budget: int | None  # pinned host bytes the offloaded checkpoints may hold (None: no offloading)
    gpu_per_token: float
    host_per_token: float
    projected: int  # the longest the costs allow, a multiple of `step`
    bound: str  # what bounds it: "GPU memory" or "host memory"
    longest: int  # the longest that ran (verified), else the projection
    verified: bool
    tried: list[Probe] = field(default_factory=list)  # the verification's steps, out-of-memory ones as gpu_peak -1
    native_context: int | None = None  # the model's max_position_embeddings

    def report(self) -> str:
        gb = 1e9
        lines = ["probes: " + "; ".join(f"{p.tokens} tokens: {p.gpu_peak / gb:.2f} GB GPU peak"
                                         + (f", {p.host_inputs / gb:.2f} GB pinned host" if p.host_inputs else "")
                                         for p in self.probes),
                 f"GPU: {self.gpu_per_token * 1000 / gb:.4f} GB per 1k tokens; {self.gpu_capacity / gb:.1f} GB usable, "
                 f"{self.reserved / gb:.2f} GB held back for the optimizer states"]
        if self.host_budget is not None:
            lines.append(f"host: {self.host_per_token * 1000 / gb:.4f} GB of offloaded layer inputs per 1k tokens; "
                         f"pinned budget {self.host_budget / gb:.1f} GB")
        lines.append(f"projected: {self.projected} tokens (bound by {self.bound})")
        for p in self.tried:
            lines.append(f"checked: {p.tokens} tokens " + (
                "ran out of GPU memory" if p.gpu_peak < 0 else
                f"fit, {p.gpu_peak / gb:.2f} GB peak, {p.tokens / p.seconds:,.0f} tokens/s (one step)"))
        lines.append(f"longest: {self.longest} tokens at batch 1 " + ("(ran)" if self.verified else "(projected, not run)")
                     + f": set model.max_seq_length to at most {self.longest}")
        if self.native_context and self.longest > self.native_context:
            lines.append(f"(past the model's native context of {self.native_context} tokens: a longer "
                         f"model.max_seq_length scales RoPE, which the model has not been trained for)")
        return "\n".join(lines)


def _release():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class CudaMeter:
    """Peak allocated bytes of a CUDA device, and what this process may allocate there (`cap`
    bytes if given: the allocator is capped there, as torch.cuda.set_per_process_memory_fraction)."""

    def __init__(self, device: torch.device, cap: int | None = None):
        self.device = device
        total = torch.cuda.get_device_properties(device).total_memory
        if cap is not None:
            if cap > total:
                raise ValueError(f"a cap of {cap / 1e9:.1f} GB is more than the GPU's {total / 1e9:.1f} GB")
            torch.cuda.set_per_process_memory_fraction(cap / total, device)
            self.capacity = cap
        else:  # what is free, plus what torch's allocator already holds
            free, _ = torch.cuda.mem_get_info(device)
            self.capacity = free + torch.cuda.memory_reserved(device)

    def reset(self) -> None:
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)

    def peak(self) -> int:
        torch.cuda.synchronize(self.device)
        return torch.cuda.max_memory_allocated(self.device)


def _measure(step: Callable[[int], None], meter, tokens: int) -> Probe:
    """One step of `tokens`: its GPU peak and the layer inputs its offloaded checkpoints held."""
    before = HOST_BUDGET.required_step
    HOST_BUDGET.required_step = None  # the most this step's inputs held, recorded as it ends
    meter.reset()
    started = time.perf_counter()
    try:
        step(tokens)
        peak = meter.peak()
    finally:
        held = HOST_BUDGET.required_step or 0
        HOST_BUDGET.required_step = max(before or 0, held) or None
    return Probe(tokens, peak, held, time.perf_counter() - started)


def plan_from_steps(step: Callable[[int], None], meter, *, probe_lengths=(4096, 8192), reserved: int = 0,
                    multiple: int = 1024, verify: bool = True, native_context: int | None = None,
                    log=print) -> SequencePlan:
    """The planner on any step: step(n) runs one training step of a row of n tokens (raising
    torch.cuda.OutOfMemoryError where it does not fit); meter has reset(), peak() and capacity."""
    short, long = sorted(probe_lengths)
    if not 0 < short < long:
        raise ValueError(f"probe lengths {probe_lengths}: two different positive lengths")
    measured = []
    for tokens in (short, short, long):  # the first unmeasured: one-time allocations (workspaces, compiles)
        try:
            measured.append(_measure(step, meter, tokens))
        except torch.cuda.OutOfMemoryError:
            _release()
            raise torch.cuda.OutOfMemoryError(
                f"out of GPU memory in a step of {tokens} tokens, a probe: the model alone nearly "
                f"fills the GPU; load it in 4 bits (model.load_in_4bit: true), turn on "
                f"lora.gradient_checkpointing: fusetune, or probe shorter rows (--probe)") from None
        _release()
    probes = measured[1:]
    for p in probes:
        log(f"plan: {p.tokens} tokens: {p.gpu_peak / 1e9:.2f} GB GPU peak")
    a, b = probes
    gpu_per_token = max(0.0, (b.gpu_peak - a.gpu_peak) / (b.tokens - a.tokens))
    host_per_token = max(0.0, (b.host_inputs - a.host_inputs) / (b.tokens - a.tokens))
    room = meter.capacity * (1 - HEADROOM) - reserved - b.gpu_peak
    by_gpu = b.tokens + room / gpu_per_token if gpu_per_token else math.inf
    budget = HOST_BUDGET.limit if host_per_token else None
    by_host = b.tokens + (budget - b.host_inputs) / host_per_token if budget is not None else math.inf
    bound = "GPU memory" if by_gpu <= by_host else "host memory"
    best = min(by_gpu, by_host)
    if math.isinf(best):
        raise ValueError("the probes' memory did not grow with their length: probe longer rows (--probe) to "
                         "measure a cost per token")
    projected = max(0, int(best) // multiple * multiple)
    plan = SequencePlan(probes, meter.capacity, reserved, budget, gpu_per_token, host_per_token, projected, bound,
                        longest=projected, verified=False, native_context=native_context)
    if not verify:
        return plan
    if projected <= b.tokens:  # the probes are the longest that ran
        plan.longest, plan.verified = b.tokens, True
        return plan
    tokens = projected
    while tokens > b.tokens:
        try:
            plan.tried.append(_measure(step, meter, tokens))
        except torch.cuda.OutOfMemoryError:
            plan.tried.append(Probe(tokens, -1, 0))
            log(f"plan: {tokens} tokens ran out of GPU memory")
            _release()
            tokens = min(tokens - multiple, int(tokens * (1 - STEP_DOWN)) // multiple * multiple)
            continue
        _release()
        log(f"plan: {tokens} tokens fit ({plan.tried[-1].gpu_peak / 1e9:.2f} GB GPU peak)")
        plan.longest, plan.verified = tokens, True
        return plan
    plan.longest, plan.verified = b.tokens, True
    return plan


def training_step(model, vocab_size: int | None = None, seed: int = 0) -> Callable[[int], None]:
    """step(n): forward and backward of one row of n random tokens (its own labels) through model,
    the gradients dropped after."""
    device = next(model.parameters()).device
    vocab = vocab_size or model.config.get_text_config().vocab_size

    def step(tokens: int) -> None:
        ids = torch.randint(vocab, (1, tokens), generator=torch.Generator().manual_seed(seed)).to(device)
        was_training = model.training
        model.train()
        try:
            model(input_ids=ids, labels=ids).loss.backward()
        finally:
            model.zero_grad(set_to_none=True)
            model.train(was_training)

    return step


def optimizer_state_bytes(model, eight_bit: bool = False) -> int:
    """What AdamW's two moments will take for the trainable parameters (a byte each in 8 bits)."""
    return sum(2 * p.numel() * (1 if eight_bit else p.element_size()) for p in model.parameters() if p.requires_grad)


def plan_longest_sequence(model, *, gpu_bytes: int | None = None, probe_lengths=(4096, 8192), multiple: int = 1024,
                          verify: bool = True, eight_bit_optimizer: bool = False, log=print) -> SequencePlan:
    """The longest row of one (batch 1) that `model` (as prepared for training: patched, with its
    adapters and checkpointing) trains on its CUDA GPU, capped at gpu_bytes if given."""
    device = next(model.parameters()).device
    if device.type != "cuda":
        raise ValueError(f"planning measures GPU memory: the model is on {device}; load it on a CUDA GPU")
    native = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    return plan_from_steps(training_step(model), CudaMeter(device, gpu_bytes), probe_lengths=probe_lengths,
                           reserved=optimizer_state_bytes(model, eight_bit_optimizer), multiple=multiple,
                           verify=verify, native_context=native, log=log)
