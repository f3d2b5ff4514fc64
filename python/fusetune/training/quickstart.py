"""The README's main job: a short LoRA fine-tune of a tiny Llama, built from a config, patched by
fusetune, on the text bundled with the package. Byte-level tokens keep it free of any download."""
from __future__ import annotations

import time
from importlib import resources

import torch

from fusetune.training.memory import describe_peak, reset_peak

BYTE_VOCAB = 256
BOS = 256


def bundled_text() -> str:
    return resources.files("fusetune.data").joinpath("quickstart.txt").read_text(encoding="utf-8")


def byte_batches(text: str, seq_len: int, batch_size: int, generator: torch.Generator):
    """Endless random windows of the UTF-8 bytes of `text`, each starting with BOS."""
    data = torch.tensor(list(text.encode("utf-8")), dtype=torch.long)
    if data.numel() <= seq_len:
        raise ValueError(f"the training text has {data.numel()} bytes; it needs more than seq_len={seq_len}")
    while True:
        starts = torch.randint(0, data.numel() - seq_len + 1, (batch_size,), generator=generator)
        windows = torch.stack([data[s:s + seq_len - 1] for s in starts.tolist()])
        yield torch.cat([torch.full((batch_size, 1), BOS), windows], dim=1)


def tiny_llama(device: torch.device, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=BYTE_VOCAB + 1, hidden_size=256, intermediate_size=688,
                         num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
                         max_position_embeddings=1024, bos_token_id=BOS, eos_token_id=BOS,
                         pad_token_id=BOS, tie_word_embeddings=False)
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config).to(device=device, dtype=dtype)


def run(steps: int = 60, seq_len: int = 128, batch_size: int = 8, lr: float = 3e-3,
        device: str | None = None, seed: int = 0, log=print) -> dict:
    from peft import LoraConfig, get_peft_model

    import fusetune

    torch.manual_seed(seed)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if dev.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    model = tiny_llama(dev, dtype)
    lora = LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM",
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                      "up_proj", "down_proj"])
    model = get_peft_model(model, lora)
    fusetune.patch_model(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    from fusetune.training.env import backend_report

    log(f"tiny Llama: {total / 1e6:.2f}M parameters, {trainable / 1e6:.2f}M trainable (LoRA r=16), "
        f"{dev.type} {str(dtype).removeprefix('torch.')}, batch {batch_size} x {seq_len} bytes, "
        f"fused ops on the {backend_report(dev)['rms_norm']} backend")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    batches = byte_batches(bundled_text(), seq_len, batch_size,
                           torch.Generator().manual_seed(seed))
    reset_peak(dev)
    losses, tokens, start = [], 0, time.perf_counter()
    model.train()
    for step in range(1, steps + 1):
        ids = next(batches).to(dev)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        tokens += ids.numel()
        if step == 1 or step % 10 == 0 or step == steps:
            rate = tokens / (time.perf_counter() - start)
            log(f"step {step:4d}  loss {losses[-1]:.4f}  {rate:,.0f} tokens/s")
    elapsed = time.perf_counter() - start
    result = {"first_loss": losses[0], "last_loss": losses[-1], "losses": losses,
              "tokens_per_s": tokens / elapsed, "peak_memory": describe_peak(dev),
              "device": str(dev), "dtype": str(dtype)}
    log(f"done: loss {losses[0]:.3f} -> {losses[-1]:.3f}, {result['tokens_per_s']:,.0f} tokens/s, "
        f"peak memory {result['peak_memory']}")
    return result
