"""Where the Triton NF4 dequantisation on the GPU and bitsandbytes' CPU dequantisation disagree
for fp16 output with double quantisation: counts and sizes of the differences (diagnostic)."""
import torch
import bitsandbytes.functional as F

from fusetune import use_backend
from fusetune.quant import dequantize_nf4, state_from_dict

torch.manual_seed(0)
for shape, blocksize in (((33, 100), 64), ((64, 128), 128), ((300, 512), 64)):
    for trial in range(20):
        w = torch.randn(shape) * 3
        packed, qs = F.quantize_4bit(w, blocksize=blocksize, quant_type="nf4", compress_statistics=True)
        qs.dtype = torch.float16
        expected = F.dequantize_4bit(packed, qs)
        state = state_from_dict(qs.as_dict(packed=True), device="cuda")
        for backend in ("triton", "cuda"):
            with use_backend(backend):
                got = dequantize_nf4(packed.cuda(), state).cpu()
            bad = got != expected
            if bad.any():
                i = bad.nonzero()[0].tolist()
                print(f"{shape} bs={blocksize} {backend}: {int(bad.sum())} differ, e.g. at {i}: got "
                      f"{got[tuple(i)].item()!r} expected {expected[tuple(i)].item()!r} "
                      f"(fp32 {F.dequantize_4bit(packed, qs).float()[tuple(i)].item()!r})")
print("done")
