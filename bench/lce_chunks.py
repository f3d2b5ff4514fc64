"""Sweep the chunk size of fusetune's fused linear cross-entropy at the Llama-3.2-1B and 3.1-8B
head shapes (4096 tokens, vocab 128256, bf16), forward+backward, against the Hugging Face way
(lm_head matmul, then cross-entropy on fp32-upcast logits). Prints median ms and peak extra MB.

    python bench/lce_chunks.py
"""
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.kernels import measure  # noqa: E402
from fusetune.ops import linear_cross_entropy as lce  # noqa: E402

lce_module = sys.modules["fusetune.ops.linear_cross_entropy"]
TOKENS, VOCAB = 4096, 128256


def main():
    print(f"{'hidden':>7}{'impl':>16}{'ms':>9}{'peak MB':>9}")
    for hidden_size in (2048, 4096):
        hidden = torch.randn(TOKENS, hidden_size, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        weight = torch.randn(VOCAB, hidden_size, device="cuda", dtype=torch.bfloat16) / hidden_size**0.5
        targets = torch.randint(0, VOCAB, (TOKENS,), device="cuda")
        inputs = (hidden, weight, targets)
        ms, peak, _ = measure(lambda h, w, t: F.cross_entropy((h @ w.t()).float(), t), inputs, "fwd+bwd")
        print(f"{hidden_size:7d}{'hf eager':>16}{ms:9.3f}{peak / 2**20:9.0f}")
        for chunk_mib in (128, 256, 512, 1024, 2048):
            lce_module.CHUNK_BYTES = chunk_mib << 20
            ms, peak, _ = measure(lce, inputs, "fwd+bwd")
            print(f"{hidden_size:7d}{f'fusetune {chunk_mib}M':>16}{ms:9.3f}{peak / 2**20:9.0f}")


if __name__ == "__main__":
    main()
