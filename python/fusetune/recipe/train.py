"""`fusetune train [CONFIG.yaml]`: load, add LoRA, train, answer the held-back prompts before and
after, save the adapter (and, if asked, a merged model or a GGUF), plot the loss."""
from __future__ import annotations

import contextlib
import io
import json
import time
from pathlib import Path

import torch

from fusetune.api import FastLanguageModel, get_chat_template, save_merged
from fusetune.api.gguf import check_exportable, check_method, save_gguf
from fusetune.api.loading import load_tokenizer, resolve_dtype, resolve_model_name
from fusetune.api.tokens import fit_embeddings, untie_embeddings
from fusetune.atomic import atomic_write
from fusetune.patching.context_parallel import check_heads
from fusetune.recipe.chat import reply
from fusetune.recipe.checkpoints import (claimed_output_dir, differences, fingerprint, read_state, read_summary,
                                        resume_point, weights_digest)
from fusetune.recipe.config import ConfigError, TrainConfig
from fusetune.recipe.data import read_new_tokens, stage_examples
from fusetune.recipe.evaluation import (generation_rouge, multiple_choice_accuracy, read_generations, read_run_data,
                                        rouge_line)
from fusetune.recipe.loop import embedding_lr, pick_micro_batch, train_loop
from fusetune.recipe.objectives import objective_for, reward_code
from fusetune.recipe.reporting import check_reporters
from fusetune.training import distributed
from fusetune.training.checkpoint import set_checkpointing
from fusetune.training.env import backend_report, gpus


def describe_hardware(device: torch.device, dtype: torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    if device.type == "cuda":
        g = gpus()[device.index or 0]
        return (f"hardware: {g['name']} ({g['memory_gib']} GiB, bf16 {'yes' if g['bf16'] else 'no'}) -> {name}, "
                f"fused ops on the {backend_report(device)['rms_norm']} backend")
    return f"hardware: CPU only (no GPU found) -> {name}, fused ops on the {backend_report(device)['rms_norm']} backend"


def answer(model, tokenizer, prompts: list[str], max_new_tokens: int) -> list[str]:
    """Greedy replies to each prompt as a one-turn chat (the model is left in training mode)."""
    FastLanguageModel.for_inference(model)
    replies = [reply(model, tokenizer, [{"role": "user", "content": p}], max_new_tokens) for p in prompts]
    FastLanguageModel.for_training(model)
    return replies


def plot_losses(losses: list[float], evals: list[dict], path: Path, title: str, ylabel: str) -> Path | None:
    """The training loss curve and the eval losses as a PNG (None when matplotlib is not installed)."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    ax.plot(range(1, len(losses) + 1), losses, marker="o", markersize=2.5, label="training")
    if evals:
        ax.plot([e["step"] for e in evals], [e["loss"] for e in evals], marker="s", label="eval (held out)")
        ax.legend()
    ax.set(xlabel="optimizer step", ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    image = io.BytesIO()
    fig.savefig(image, format="png")
    plt.close(fig)
    return atomic_write(path, image.getvalue())


def _finished(out: Path, run: dict) -> dict | None:
    """The summary of a finished run in `out` with the fingerprint `run` (None: none such)."""
    summary = read_summary(out)
    return summary if summary and isinstance(summary.get("fingerprint"), dict) \
        and not differences(summary["fingerprint"], run) else None


@contextlib.contextmanager
def _output_dir(path: Path, ranks: distributed.Ranks, log):
    """Rank 0 claims the output folder (its lock, the clean-up of interrupted saves); the other
    processes of a data-parallel run wait for that and write nothing there."""
    if ranks.main:
        with claimed_output_dir(path, log) as out:
            distributed.barrier(ranks)
            yield out
    else:
        distributed.barrier(ranks)
        yield path


def check_data_parallel(config, ranks: distributed.Ranks, recipe_stage: bool) -> None:
    """What `--nproc` runs: one sft or cpt stage, with an example per process and step at least."""
    if recipe_stage:
        raise ConfigError(f"recipes (stages:) train on one process; --nproc {ranks.world} runs a single sft or cpt "
                          f"stage")
    kind, batch = config.stage.kind, config.training.effective_batch_size
    if kind not in ("sft", "cpt"):
        raise ConfigError(f"stage.kind {kind} trains on one process; --nproc {ranks.world} runs sft and cpt")
    t = config.training
    if t.fsdp and config.model.load_in_8bit:
        raise ConfigError("training.fsdp shards 16-bit bases and keeps 4-bit ones whole on every process; 8-bit "
                          "bases are not supported with it yet: use load_in_4bit, or --nproc with fsdp off")
    if t.fsdp and t.optim.endswith("8bit"):
        raise ConfigError(f"training.fsdp shards AdamW's states, and bitsandbytes' 8-bit AdamW (optim: {t.optim}) "
                          f"does not run on shards: set training.optim: adamw")
    if t.fsdp and t.context_parallel:
        raise ConfigError("training.fsdp and training.context_parallel do not run together yet: choose one")
    if batch < ranks.world and not config.training.context_parallel:
        raise ConfigError(f"training.effective_batch_size {batch} is less than the {ranks.world} processes: each "
                          f"needs at least one example per step; raise it or lower --nproc")


def load_model(m, source: str, dtype: torch.dtype, tokenizer=None, gguf_file: str | None = None):
    """The model section's model (from `source`: its name, or an earlier stage's result), patched."""
    return FastLanguageModel.from_pretrained(source, max_seq_length=m.max_seq_length, dtype=dtype,
                                             load_in_4bit=m.load_in_4bit, load_in_8bit=m.load_in_8bit,
                                             full_finetuning=m.full_finetuning, gguf_file=gguf_file,
                                             trust_remote_code=m.trust_remote_code, tokenizer=tokenizer)


def prepare_for_training(model, config, *, continued: bool = False, modules_to_save: list[str] | None = None):
    """New LoRA adapters (the lora section), an earlier stage's adapter trained on (continued), or
    every weight (model.full_finetuning); the lora section's checkpointing in each case. Returns
    (model, what trains)."""
    lora = config.lora
    if config.model.full_finetuning or continued:
        set_checkpointing(model, lora.gradient_checkpointing)
        return model, "full fine-tuning" if config.model.full_finetuning else f"LoRA r={lora.r}, continued"
    model = FastLanguageModel.get_peft_model(model, r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                             target_modules=lora.target_modules, use_rslora=lora.use_rslora,
                                             use_gradient_checkpointing=lora.gradient_checkpointing,
                                             random_state=config.training.seed, modules_to_save=modules_to_save)
    return model, f"LoRA r={lora.r}"


def run_train(config: TrainConfig, log=print, *, start_from: dict | None = None, keep_finished: bool = False) -> dict:
    """The whole job. Everything a user can get wrong (the config, the data, the output folder, a
    checkpoint of other settings) is checked before the model loads. The results are written
    atomically, summary.json last: it marks the run finished.

    start_from: {"adapter": the result of the recipe stage this one continues (its adapter trains
    on, or its full model), "digest": that stage's settings}. keep_finished (recipes): a finished
    run of the same settings from the same start is kept rather than trained again (unless
    training.resume is false: start over)."""
    m, t, kind = config.model, config.training, config.stage.kind
    if config.output.save_gguf:  # fail now, not after training
        check_method(config.output.save_gguf)
    check_reporters(t.report_to)
    d = config.data
    rows, eval_rows, questions = read_run_data(config)
    generations = read_generations(d.generation_path) if d.generation_path else []
    new_tokens = read_new_tokens(m.new_tokens) if m.new_tokens else []
    prompts = config.data.eval_prompts
    ranks = distributed.launched_ranks()  # torchrun's processes (fusetune train --nproc), or one
    if ranks.world > 1:
        check_data_parallel(config, ranks, recipe_stage=bool(start_from or keep_finished))
        if not ranks.main:  # rank 0 alone reports and writes; under FSDP all answer and score (every forward
            log = lambda *_: None  # noqa: E731  (gathers weights from all processes)
            if not t.fsdp:
                prompts, questions, generations = [], [], []
    device = distributed.start(ranks)
    with _output_dir(Path(config.output.dir), ranks, log) as out:
        torch.manual_seed(t.seed)
        dtype = resolve_dtype(m.dtype, device.type)
        if m.full_finetuning and dtype == torch.float16:
            raise ConfigError("model.full_finetuning updates the weights themselves, and AdamW on float16 weights "
                              "underflows (this GPU has no bf16): set model.dtype: float32")
        log(describe_hardware(device, dtype))
        if ranks.world > 1:
            backend = 'NCCL' if device.type == 'cuda' else 'gloo'
            log(f"context parallel: {ranks.world} processes ({backend}), each training 1/{ranks.world} of every "
                f"micro-batch's tokens (attention exchanges heads for tokens); gradients summed once per step"
                if t.context_parallel else
                f"data parallel: {ranks.world} processes ({backend}), each training its share of every batch of "
                f"{t.effective_batch_size}; "
                + ("weights sharded (fsdp), gradients summed in every backward" if t.fsdp
                   else "gradients summed once per step"))
        elif t.fsdp or t.context_parallel:
            log(f"training.{'fsdp' if t.fsdp else 'context_parallel'} shares work between processes: one process "
                f"runs without it (--nproc N for more)")
        started = time.perf_counter()
        source = start_from["adapter"] if start_from else m.name  # a stage's saved adapter holds its tokenizer
        tokenizer = load_tokenizer(source, None if start_from else m.gguf_file, trust_remote_code=m.trust_remote_code)
        base_vocab = len(tokenizer)
        if m.chat_template:
            get_chat_template(tokenizer, m.chat_template)
        listed = len(tokenizer)
        if m.new_tokens:
            tokenizer.add_tokens(new_tokens)
            log(f"tokenizer: {len(tokenizer) - listed} new tokens of {len(new_tokens)} listed "
                f"({', '.join(new_tokens[:5])}{' ...' if len(new_tokens) > 5 else ''})" +
                ("" if m.full_finetuning else f"; embed_tokens and lm_head train at {embedding_lr(t):g}"))
        examples = stage_examples(kind, rows, tokenizer, config)
        eval_examples = stage_examples(kind, eval_rows, tokenizer, config, held_out=True) if eval_rows else []
        split_sequence = t.context_parallel and ranks.world > 1
        objective = objective_for(config.stage, tokenizer, m.max_seq_length if d.packing else None, split_sequence)
        lengths = [objective.length(e) for e in examples]
        # (cpt packs its rows into blocks: their count is no row count)
        dropped = (f" ({len(rows) - len(examples)} rows dropped: no answer to learn: no assistant turn, or none "
                   f"within max_seq_length)" if len(rows) > len(examples) and kind != "cpt" else "")
        held = (f"; {len(eval_examples)} held out for the eval loss ({d.eval_path or f'eval_split {d.eval_split:g}'})"
                if eval_examples else "")
        what_rows = {"sft": "conversations", "cpt": f"blocks of text (from {len(rows)} rows, packed)",
                     "dpo": "preference pairs", "orpo": "preference pairs", "grpo": "prompts"}[kind]
        in_loss = {"sft": 'assistant replies only' if d.train_on_responses_only else 'all tokens',
                   "cpt": "all tokens", "dpo": "the replies", "orpo": "the replies",
                   "grpo": f"{config.stage.generations} sampled completions each"}[kind]
        log(f"data: {len(examples)} {what_rows} from {d.path}, {min(lengths)}-{max(lengths)} tokens, "
            f"{in_loss} in the loss{dropped}{held}")
        run = fingerprint(config, examples, str(dtype).removeprefix("torch."), device.type)
        if new_tokens:
            run["model.new_tokens"] = new_tokens  # the tokens, not the file naming them
        folder, gguf = resolve_model_name(m.name, m.gguf_file)
        weights = weights_digest(str(Path(folder) / gguf) if gguf else folder)
        if weights:  # what the name holds now: other weights under it are not resumed onto
            run["model.weights"] = weights
        if start_from:
            run["stage.from"] = start_from["digest"]
        if kind == "grpo":
            run["stage.reward_code"] = reward_code(config.stage.reward)
        finished = _finished(out, run) if keep_finished and t.resume is not False else None
        if finished is not None:
            log(f"{out} holds this stage finished with the same settings: kept (delete it to train it again)")
            return finished
        reads = tuple(str(p) for p in (source, d.path, d.eval_path, d.choices_path, d.generation_path) if p)
        resume_from = distributed.from_main(ranks, resume_point(out, t.resume, run, log, reads) if ranks.main else None)
        model, tokenizer = load_model(m, source, dtype, tokenizer, gguf_file=None if start_from else m.gguf_file)
        grew = len(tokenizer) > base_vocab  # a chat template's or model.new_tokens' tokens
        if grew:  # their rows start at the mean of the others
            fit_embeddings(model, tokenizer, base_vocab)
        # new tokens' rows and a cpt stage's vocabulary train beside LoRA, apart from a tied head
        train_embeddings = (grew or kind == "cpt") and not m.full_finetuning and not start_from
        if train_embeddings and untie_embeddings(model):
            log("tokenizer: the output layer was tied to the input embeddings; it trains apart now (both saved)")
        if config.output.save_gguf:
            check_exportable(model, tokenizer)
        model, what = prepare_for_training(model, config, continued=bool(start_from),
                                           modules_to_save=["embed_tokens", "lm_head"] if train_embeddings else None)
        if ranks.world > 1:  # the same weights on every process, then each its own dropout masks
            torch.manual_seed(t.seed + ranks.rank)
        if t.fsdp and ranks.world > 1:
            layers, whole = distributed.shard_model(model)
            kept = (f"; the {whole} 4-bit base weights whole on every process (FSDP2 would drop their "
                    f"quantisation state)" if whole else "")
            log(f"fsdp: {layers} decoder layers and the rest of the model sharded over {ranks.world} processes "
                f"(weights, gradients, optimizer states){kept}")
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
        log(f"model: {m.name}, {total / 1e6:.1f}M parameters, {trainable / 1e6:.2f}M trainable ({what}), "
            f"loaded in {time.perf_counter() - started:.0f} s")
        if split_sequence:
            if model.config._attn_implementation != "fusetune":
                raise ConfigError(f"training.context_parallel shards the sequence inside fusetune's attention, and "
                                  f"this model runs transformers' {model.config._attn_implementation} attention (see "
                                  f"the patch line above): turn context_parallel off")
            text = model.config.get_text_config()
            check_heads(text.num_attention_heads,
                        getattr(text, "num_key_value_heads", None) or text.num_attention_heads, ranks.world)
        before = answer(model, tokenizer, prompts, config.data.max_new_tokens) if prompts else []
        choices = {"before": multiple_choice_accuracy(model, tokenizer, questions)} if questions else {}
        rouge = {"before": generation_rouge(model, tokenizer, generations, d.max_new_tokens)} if generations else {}
        if getattr(objective, "packing_length", None) and model.config._attn_implementation != "fusetune":
            # transformers' attention would need a (tokens x tokens) mask to keep packed rows apart
            objective.packing_length = None
            log(f"packing: off, padded micro-batches: the model runs transformers' "
                f"{model.config._attn_implementation} attention, not fusetune's (see the patch line above)")
        micro = read_state(resume_from).get("micro_batch") if resume_from and t.micro_batch_size == "auto" else None
        if micro:
            log(f"micro-batch: {micro} (as in the run it resumes, so the result is the same bit for bit)")
        else:
            micro = pick_micro_batch(model, examples, objective, t, device, log)
        if getattr(objective, "packing_length", None):
            log(f"packing: each micro-batch's rows in one padding-free row of up to {micro * m.max_seq_length} "
                f"tokens (data.packing)")
        record = train_loop(model, examples, objective, t, out, device, micro, log, fingerprint=run,
                            resume_from=resume_from, eval_examples=eval_examples, ranks=ranks)
        sharded = distributed.is_sharded(model)
        if not ranks.main and not sharded:
            return record
        losses = record["losses"]
        evals = record["eval"]
        held_out = f", eval loss {evals[0]['loss']:.3f} -> {evals[-1]['loss']:.3f}" if evals else ""
        log(f"trained {record['steps']} steps: loss {losses[0]:.3f} -> {losses[-1]:.3f}{held_out}, "
            f"{record['tokens_per_s']:,.0f} tokens/s, peak memory {record['peak_memory_gib']:.2f} GiB "
            f"({'GPU allocated' if device.type == 'cuda' else 'process RSS'})")
        with distributed.gathered(model):  # (FSDP: the whole model on every process while rank 0 writes)
            if not ranks.main:
                adapter = None
            elif m.full_finetuning:  # first: the run's result, in the dtype it trained in
                adapter = save_merged(model, out / "model", tokenizer, dtype=model.get_input_embeddings().weight.dtype)
            else:
                adapter = save_merged(model, out / "adapter", tokenizer, save_method="lora")
            if sharded:  # the others hold their gathered weights until it is written
                distributed.barrier(ranks)
        log(f"saved the {'model' if m.full_finetuning else 'adapter'} to {adapter}")
        after = answer(model, tokenizer, prompts, config.data.max_new_tokens) if prompts else []
        if questions:
            choices["after"] = multiple_choice_accuracy(model, tokenizer, questions)
            log(f"multiple choice ({d.choices_path}, {len(questions)} questions): accuracy "
                f"{choices['before']['accuracy']:.1%} before, {choices['after']['accuracy']:.1%} after")
        if generations:
            rouge["after"] = generation_rouge(model, tokenizer, generations, d.max_new_tokens)
            log(rouge_line(d.generation_path, rouge["before"], rouge["after"]))
        for prompt, old, new in zip(prompts, before, after):
            log(f"\n> {prompt}\n  before: {old}\n  after:  {new}")
        if config.output.save_merged or config.output.save_gguf:
            with distributed.gathered(model):
                if ranks.main and config.output.save_merged and not m.full_finetuning:  # (a full fine-tune's model is its result)
                    log(f"merged model: {save_merged(model, out / 'merged', tokenizer)}")
                if ranks.main and config.output.save_gguf:
                    log(f"GGUF: {save_gguf(model, out / 'gguf', tokenizer, config.output.save_gguf)}")
        if sharded:  # FSDP's last gathers done on every process before one leaves (and tears its group down)
            distributed.barrier(ranks)
        if not ranks.main:
            return record
        plot = plot_losses(losses, record["eval"], out / "loss.png", f"{m.name}: {kind}, {what}", objective.label)
        log(f"\nloss curve: {plot}" if plot else "loss curve: pip install matplotlib to plot it (losses in summary.json)")
        summary = {**record, "stage": kind, "before": before, "after": after, "prompts": prompts, "multiple_choice": choices,
                   "rouge": rouge, "adapter": str(adapter),
                   "device": str(device), "dtype": str(dtype)}
        atomic_write(out / "summary.json", json.dumps(summary, indent=1, ensure_ascii=False))
    return summary
