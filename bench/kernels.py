"""Kernel benchmarks at Llama-3.1-8B shapes: each op's forward and forward+backward, fusetune
(Triton, and the CUDA extension where it has the op) against torch eager and torch.compile.

    python bench/kernels.py [--ops rms_norm,rope,swiglu,geglu,cross_entropy] [--no-compile]

Times are medians of triton.testing.do_bench, as called from Python (what a training step pays),
and, in the graph column, replayed from a CUDA graph (the GPU time alone); the host column is the
microseconds one forward+backward call costs at 1 token (the host's share). GB/s counts the
fewest bytes the op must move (each input read once, each output written once) over the measured
device-to-device copy bandwidth.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import copy_bandwidth, do_bench, environment, write_results  # noqa: E402
from fusetune import use_backend  # noqa: E402
from fusetune.ops import cross_entropy, geglu, linear_cross_entropy, rms_norm, rope, swiglu  # noqa: E402
from fusetune.reference import glu as glu_ref  # noqa: E402
from fusetune.reference import rms_norm as rms_ref  # noqa: E402
from fusetune.reference import rope as rope_ref  # noqa: E402

TOKENS, HIDDEN, INTERMEDIATE, VOCAB, Q_HEADS, KV_HEADS, HEAD_DIM = 4096, 4096, 14336, 128256, 32, 8, 128


def _fused(fn):
    def run(*args):
        with use_backend("triton"):
            return fn(*args)
    return run


def _cuda_ext(fn):
    def run(*args):
        with use_backend("cuda"):
            return fn(*args)
    return run


def hf_cross_entropy(logits, targets):
    """What Hugging Face's causal-LM loss does: upcast the logits to fp32, then cross_entropy."""
    return F.cross_entropy(logits.float(), targets, ignore_index=-100)


def make_cases(tokens: int = TOKENS):
    bf16 = dict(device="cuda", dtype=torch.bfloat16)
    cases = {}

    def rms_inputs():
        x = torch.randn(tokens, HIDDEN, **bf16, requires_grad=True)
        w = (torch.randn(HIDDEN, **bf16) * 0.1 + 1).requires_grad_()
        return (x, w)
    unit = tokens * HIDDEN * 2
    cases["rms_norm"] = dict(inputs=rms_inputs, bytes_fwd=2 * unit, bytes_fwdbwd=5 * unit,
                             impls={"eager": rms_ref.rms_norm, "fusetune": _fused(rms_norm),
                                    "fusetune-cuda": _cuda_ext(rms_norm)})

    def rope_inputs():
        q = torch.randn(1, tokens, Q_HEADS, HEAD_DIM, **bf16).transpose(1, 2).requires_grad_()
        k = torch.randn(1, tokens, KV_HEADS, HEAD_DIM, **bf16).transpose(1, 2).requires_grad_()
        angles = torch.arange(tokens, device="cuda")[:, None] * torch.rand(HEAD_DIM // 2, device="cuda")
        angles = torch.cat([angles, angles], -1)[None]
        return (q, k, angles.cos().to(torch.bfloat16), angles.sin().to(torch.bfloat16))
    qk = tokens * (Q_HEADS + KV_HEADS) * HEAD_DIM * 2
    cossin = 2 * tokens * HEAD_DIM * 2
    cases["rope"] = dict(inputs=rope_inputs, bytes_fwd=2 * qk + cossin, bytes_fwdbwd=4 * qk + 2 * cossin,
                         impls={"eager": rope_ref.rope, "fusetune": _fused(rope), "fusetune-cuda": _cuda_ext(rope)})

    def glu_inputs():
        gate = torch.randn(tokens, INTERMEDIATE, **bf16, requires_grad=True)
        up = torch.randn(tokens, INTERMEDIATE, **bf16, requires_grad=True)
        return (gate, up)
    unit = tokens * INTERMEDIATE * 2
    cases["swiglu"] = dict(inputs=glu_inputs, bytes_fwd=3 * unit, bytes_fwdbwd=8 * unit,
                           impls={"eager": glu_ref.swiglu, "fusetune": _fused(swiglu),
                                  "fusetune-cuda": _cuda_ext(swiglu)})
    cases["geglu"] = dict(inputs=glu_inputs, bytes_fwd=3 * unit, bytes_fwdbwd=8 * unit,
                          impls={"eager": lambda g, u: glu_ref.glu(g, u, "gelu_tanh"), "fusetune": _fused(geglu), "fusetune-cuda": _cuda_ext(geglu)})

    def ce_inputs():
        logits = torch.randn(tokens, VOCAB, **bf16, requires_grad=True)
        targets = torch.randint(0, VOCAB, (tokens,), device="cuda")
        targets[::7] = -100
        return (logits, targets)
    unit = tokens * VOCAB * 2
    cases["cross_entropy"] = dict(
        inputs=ce_inputs, bytes_fwd=unit, bytes_fwdbwd=3 * unit,
        impls={"eager": hf_cross_entropy,
               "fusetune": _fused(lambda x, t: cross_entropy(x, t, inplace_backward=True)),
               "fusetune-cuda": _cuda_ext(lambda x, t: cross_entropy(x, t, inplace_backward=True))})

    def head_inputs():
        hidden = torch.randn(tokens, HIDDEN, **bf16, requires_grad=True)
        weight = (torch.randn(VOCAB, HIDDEN, **bf16) / HIDDEN**0.5)
        targets = torch.randint(0, VOCAB, (tokens,), device="cuda")
        return (hidden, weight, targets)
    # lm_head matmuls + loss: compute-bound, so no bandwidth figure; the point is time and memory
    cases["lm_head+loss"] = dict(
        inputs=head_inputs, bytes_fwd=None, bytes_fwdbwd=None,
        impls={"eager": lambda h, w, t: hf_cross_entropy(h @ w.t(), t),
               "fusetune": _fused(linear_cross_entropy), "fusetune-cuda": _cuda_ext(linear_cross_entropy)})
    return cases


def _outputs(result):
    return result if isinstance(result, tuple) else (result,)


def measure(fn, inputs, mode: str):
    leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    if mode == "fwd":
        def step():
            with torch.no_grad():
                fn(*inputs)
    else:
        grads = [torch.randn_like(o) for o in _outputs(fn(*inputs))]

        def step():
            outs = _outputs(fn(*inputs))
            torch.autograd.backward(outs, grads)
    step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    ms = do_bench(step, grad_to_none=leaves)
    return ms, peak, graph_ms(step, leaves)


def host_us(fn, inputs, steps: int = 200) -> float:
    """Microseconds per forward+backward call on 1-token inputs, synced once at the end: what the
    op costs the host (Python, checks, the launches), the bound of a host-bound training step."""
    leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    grads = [torch.randn_like(o) for o in _outputs(fn(*inputs))]
    for _ in range(10):
        torch.autograd.backward(_outputs(fn(*inputs)), grads)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        for t in leaves:
            t.grad = None
        torch.autograd.backward(_outputs(fn(*inputs)), grads)
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps * 1e6


def graph_ms(step, leaves):
    """Median ms of the same step replayed from a CUDA graph: the GPU time without the Python and
    launch overhead (None where the step cannot be captured)."""
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            step()
        torch.cuda.current_stream().wait_stream(side)
        for t in leaves:
            t.grad = None
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        return do_bench(graph.replay)
    except Exception:  # noqa: BLE001  (a step that syncs or allocates on the host cannot be captured)
        torch.cuda.synchronize()
        return None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ops", default="rms_norm,rope,swiglu,geglu,cross_entropy,lm_head+loss")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench/kernels.py needs a CUDA GPU")
    from fusetune.backend import cuda_extension

    bandwidth = copy_bandwidth()
    print(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s")
    rows = []
    tiny = make_cases(tokens=1)
    for op, case in make_cases().items():
        if op not in args.ops.split(","):
            continue
        impls = dict(case["impls"])
        if "fusetune-cuda" in impls and cuda_extension() is None:
            print(f"{op}: fusetune._C not built, skipping the CUDA extension")
            del impls["fusetune-cuda"]
        if not args.no_compile:
            impls["torch.compile"] = torch.compile(case["impls"]["eager"], dynamic=False)
        for mode in ("fwd", "fwd+bwd"):
            nbytes = case["bytes_fwd" if mode == "fwd" else "bytes_fwdbwd"]
            for impl, fn in impls.items():
                torch.manual_seed(0)
                inputs = case["inputs"]()
                try:
                    ms, peak, gpu_ms = measure(fn, inputs, mode)
                except Exception as err:  # a failing baseline is reported, not fatal
                    print(f"{op} {mode} {impl}: failed: {type(err).__name__}: {err}")
                    continue
                gbs = nbytes / (ms * 1e-3) / 1e9 if nbytes else None
                host = None
                if mode == "fwd+bwd" and impl != "torch.compile":  # (compile re-specialises on the new shape)
                    host = host_us(tiny[op]["impls"][impl], tiny[op]["inputs"]())
                rows.append(dict(op=op, mode=mode, impl=impl, ms=ms, graph_ms=gpu_ms, host_us=host, gb_per_s=gbs,
                                 fraction_of_copy=gbs * 1e9 / bandwidth if nbytes else None,
                                 min_bytes=nbytes, peak_extra_bytes=peak))
                del inputs
                torch.cuda.empty_cache()
    payload = {"environment": environment(), "copy_bandwidth_bytes_per_s": bandwidth,
               "shapes": dict(tokens=TOKENS, hidden=HIDDEN, intermediate=INTERMEDIATE, vocab=VOCAB,
                              q_heads=Q_HEADS, kv_heads=KV_HEADS, head_dim=HEAD_DIM, dtype="bfloat16"),
               "rows": rows}
    path = write_results("kernels", payload)
    print(f"\n{'op':<14}{'mode':<9}{'impl':<15}{'ms':>8}{'GB/s':>8}{'%copy':>7}{'peak MB':>9}"
          f"{'graph ms':>9}{'%copy':>7}{'host us':>9}")
    for r in rows:
        rate = (f"{r['gb_per_s']:8.0f}{100 * r['fraction_of_copy']:6.0f}%" if r["min_bytes"]
                else f"{'-':>8}{'-':>7}")
        graph = (f"{r['graph_ms']:9.3f}" if r["graph_ms"] is not None else f"{'-':>9}")
        graph += (f"{100 * r['min_bytes'] / (r['graph_ms'] * 1e-3) / bandwidth:6.0f}%"
                  if r["graph_ms"] and r["min_bytes"] else f"{'-':>7}")
        host = f"{r['host_us']:9.1f}" if r["host_us"] is not None else f"{'-':>9}"
        print(f"{r['op']:<14}{r['mode']:<9}{r['impl']:<15}{r['ms']:8.3f}{rate}"
              f"{r['peak_extra_bytes'] / 2**20:9.0f}{graph}{host}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
