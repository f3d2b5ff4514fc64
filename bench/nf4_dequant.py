"""NF4 dequantisation speed at a Llama-3.1-8B MLP weight (14336 x 4096 -> bf16), plain and
double-quantised, fusetune's kernel beside bitsandbytes' dequantize_4bit (when importable) on the
same data: median ms (do_bench) and bandwidth (4-bit data + absmax read, bf16 written) as a
fraction of the measured copy bandwidth; then a sweep of the kernel's tile size and warps.

    python bench/nf4_dequant.py
"""
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import copy_bandwidth, do_bench  # noqa: E402
from fusetune import use_backend  # noqa: E402
from fusetune.quant import dequantize_nf4, quantize_nf4  # noqa: E402
from fusetune.triton_kernels import nf4 as kernels  # noqa: E402


def _bnb_dequant(weight, double_quant):
    try:
        import bitsandbytes.functional as F
    except ImportError:
        return None
    packed, state = F.quantize_4bit(weight, blocksize=64, compress_statistics=double_quant, quant_type="nf4")
    return lambda: F.dequantize_4bit(packed, state)


def main():
    bandwidth = copy_bandwidth()
    weight = torch.randn(14336, 4096, device="cuda", dtype=torch.bfloat16)
    for double_quant in (False, True):
        packed, state = quantize_nf4(weight, 64, double_quant)
        stats = sum(t.nbytes for t in (state.absmax, state.nested_absmax) if t is not None)
        nbytes = packed.nbytes + stats + weight.nbytes
        out = torch.empty_like(weight)
        cases = {}
        for backend in ("triton", "cuda"):
            cases[f"fusetune-{backend}"] = (backend, lambda: dequantize_nf4(packed, state, out=out))
        bnb = _bnb_dequant(weight, double_quant)
        if bnb is not None:
            cases["bitsandbytes"] = ("auto", bnb)
        for name, (backend, fn) in cases.items():
            with use_backend(backend):
                ms = do_bench(fn)
            print(f"nf4 dequant 14336x4096 double_quant={double_quant} {name:>16}: {ms:.4f} ms, "
                  f"{nbytes / ms / 1e6:.0f} GB/s, {100 * nbytes / (ms * 1e-3) / bandwidth:.0f}% of copy")
        sweep, defaults = [], (kernels.BLOCK_BYTES, kernels.NUM_WARPS)
        for block_bytes in (512, 1024, 2048, 4096):
            for warps in (2, 4, 8):
                kernels.BLOCK_BYTES, kernels.NUM_WARPS = block_bytes, warps
                with use_backend("triton"):
                    sweep.append((do_bench(lambda: dequantize_nf4(packed, state, out=out)), block_bytes, warps))
        kernels.BLOCK_BYTES, kernels.NUM_WARPS = defaults  # later measurements use the shipped tile
        print("  sweep (ms, BLOCK_BYTES, warps), best first:", sorted(sweep)[:5])
    # host time per call (a small weight, so the GPU never limits): what hundreds of calls per
    # training step cost on the CPU side
    small_packed, small_state = quantize_nf4(torch.randn(256, 256, device="cuda"), 64, True)
    small_out = torch.empty(256, 256, device="cuda")
    for backend in ("triton", "cuda"):
        with use_backend(backend):
            for _ in range(50):
                dequantize_nf4(small_packed, small_state, out=small_out)
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(1000):
                dequantize_nf4(small_packed, small_state, out=small_out)
            torch.cuda.synchronize()
        print(f"host time per dequantize_nf4 call, {backend}: {(time.perf_counter() - start) * 1e3:.1f} us")


if __name__ == "__main__":
    main()
