"""End-to-end training benchmark (the protocol of DESIGN.md): the same LoRA loop for each stack,
each stack in its own process, in one run.

    python bench/e2e.py [--workloads W1,W2] [--stacks hf,fusetune]

Stacks: hf = Hugging Face + PEFT with SDPA attention; fusetune = the same model after
fusetune.patch_model. Llama shapes with random bf16 weights built from the config (no downloads);
LoRA r=16, alpha 16, dropout 0 on q,k,v,o,gate,up,down; random tokens, labels = input_ids;
gradient checkpointing on; AdamW(fused=True, lr=1e-4); 3 warm-up + 10 timed steps.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import environment, matmul_flops, write_results  # noqa: E402

MODELS = {
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                         vocab_size=128256, tie_word_embeddings=True, rms_norm_eps=1e-5),
    "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                         vocab_size=128256, tie_word_embeddings=False, rms_norm_eps=1e-5),
}
WORKLOADS = {"W1": ("llama-3.2-1b", 2, 2048), "W2": ("llama-3.1-8b", 1, 2048),
             "W3": ("llama-3.1-8b", 2, 4096)}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
WARMUP, TIMED = 3, 10


def flops_per_token(model, cfg: dict, seq: int) -> float:
    """F = 6 N_dec + 4 N_head + 8 N_lora + 8 L S H d_h (see DESIGN.md, Benchmarks)."""
    n_dec = n_head = n_lora = 0
    for name, p in model.named_parameters():
        if "lora_" in name:
            n_lora += p.numel()
        elif "lm_head" in name:
            n_head += p.numel()
        elif ".layers." in name and p.dim() == 2:
            n_dec += p.numel()
    if n_head == 0:  # tied embeddings: the head is the embedding matrix
        n_head = cfg["vocab_size"] * cfg["hidden_size"]
    attn = 8 * cfg["num_hidden_layers"] * seq * cfg["num_attention_heads"] * cfg["head_dim"]
    return 6 * n_dec + 4 * n_head + 8 * n_lora + attn


def worker(stack: str, workload: str, profile: bool = False) -> dict:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    name, batch, seq = WORKLOADS[workload]
    cfg = MODELS[name]
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = LlamaForCausalLM(LlamaConfig(**cfg, attn_implementation="sdpa"))
    torch.set_default_dtype(torch.float32)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0,
                                             target_modules=TARGETS, task_type="CAUSAL_LM"))
    if stack == "fusetune":
        import fusetune

        fusetune.patch_model(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=True)
    gen = torch.Generator(device="cuda").manual_seed(1)
    torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for _ in range(WARMUP + TIMED):
        ids = torch.randint(0, cfg["vocab_size"], (batch, seq), device="cuda", generator=gen)
        torch.cuda.synchronize()
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())  # syncs
        times.append(time.perf_counter() - start)
    step = statistics.median(times[WARMUP:])
    if profile:
        _profile_one_step(model, optimizer, ids, stack, workload)
    return dict(stack=stack, workload=workload, model=name, batch=batch, seq=seq,
                step_s=step, tokens_per_s=batch * seq / step,
                peak_bytes=torch.cuda.max_memory_allocated(), first_loss=losses[0],
                last_loss=losses[-1], flops_per_token=flops_per_token(model, cfg, seq))


def _profile_one_step(model, optimizer, ids, stack, workload):
    """Print where one training step spends its time: GPU kernels by total time, and the host."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        wall = time.perf_counter() - start
    events = prof.key_averages()
    gpu = sum(e.self_device_time_total for e in events) / 1e3
    print(f"PROFILE {stack} {workload}: wall {wall * 1e3:.1f} ms (profiled), GPU busy {gpu:.1f} ms, "
          f"{sum(e.count for e in events if 'LaunchKernel' in e.key)} kernel launches", file=sys.stderr)
    print(events.table(sort_by="self_device_time_total", row_limit=15, max_name_column_width=60), file=sys.stderr)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", default="W1")
    parser.add_argument("--stacks", default="hf,fusetune")
    parser.add_argument("--profile", action="store_true", help="also profile one step per stack")
    parser.add_argument("--repeat", type=int, default=1,
                        help="run the stacks this many times, alternating (timings on a shared host vary)")
    parser.add_argument("--worker", nargs=2, metavar=("STACK", "WORKLOAD"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        try:
            result = worker(*args.worker, profile=args.profile)
        except torch.cuda.OutOfMemoryError as err:
            result = dict(stack=args.worker[0], workload=args.worker[1], error=f"OOM: {err}"[:300])
        print("RESULT " + json.dumps(result))
        return
    if not torch.cuda.is_available():
        sys.exit("bench/e2e.py needs a CUDA GPU")
    rate = matmul_flops()
    print(f"bf16 matmul 8192^3: {rate / 1e12:.0f} TFLOP/s")
    rows = []
    runs = [(w, r) for w in args.workloads.split(",") for r in range(args.repeat)]
    for workload, repeat in runs:
        for stack in args.stacks.split(","):
            proc = subprocess.run([sys.executable, __file__, "--worker", stack, workload]
                                  + (["--profile"] if args.profile else []), capture_output=True, text=True)
            if args.profile:
                print(proc.stderr[proc.stderr.find("PROFILE"):])
            lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
            if not lines:
                print(f"{workload} {stack}: worker failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
                rows.append(dict(stack=stack, workload=workload, error=proc.stderr[-500:]))
                continue
            row = json.loads(lines[-1][7:])
            row["repeat"] = repeat
            if "error" not in row:
                row["mfu"] = row["flops_per_token"] * row["tokens_per_s"] / rate
            rows.append(row)
            print(f"{workload} {stack}: {row}")
    payload = {"environment": environment(), "matmul_flops_per_s": rate, "warmup": WARMUP,
               "timed": TIMED, "rows": rows}
    path = write_results("e2e-" + "-".join(dict.fromkeys(args.workloads.split(","))), payload)
    base = {(r["workload"], r["repeat"]): r for r in rows if r["stack"] == "hf" and "error" not in r}
    print(f"\n{'wl':<4}{'stack':<10}{'step s':>8}{'tok/s':>9}{'x hf':>6}{'peak GB':>9}{'MFU':>6}"
          f"{'loss first->last':>20}")
    for r in rows:
        if "error" in r:
            print(f"{r['workload']:<4}{r['stack']:<10}  {r.get('error', '')[:60]}")
            continue
        key = (r["workload"], r["repeat"])
        ratio = r["tokens_per_s"] / base[key]["tokens_per_s"] if key in base else float("nan")
        print(f"{r['workload']:<4}{r['stack']:<10}{r['step_s']:8.3f}{r['tokens_per_s']:9.0f}{ratio:6.2f}"
              f"{r['peak_bytes'] / 1e9:9.2f}{100 * r['mfu']:5.0f}%"
              f"{r['first_loss']:10.3f} -> {r['last_loss']:.3f}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
