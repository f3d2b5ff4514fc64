"""Qwen3: Qwen2 plus RMSNorm over head_dim on q and k before RoPE."""
from fusetune.patching.spec import FamilySpec

SPEC = FamilySpec(
    name="Qwen3", model_type="qwen3", modeling="transformers.models.qwen3.modeling_qwen3",
    norm="Qwen3RMSNorm", norm_variant="llama", norm_eps="variance_epsilon",
    mlp="Qwen3MLP", attention="Qwen3Attention", qk_norm=True, sliding_window="module",
)
