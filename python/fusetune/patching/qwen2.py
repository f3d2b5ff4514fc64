"""Qwen2: Llama with q/k/v biases (inside the projections) and per-layer sliding windows."""
from fusetune.patching.spec import FamilySpec

SPEC = FamilySpec(
    name="Qwen2", model_type="qwen2", modeling="transformers.models.qwen2.modeling_qwen2",
    norm="Qwen2RMSNorm", norm_variant="llama", norm_eps="variance_epsilon",
    mlp="Qwen2MLP", attention="Qwen2Attention", sliding_window="module",
)
