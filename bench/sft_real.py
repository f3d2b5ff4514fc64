"""W8, real-data SFT: variable-length conversations, real (non-padding) tokens/s and peak memory.

Data: 2,000 conversations of random tokens whose lengths follow a fixed distribution: lognormal
with median 250 tokens (mu = ln 250, sigma = 0.9), clipped to [16, 2048], seed 0 (`conversations`);
every token but the first is a label. Each step trains on the next 16 conversations (the effective
batch), in order; 3 warm-up + 10 timed steps (conversations 0-207; their real-token count is exact).
Model set-up as the e2e workloads (bench/e2e.py: random bf16 Llama shapes, LoRA r=16 on q,k,v,o,
gate,up,down, checkpointing, AdamW fused lr 1e-4); models llama-3.2-1b (W8-1B) and llama-3.1-8b
(W8-8B). Stacks, each in its own process:
  hf               Hugging Face + PEFT, micro-batches of 4 conversations right-padded (TRL's default
                   collation), 4 accumulation steps, num_items_in_batch over the 16
  fusetune-padded  the same batches through a patched model (fusetune's offloaded checkpointing)
  fusetune         patched, packed: each micro-batch up to 4 x 2048 tokens in one row without padding
                   (fusetune.training.packing, as `fusetune train` with data.packing)
  fusetune-micro4  patched, packed, each micro-batch the same 4 conversations as hf's and unsloth's (one
                   row each): the same activations per micro-batch as the other stacks, so peak memory
                   compares like for like
  unsloth          the best-known library through its own SFT path: its FastLanguageModel on the same
                   random model saved to disk, TRL's SFTTrainer with padding_free=True (its
                   uncontaminated packing), per-device batch 4 x 4 accumulation, conversations in order

    python -m bench.sft_real [--models 1b,8b] [--stacks hf,fusetune-padded,fusetune,fusetune-micro4,unsloth] [--tag T]
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import environment, unsloth_lora_model, write_results  # noqa: E402
from bench.e2e import MODELS, TARGETS  # noqa: E402

MODEL_NAMES = {"1b": "llama-3.2-1b", "8b": "llama-3.1-8b"}
EFFECTIVE, MICRO, MAX_LEN = 16, 4, 2048
WARMUP, TIMED = 3, 10


def conversations(n: int = 2000, seed: int = 0, vocab: int = 128256) -> list[list[int]]:
    """The fixed W8 data: n token lists with lognormal lengths (median 250, sigma 0.9, in [16, 2048])."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.empty(n, dtype=torch.float64).log_normal_(math.log(250), 0.9, generator=gen)
    lengths = lengths.round().clamp(16, MAX_LEN).long().tolist()
    return [torch.randint(3, vocab, (k,), generator=gen).tolist() for k in lengths]


def micro_batches(stack: str, rows):
    if stack in ("fusetune", "fusetune-micro4"):
        from fusetune.training.packing import pack_examples, pack_groups

        if stack == "fusetune":
            groups = pack_groups([len(r) for r in rows], MICRO * MAX_LEN)
        else:
            groups = [range(i, min(i + MICRO, len(rows))) for i in range(0, len(rows), MICRO)]
        return [dict(pack_examples([{"input_ids": rows[i]} for i in g]), use_cache=False) for g in groups]
    from fusetune.recipe.data import collate

    examples = [{"input_ids": r, "labels": r} for r in rows]  # right-padded, padding masked in the labels
    return [collate(examples[i:i + MICRO], pad_id=0) for i in range(0, len(rows), MICRO)]


def worker(stack: str, size: str) -> dict:
    from bench.e2e import build_model

    data = conversations()
    model = build_model(stack, MODEL_NAMES[size])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    times, losses, tokens, computed = [], [], [], []
    for step in range(WARMUP + TIMED):
        rows = data[step * EFFECTIVE:(step + 1) * EFFECTIVE]
        n_items = sum(len(r) - 1 for r in rows)
        batches = [{k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in b.items()}
                   for b in micro_batches(stack, rows)]
        torch.cuda.synchronize()
        start = time.perf_counter()
        total = 0.0
        for batch in batches:
            loss = model(**batch, num_items_in_batch=n_items).loss
            loss.backward()
            total += loss.detach()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(total))  # syncs
        times.append(time.perf_counter() - start)
        tokens.append(sum(len(r) for r in rows))
        computed.append(sum(b["input_ids"].numel() for b in batches))
    return _result(stack, size, times, tokens, computed, losses)


def _result(stack, size, times, tokens, computed, losses):
    timed = slice(WARMUP, None)
    return dict(stack=stack, workload=f"W8-{size.upper()}", model=MODEL_NAMES[size], real_tokens=sum(tokens[timed]),
                computed_tokens=sum(computed[timed]) if computed else None, seconds=sum(times[timed]),
                real_tokens_per_s=sum(tokens[timed]) / sum(times[timed]), median_step_s=statistics.median(times[timed]),
                peak_bytes=torch.cuda.max_memory_allocated(), losses=losses)


def unsloth_worker(size: str) -> dict:
    """The best-known library's own path: FastLanguageModel + TRL SFTTrainer(padding_free=True)."""
    model, tokenizer = unsloth_lora_model(MODELS[MODEL_NAMES[size]], TARGETS, MAX_LEN)  # imports unsloth first
    from datasets import Dataset
    from torch.utils.data import SequentialSampler
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    data = conversations()[:(WARMUP + TIMED) * EFFECTIVE]
    folder = Path(tempfile.mkdtemp(prefix="w8-"))
    times, marks = [], {}

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            torch.cuda.synchronize()
            marks["start"] = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            torch.cuda.synchronize()
            times.append(time.perf_counter() - marks["start"])

    config = SFTConfig(output_dir=str(folder / "out"), per_device_train_batch_size=MICRO,
                       gradient_accumulation_steps=EFFECTIVE // MICRO, max_steps=WARMUP + TIMED, learning_rate=1e-4,
                       optim="adamw_torch_fused", padding_free=True, max_length=None, logging_steps=1, report_to=[],
                       save_strategy="no", bf16=True, dataloader_num_workers=0, warmup_steps=0,
                       lr_scheduler_type="constant")
    trainer = SFTTrainer(model=model, processing_class=tokenizer, args=config, callbacks=[Timer()],
                         train_dataset=Dataset.from_list([{"input_ids": r} for r in data]))
    trainer._get_train_sampler = lambda *args, **kwargs: SequentialSampler(trainer.train_dataset)
    torch.cuda.reset_peak_memory_stats()
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    tokens = [sum(len(r) for r in data[s * EFFECTIVE:(s + 1) * EFFECTIVE]) for s in range(WARMUP + TIMED)]
    return _result("unsloth", size, times, tokens, [], losses)


def run_worker(stack: str, size: str) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--worker", stack, size], capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if not lines:
        print(f"W8-{size} {stack}: worker failed (exit {proc.returncode}):\n{proc.stderr[-2500:]}")
        return dict(stack=stack, workload=f"W8-{size.upper()}", error=proc.stderr[-600:])
    return json.loads(lines[-1][7:])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="1b,8b")
    parser.add_argument("--stacks", default="hf,fusetune-padded,fusetune,fusetune-micro4,unsloth")
    parser.add_argument("--tag", default="", help="added to the JSON's name (runs of one day keep apart)")
    parser.add_argument("--worker", nargs=2, metavar=("STACK", "SIZE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        stack, size = args.worker
        row = unsloth_worker(size) if stack == "unsloth" else worker(stack, size)
        print("RESULT " + json.dumps(row))
        return
    data = conversations()
    lengths = torch.tensor([len(r) for r in data], dtype=torch.float64)
    print(f"W8 data: {len(data)} conversations, median {lengths.median():.0f}, mean {lengths.mean():.0f}, "
          f"max {lengths.max():.0f} tokens")
    rows, env = [], environment()
    for size in args.models.split(","):
        for stack in args.stacks.split(","):
            rows.append(run_worker(stack, size))
            r = rows[-1]
            if "error" not in r:
                computed = f"{r['computed_tokens'] / r['real_tokens']:.2f}" if r["computed_tokens"] else "-"
                print(f"{r['workload']:>6} {stack:>16}: {r['real_tokens_per_s']:8.0f} real tok/s, "
                      f"peak {r['peak_bytes'] / 2**30:5.1f} GiB, computed/real {computed}, "
                      f"losses {r['losses'][0]:.4f} .. {r['losses'][-1]:.4f}", flush=True)
            # after every row: a run cut short keeps what it measured
            write_results("-".join(filter(None, ["sft-real", args.tag])), {"environment": env, "effective_batch": EFFECTIVE, "micro_batch": MICRO,
                                       "warmup": WARMUP, "timed": TIMED, "results": rows})


if __name__ == "__main__":
    main()
