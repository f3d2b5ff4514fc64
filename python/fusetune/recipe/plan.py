"""`fusetune plan`: the longest row a config's model trains on this GPU (training/plan.py), with
the model loaded, patched and prepared as `fusetune train` would (its adapters, checkpointing and
optimizer), before any data is read."""
from __future__ import annotations

import torch

from fusetune.api.loading import resolve_dtype
from fusetune.recipe.config import ConfigError, Recipe
from fusetune.recipe.train import describe_hardware, load_model, prepare_for_training
from fusetune.training.plan import SequencePlan, plan_longest_sequence


def run_plan(config, *, gpu_gb: float | None = None, probe_lengths=(4096, 8192), verify: bool = True,
             log=print) -> SequencePlan:
    if isinstance(config, Recipe):  # every stage trains the same model: the first one's settings
        name, _, config = config.stages[0]
        log(f"plan: the recipe's first stage, {name}")
    if not torch.cuda.is_available():
        raise ConfigError("it measures training steps in GPU memory, and this machine has no CUDA GPU (on "
                          "the CPU, model.max_seq_length is bound by host memory and time)")
    if config.stage.kind in ("dpo", "orpo", "grpo"):
        log(f"plan: a {config.stage.kind} stage's step runs several rows at once (chosen and rejected, or sampled "
            f"completions): the longest below is for one row, an upper bound for it")
    m = config.model
    device = torch.device("cuda")
    dtype = resolve_dtype(m.dtype, device.type)
    log(describe_hardware(device, dtype))
    model, _ = load_model(m, m.name, dtype, gguf_file=m.gguf_file)
    model, what = prepare_for_training(model, config)
    cap = None if gpu_gb is None else int(gpu_gb * 1e9)
    log(f"plan: {m.name}, {what}, lora.gradient_checkpointing: {config.lora.gradient_checkpointing}"
        + (f", GPU memory capped at {gpu_gb:g} GB" if cap else ""))
    plan = plan_longest_sequence(model, gpu_bytes=cap, probe_lengths=probe_lengths, verify=verify,
                                 eight_bit_optimizer=config.training.optim.endswith("8bit"), log=log)
    log(plan.report())
    return plan
