"""NF4 dequantisation speed at a Llama-3.1-8B MLP weight (14336 x 4096 -> bf16), plain and
double-quantised: median ms (do_bench) and bandwidth (4-bit data + absmax read, bf16 written)
as a fraction of the measured copy bandwidth.

    python bench/nf4_dequant.py
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import copy_bandwidth, do_bench  # noqa: E402
from fusetune import use_backend  # noqa: E402
from fusetune.quant import dequantize_nf4, quantize_nf4  # noqa: E402


def main():
    bandwidth = copy_bandwidth()
    weight = torch.randn(14336, 4096, device="cuda", dtype=torch.bfloat16)
    for double_quant in (False, True):
        packed, state = quantize_nf4(weight, 64, double_quant)
        stats = sum(t.nbytes for t in (state.absmax, state.nested_absmax) if t is not None)
        nbytes = packed.nbytes + stats + weight.nbytes
        with use_backend("triton"):
            ms = do_bench(lambda: dequantize_nf4(packed, state))
        print(f"nf4 dequant 14336x4096 double_quant={double_quant}: {ms:.4f} ms, "
              f"{nbytes / ms / 1e6:.0f} GB/s, {100 * nbytes / (ms * 1e-3) / bandwidth:.0f}% of copy")


if __name__ == "__main__":
    main()
