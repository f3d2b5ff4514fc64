"""Qwen3-MoE: Qwen3's attention (q/k head norms, per-module sliding window) with a sparse MoE block;
its experts' act(gate) * up runs fused (FusedExperts). Dense layers (mlp_only_layers) keep their MLP."""
from fusetune.patching.spec import FamilySpec

SPEC = FamilySpec(
    name="Qwen3-MoE", model_type="qwen3_moe", modeling="transformers.models.qwen3_moe.modeling_qwen3_moe",
    norm="Qwen3MoeRMSNorm", norm_variant="llama", norm_eps="variance_epsilon",
    mlp="Qwen3MoeExperts", mlp_kind="experts", attention="Qwen3MoeAttention", qk_norm=True,
    sliding_window="module",
)
