"""The training loop of `fusetune train`: effective batches split into micro-batches (gradient
accumulation normalised by the effective batch's label count, so any micro-batch size gives the
same update), AdamW with a warm-up + decay schedule, a progress bar, and checkpoints that resume
(recipe/checkpoints.py): resuming replays the same sample order, so an interrupted run ends
bit for bit where an uninterrupted one would. Ctrl-C stops at the next step with a checkpoint; a
non-finite loss or gradient stops before it reaches the weights.
"""
from __future__ import annotations

import math
import signal
import sys
import threading
import time
from pathlib import Path

import torch

from fusetune.api.tokens import embedding_param_groups
from fusetune.recipe.batch_size import OutOfMemory, find_longest, size_micro_batch
from fusetune.recipe.checkpoints import checkpoints, load_checkpoint, rows_digest, save_checkpoint, trainable_parameters
from fusetune.recipe.config import ConfigError, TrainingConfig
from fusetune.recipe.memory import peak_bytes
from fusetune.recipe.reporting import Reporters
from fusetune.training import distributed
from fusetune.training.distributed import Ranks
from fusetune.training.plan import optimizer_state_bytes


def total_steps(cfg: TrainingConfig, n_examples: int) -> int:
    if cfg.max_steps is not None:
        return cfg.max_steps
    return max(1, math.ceil(cfg.epochs * n_examples / cfg.effective_batch_size))


def sample_indices(n: int, seed: int, start: int, count: int) -> list[int]:
    """Samples start .. start+count-1 of the stream of epochs, each a fresh permutation."""
    out, orders = [], {}
    for k in range(start, start + count):
        epoch = k // n
        if epoch not in orders:
            orders[epoch] = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        out.append(orders[epoch][k % n])
    return out


def accumulate(objective, model, examples: list[dict], micro_batch: int, device, ranks: Ranks = Ranks()
               ) -> tuple[float, int, dict]:
    """Forward + backward of one effective batch in micro-batches (recipe/objectives.py); grads as
    for the whole batch. Returns (loss, tokens processed, the objective's metrics). With several
    processes each trains its share, and the loss, tokens and gradients are summed across them."""
    if ranks.world == 1:
        return objective.accumulate(model, examples, micro_batch, device)
    loss, tokens, metrics = objective.accumulate(model, examples, micro_batch, device, ranks)
    if not distributed.is_sharded(model):  # FSDP sums them in every backward
        distributed.sum_gradients(ranks, list(trainable_parameters(model).values()))
    return distributed.all_sum(ranks, loss, device), int(distributed.all_sum(ranks, tokens, device)), metrics


def pick_micro_batch(model, examples: list[dict], objective, cfg: TrainingConfig, device, log) -> int:
    """training.micro_batch_size, or ("auto") the batch-size finder on the longest examples (GPU);
    on the CPU auto is the whole effective batch. On a GPU a size that is set is tried first on
    the longest examples: one that does not fit is refused now, naming the size that does, rather
    than at the step that draws them."""
    upper = cfg.effective_batch_size
    chosen = None if cfg.micro_batch_size == "auto" else min(cfg.micro_batch_size, upper)

    def untried(size: int, why: str) -> int:
        log(f"micro-batch: {size} ({'training.micro_batch_size' if chosen else why}); "
            f"{math.ceil(upper / size)} micro-batches per step")
        return size

    if device.type != "cuda":
        return untried(chosen or upper, "auto on the CPU: no finder, the whole effective batch")
    if distributed.is_sharded(model) or getattr(objective, "context_parallel", False):
        # the finder's out-of-memory trials would leave the processes out of step
        return untried(chosen or 1, f"auto under {'fsdp' if distributed.is_sharded(model) else 'context parallel'}: "
                                    f"no finder")
    longest = sorted(examples, key=objective.length, reverse=True)[:upper]
    # the trials run no optimizer step: hold back what AdamW's two moments will take (a byte each in 8 bits)
    reserve = torch.empty(optimizer_state_bytes(model, cfg.optim.endswith("8bit")), dtype=torch.uint8, device=device)

    def trial(rows: list[dict]):
        """One forward and backward of rows as one micro-batch, its gradients dropped."""
        try:
            with objective.sizing():
                accumulate(objective, model, rows, len(rows), device)
        finally:
            model.zero_grad(set_to_none=True)

    try:
        size = size_micro_batch(lambda m: trial((longest * m)[:m]), chosen, upper, log)
    except OutOfMemory as err:
        if objective.sizing_cut is None:
            raise
        length = objective.length(longest[0])
        best = find_longest(lambda n: trial([objective.sizing_cut(longest[0], n)]), length, log=log)
        raise OutOfMemory(too_long_message(length, best)) from err
    finally:
        del reserve
    if chosen is not None and size < chosen:
        raise OutOfMemory(f"training.micro_batch_size {chosen}: {chosen} of the longest rows "
                          f"({objective.length(longest[0])} tokens) run out of GPU memory, {size} fit: set it to "
                          f"{size}, or to auto (the batch-size finder)")
    log(f"micro-batch: {size} ({'training.micro_batch_size' if chosen else 'batch-size finder'}, longest rows of "
        f"{objective.length(longest[0])} tokens); {math.ceil(upper / size)} micro-batches per step")
    return size


def too_long_message(length: int, longest_fit: int) -> str:
    """The error when one example of `length` tokens does not fit a step, naming what would."""
    what = (f"rows of up to {longest_fit} tokens fit: set model.max_seq_length to at most {longest_fit}"
            if longest_fit else f"not even {min(length, 256)} tokens fit: the model alone nearly fills the GPU")
    return (f"out of GPU memory with one example of {length} tokens (the longest; model.max_seq_length cuts rows); "
            f"{what}, or save memory with model.load_in_4bit: true and lora.gradient_checkpointing: fusetune")


def embedding_lr(cfg: TrainingConfig) -> float:
    """The learning rate of embed_tokens / lm_head trained beside LoRA: a tenth of the adapters' by default."""
    return cfg.learning_rate / 10 if cfg.embedding_learning_rate is None else cfg.embedding_learning_rate


def make_optimizer(params: list, cfg: TrainingConfig, device):  # params: tensors or parameter groups
    """torch's AdamW, or bitsandbytes' AdamW with 8-bit states (a quarter of the optimizer memory);
    the paged one moves its states to host memory under GPU memory pressure (CUDA only)."""
    if cfg.optim == "adamw":
        return torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    if cfg.optim.startswith("paged") and device.type != "cuda":
        raise ConfigError(f"training.optim = {cfg.optim}: paging moves optimizer states between GPU and host memory "
                          f"and needs a CUDA GPU; on this machine use adamw_8bit")
    try:
        import bitsandbytes as bnb
    except ImportError as err:
        raise ConfigError(f"training.optim = {cfg.optim} needs bitsandbytes: pip install bitsandbytes") from err
    kind = bnb.optim.PagedAdamW8bit if cfg.optim.startswith("paged") else bnb.optim.AdamW8bit
    return kind(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)


def _schedule(optimizer, cfg: TrainingConfig, steps: int):
    from transformers import get_scheduler

    name = {"constant": "constant_with_warmup"}.get(cfg.lr_scheduler, cfg.lr_scheduler)
    return get_scheduler(name, optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=steps)


class TrainingInterrupted(Exception):
    """The run stopped on request (Ctrl-C, SIGTERM) at a step boundary, after saving a checkpoint."""


class StoppedAtOnce(KeyboardInterrupt):
    """A second Ctrl-C (or SIGTERM) while the run was finishing its step."""


class StopRequests:
    """Ctrl-C (or SIGTERM, as a scheduler sends before preempting) asks the loop to stop at the next
    step boundary, where it saves a checkpoint; a second one stops at once. The handler only
    records the signal (printing from a signal handler can break an interrupted write)."""

    def __init__(self):
        self.signal, self._previous = None, {}

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.signal is not None:
            raise StoppedAtOnce(name)
        self.signal = name

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # signals reach the main thread only
            for sig in (signal.SIGINT, signal.SIGTERM):
                if signal.getsignal(sig) is not signal.SIG_IGN:  # a job started with the signal ignored keeps it so
                    self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class Progress:
    """A tqdm bar on a terminal; plain log lines every logging_steps elsewhere (logs, CI)."""

    def __init__(self, total: int, start: int, every: int, log, shown: bool = True):
        from tqdm.auto import tqdm

        self.every, self.log = every, log
        self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True) \
            if shown and sys.stderr.isatty() else None

    def update(self, step: int, total: int, fields: dict):
        if self.bar is not None:
            self.bar.set_postfix(fields, refresh=False)
            self.bar.update(1)
        elif step % self.every == 0 or step == total or step == 1:
            self.log(f"step {step:>4}/{total}  " + "  ".join(f"{k} {v}" for k, v in fields.items()))

    def close(self):
        if self.bar is not None:
            self.bar.close()


DIVERGENCE = 2.0  # a step's loss over this many times the first step's is reported as divergence


def _check_finite(step: int, loss: float, grad_norm: float, lr: float, output_dir: Path) -> None:
    """Stop before a non-finite loss or gradient reaches the weights (and any checkpoint)."""
    if math.isfinite(loss) and math.isfinite(grad_norm):
        return
    saved = checkpoints(output_dir)
    raise ConfigError(f"training diverged at step {step}: the loss is {loss} and the gradient norm {grad_norm} "
                      f"(learning rate {lr:.2e}); lower training.learning_rate and keep training.max_grad_norm "
                      f"set (1.0 by default); nothing of this step was applied or saved"
                      + (f", the last good checkpoint is {saved[-1]}" if saved else ""))


def train_loop(model, examples: list[dict], objective, cfg: TrainingConfig, output_dir: Path, device,
               micro_batch: int, log=print, *, fingerprint: dict, resume_from: Path | None = None,
               eval_examples: list[dict] = (), ranks: Ranks = Ranks()) -> dict:
    """Train `model` (its parameters that require grad) on the tokenized examples, continuing from
    the checkpoint `resume_from` (see checkpoints.resume_point) with `objective` (recipe/objectives.py);
    with eval_examples, the eval loss every cfg.eval_steps and after the last step. With several
    processes (`ranks`, training/distributed.py) each trains and evaluates its share of every batch
    and only rank 0 writes. Returns the run's record: losses and the objective's metrics per
    step, eval losses, tokens/s (of all processes), peak memory (of this one), steps, resumed_from,
    fingerprint."""
    steps = total_steps(cfg, len(examples))
    distributed.reshard(model)  # (the answers before training left FSDP's root unit gathered)
    params = list(trainable_parameters(model).values())
    if not params:
        raise ConfigError("the model has no trainable parameters: add LoRA adapters (the lora section)")
    # embed_tokens / lm_head beside LoRA (PEFT's modules_to_save, for added tokens) get their own, smaller
    # learning rate; a full fine-tune trains every weight at one
    beside_lora = any("modules_to_save" in name for name in trainable_parameters(model))
    groups = embedding_param_groups(model, cfg.learning_rate, embedding_lr(cfg)) if beside_lora else params
    optimizer = make_optimizer(groups, cfg, device)
    scheduler = _schedule(optimizer, cfg, steps)
    # the held-out rows are not in the fingerprint (they do not change the weights), but their losses are
    # measured against each other: a resume with other rows keeps the earlier losses apart
    held_out = rows_digest(eval_examples)
    state = {"step": 0, "consumed": 0, "losses": [], "metrics": [], "eval": [], "tokens": 0,
             "fingerprint": fingerprint, "eval_rows": held_out}
    if resume_from is not None:
        state = load_checkpoint(resume_from, model, optimizer, scheduler)
        log(f"resumed from {resume_from} (step {state['step']} of {steps})")
        if state.get("eval_rows") != held_out and state["eval"]:
            log(f"the held-out rows are not those {resume_from.name} measured its eval losses on: they are kept apart "
                f"(summary.json eval_before_resume), and this run's are measured from here on")
            state["eval_before_resume"] = state.pop("eval") + state.get("eval_before_resume", [])
            state["eval"] = []
        state["eval_rows"] = held_out
    objective.prepare(model, examples, list(eval_examples), state, micro_batch, device, log)
    reporters = Reporters(cfg.report_to if ranks.main else [], output_dir, fingerprint)
    model.train()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    first_step = state["step"]
    progress = Progress(steps, first_step, cfg.logging_steps, log, shown=ranks.main)
    run_tokens, run_seconds = 0, 0.0  # this process's training steps only (not loading, not saving)
    warned = False

    state["micro_batch"] = micro_batch  # a resumed run with micro_batch_size auto takes the same (bit for bit)

    sharded = distributed.is_sharded(model)  # FSDP: every process takes part in every forward and gather

    def save():
        saved = save_checkpoint(output_dir, model, optimizer, scheduler, state, cfg.save_total_limit,
                                write=ranks.main) if ranks.main or sharded else None
        return distributed.from_main(ranks, saved)  # every process goes on (or stops) once it is written

    def eval_loss():  # (every process measures its share of the rows; their sum is the loss)
        try:
            loss = objective.evaluate(model, eval_examples, micro_batch, device,
                                      **({"ranks": ranks} if ranks.world > 1 else {}))
        except torch.cuda.OutOfMemoryError as err:  # evaluation holds the logits of whole rows
            raise ConfigError(f"out of GPU memory measuring the eval loss at step {state['step']} (micro-batch "
                              f"{micro_batch}): set training.micro_batch_size lower, or hold out fewer or shorter "
                              f"rows (data.eval_split)") from err
        state["eval"].append({"step": state["step"], "loss": loss, "perplexity": math.exp(min(loss, 700.0))})
        log(f"eval at step {state['step']}: loss {loss:.4f}, perplexity {state['eval'][-1]['perplexity']:,.2f} "
            f"({len(eval_examples)} held-out rows)")
        reporters.log(state["step"], {"eval/loss": loss, "eval/perplexity": state["eval"][-1]["perplexity"]})

    if eval_examples and state["step"] == 0:
        eval_loss()  # the baseline the trained model is measured against
    try:
        with StopRequests() as stop:
            while state["step"] < steps:
                start = time.perf_counter()
                batch = [examples[i] for i in sample_indices(len(examples), cfg.seed, state["consumed"],
                                                             cfg.effective_batch_size)]
                loss, tokens, metrics = accumulate(objective, model, batch, micro_batch, device, ranks)
                lr = scheduler.get_last_lr()[0]
                # the norm is measured even without clipping: a non-finite one must stop the run
                grad_norm = float(distributed.full_tensor(
                    torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm or float("inf"))))
                _check_finite(state["step"] + 1, loss, grad_norm, lr, output_dir)
                if objective.watch_divergence and state["losses"] and not warned and \
                        loss > DIVERGENCE * state["losses"][0]:
                    warned = True
                    log(f"warning: the loss {loss:.4f} at step {state['step'] + 1} is over {DIVERGENCE:g}x the first "
                        f"step's {state['losses'][0]:.4f}: training may be diverging; lower training.learning_rate "
                        f"(now {cfg.learning_rate:g})")
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                state["step"] += 1
                state["consumed"] += len(batch)
                state["losses"].append(loss)
                state.setdefault("metrics", []).append(metrics)  # (absent from checkpoints of before stages)
                state["tokens"] += tokens
                run_tokens += tokens
                run_seconds += time.perf_counter() - start
                rate = run_tokens / run_seconds
                memory = peak_bytes(device) / 2**30
                shown = {k: f"{v:.3g}" for k, v in metrics.items()}
                progress.update(state["step"], steps, {"loss": f"{loss:.4f}", **shown, "tok/s": f"{rate:,.0f}",
                                                       "lr": f"{lr:.2e}", "mem": f"{memory:.2f}GiB"})
                reporters.log(state["step"], {"train/loss": loss, "train/learning_rate": lr,
                                              "train/tokens_per_s": rate, "train/grad_norm": grad_norm,
                                              "train/peak_memory_gib": memory,
                                              **{f"train/{k}": v for k, v in metrics.items()}})
                if eval_examples and (state["step"] == steps or
                                      (cfg.eval_steps and state["step"] % cfg.eval_steps == 0)):
                    eval_loss()
                if distributed.any_rank(ranks, stop.signal is not None, device):
                    saved = save()
                    rerun = ("set training.resume: auto (it is false) and run the same command" if cfg.resume is False
                             else "run the same command again")
                    raise TrainingInterrupted(
                        f"stopped by {stop.signal or 'another process'} after step {state['step']} of {steps}, before writing the results; "
                        f"saved {saved}: {rerun} to resume from it")
                if cfg.save_steps and state["step"] % cfg.save_steps == 0 and state["step"] < steps:
                    save()
    except torch.cuda.OutOfMemoryError as err:
        last = checkpoints(output_dir)
        raise ConfigError(f"out of GPU memory at step {state['step'] + 1} (micro-batch {micro_batch}): set "
                          f"training.micro_batch_size lower, lower model.max_seq_length, or set model.load_in_4bit: "
                          f"true; " + (f"rerunning resumes from {last[-1]}" if last else "no checkpoint was written yet")
                          ) from err
    finally:
        progress.close()
        reporters.close()
    if cfg.save_steps and state["step"] > first_step:
        save()  # the final state: a run stopped while writing its results resumes here, not from the start
    kept_apart = {"eval_before_resume": state["eval_before_resume"]} if "eval_before_resume" in state else {}
    return {"losses": state["losses"], "metrics": state.get("metrics", []), "eval": state["eval"], **kept_apart,
            "eval_rows": held_out, "steps": steps,
            "resumed_from": str(resume_from) if resume_from else None,
            "tokens_per_s": run_tokens / run_seconds if run_seconds else 0.0,
            "peak_memory_gib": peak_bytes(device) / 2**30, "micro_batch": micro_batch, "fingerprint": fingerprint}
