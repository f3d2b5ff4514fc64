"""Fused LoRA blocks: autograd Functions with hand-written backwards over PEFT-compatible adapters."""
from fusetune.lora.linear import LoRALinearFunction, lora_linear
from fusetune.lora.mlp import LoRAMLPFunction, lora_mlp
from fusetune.lora.projection import LoRAProjection

__all__ = ["LoRALinearFunction", "LoRAMLPFunction", "LoRAProjection", "lora_linear", "lora_mlp"]
