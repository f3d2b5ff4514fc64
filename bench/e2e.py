"""End-to-end training benchmark (the protocol of DESIGN.md): the same LoRA loop for each stack,
each stack in its own process, in one run.

    python bench/e2e.py [--workloads W1,W2,W4,W7] [--stacks hf,fusetune] [--max-seq-cap 131072]
                        [--memory-cap-gb 80] [--search-step 32768]

Stacks: hf = Hugging Face + PEFT with SDPA attention; fusetune = the same model after
fusetune.patch_model, with fusetune's offloaded activation checkpointing (layer inputs kept in
pinned host memory); fusetune-recompute = patched, with Hugging Face's checkpointing;
fusetune-triton = as fusetune with every kernel on Triton (FUSETUNE_BACKEND=triton: what auto's
table of CUDA-first ops is measured against); fusetune-tiled = as fusetune with the MLP always
sequence-tiled, 8k tokens a chunk; unsloth = the
best-known library's own model path (bench.common.unsloth_lora_model: FastLanguageModel on the same
random model saved to disk, its QLoRA quantisation at load, its checkpointing; for side-by-side runs
only, carried by ../shared/tools/pack-gpu-extras.sh). Llama shapes with random bf16 weights built
from the config (no downloads); LoRA r=16, alpha 16, dropout 0 on q,k,v,o,gate,up,down; random
tokens, labels = input_ids; gradient checkpointing on; AdamW(fused=True, lr=1e-4); 3 warm-up + 10
timed steps, the same loop for every stack.

Workloads (batch x seq): W1 Llama-3.2-1B LoRA 2x2048; W2 Llama-3.1-8B LoRA 1x2048; W3 8B LoRA
2x4096; W4 1B QLoRA 2x2048; W5 8B QLoRA 1x2048; W6 8B QLoRA 2x4096; W7 8B QLoRA at batch 1, the
longest sequence that trains, per stack. QLoRA (W4-W7): the same bf16 model with every decoder
nn.Linear replaced by a bitsandbytes NF4 Linear4bit (double quantisation, blocksize 64, bf16
compute), as transformers' BitsAndBytesConfig loading gives; see bench/qlora.py, which also says
why peft.prepare_model_for_kbit_training is not called. bitsandbytes is needed only there.

W7 (8B QLoRA) and W7L (8B LoRA, 16-bit base) are searches, not repeated by --repeat: for each stack,
sequence 4096, 8192, 16384, ... (up to --max-seq-cap) until a step fails (out of memory), then
bisection between the longest that trained and the first that failed down to --search-step tokens
(32768), or the lengths of --seqs; each probe is its own process, 1 warm-up + 2 timed steps (the second
step is the first with the optimizer state, so the peak is reached), with GPU memory capped at
--memory-cap-gb when given (torch.cuda.set_per_process_memory_fraction: issue 11 measures within 80 GB on a 141 GB
H200). It costs several 8B set-ups and long steps (minutes at 64k-128k tokens).
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
from bench.common import environment, matmul_flops, unsloth_lora_model, write_results  # noqa: E402
from bench.qlora import QLoRAUnavailable, weight_numel  # noqa: E402  (imports no bitsandbytes)

MODELS = {
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                         vocab_size=128256, tie_word_embeddings=True, rms_norm_eps=1e-5,
                         max_position_embeddings=131072),
    "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                         vocab_size=128256, tie_word_embeddings=False, rms_norm_eps=1e-5,
                         max_position_embeddings=131072),
}
# name -> (model, batch, seq, QLoRA); W7's and W7L's seq is searched (SEARCH_START, doubling, bisecting)
WORKLOADS = {"W1": ("llama-3.2-1b", 2, 2048, False), "W2": ("llama-3.1-8b", 1, 2048, False),
             "W3": ("llama-3.1-8b", 2, 4096, False), "W4": ("llama-3.2-1b", 2, 2048, True),
             "W5": ("llama-3.1-8b", 1, 2048, True), "W6": ("llama-3.1-8b", 2, 4096, True),
             "W7": ("llama-3.1-8b", 1, None, True), "W7L": ("llama-3.1-8b", 1, None, False)}
SEARCH = {"W7", "W7L"}
SEARCH_START, SEARCH_STEPS = 4096, (1, 2)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
WARMUP, TIMED = 3, 10


def flops_per_token(model, cfg: dict, seq: int) -> float:
    """F = 6 N_dec + 4 N_head + 8 N_lora + 8 L S H d_h (see DESIGN.md, Benchmarks).

    N counts weight elements: an NF4 weight (QLoRA) counts as the matrix it stands for, so the same
    shapes give the same F with and without quantisation."""
    n_dec = n_head = n_lora = 0
    for name, p in model.named_parameters():
        if "lora_" in name:
            n_lora += p.numel()
        elif "lm_head" in name:
            n_head += weight_numel(p)
        elif ".layers." in name and p.dim() == 2:
            n_dec += weight_numel(p)
    if n_head == 0:  # tied embeddings: the head is the embedding matrix
        n_head = cfg["vocab_size"] * cfg["hidden_size"]
    attn = 8 * cfg["num_hidden_layers"] * seq * cfg["num_attention_heads"] * cfg["head_dim"]
    return 6 * n_dec + 4 * n_head + 8 * n_lora + attn


def build_model(stack: str, name: str, qlora: bool = False):
    """The benchmark's Llama of MODELS[name] (random bf16 weights, SDPA), QLoRA'd if asked, with LoRA
    on TARGETS and checkpointing; a fusetune stack patched ("fusetune": its offloaded checkpointing)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from fusetune.training.checkpoint import enable_checkpointing, enable_offloaded_checkpointing

    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = LlamaForCausalLM(LlamaConfig(**MODELS[name], attn_implementation="sdpa"))
    torch.set_default_dtype(torch.float32)
    if qlora:
        from bench.qlora import prepare_qlora

        prepare_qlora(model)  # decoder linears -> bitsandbytes NF4 (see bench/qlora.py)
    enable_checkpointing(model)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0,
                                             target_modules=TARGETS, task_type="CAUSAL_LM"))
    if stack.startswith("fusetune"):
        import fusetune

        if stack == "fusetune-triton":  # auto's alternative, side by side: every kernel on Triton
            fusetune.backend.set_backend("triton")
        # "fusetune-tiled": the MLP a fixed 8k tokens at a time however much memory is free (the slope the
        # longest sequence that fits is bound by; the default tiles only where the whole MLP would not fit)
        fusetune.patch_model(model, tiled_mlp=8192 if stack == "fusetune-tiled" else True)
        if not stack.endswith("-recompute"):  # its own checkpointing; "fusetune-recompute" keeps Hugging Face's
            enable_offloaded_checkpointing(model)
    return model


def worker(stack: str, workload: str, profile: bool = False, seq: int | None = None,
           steps: tuple[int, int] = (WARMUP, TIMED), memory_cap_gb: float | None = None) -> dict:
    name, batch, default_seq, qlora = WORKLOADS[workload]
    seq = seq or default_seq
    if seq is None:
        raise ValueError(f"{workload} needs a sequence length (--seq)")
    if qlora:
        from bench.qlora import import_bnb

        import_bnb()  # fail before building the model when bitsandbytes is missing
    warmup, timed = steps
    cfg = MODELS[name]
    if memory_cap_gb:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, memory_cap_gb * 2**30 / total))
    if stack == "unsloth":
        model, _ = unsloth_lora_model(cfg, TARGETS, seq, load_in_4bit=qlora)
    else:
        model = build_model(stack, name, qlora)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=True)
    gen = torch.Generator(device="cuda").manual_seed(1)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    times, issued, losses = [], [], []
    for _ in range(warmup + timed):
        ids = torch.randint(0, cfg["vocab_size"], (batch, seq), device="cuda", generator=gen)
        torch.cuda.synchronize()
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        issued.append(time.perf_counter() - start)  # the host has launched the step (or waited inside it)
        losses.append(loss.item())  # syncs
        times.append(time.perf_counter() - start)
    step = statistics.median(times[warmup:])
    row = dict(stack=stack, workload=workload, model=name, qlora=qlora, batch=batch, seq=seq,
               warmup=warmup, timed=timed, step_s=step, tokens_per_s=batch * seq / step,
               step_s_spread=[min(times[warmup:]), max(times[warmup:])], issue_s=statistics.median(issued[warmup:]),
               peak_bytes=torch.cuda.max_memory_allocated(), first_loss=losses[0],
               last_loss=losses[-1], flops_per_token=flops_per_token(model, cfg, seq), memory_cap_gb=memory_cap_gb)
    if profile:
        row.update(_profile_one_step(model, optimizer, ids, stack, workload))
    return row


def _profile_one_step(model, optimizer, ids, stack, workload) -> dict:
    """Print where one training step spends its time: GPU kernels by total time, and the host;
    returns the step's wall time, GPU busy time (kernels and copies) and kernel launches."""
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
    launches = sum(e.count for e in events if "LaunchKernel" in e.key)
    print(f"PROFILE {stack} {workload}: wall {wall * 1e3:.1f} ms (profiled), GPU busy {gpu:.1f} ms "
          f"({100 * gpu / (wall * 1e3):.0f}%), {launches} kernel launches", file=sys.stderr)
    print(events.table(sort_by="self_device_time_total", row_limit=15, max_name_column_width=60), file=sys.stderr)
    print(events.table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=60), file=sys.stderr)
    return dict(profiled_wall_ms=wall * 1e3, gpu_busy_ms=gpu, launches=launches)


def run_worker(stack: str, workload: str, profile: bool = False, seq: int | None = None,
               steps: tuple[int, int] | None = None, memory_cap_gb: float | None = None) -> dict:
    """One worker process; its RESULT row, or an error row with the end of its stderr."""
    cmd = [sys.executable, __file__, "--worker", stack, workload] + (["--profile"] if profile else [])
    if seq is not None:
        cmd += ["--seq", str(seq)]
    if steps is not None:
        cmd += ["--steps", f"{steps[0]},{steps[1]}"]
    if memory_cap_gb:
        cmd += ["--memory-cap-gb", str(memory_cap_gb)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if profile:
        print(proc.stderr[proc.stderr.find("PROFILE"):])
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if not lines:
        print(f"{workload} {stack}: worker failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        return dict(stack=stack, workload=workload, seq=seq, error=proc.stderr[-500:])
    return json.loads(lines[-1][7:])


def search_longest(probe, start: int, cap: int, step: int) -> list[dict]:
    """The probes of one stack's longest-sequence search: probe(seq) -> row (with "error" when the
    step failed). Doubles from `start` while steps train (up to `cap`), then bisects between the
    longest that trained and the first that failed until they are `step` tokens apart. Returns
    the rows in the order they ran."""
    rows, fit, fail, seq = [], 0, None, start
    while seq <= cap:
        rows.append(probe(seq))
        if "error" in rows[-1]:
            fail = seq
            break
        fit, seq = seq, seq * 2
    while fail is not None and fit and fail - fit > step:
        seq = (fit + fail) // 2 // step * step
        if seq <= fit:
            break
        rows.append(probe(seq))
        fit, fail = (fit, seq) if "error" in rows[-1] else (seq, fail)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", default="W1", help=f"comma-separated, of {','.join(WORKLOADS)}")
    parser.add_argument("--stacks", default="hf,fusetune")
    parser.add_argument("--profile", action="store_true", help="also profile one step per stack (not in W7's search)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="run the stacks this many times, alternating (timings on a shared host vary); "
                             "W7's search runs once")
    parser.add_argument("--max-seq-cap", type=int, default=131072,
                        help="W7/W7L: the longest sequence tried (default 131072, Llama-3.1's context)")
    parser.add_argument("--search-step", type=int, default=32768,
                        help="W7/W7L: bisect the longest sequence to this many tokens")
    parser.add_argument("--seqs", help="W7/W7L: train these sequence lengths (comma-separated, e.g. 65536,131072) "
                                       "instead of searching; reports GB of GPU memory per 1k tokens between them")
    parser.add_argument("--probe-steps", default=",".join(map(str, SEARCH_STEPS)),
                        help="W7/W7L: warm-up and timed steps of each probe (default 1,2; 1,1 still reaches the "
                             "peak: the timed step is the first with the optimizer state)")
    parser.add_argument("--memory-cap-gb", type=float,
                        help="cap every worker's GPU memory (set_per_process_memory_fraction), e.g. 80")
    parser.add_argument("--worker", nargs=2, metavar=("STACK", "WORKLOAD"), help=argparse.SUPPRESS)
    parser.add_argument("--seq", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--steps", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        stack, workload = args.worker
        steps = tuple(int(n) for n in args.steps.split(",")) if args.steps else (WARMUP, TIMED)
        failed = dict(stack=stack, workload=workload, seq=args.seq or WORKLOADS[workload][2])
        try:
            result = worker(stack, workload, profile=args.profile, seq=args.seq, steps=steps,
                            memory_cap_gb=args.memory_cap_gb)
        except torch.cuda.OutOfMemoryError as err:
            result = dict(failed, error=f"OOM: {err}"[:300])
        except QLoRAUnavailable as err:  # no bitsandbytes: say how to carry it
            result = dict(failed, error=str(err))
        print("RESULT " + json.dumps(result))
        return
    workloads = list(dict.fromkeys(args.workloads.split(",")))
    unknown = [w for w in workloads if w not in WORKLOADS]
    if unknown:
        parser.error(f"unknown workloads {unknown}; known: {', '.join(WORKLOADS)}")
    stacks = args.stacks.split(",")
    if not torch.cuda.is_available():
        sys.exit("bench/e2e.py needs a CUDA GPU")
    rate = matmul_flops()
    print(f"bf16 matmul 8192^3: {rate / 1e12:.0f} TFLOP/s")
    rows = []
    probe_steps = tuple(int(n) for n in args.probe_steps.split(","))
    runs = [(w, r) for w in workloads if w not in SEARCH for r in range(args.repeat)]
    for workload, repeat in runs:
        for stack in stacks:
            row = run_worker(stack, workload, args.profile, memory_cap_gb=args.memory_cap_gb)
            row["repeat"] = repeat
            if "error" not in row:
                row["mfu"] = row["flops_per_token"] * row["tokens_per_s"] / rate
            rows.append(row)
            print(f"{workload} {stack}: {row}")
    for workload in (w for w in workloads if w in SEARCH):
        for stack in stacks:
            def probe(seq, stack=stack, workload=workload):
                row = run_worker(stack, workload, seq=seq, steps=probe_steps, memory_cap_gb=args.memory_cap_gb)
                row.update(repeat=0, search=True)
                if "error" not in row:
                    row["mfu"] = row["flops_per_token"] * row["tokens_per_s"] / rate
                print(f"{workload} {stack} seq {seq}: {row}")
                return row
            if args.seqs:
                rows += [probe(int(seq)) for seq in args.seqs.split(",")]
            else:
                rows += search_longest(probe, SEARCH_START, args.max_seq_cap, args.search_step)
    payload = {"environment": environment(), "matmul_flops_per_s": rate, "warmup": WARMUP,
               "timed": TIMED, "search_start": SEARCH_START, "search_steps": list(probe_steps),
               "search_step": args.search_step, "memory_cap_gb": args.memory_cap_gb,
               "max_seq_cap": args.max_seq_cap, "seqs": args.seqs, "rows": rows}
    path = write_results("e2e-" + "-".join(workloads), payload)
    table = [r for r in rows if not r.get("search")]
    base = {(r["workload"], r["repeat"]): r for r in table if r["stack"] == "hf" and "error" not in r}
    if table:
        print(f"\n{'wl':<4}{'stack':<10}{'step s':>8}{'issue s':>8}{'busy':>5}{'tok/s':>9}{'x hf':>6}{'peak GB':>9}"
              f"{'MFU':>6}{'loss first->last':>20}")
    for r in table:
        if "error" in r:
            print(f"{r['workload']:<4}{r['stack']:<10}  {r.get('error', '')[:60]}")
            continue
        key = (r["workload"], r["repeat"])
        ratio = r["tokens_per_s"] / base[key]["tokens_per_s"] if key in base else float("nan")
        busy = f"{100 * r['gpu_busy_ms'] / r['profiled_wall_ms']:4.0f}%" if "gpu_busy_ms" in r else "    -"
        print(f"{r['workload']:<4}{r['stack']:<10}{r['step_s']:8.3f}{r['issue_s']:8.3f}{busy}{r['tokens_per_s']:9.0f}"
              f"{ratio:6.2f}"
              f"{r['peak_bytes'] / 1e9:9.2f}{100 * r['mfu']:5.0f}%"
              f"{r['first_loss']:10.3f} -> {r['last_loss']:.3f}")
    for workload, stack, slope in memory_slopes(rows):
        print(f"{workload} {stack}: {slope:.3f} GB of GPU memory per 1k tokens (peak, between its two longest)")
    for workload, stack, best, failure in ([] if args.seqs else search_summary(rows)):
        trained = (f"longest seq {best['seq']}: {best['step_s']:.2f} s/step, {best['tokens_per_s']:.0f} tok/s, "
                   f"peak {best['peak_bytes'] / 1e9:.2f} GB" if best else "nothing trained")
        stop = (f"; seq {failure['seq']} failed: {failure['error'][:60]!r}" if failure
                else f"; the cap {args.max_seq_cap} was reached")
        print(f"{workload} {stack}: {trained}{stop}")
    print(f"wrote {path}")


def _searched(rows):
    """(workload, stack, rows that trained by length, rows that failed by length) per searched stack."""
    searched = [r for r in rows if r.get("search")]
    for workload, stack in dict.fromkeys((r["workload"], r["stack"]) for r in searched):
        mine = sorted((r for r in searched if r["workload"] == workload and r["stack"] == stack), key=lambda r: r["seq"])
        yield workload, stack, [r for r in mine if "error" not in r], [r for r in mine if "error" in r]


def memory_slopes(rows):
    """(workload, stack, GB per 1k tokens) from the two longest searched lengths that trained, per stack."""
    out = []
    for workload, stack, good, _ in _searched(rows):
        if len(good) >= 2 and good[-1]["seq"] > good[-2]["seq"]:
            a, b = good[-2], good[-1]
            out.append((workload, stack, (b["peak_bytes"] - a["peak_bytes"]) / 1e9 / ((b["seq"] - a["seq"]) / 1000)))
    return out


def search_summary(rows):
    """(workload, stack, longest row that trained or None, the failed row or None) per searched stack."""
    return [(workload, stack, good[-1] if good else None, bad[0] if bad else None)
            for workload, stack, good, bad in _searched(rows)]


if __name__ == "__main__":
    main()
