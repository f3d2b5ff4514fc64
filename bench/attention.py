"""fusetune's flash attention beside torch SDPA (flash and cuDNN backends): forward and
forward + backward, bf16, causal, 32 query / 8 key-value heads (Llama-3 8B), one sequence of
2k to 32k tokens at head dims 64 and 128; then the features SDPA's fast backends lack: Gemma-2's
softcap with a sliding window, and packed documents (SDPA gets the dense block-causal mask
Hugging Face builds for packed rows, which only its memory-efficient/math backends take).

TFLOP/s count the useful work: forward 4 * heads * D * (allowed query-key pairs), backward 2.5x
the forward (flash attention's convention), so causal and packed rows count only what they attend.

    python -m bench.attention [--quick]       # on a GPU; prints a table, writes bench/results JSON
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from bench.common import do_bench, environment, write_results


def documents(seq: int, median: int = 250, seed: int = 0) -> torch.Tensor:
    """(1, seq) segment ids of documents with lognormal lengths (median ~250, clipped at 2048)."""
    gen = torch.Generator().manual_seed(seed)
    ids, doc = [], 0
    while len(ids) < seq:
        n = int(torch.empty(1).log_normal_(mean=float(torch.tensor(median).log()), std=0.9, generator=gen)
                .clamp(8, 2048))
        ids += [doc] * n
        doc += 1
    return torch.tensor(ids[:seq])[None]


def pairs(seq: int, causal: bool, window: int | None, ids: torch.Tensor | None) -> int:
    """Allowed (query, key) pairs of one head."""
    from fusetune.reference.attention import allowed

    if seq > 16384:  # the mask would be big: count per document / closed form
        if ids is None and window is None:
            return seq * (seq + 1) // 2 if causal else seq * seq
    return int(allowed(seq, seq, causal, window, ids, "cuda").sum())


def sdpa_runner(q, k, v, backend, mask=None):
    from torch.nn.attention import sdpa_kernel

    def run():
        with sdpa_kernel(backend):
            if mask is None:
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            group = q.shape[1] // k.shape[1]  # the memory-efficient backend takes no enable_gqa
            return F.scaled_dot_product_attention(q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1),
                                                  attn_mask=mask)
    return run


def fusetune_runner(q, k, v, **options):
    from fusetune.ops.attention import attention, segments

    if options.get("segment_ids") is not None:
        options["runs"] = segments(options.pop("segment_ids"))
    return lambda: attention(q, k, v, **options)


def timed(run, inputs):
    """(forward ms, forward + backward ms) of run()."""
    fwd = do_bench(run)
    out = run()
    grad = torch.randn_like(out)

    def both():
        torch.autograd.grad(run(), inputs, grad)
    return fwd, do_bench(both)


def case(seq, head_dim, heads=32, kv_heads=8, **feature):
    torch.manual_seed(0)
    q = torch.randn(1, heads, seq, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(1, kv_heads, seq, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            for _ in range(2))
    ids = feature.get("segment_ids")
    work = 4 * heads * head_dim * pairs(seq, True, feature.get("window"), ids)
    rows = []
    stacks = {"fusetune": fusetune_runner(q, k, v, **dict(feature))}
    from torch.nn.attention import SDPBackend

    if not feature:
        stacks["sdpa-flash"] = sdpa_runner(q, k, v, SDPBackend.FLASH_ATTENTION)
        stacks["sdpa-cudnn"] = sdpa_runner(q, k, v, SDPBackend.CUDNN_ATTENTION)
    elif ids is not None and seq <= 16384:
        from fusetune.reference.attention import allowed

        mask = allowed(seq, seq, True, None, ids.cuda(), "cuda")
        stacks["sdpa-efficient-mask"] = sdpa_runner(q, k, v, SDPBackend.EFFICIENT_ATTENTION, mask)
    for name, run in stacks.items():
        try:
            fwd, both = timed(run, (q, k, v))
            rows.append(dict(stack=name, fwd_ms=fwd, fwdbwd_ms=both, fwd_tflops=work / fwd / 1e9,
                             fwdbwd_tflops=3.5 * work / both / 1e9))
        except Exception as error:  # noqa: BLE001 - a backend that cannot take the case is a row, not a crash
            rows.append(dict(stack=name, error=f"{type(error).__name__}: {str(error)[:120]}"))
    return rows


def check_numerics():
    """bf16 kernel output and gradients vs float64 at a real shape, the relative errors."""
    from fusetune.ops.attention import attention
    from fusetune.reference.attention import attention as reference

    ids = documents(4096).cuda()
    q = torch.randn(1, 32, 4096, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(1, 8, 4096, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    out = attention(q, k, v, segment_ids=ids)
    grad = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), grad)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref, _ = reference(q64, k64, v64, segment_ids=ids)
    refs = torch.autograd.grad(ref, (q64, k64, v64), grad.double())
    err = lambda a, b: float((a.double() - b).norm() / b.norm())  # noqa: E731
    return {"out": err(out, ref), **{n: err(a, b) for n, a, b in zip(("dq", "dk", "dv"), grads, refs)}}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="2k and 8k only")
    args = parser.parse_args()
    seqs = (2048, 8192) if args.quick else (2048, 4096, 8192, 16384, 32768)
    results = []
    numerics = check_numerics()
    print("numerics (bf16 vs float64, 4k packed, 32/8 heads of 128):", numerics, flush=True)
    for head_dim in (128, 64):
        for seq in seqs:
            for row in case(seq, head_dim):
                results.append(dict(seq=seq, head_dim=head_dim, feature="causal", **row))
    for seq in seqs[:3]:
        for row in case(seq, 256, heads=16, kv_heads=8, softcap=50.0, window=4096, scale=256 ** -0.5):
            results.append(dict(seq=seq, head_dim=256, feature="softcap+window4096", **row))
        for row in case(seq, 128, segment_ids=documents(seq).cuda()):
            results.append(dict(seq=seq, head_dim=128, feature="packed", **row))
    print(f"{'feature':>18} {'D':>4} {'seq':>6} {'stack':>20} {'fwd TF/s':>9} {'fwd+bwd TF/s':>12}")
    for r in results:
        if "error" in r:
            print(f"{r['feature']:>18} {r['head_dim']:>4} {r['seq']:>6} {r['stack']:>20}  {r['error']}")
        else:
            print(f"{r['feature']:>18} {r['head_dim']:>4} {r['seq']:>6} {r['stack']:>20} {r['fwd_tflops']:9.1f} "
                  f"{r['fwdbwd_tflops']:12.1f}")
    write_results("attention", {"environment": environment(), "numerics": numerics, "results": results})


if __name__ == "__main__":
    main()
