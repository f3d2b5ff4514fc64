"""Fused LoRA blocks: autograd Functions with hand-written backwards over PEFT-compatible adapters."""
from fusetune.lora.mlp import LoRAMLPFunction, LoRAProjection, lora_mlp

__all__ = ["LoRAMLPFunction", "LoRAProjection", "lora_mlp"]
