"""What a stage of `fusetune train` minimises, one class per stage kind.

The loop (recipe/loop.py) draws each effective batch; the objective runs its forwards and
backwards in micro-batches with every term divided by a count over the whole effective batch, so
the micro-batch size never changes the update. Each returns (loss, tokens processed, metrics).

- LanguageModeling (sft, cpt): the mean cross-entropy per label token.
- Preference (dpo, orpo) on (prompt, chosen, rejected) pairs. DPO: -log sigmoid(beta * ((c - c_ref)
  - (r - r_ref))) with c, r the summed log-probabilities of the chosen and rejected replies and the
  reference the model at the stage's start (computed once, kept in the run's state so a resumed
  run uses the same). ORPO: the chosen reply's cross-entropy + beta * -log sigmoid(log odds(c) -
  log odds(r)), odds from the mean per-token probability, p / (1 - p); no reference.
- GroupRelative (grpo): per prompt, `generations` sampled completions scored by the user's reward
  function; each completion's advantage is its reward minus the group's mean, over the group's
  standard deviation; the loss -sum(advantage * log-prob of its tokens) / completion tokens (one
  policy update per sampling, so the clipped ratio of PPO is 1 and drops out; no KL term, as TRL's
  default beta = 0).
"""
from __future__ import annotations

import contextlib
import difflib
import importlib
import math
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from fusetune.ops.cross_entropy import cross_entropy
from fusetune.recipe.config import ConfigError, StageSection
from fusetune.recipe.data import IGNORE_INDEX, collate, end_of_turn, label_count
from fusetune.training import distributed
from fusetune.training.context_parallel import context_parallel, shard_batch
from fusetune.training.packing import pack_examples, pack_groups


def micro_batches(examples: list, size: int):
    for i in range(0, len(examples), size):
        yield examples[i:i + size]


@contextlib.contextmanager
def evaluating(model):
    """Eval mode (no dropout) without gradients, the mode before restored after."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _to(batch: dict, device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


def token_logprobs(model, rows: list[dict], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(log P of each label token given the tokens before it, [rows, length - 1], 0 off the labels;
    the label mask) for right-padded rows of input_ids and labels."""
    batch = _to(collate(rows, pad_id), device)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    targets = batch["labels"][:, 1:]
    losses = cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    mask = targets != IGNORE_INDEX
    return -losses.view(targets.shape) * mask, mask


class Objective:
    """What every objective shares: nothing to prepare, nothing to change for the batch-size finder."""

    watch_divergence = True  # a loss over twice the first step's is reported as divergence

    def prepare(self, model, examples, eval_examples, state, micro_batch, device, log):
        """Before the first step (and again on resume, with the checkpoint's state)."""

    def sizing(self):
        """A context in which accumulate runs for the batch-size finder, before prepare."""
        return contextlib.nullcontext()

    # (example, n) -> the example cut to n tokens for a memory trial (every token labelled: a cut
    # through a masked prompt would leave no label to compute a loss on), where the objective can cut one
    sizing_cut = None


class LanguageModeling(Objective):
    """sft and cpt: the mean cross-entropy per label token of the effective batch."""

    label = "loss (label tokens)"

    def __init__(self, pad_id: int, packing_length: int | None = None, context_parallel: bool = False):
        """packing_length: pack each micro-batch's examples into rows without padding, a micro-batch
        being up to micro_batch * packing_length tokens (None: padded micro-batches of micro_batch rows).
        context_parallel: with several processes, each runs every micro-batch's 1/N of the tokens
        (fusetune.training.context_parallel) instead of its share of the examples."""
        self.pad_id = pad_id
        self.packing_length = packing_length
        self.context_parallel = context_parallel

    @staticmethod
    def length(example: dict) -> int:
        return len(example["input_ids"])

    @staticmethod
    def sizing_cut(example: dict, n: int) -> dict:
        return {**example, "input_ids": example["input_ids"][:n], "labels": example["input_ids"][:n]}

    def _passes(self, model, examples, micro_batch, device, ranks=None):
        """(loss, tokens) of each micro-batch of this process's share of examples (all of them
        without ranks), every loss divided by the label count of all examples. The caller runs the
        backward before asking for the next: under context parallelism it must run inside the
        sharded attention's block (checkpointed layers recompute it)."""
        n_items = label_count(examples)
        split_sequence = ranks is not None and ranks.world > 1 and self.context_parallel
        every = examples
        if ranks is not None and not split_sequence:
            examples = ranks.share(examples)
        batches = self._batches(examples, micro_batch)
        if ranks is not None and not split_sequence and distributed.is_sharded(model):
            # FSDP gathers weights in every forward and sums gradients in every backward, all processes
            # together: one with fewer micro-batches (packing makes them differ; a small eval set may leave
            # it none) runs one again at weight 0
            filler = batches[-1] if batches else self._batches(every[:1], 1)[0]
            for _ in range(distributed.all_max(ranks, len(batches), device) - len(batches)):
                yield model(**_to(filler, device), use_cache=False).loss * 0, 0
        # no KV cache when packed: with one, transformers' own attention (an unpatched model) ignores the restarts
        options = {"num_items_in_batch": n_items, **({"use_cache": False} if self.packing_length or split_sequence
                                                     else {})}
        for batch in batches:
            batch = _to(batch, device)
            tokens = int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()
            if not split_sequence:
                yield model(**batch, **options).loss, tokens
                continue
            with context_parallel(model):
                shard = shard_batch(batch, pad_token_id=self.pad_id)
                del shard["num_items_in_batch"]  # that of this micro-batch: the whole step's counts
                yield model(**shard, **options).loss, tokens if ranks.main else 0  # counted once

    def _batches(self, examples, micro_batch) -> list[dict]:
        if self.packing_length:
            groups = pack_groups([len(e["input_ids"]) for e in examples], micro_batch * self.packing_length)
            return [pack_examples([examples[i] for i in group]) for group in groups]
        return [collate(chunk, self.pad_id) for chunk in micro_batches(examples, micro_batch)]

    def accumulate(self, model, examples, micro_batch, device, ranks=None):
        total, tokens = 0.0, 0
        for loss, n in self._passes(model, examples, micro_batch, device, ranks):
            loss.backward()
            total += loss.item()
            tokens += n
        return total, tokens, {}

    def evaluate(self, model, examples, micro_batch, device, ranks=None) -> float:
        """The mean loss per label token of `examples`, summed over micro-batches as one batch; exp
        of it is the perplexity. With ranks, every process measures its share (as in training) and
        each gets the sum."""
        with evaluating(model):
            loss = sum(loss.item() for loss, _ in self._passes(model, examples, micro_batch, device, ranks))
        return loss if ranks is None else distributed.all_sum(ranks, loss, device)


class Preference(Objective):
    """dpo and orpo on examples {"chosen": {input_ids, labels}, "rejected": {...}}."""

    def __init__(self, kind: str, beta: float, pad_id: int):
        self.kind, self.beta, self.pad_id = kind, beta, pad_id
        self._sizing = False
        self.label = "DPO loss" if kind == "dpo" else "ORPO loss (chosen cross-entropy + odds-ratio term)"

    @staticmethod
    def length(example: dict) -> int:
        return max(len(example["chosen"]["input_ids"]), len(example["rejected"]["input_ids"]))

    @staticmethod
    def sizing_cut(example: dict, n: int) -> dict:
        return {**example, **{side: LanguageModeling.sizing_cut(example[side], n) for side in ("chosen", "rejected")}}

    def _sums(self, model, chunk, device):
        """Summed log-probabilities and label counts of the chosen and the rejected replies."""
        logp, mask = token_logprobs(model, [e["chosen"] for e in chunk] + [e["rejected"] for e in chunk],
                                    self.pad_id, device)
        sums, counts = logp.sum(-1), mask.sum(-1)
        k = len(chunk)
        return sums[:k], sums[k:], counts[:k], counts[k:]

    def prepare(self, model, examples, eval_examples, state, micro_batch, device, log):
        """DPO's reference: the log-probabilities of every pair under the model as the stage starts
        (kept in the state: a resumed run, whose model has moved, reads them back)."""
        if self.kind != "dpo":
            return
        for name, rows in (("reference", examples), ("eval_reference", eval_examples)):
            if name not in state:
                state[name] = self._reference(model, rows, micro_batch, device)
            for e, ref in zip(rows, state[name]):
                e["reference"] = ref
        log(f"dpo: reference log-probabilities of {len(examples) + len(eval_examples)} pairs (the model at the "
            f"stage's start)")

    @contextlib.contextmanager
    def sizing(self):
        """The batch-size finder runs before the reference exists: the policy's own log-probabilities,
        detached, stand in for it (the same work and memory)."""
        self._sizing = True
        try:
            yield
        finally:
            self._sizing = False

    def _reference(self, model, rows, micro_batch, device) -> list[list[float]]:
        out = []
        with evaluating(model):
            for chunk in micro_batches(rows, micro_batch):
                c, r, _, _ = self._sums(model, chunk, device)
                out += [[a, b] for a, b in zip(c.tolist(), r.tolist())]
        return out

    def _loss(self, model, chunk, n_pairs: int, chosen_tokens: int, device):
        c, r, nc, nr = self._sums(model, chunk, device)
        if self.kind == "dpo":
            ref = torch.stack([c.detach(), r.detach()], 1) if self._sizing else \
                torch.tensor([e["reference"] for e in chunk], dtype=c.dtype, device=c.device)
            margin = self.beta * ((c - ref[:, 0]) - (r - ref[:, 1]))
            return -F.logsigmoid(margin).sum() / n_pairs, margin
        mean_c, mean_r = c / nc, r / nr  # mean per-token log-probability: log p
        # log odds = log p - log(1 - p); expm1 keeps 1 - p exact where p is near 1
        log_odds = (mean_c - torch.log(-torch.expm1(mean_c.clamp(max=-1e-6)))) - \
                   (mean_r - torch.log(-torch.expm1(mean_r.clamp(max=-1e-6))))
        return -c.sum() / chosen_tokens - self.beta * F.logsigmoid(log_odds).sum() / n_pairs, log_odds

    def _passes(self, model, examples, micro_batch, device):
        chosen_tokens = label_count([e["chosen"] for e in examples])
        for chunk in micro_batches(examples, micro_batch):
            yield self._loss(model, chunk, len(examples), chosen_tokens, device), chunk

    def accumulate(self, model, examples, micro_batch, device):
        total, tokens, wins = 0.0, 0, 0
        for (loss, margin), chunk in self._passes(model, examples, micro_batch, device):
            loss.backward()
            total += loss.item()
            wins += int((margin > 0).sum())
            tokens += sum(len(e["chosen"]["input_ids"]) + len(e["rejected"]["input_ids"]) for e in chunk)
        return total, tokens, {"chosen_wins": wins / len(examples)}

    def evaluate(self, model, examples, micro_batch, device) -> float:
        with evaluating(model):
            return sum(loss.item() for (loss, _), _ in self._passes(model, examples, micro_batch, device))


def load_reward(spec: str):
    """The function `spec` names (module:function or module.function), importable from the working
    folder; ConfigError naming what is missing otherwise."""
    module_name, sep, function = spec.partition(":") if ":" in spec else spec.rpartition(".")
    if not sep or not module_name or not function:
        raise ConfigError(f"stage.reward = {spec!r}: write module:function, e.g. rewards:length for a function "
                          f"length in rewards.py in the working folder")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # as `python -m` would: the user's rewards.py beside the config
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # a missing module, or one that fails as it imports
        raise ConfigError(f"stage.reward = {spec!r}: module {module_name!r} cannot be imported "
                          f"({type(err).__name__}: {err}); put it beside the config or in the working folder "
                          f"({os.getcwd()}), or install it") from err
    fn = getattr(module, function, None)
    if not callable(fn):
        names = [n for n in dir(module) if callable(getattr(module, n)) and not n.startswith("_")]
        close = difflib.get_close_matches(function, names, n=1)
        raise ConfigError(f"stage.reward = {spec!r}: {module_name} has no function {function!r}"
                          f"{f' (did you mean {close[0]!r}?)' if close else ''}")
    return fn


def reward_code(spec: str) -> str:
    """A digest of the source file of the reward function `spec` names (a fixed reward is another
    objective: a checkpoint trained on the old one must not be continued as if it were the same)."""
    import hashlib
    import inspect

    try:
        source = Path(inspect.getsourcefile(load_reward(spec))).read_bytes()
    except (TypeError, OSError):  # a built-in or compiled function: its name is all there is
        return "unknown"
    return "sha256 " + hashlib.sha256(source).hexdigest()[:16]


class GroupRelative(Objective):
    """grpo on examples {"prompt": as written, "prompt_ids", "columns": the row's other fields}."""

    label = "GRPO policy loss"
    watch_divergence = False  # the loss is advantage-weighted: its scale says nothing of divergence

    def __init__(self, stage: StageSection, tokenizer):
        self.stage, self.tokenizer, self.pad_id = stage, tokenizer, tokenizer.pad_token_id
        self.reward = load_reward(stage.reward)
        self.turn_stops = {tokenizer.eos_token_id, end_of_turn(tokenizer)}  # (rendering once, not per batch)

    @staticmethod
    def length(example: dict) -> int:
        return len(example["prompt_ids"])

    def _stops(self, model) -> list[int]:
        """The tokens a completion ends at: the tokenizer's end of sequence, the model's (an instruct
        model's generation config lists its end-of-turn token there) and the chat template's end of an
        assistant turn, where that is a special token (a template installed on a base model)."""
        configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        stops = set(self.turn_stops)
        stops.update(configured if isinstance(configured, (list, tuple)) else [configured])
        return sorted(t for t in stops if t is not None)

    def _sample(self, model, chunk, device) -> list[list[int]]:
        """`generations` completions of each prompt (left-padded together), each cut after its
        first stop token (_stops)."""
        from transformers import GenerationConfig

        g, eos = self.stage.generations, self._stops(model)
        width = max(len(e["prompt_ids"]) for e in chunk)
        ids = torch.tensor([[self.pad_id] * (width - len(e["prompt_ids"])) + e["prompt_ids"] for e in chunk],
                           device=device)
        mask = torch.tensor([[0] * (width - len(e["prompt_ids"])) + [1] * len(e["prompt_ids"]) for e in chunk],
                            device=device)
        config = GenerationConfig(do_sample=True, temperature=self.stage.temperature, top_k=0, top_p=1.0,
                                  max_new_tokens=self.stage.max_completion_length, num_return_sequences=g,
                                  pad_token_id=self.pad_id, eos_token_id=eos)
        with evaluating(model):
            out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)[:, width:].tolist()
        ends = [next((i + 1 for i, t in enumerate(row) if t in eos), len(row)) for row in out]
        return [row[:end] for row, end in zip(out, ends)]

    def _rewards(self, chunk, texts: list[str]) -> list[float]:
        g = self.stage.generations
        prompts = [e["prompt"] for e in chunk for _ in range(g)]
        columns = {k: [e["columns"][k] for e in chunk for _ in range(g)] for k in chunk[0]["columns"]}
        values = self.reward(prompts=prompts, completions=texts, **columns)
        try:
            values = [float(v) for v in values]
        except (TypeError, ValueError) as err:
            raise ConfigError(f"stage.reward {self.stage.reward}: returned {values!r:.80}, not a list of numbers") \
                from err
        if len(values) != len(texts) or not all(math.isfinite(v) for v in values):
            raise ConfigError(f"stage.reward {self.stage.reward}: returned {len(values)} values for {len(texts)} "
                              f"completions{'' if len(values) != len(texts) else ', some not finite'}: give one "
                              f"finite number per completion")
        return values

    def accumulate(self, model, examples, micro_batch, device):
        g = self.stage.generations
        groups = []  # (rows to train on, advantages) per micro-batch of prompts
        rewards = []
        for chunk in micro_batches(examples, micro_batch):
            completions = self._sample(model, chunk, device)
            values = self._rewards(chunk, self.tokenizer.batch_decode(completions, skip_special_tokens=True))
            rewards += values
            r = torch.tensor(values, dtype=torch.float64).view(len(chunk), g)
            advantages = (r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-4)
            rows = [{"input_ids": e["prompt_ids"] + c, "labels": [IGNORE_INDEX] * len(e["prompt_ids"]) + c}
                    for e, c in zip((e for e in chunk for _ in range(g)), completions)]
            groups.append((rows, advantages.view(-1)))
        completion_tokens = sum(label_count(rows) for rows, _ in groups)
        total, tokens = 0.0, 0
        for rows, advantages in groups:
            logp, _ = token_logprobs(model, rows, self.pad_id, device)
            loss = -(advantages.to(logp.device, logp.dtype)[:, None] * logp).sum() / completion_tokens
            loss.backward()
            total += loss.item()
            tokens += sum(len(row["input_ids"]) for row in rows)
        return total, tokens, {"reward": sum(rewards) / len(rewards)}

    def evaluate(self, model, examples, micro_batch, device) -> float:
        raise ConfigError("a grpo stage has no eval loss")  # config validation refuses its eval data


def objective_for(stage: StageSection, tokenizer, packing_length: int | None = None, context_parallel: bool = False):
    if stage.kind in ("dpo", "orpo"):
        return Preference(stage.kind, stage.beta, tokenizer.pad_token_id)
    if stage.kind == "grpo":
        return GroupRelative(stage, tokenizer)
    return LanguageModeling(tokenizer.pad_token_id, packing_length, context_parallel)
