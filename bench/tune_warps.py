"""Sweep num_warps of the RMSNorm and RoPE launchers at Llama-3.1-8B shapes (4096 tokens, bf16):
GPU time from CUDA-graph replay and the fraction of the measured copy bandwidth.

    python bench/tune_warps.py
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import copy_bandwidth, do_bench  # noqa: E402
from fusetune.triton_kernels import rms_norm as rms_kernels  # noqa: E402
from fusetune.triton_kernels import rope as rope_kernels  # noqa: E402


def graph_ms(fn):
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return do_bench(graph.replay)


def main():
    bandwidth = copy_bandwidth()
    bf16 = dict(device="cuda", dtype=torch.bfloat16)
    x = torch.randn(4096, 4096, **bf16)
    w = torch.randn(4096, **bf16)
    dy = torch.randn_like(x)
    q = torch.randn(1, 4096, 32, 128, **bf16).transpose(1, 2)
    k = torch.randn(1, 4096, 8, 128, **bf16).transpose(1, 2)
    cos, sin = torch.randn(1, 4096, 128, **bf16), torch.randn(1, 4096, 128, **bf16)
    _, rstd = rms_kernels.rms_norm_fwd(x, w, 1e-6, 0.0, True, x.dtype)
    cases = {
        "rms_norm fwd": (rms_kernels, lambda: rms_kernels.rms_norm_fwd(x, w, 1e-6, 0.0, True, x.dtype), 2 * x.nbytes),
        "rms_norm bwd": (rms_kernels, lambda: rms_kernels.rms_norm_bwd(dy, x, w, rstd, 0.0, True, False), 3 * x.nbytes),
        "rope fwd": (rope_kernels, lambda: rope_kernels.rope_fwd(q, k, cos, sin),
                     2 * (q.nbytes + k.nbytes) + cos.nbytes + sin.nbytes),
    }
    print(f"{'case':<14}{'warps':>6}{'us':>8}{'%copy':>7}")
    for name, (module, fn, nbytes) in cases.items():
        default = module.elementwise_warps
        for warps in (None, 2, 4, 8, 16, 32):
            module.elementwise_warps = default if warps is None else (lambda block, w=warps: w)
            ms = graph_ms(fn)
            print(f"{name:<14}{'auto' if warps is None else warps:>6}{ms * 1e3:8.1f}"
                  f"{100 * nbytes / (ms * 1e-3) / bandwidth:6.0f}%")
        module.elementwise_warps = default


if __name__ == "__main__":
    main()
