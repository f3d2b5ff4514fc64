"""Fused NF4 dequantise + small-M matmul (nf4_gemv, decoding) at Llama-3.1-8B weight shapes, bf16 x,
double-quantised W (blocksize 64): nf4_gemv with its heuristic config and a sweep of configs,
against dequantise-then-matmul (fusetune's nf4_dequant + x @ w.T) and a plain bf16 x @ w.T.

    python bench/nf4_gemv.py [--m 1 4 16] [--shapes 4096x4096,14336x4096] [--no-sweep] [--budget-s 420]

Times are medians of triton.testing.do_bench (L2 flushed between runs) in microseconds; the sweep
uses shorter runs (warmup 5 ms, rep 20 ms) and its three fastest configs are timed again in full.
Bandwidth counts the bytes nf4_gemv must move: packed W + absmax codes + nested absmax + x + out,
as a percentage of the measured device-to-device copy bandwidth. Errors are relative to
x.float() @ w.float().T with w the dequantised bf16 weight: max|out - ref| / max|ref| ("max rel")
and ||out - ref|| / ||ref|| ("norm rel"); a sweep config whose norm error passes 1e-2 is marked
WRONG and never chosen. Results also go to bench/results/nf4_gemv-<gpu>-<date>.json.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import triton
import triton.testing

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import copy_bandwidth, do_bench, write_results  # noqa: E402
from fusetune.quant import quantize_nf4  # noqa: E402
from fusetune.triton_kernels.nf4 import nf4_dequant  # noqa: E402
from fusetune.triton_kernels.nf4_gemv import GemvConfig, nf4_gemv, nf4_gemv_config  # noqa: E402

SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336), (1024, 4096)]  # W (N, K): q/o, gate/up, down, k/v
MS = (1, 4, 16)
BLOCKSIZE = 64


def label(cfg: GemvConfig) -> str:
    kind = "fma" if not cfg.use_dot else ("dot" if cfg.w_lhs else "dotR")
    stages = "" if cfg.num_stages is None else f" st{cfg.num_stages}"
    return f"{kind} bn{cfg.block_n} bk{cfg.block_k} s{cfg.split_k} w{cfg.num_warps}{stages}"


def sweep_configs(m: int, n: int, k: int, sms: int) -> list[GemvConfig]:
    """A grid around the heuristic: for each tile, split-K of 1, the smallest power of 2 that gives
    2 programs per SM, and twice that."""
    out = [nf4_gemv_config(m, n, k, BLOCKSIZE, sms)]

    def splits(block_n, block_k):
        k_tiles, tiles, s = k // block_k, triton.cdiv(n, block_n), 1
        while tiles * s < 2 * sms and s * 2 <= k_tiles:
            s *= 2
        return sorted({1, s, min(2 * s, k_tiles)})

    def add(block_ns, block_ks, warps, **kw):
        for block_n in block_ns:
            for block_k in block_ks:
                if k % block_k:
                    continue
                for split in splits(block_n, block_k):
                    for w in warps:
                        if block_n * block_k <= 128 * 32 * w:  # more elements per thread spill
                            out.append(GemvConfig(block_n, block_k, split, w, **kw))

    if m == 1:
        add((16, 32, 64), (256, 512), (4, 8), use_dot=False)
        add((32, 64), (128, 256), (4,), use_dot=True, num_stages=1)
    else:
        add((16, 32, 64), (64, 128, 256), (4, 8), use_dot=True, num_stages=1)
        add((32, 64), (128,), (4,), use_dot=True, w_lhs=False, num_stages=1)
        base = out[0]
        out += [GemvConfig(base.block_n, base.block_k, base.split_k, base.num_warps, True, True, st)
                for st in (2, 3)]
    seen, unique = set(), []
    for cfg in out:
        if cfg not in seen:
            seen.add(cfg)
            unique.append(cfg)
    return unique


def errors(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    diff = (out.float() - ref).abs()
    return (diff.max() / ref.abs().max()).item(), ((out.float() - ref).norm() / ref.norm()).item()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--m", type=int, nargs="+", default=list(MS))
    parser.add_argument("--shapes", default=",".join(f"{n}x{k}" for n, k in SHAPES),
                        help="comma-separated NxK weight shapes")
    parser.add_argument("--no-sweep", action="store_true", help="heuristic config and baselines only")
    parser.add_argument("--budget-s", type=float, default=420.0,
                        help="stop sweeping (heuristic and baselines still run) after this many seconds")
    args = parser.parse_args()
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    start = time.time()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    bandwidth = copy_bandwidth()
    gpu = torch.cuda.get_device_name()
    print(f"{gpu}, {sms} SMs, copy bandwidth {bandwidth / 1e9:.0f} GB/s, torch {torch.__version__}, "
          f"triton {triton.__version__}")
    rows, sweeps = [], {}
    for n, k in shapes:
        w_src = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        packed, st = quantize_nf4(w_src, BLOCKSIZE, True)
        del w_src
        q = (packed, st.absmax, st.code, BLOCKSIZE, n, k, st.nested_absmax, st.nested_code, st.offset,
             st.nested_blocksize)

        def dequant():
            return nf4_dequant(packed, st.absmax, st.code, BLOCKSIZE, n * k, torch.bfloat16, st.nested_absmax,
                               st.nested_code, st.offset, st.nested_blocksize).view(n, k)

        w = dequant()
        for m in args.m:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            ref = x.float() @ w.float().T
            nbytes = (packed.nbytes + st.absmax.nbytes + st.nested_absmax.nbytes + x.nbytes + m * n * 2)
            pct = lambda us: 100 * nbytes / (us * 1e-6) / bandwidth  # noqa: E731
            heur = nf4_gemv_config(m, n, k, BLOCKSIZE, sms)
            ours = nf4_gemv(x, *q)
            torch_out = x @ w.T
            max_rel, norm_rel = errors(ours, ref)
            t_max_rel, t_norm_rel = errors(torch_out, ref)
            us_heur = 1e3 * do_bench(lambda: nf4_gemv(x, *q))
            us_deq = 1e3 * do_bench(lambda: x @ dequant().T)
            us_mm = 1e3 * do_bench(lambda: x @ w.T)
            timed = [(us_heur, heur)]
            if not args.no_sweep:
                results = []
                for cfg in sweep_configs(m, n, k, sms):
                    if time.time() - start > args.budget_s:
                        print(f"  budget of {args.budget_s:.0f} s spent: sweep cut short at M={m} {n}x{k}")
                        break
                    try:
                        err = errors(nf4_gemv(x, *q, config=cfg), ref)[1]
                        us = 1e3 * triton.testing.do_bench(lambda: nf4_gemv(x, *q, config=cfg), warmup=5, rep=20,
                                                           return_mode="median")
                    except Exception as exc:  # e.g. out of shared memory / registers on this GPU
                        results.append((float("inf"), cfg, f"{type(exc).__name__}: {str(exc)[:80]}"))
                        continue
                    results.append((us, cfg, "WRONG" if err > 1e-2 else f"{err:.1e}"))
                results.sort(key=lambda r: r[0])
                sweeps[(m, n, k)] = results
                good = [r for r in results if r[2] != "WRONG" and r[0] != float("inf")]
                for _, cfg, _ in good[:3]:  # the fastest few again, timed in full
                    timed.append((1e3 * do_bench(lambda: nf4_gemv(x, *q, config=cfg)), cfg))
            us_best, best = min(timed, key=lambda r: r[0])
            row = {"m": m, "n": n, "k": k, "bytes": nbytes, "heuristic": label(heur), "us_heuristic": us_heur,
                   "pct_copy_heuristic": pct(us_heur), "best": label(best), "us_best": us_best,
                   "pct_copy_best": pct(us_best), "us_dequant_matmul": us_deq, "us_bf16_matmul": us_mm,
                   "max_rel_err": max_rel, "norm_rel_err": norm_rel, "torch_max_rel_err": t_max_rel,
                   "torch_norm_rel_err": t_norm_rel}
            rows.append(row)
            print(f"M={m:2d} W {n}x{k}: heuristic [{label(heur)}] {us_heur:7.1f} us {pct(us_heur):3.0f}% | best "
                  f"[{label(best)}] {us_best:7.1f} us {pct(us_best):3.0f}% | dequant+matmul {us_deq:7.1f} us | "
                  f"bf16 matmul {us_mm:7.1f} us | max rel {max_rel:.1e} (torch {t_max_rel:.1e}), "
                  f"norm rel {norm_rel:.1e} (torch {t_norm_rel:.1e})", flush=True)

    print(f"\n{'M':>2} {'W (N x K)':>11} | {'heuristic':>26} {'us':>7} {'%copy':>5} | {'best':>26} {'us':>7} "
          f"{'%copy':>5} | {'deq+mm us':>9} {'bf16 mm us':>10} | {'speedup':>7} | {'max rel':>7}")
    for r in rows:
        print(f"{r['m']:>2} {r['n']:>5}x{r['k']:<5} | {r['heuristic']:>26} {r['us_heuristic']:7.1f} "
              f"{r['pct_copy_heuristic']:5.0f} | {r['best']:>26} {r['us_best']:7.1f} {r['pct_copy_best']:5.0f} | "
              f"{r['us_dequant_matmul']:9.1f} {r['us_bf16_matmul']:10.1f} | "
              f"{r['us_dequant_matmul'] / r['us_heuristic']:6.1f}x | {r['max_rel_err']:.1e}")
    for (m, n, k), results in sweeps.items():
        print(f"\nsweep M={m} W {n}x{k} ({len(results)} configs), fastest first:")
        for us, cfg, note in results[:8]:
            print(f"  {label(cfg):>28} {us:8.1f} us  err {note}")
        failed = [r for r in results if r[0] == float("inf") or r[2] == "WRONG"]
        for us, cfg, note in failed:
            print(f"  {label(cfg):>28} FAILED {note}")
    payload = {"rows": rows, "sweeps": {f"M{m}_{n}x{k}": [{"config": label(c), "us": us, "note": note}
                                                         for us, c, note in res]
                                        for (m, n, k), res in sweeps.items()},
               "copy_bandwidth": bandwidth, "seconds": time.time() - start}
    try:
        from bench.common import environment

        payload["environment"] = environment()
    except ImportError:  # environment() imports transformers
        import datetime

        payload["environment"] = {"gpu": gpu, "torch": torch.__version__, "triton": triton.__version__,
                                  "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    print(f"\nwrote {write_results('nf4_gemv', payload)} ({time.time() - start:.0f} s)")


if __name__ == "__main__":
    main()
