"""The longest sequence a model can train on this GPU, from measured per-token costs
(`fusetune plan`, or plan_longest_sequence() on a model of one's own).

A training step's peak GPU memory is a fixed part (weights, gradients of the trainable ones,
workspaces, the optimizer states, held allocated while planning) plus a part that grows linearly
with the tokens of the row (the layer inputs the checkpoints keep, one layer's activations in its
recompute, the loss's chunks): two steps at short lengths measure both, and what the GPU holds
beyond the longer one, over the cost per token, gives the longest row that should fit. The
offloaded checkpoints' layer inputs go to pinned host memory instead, under its budget
(training/checkpoint.py HostBudget), in power-of-two blocks: they bound the length too, as past
the budget they stay on the GPU. A step at the projected length checks it; where it runs out of
memory the planner bisects down to within STEP_DOWN of the longest that runs.
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
STEP_DOWN = 0.05  # the check stops bisecting when the longest that ran is this close to the shortest that did not


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
    reserved: int  # bytes held allocated through every step for the optimizer states
    host_budget: int | None  # pinned host bytes the offloaded checkpoints may hold (None: no offloading)
    gpu_per_token: float
    host_per_token: float
    projected: int  # the longest the costs allow, a multiple of `step`
    bound: str  # what bounds it: "GPU memory" or "host memory"
    longest: int  # the longest that ran (verified), else the projection
    verified: bool
    tried: list[Probe] = field(default_factory=list)  # the verification's steps, out-of-memory ones as gpu_peak -1
    native_context: int | None = None  # the model's max_position_embeddings as loaded

    def report(self) -> str:
        gb = 1e9
        lines = ["probes: " + "; ".join(f"{p.tokens} tokens: {p.gpu_peak / gb:.2f} GB GPU peak"
                                         + (f", {p.host_inputs / gb:.2f} GB pinned host" if p.host_inputs else "")
                                         for p in self.probes),
                 f"GPU: {self.gpu_per_token * 1000 / gb:.4f} GB per 1k tokens; {self.gpu_capacity / gb:.1f} GB usable, "
                 f"{self.reserved / gb:.2f} GB held back for the optimizer states"]
        if self.host_budget is not None:
            lines.append(f"host: {self.host_per_token * 1000 / gb:.4f} GB of offloaded layer inputs per 1k tokens "
                         f"(in power-of-two pinned blocks); pinned budget {self.host_budget / gb:.1f} GB, this "
                         f"process's share")
        lines.append(f"projected: {self.projected} tokens (bound by {self.bound})")
        for p in self.tried:
            lines.append(f"checked: {p.tokens} tokens " + (
                "ran out of GPU memory" if p.gpu_peak < 0 else
                f"fit, {p.gpu_peak / gb:.2f} GB peak, {p.tokens / p.seconds:,.0f} tokens/s (one step)"))
        lines.append(f"longest: {self.longest} tokens at batch 1 " + ("(ran)" if self.verified else "(projected, not run)")
                     + f": set model.max_seq_length to at most {self.longest}")
        if self.native_context and self.longest > self.native_context:
            lines.append(f"(past the model's context as loaded, {self.native_context} tokens: a longer "
                         f"model.max_seq_length scales RoPE further than the model was trained for)")
        return "\n".join(lines)


def release_memory() -> None:
    """Free what a trial step left (its tensors, the allocator's cached blocks), as after each trial
    here and in the recipe's batch-size finder."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class CudaMeter:
    """Peak allocated bytes of a CUDA device, and what this process may allocate there: what is
    free plus what torch's allocator holds, or `cap` bytes below that (the allocator is capped
    there, as torch.cuda.set_per_process_memory_fraction does)."""

    def __init__(self, device: torch.device, cap: int | None = None, log=print):
        self.device = device
        free, total = torch.cuda.mem_get_info(device)
        self.capacity = free + torch.cuda.memory_reserved(device)
        if cap is not None:
            if cap > self.capacity:
                log(f"plan: {cap / 2**30:.1f} GiB asked for, {self.capacity / 2**30:.1f} GiB free for this process: "
                    f"planning for what is free")
            self.capacity = min(cap, self.capacity)
            torch.cuda.set_per_process_memory_fraction(self.capacity / total, device)

    def reset(self) -> None:
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)

    def peak(self) -> int:
        torch.cuda.synchronize(self.device)
        return torch.cuda.max_memory_allocated(self.device)


def _measure(step: Callable[[int], None], meter, tokens: int) -> Probe:
    """One step of `tokens`: its GPU peak and the most pinned host memory its offloaded layer
    inputs held at once."""
    meter.reset()
    HOST_BUDGET.last_step_inputs = 0
    started = time.perf_counter()
    step(tokens)
    peak = meter.peak()
    return Probe(tokens, peak, HOST_BUDGET.last_step_inputs, time.perf_counter() - started)


def _fits(step, meter, tokens: int, log) -> Probe | None:
    """_measure, or None where the step runs out of GPU memory (its memory released after)."""
    try:
        probe = _measure(step, meter, tokens)
    except torch.cuda.OutOfMemoryError:
        probe = None
    release_memory()  # (outside the except: its frames, which hold the failed step's tensors, are gone)
    log(f"plan: {tokens} tokens " + ("ran out of GPU memory" if probe is None else
                                     f"fit ({probe.gpu_peak / 1e9:.2f} GB GPU peak)"))
    return probe


def _host_bound(probe: Probe, budget: int, layers: int | None) -> float:
    """The longest row whose offloaded layer inputs fit the pinned budget. Each layer's input takes a
    power-of-two block of pinned memory (training/checkpoint.py), so with `layers` known the bound
    is the largest block size whose `layers` blocks fit, over the bytes per token of one input."""
    if layers is None:
        return budget * probe.tokens / probe.host_inputs
    block = 1 << int(math.log2(budget / layers))
    return block / (probe.host_inputs / layers / probe.tokens)


def plan_from_steps(step: Callable[[int], None], meter, *, probe_lengths=(4096, 8192), held: int = 0,
                    layers: int | None = None, multiple: int = 1024, verify: bool = True,
                    native_context: int | None = None, log=print) -> SequencePlan:
    """The planner on any step: step(n) runs one training step of a row of n tokens (raising
    torch.cuda.OutOfMemoryError where it does not fit); meter has reset(), peak() and capacity.
    `held`: bytes the caller keeps allocated through every step, standing for the optimizer states
    a training step adds (so every peak, and the check, count them). `layers`: how many layer
    inputs the offloaded checkpoints keep in pinned memory (None: treat their bytes as linear).
    The check runs the projection, then bisects between the longest that ran and the shortest that
    did not until they are STEP_DOWN (or `multiple` tokens) apart."""
    short, long = sorted(probe_lengths)
    if not 0 < short < long:
        raise ValueError(f"probe lengths {probe_lengths}: two different positive lengths")
    measured = []
    for tokens in (short, short, long):  # the first unmeasured: one-time allocations (workspaces, compiles)
        probe = _fits(step, meter, tokens, lambda *_: None)
        if probe is None:
            raise torch.cuda.OutOfMemoryError(
                f"out of GPU memory in a step of {tokens} tokens, a probe (with {held / 1e9:.2f} GB held for the "
                f"optimizer states): probe shorter rows (--probe), or save memory: model.load_in_4bit: true, "
                f"lora.gradient_checkpointing: fusetune, LoRA instead of full fine-tuning")
        measured.append(probe)
    probes = measured[1:]
    for p in probes:
        log(f"plan: {p.tokens} tokens: {p.gpu_peak / 1e9:.2f} GB GPU peak")
    a, b = probes
    gpu_per_token = max(0.0, (b.gpu_peak - a.gpu_peak) / (b.tokens - a.tokens))
    host_per_token = b.host_inputs / b.tokens
    by_gpu = b.tokens + (meter.capacity * (1 - HEADROOM) - b.gpu_peak) / gpu_per_token if gpu_per_token else math.inf
    budget = HOST_BUDGET.limit if b.host_inputs else None
    by_host = _host_bound(b, budget, layers) if budget is not None else math.inf
    best = min(by_gpu, by_host)
    if math.isinf(best):
        raise ValueError("the probes' memory did not grow with their length: probe longer rows (--probe) to "
                         "measure a cost per token")
    projected = max(0, int(best) // multiple * multiple)
    plan = SequencePlan(probes, meter.capacity, held, budget, gpu_per_token, host_per_token, projected,
                        "GPU memory" if by_gpu <= by_host else "host memory", longest=projected, verified=False,
                        native_context=native_context)
    if not verify:
        return plan
    fit, fail, tokens = b.tokens, None, projected  # the long probe ran, the optimizer states held
    while tokens > fit:
        probe = _fits(step, meter, tokens, log)
        plan.tried.append(probe or Probe(tokens, -1, 0))
        if probe is not None:
            fit = tokens
        else:
            fail = tokens
        if fail is None or fail - fit <= max(multiple, STEP_DOWN * fail):
            break
        tokens = (fit + fail) // 2 // multiple * multiple
    plan.longest, plan.verified = fit, True
    return plan


def training_step(model) -> Callable[[int], None]:
    """step(n): forward and backward of one row of n random tokens (its own labels) through model,
    the gradients dropped after."""
    device = next(model.parameters()).device
    vocab = model.config.get_text_config().vocab_size

    def step(tokens: int) -> None:
        ids = torch.randint(vocab, (1, tokens), generator=torch.Generator().manual_seed(0)).to(device)
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
    adapters and checkpointing) trains on its CUDA GPU beside its AdamW states, within gpu_bytes if
    given (the allocator is capped there while planning, and uncapped after)."""
    device = next(model.parameters()).device
    if device.type != "cuda":
        raise ValueError(f"planning measures GPU memory: the model is on {device}; load it on a CUDA GPU")
    text = model.config.get_text_config()
    meter = CudaMeter(device, gpu_bytes, log)
    held = optimizer_state_bytes(model, eight_bit_optimizer)
    try:
        states = torch.empty(held, dtype=torch.uint8, device=device)  # what AdamW's moments will take
        try:
            return plan_from_steps(training_step(model), meter, probe_lengths=probe_lengths, held=held,
                                   layers=getattr(text, "num_hidden_layers", None), multiple=multiple,
                                   verify=verify, native_context=getattr(text, "max_position_embeddings", None),
                                   log=log)
        finally:
            del states
    finally:
        if gpu_bytes is not None:
            torch.cuda.set_per_process_memory_fraction(1.0, device)
