"""`fusetune plan`: the longest row a config's model trains on this GPU (training/plan.py), with
the model loaded, patched and prepared as `fusetune train` would (its adapters, checkpointing and
optimizer), before any data is read."""
from __future__ import annotations

import torch

from fusetune.api.loading import resolve_dtype
from fusetune.recipe.config import ConfigError, Recipe
from fusetune.recipe.train import describe_hardware, load_model, prepare_for_training
from fusetune.training.checkpoint import HOST_BUDGET, host_share
from fusetune.training.plan import SequencePlan, plan_longest_sequence


def run_plan(config, *, gpu_gib: float | None = None, probe_lengths=(4096, 8192), verify: bool = True,
             processes: int = 1, log=print) -> SequencePlan:
    """`processes`: plan one GPU of a `fusetune train --nproc N` launch, whose N processes share this
    host's memory (each offloads into its share)."""
    kinds = {config.stage.kind} if not isinstance(config, Recipe) else {c.stage.kind for _, _, c in config.stages}
    if isinstance(config, Recipe):  # every stage trains the same model: the first one's settings
        name, _, config = config.stages[0]
        log(f"plan: the recipe's first stage, {name}")
    if not torch.cuda.is_available():
        raise ConfigError("it measures training steps in GPU memory, and this machine has no CUDA GPU (on "
                          "the CPU, model.max_seq_length is bound by host memory and time)")
    several = sorted(kinds & {"dpo", "orpo", "grpo"})
    if several:
        log(f"plan: a {'/'.join(several)} stage's step runs several rows at once (chosen and rejected, or sampled "
            f"completions): the longest below is for one row, an upper bound for those")
    m = config.model
    device = torch.device("cuda")
    dtype = resolve_dtype(m.dtype, device.type)
    log(describe_hardware(device, dtype))
    model, _ = load_model(m, m.name, dtype, gguf_file=m.gguf_file)
    # a cpt stage, or tokens added to the vocabulary, train embed_tokens and lm_head beside LoRA (as train's)
    embeddings = ("cpt" in kinds or bool(m.new_tokens)) and not m.full_finetuning
    model, what = prepare_for_training(model, config, modules_to_save=["embed_tokens", "lm_head"] if embeddings
                                       else None)
    cap = None if gpu_gib is None else int(gpu_gib * 2**30)
    if processes > 1:
        HOST_BUDGET.set_limit(host_share(processes))
        log(f"plan: one of {processes} processes on this host: pinned host memory for offloaded checkpoints "
            f"{HOST_BUDGET.limit / 1e9:.1f} GB (its share)")
    log(f"plan: {m.name}, {what}{', embed_tokens and lm_head trained' if embeddings else ''}, "
        f"lora.gradient_checkpointing: {config.lora.gradient_checkpointing}"
        + (f", GPU memory capped at {gpu_gib:g} GiB" if cap else ""))
    plan = plan_longest_sequence(model, gpu_bytes=cap, probe_lengths=probe_lengths, verify=verify,
                                 eight_bit_optimizer=config.training.optim.endswith("8bit"), log=log)
    log(plan.report())
    return plan
