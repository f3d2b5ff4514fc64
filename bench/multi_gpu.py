"""Multi-GPU benchmark: one process per GPU under torchrun, the Llama shapes of bench/e2e.py, patched
by fusetune, every part measured on 1 and on N GPUs in the same run (each its own torchrun).

- scaling: W3 (8B LoRA, 2x4096 per GPU) and W6 (8B QLoRA, 2x4096 per GPU), data parallel as
  `fusetune train --nproc N` runs it (each process its own batch, trainable gradients summed once
  per step): tokens/s per GPU on N GPUs over tokens/s on one (target >= 90%).
- fsdp: 8B full fine-tune (every weight trains, AdamW), 1x4096 per GPU, FSDP2 over N GPUs
  (fusetune.training.distributed.shard_model): tokens/s, peak memory per GPU; on one GPU the same
  run without FSDP shows whether it fits there at all.
- cp: 8B QLoRA at batch 1, context parallel over N GPUs (fusetune.training.context_parallel), the
  longest sequence that trains under --cap-gib of memory per GPU, searched from 16k in steps of
  --cp-step tokens, against the same search on one GPU (target: N-GPU longest >= 1.8x one GPU's).

    python bench/multi_gpu.py --nproc 2 [--parts scaling,fsdp,cp] [--cap-gib 80] [--cp-step 16384]

Protocol as bench/e2e.py: random tokens, labels = input_ids, offloaded checkpointing, AdamW
(lr 1e-4), 3 warm-up + 10 timed steps (the search: 1 + 2); the rate is of all processes.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import environment, write_results  # noqa: E402
from bench.e2e import MODELS, WORKLOADS, build_model  # noqa: E402

PARTS = ("scaling", "fsdp", "cp")
SCALING = ("W3", "W6")
FSDP_SEQ, CP_START = 4096, 16384


def full_model(name: str):
    """The benchmark's Llama in bf16 with every weight trainable, patched, offloaded checkpointing."""
    from transformers import LlamaConfig, LlamaForCausalLM

    import fusetune
    from fusetune.training.checkpoint import enable_offloaded_checkpointing

    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = LlamaForCausalLM(LlamaConfig(**MODELS[name], attn_implementation="sdpa"))
    torch.set_default_dtype(torch.float32)
    fusetune.patch_model(model)
    enable_offloaded_checkpointing(model)
    return model


def worker(part: str, workload: str, seq: int, steps: tuple[int, int]) -> dict:
    """One torchrun process: trains `steps` (warm-up, timed) and returns the rank-0 row."""
    from fusetune.training import distributed
    from fusetune.training.context_parallel import context_parallel, shard_batch

    ranks = distributed.launched_ranks()
    device = distributed.start(ranks)
    name, batch, _, qlora = WORKLOADS[workload] if part != "fsdp" else ("llama-3.1-8b", 1, None, False)
    if part == "cp":
        batch = 1
    cap = float(os.environ.get("BENCH_CAP_GIB", "0"))
    if cap:
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap * 2**30 / total), device)
    if part == "fsdp":
        model = full_model(name)
        if ranks.world > 1:
            distributed.shard_model(model)
    else:
        if qlora:
            from bench.qlora import import_bnb

            import_bnb()
        model = build_model("fusetune", name, qlora)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, foreach=True)
    gen = torch.Generator(device="cuda").manual_seed(1 + (0 if part == "cp" else ranks.rank))
    vocab = MODELS[name]["vocab_size"]
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(sum(steps)):
        ids = torch.randint(0, vocab, (batch, seq), device="cuda", generator=gen)
        torch.cuda.synchronize()
        start = time.perf_counter()
        if part == "cp" and ranks.world > 1:
            with context_parallel(model):
                loss = model(**shard_batch({"input_ids": ids, "labels": ids}), use_cache=False).loss
                loss.backward()
        else:
            # the mean over every process's tokens (context parallel on one GPU: the whole sequence here)
            loss = model(input_ids=ids, labels=ids).loss / (1 if part == "cp" else ranks.world)
            loss.backward()
        if part != "fsdp":
            distributed.sum_gradients(ranks, params)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    step = statistics.median(times[steps[0]:])
    tokens = batch * seq * (1 if part == "cp" else ranks.world)
    peak = distributed.all_max(ranks, torch.cuda.max_memory_allocated(), device)
    distributed.finish(ranks)
    return dict(part=part, workload=workload, gpus=ranks.world, batch=batch, seq=seq, step_s=step,
                tokens_per_s=tokens / step, tokens_per_s_per_gpu=tokens / step / ranks.world,
                peak_bytes_per_gpu=peak)


def launch(part: str, workload: str, nproc: int, seq: int, steps: tuple[int, int], cap_gib: float) -> dict:
    """One torchrun of `nproc` processes; its row, or an error row (out of memory included)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), __file__,
           "--worker", part, workload, "--seq", str(seq), "--steps", f"{steps[0]},{steps[1]}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "BENCH_CAP_GIB": str(cap_gib)})
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if not lines:
        oom = "OutOfMemoryError" in proc.stderr or "out of memory" in proc.stderr
        print(f"{part} {workload} {nproc} GPU(s) seq {seq}: {'out of memory' if oom else 'failed'}"
              + ("" if oom else f"\n{proc.stderr[-3000:]}"))
        return dict(part=part, workload=workload, gpus=nproc, seq=seq, error="oom" if oom else proc.stderr[-500:])
    return json.loads(lines[-1][7:])


def longest(workload: str, nproc: int, step: int, cap_gib: float) -> tuple[int, list[dict]]:
    """The longest sequence (CP_START + k * step) that trains on nproc GPUs under the cap."""
    rows, seq, best = [], CP_START, 0
    while True:
        row = launch("cp", workload, nproc, seq, (1, 2), cap_gib)
        rows.append(row)
        if "error" in row:
            return best, rows
        best, seq = seq, seq + step


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nproc", type=int, default=torch.cuda.device_count())
    parser.add_argument("--parts", default=",".join(PARTS))
    parser.add_argument("--cap-gib", type=float, default=80.0, help="memory per GPU (the cp search and fsdp)")
    parser.add_argument("--cp-step", type=int, default=16384)
    parser.add_argument("--worker", nargs=2, metavar=("PART", "WORKLOAD"), help=argparse.SUPPRESS)
    parser.add_argument("--seq", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--steps", default="3,10", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    steps = tuple(int(x) for x in args.steps.split(","))
    if args.worker:
        row = worker(*args.worker, args.seq, steps)
        if int(os.environ.get("RANK", "0")) == 0:
            print("RESULT " + json.dumps(row))
        return
    if args.nproc < 2:
        raise SystemExit(f"bench/multi_gpu.py compares 1 GPU with several: {args.nproc} visible (--nproc)")
    rows, summary = [], {}
    parts = args.parts.split(",")
    if "scaling" in parts:
        for workload in SCALING:
            one, many = (launch("scaling", workload, n, WORKLOADS[workload][2], steps, 0) for n in (1, args.nproc))
            rows += [one, many]
            if "error" not in one and "error" not in many:
                summary[f"scaling {workload}"] = many["tokens_per_s_per_gpu"] / one["tokens_per_s_per_gpu"]
    if "fsdp" in parts:
        for n in (1, args.nproc):
            rows.append(launch("fsdp", "8b-full", n, FSDP_SEQ, steps, args.cap_gib))
    if "cp" in parts:
        for n in (1, args.nproc):
            best, searched = longest("W7", n, args.cp_step, args.cap_gib)
            rows += searched
            summary[f"cp longest {n} GPU(s)"] = best
        if summary.get("cp longest 1 GPU(s)"):
            summary["cp ratio"] = summary[f"cp longest {args.nproc} GPU(s)"] / summary["cp longest 1 GPU(s)"]
    for row in rows:
        print(json.dumps(row))
    print(json.dumps(summary, indent=1))
    write_results("multi-gpu", {"environment": environment(), "nproc": args.nproc, "cap_gib": args.cap_gib,
                                "rows": rows, "summary": summary})


if __name__ == "__main__":
    main()
