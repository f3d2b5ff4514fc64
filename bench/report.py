"""Generate bench/REPORT.md and its plots from the newest bench/results/*.json (never typed by hand).

    python bench/report.py
"""
from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
sys.path.insert(0, str(HERE.parent))
from bench.e2e import memory_slopes, search_summary  # noqa: E402


def by_date(kind: str):
    """(path, data) of every bench/results/<kind>-*.json, oldest first."""
    found = [(p, json.loads(p.read_text())) for p in RESULTS.glob(f"{kind}-*.json")]
    return sorted(found, key=lambda item: item[1]["environment"]["date"])


def env_line(env: dict) -> str:
    return (f"{env['gpu']}, torch {env['torch']} (CUDA {env['cuda']}), Triton {env['triton']}, "
            f"transformers {env['transformers']}, git {env['git']}, {env['date']}")


def kernel_section(path, data, plt) -> list[str]:
    rows = data["rows"]
    lines = [f"## Kernels ({path.name})", "", env_line(data["environment"]), "",
             f"Shapes: {data['shapes']}. Measured copy bandwidth "
             f"{data['copy_bandwidth_bytes_per_s'] / 1e12:.2f} TB/s (bytes read + written).", "",
             "Median ms as called from Python; graph ms: the same step replayed from a CUDA graph "
             "(GPU time without the Python and launch overhead).", "",
             "| op | mode | impl | median ms | GB/s | % of copy | extra peak MB | graph ms |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        rate = (f"{r['gb_per_s']:.0f} | {100 * r['fraction_of_copy']:.0f}%" if r.get("min_bytes")
                else "- | -")
        lines.append(f"| {r['op']} | {r['mode']} | {r['impl']} | {r['ms']:.3f} | {rate} | "
                     f"{r['peak_extra_bytes'] / 2**20:.0f} | "
                     f"{'-' if r.get('graph_ms') is None else format(r['graph_ms'], '.3f')} |")
    ops = list(dict.fromkeys(r["op"] for r in rows))
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for ax, mode in zip(axes, ("fwd", "fwd+bwd")):
        width = 0.8 / len(impls)
        for i, impl in enumerate(impls):
            xs, ys = [], []
            for j, op in enumerate(ops):
                match = [r for r in rows if r["op"] == op and r["mode"] == mode and r["impl"] == impl]
                if match:
                    xs.append(j + i * width)
                    ys.append(match[0]["ms"])
            ax.bar(xs, ys, width, label=impl)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(ops))], ops)
        ax.set_yscale("log")
        ax.set_ylabel("median ms, log scale (lower is better)")
        ax.set_title(f"{mode}, {data['environment']['gpu']}")
        ax.legend()
    fig.tight_layout()
    fig.savefig(HERE / "kernels.png", dpi=110)
    lines += ["", "![kernel times](kernels.png)", ""]
    return lines


def e2e_section(path, data, plt, plot_name) -> list[str]:
    rows = [r for r in data["rows"] if "error" not in r and not r.get("search")]
    base = {(r["workload"], r.get("repeat", 0)): r for r in rows if r["stack"] == "hf"}
    lines = [f"## End to end ({path.name})", "", env_line(data["environment"]), "",
             f"bf16 matmul rate measured in the same run: {data['matmul_flops_per_s'] / 1e12:.0f} TFLOP/s; "
             f"{data['warmup']} warm-up + {data['timed']} timed steps, median.", "",
             "step s: median (fastest-slowest of the timed steps).", "",
             "| workload, run | stack | batch x seq | step s | tokens/s | x HF | peak GB | MFU | loss first -> last |",
             "|---|---|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        key = (r["workload"], r.get("repeat", 0))
        ratio = r["tokens_per_s"] / base[key]["tokens_per_s"] if key in base else float("nan")
        model = r["model"] + (", QLoRA NF4" if r.get("qlora") else "")
        spread = " ({:.3f}-{:.3f})".format(*r["step_s_spread"]) if r.get("step_s_spread") else ""
        lines.append(f"| {r['workload']} ({model}) #{key[1] + 1} | {r['stack']} | {r['batch']} x {r['seq']} | "
                     f"{r['step_s']:.3f}{spread} | {r['tokens_per_s']:,.0f} | {ratio:.2f} | "
                     f"{r['peak_bytes'] / 1e9:.2f} | {100 * r['mfu']:.0f}% | "
                     f"{r['first_loss']:.3f} -> {r['last_loss']:.3f} |")
    for r in data["rows"]:
        if "error" in r and not r.get("search"):
            lines.append(f"| {r['workload']} | {r['stack']} | failed: {r['error'][:80]} | | | | | | |")
    lines += repeats_lines(rows)
    lines += search_lines(data)
    workloads = list(dict.fromkeys(r["workload"] for r in rows))
    stacks = list(dict.fromkeys(r["stack"] for r in rows))
    if not rows:
        return lines
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, label in ((axes[0], "tokens_per_s", "tokens/s (higher is better)"),
                           (axes[1], "peak_bytes", "peak memory, bytes (lower is better)")):
        width = 0.8 / len(stacks)
        for i, stack in enumerate(stacks):
            pts = [(j + i * width, r[key]) for j, w in enumerate(workloads)
                   for r in rows if r["workload"] == w and r["stack"] == stack]
            ax.bar([p[0] for p in pts], [p[1] for p in pts], width, label=stack)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(workloads))], workloads)
        ax.set_ylabel(label)
        ax.legend()
    fig.tight_layout()
    fig.savefig(HERE / plot_name, dpi=110)
    lines += ["", f"![end to end]({plot_name})", ""]
    return lines


def repeats_lines(rows) -> list[str]:
    """Where a stack ran a workload more than once (--repeat, interleaved): the median tokens/s of
    the runs with their range, and each stack's ratio of medians to the workload's first stack."""
    runs = {}
    for r in rows:
        runs.setdefault((r["workload"], r["stack"]), []).append(r["tokens_per_s"])
    if all(len(v) < 2 for v in runs.values()):
        return []
    lines = ["", "Interleaved repeats: median tokens/s of the runs (slowest-fastest), and the ratio of medians "
             "to the workload's first stack.", "", "| workload | stack | runs | median tokens/s | range | ratio |",
             "|---|---|---:|---:|---|---:|"]
    first = {}
    for (workload, stack), values in runs.items():
        median = statistics.median(values)
        first.setdefault(workload, median)
        lines.append(f"| {workload} | {stack} | {len(values)} | {median:,.0f} | {min(values):,.0f}-{max(values):,.0f} | "
                     f"{median / first[workload]:.2f} |")
    return lines


def search_lines(data) -> list[str]:
    """W7: per stack, the longest sequence that trained (batch 1) and what stopped the search."""
    search = [r for r in data["rows"] if r.get("search")]
    if not search:
        return []
    steps = data.get("search_steps", [1, 2])
    bisect = f", then bisected to {data['search_step']:,} tokens" if data.get("search_step") else ""
    cap = f"; GPU memory capped at {data['memory_cap_gb']:g} GB" if data.get("memory_cap_gb") else ""
    how = (f"the lengths {data['seqs']} (--seqs, no search)" if data.get("seqs") else
           f"sequence doubled from {data.get('search_start', 4096)} up to {data.get('max_seq_cap', '?')}{bisect}")
    lines = ["", f"Longest sequence that trains ({how}{cap}; each probe {steps[0]} warm-up + {steps[1]} timed "
             f"steps):", "",
             "| workload | stack | longest seq | step s | tokens/s | peak GB | MFU | stopped by |",
             "|---|---|---:|---:|---:|---:|---:|---|"]
    for workload, stack, b, first_bad in search_summary(data["rows"]):
        stop = (f"seq {first_bad.get('seq')}: {first_bad['error'].splitlines()[0][:60]}" if first_bad
                else "the last length given" if data.get("seqs") else "the cap")
        if b:
            base = "QLoRA NF4" if b.get("qlora", True) else "LoRA, bf16 base"
            lines.append(f"| {workload} ({b['model']}, {base}) | {stack} | {b['seq']:,} | {b['step_s']:.2f} | "
                         f"{b['tokens_per_s']:,.0f} | {b['peak_bytes'] / 1e9:.2f} | {100 * b['mfu']:.0f}% | {stop} |")
        else:
            lines.append(f"| {workload} | {stack} | none | | | | | {stop} |")
    lines += [""] + [f"{workload} {stack}: {slope:.3f} GB of GPU memory per 1k tokens (peak, between its two "
                     f"longest lengths)" for workload, stack, slope in memory_slopes(data["rows"])]
    return lines


def attention_section(path, data) -> list[str]:
    lines = [f"## Attention kernel ({path.name})", "", env_line(data["environment"]), "",
             "bf16, batch 1, causal; TFLOP/s of the useful work (4 x heads x D x allowed pairs forward, "
             "3.5x that forward + backward). `python -m bench.attention`.", "",
             "| feature | D | seq | stack | fwd TFLOP/s | fwd+bwd TFLOP/s |", "|---|---:|---:|---|---:|---:|"]
    for r in data["results"]:
        figures = (f"{r['fwd_tflops']:.0f} | {r['fwdbwd_tflops']:.0f}" if "error" not in r
                   else f"{r['error'][:60]} | -")
        lines.append(f"| {r['feature']} | {r['head_dim']} | {r['seq']} | {r['stack']} | {figures} |")
    return lines + [""]


def sft_real_section(path, data) -> list[str]:
    lines = [f"## W8, real-data SFT ({path.name})", "", env_line(data["environment"]), "",
             f"Effective batch {data['effective_batch']} conversations (lognormal lengths, median 250, clipped at "
             f"2048), micro-batch {data['micro_batch']}; {data['warmup']} warm-up + {data['timed']} timed steps. "
             "`python -m bench.sft_real`.", "",
             "| workload | stack | real tokens/s | peak GiB | computed / real tokens | first loss | last loss |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in data["results"]:
        if "error" in r:
            lines.append(f"| {r['workload']} | {r['stack']} | error: {r['error'][-80:].strip()} | | | | |")
            continue
        ratio = f"{r['computed_tokens'] / r['real_tokens']:.2f}" if r.get("computed_tokens") else "-"
        lines.append(f"| {r['workload']} | {r['stack']} | {r['real_tokens_per_s']:,.0f} | "
                     f"{r['peak_bytes'] / 2**30:.1f} | {ratio} | {r['losses'][0]:.4f} | {r['losses'][-1]:.4f} |")
    return lines + [""]


def main():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        sys.exit("bench/report.py draws its plots with matplotlib: pip install matplotlib")
    lines = ["# fusetune benchmark report", "", "Generated by `python bench/report.py` from bench/results/*.json.", ""]
    kernels = by_date("kernels")
    if kernels:
        lines += kernel_section(*kernels[-1], plt)
    attention = by_date("attention")
    if attention:
        lines += attention_section(*attention[-1])
    for path, data in by_date("sft-real"):
        lines += sft_real_section(path, data)
    for path, data in by_date("e2e"):
        workloads = sorted(dict.fromkeys(r["workload"] for r in data["rows"]))
        lines += e2e_section(path, data, plt, f"e2e-{'-'.join(workloads)}.png")
    (HERE / "REPORT.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {HERE / 'REPORT.md'}")


if __name__ == "__main__":
    main()
