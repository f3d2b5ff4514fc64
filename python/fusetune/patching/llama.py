"""Llama: llama RMSNorm, SwiGLU MLP, full RoPE, no sliding window."""
from fusetune.patching.spec import FamilySpec

SPEC = FamilySpec(
    name="Llama", model_type="llama", modeling="transformers.models.llama.modeling_llama",
    norm="LlamaRMSNorm", norm_variant="llama", norm_eps="variance_epsilon",
    mlp="LlamaMLP", attention="LlamaAttention",
)
