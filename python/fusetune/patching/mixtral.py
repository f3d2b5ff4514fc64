"""Mixtral: Mistral's attention and norms (the model-wide sliding window read from the config) with
a sparse MoE block; its experts' act(gate) * up runs fused (FusedExperts)."""
from fusetune.patching.spec import FamilySpec

SPEC = FamilySpec(
    name="Mixtral", model_type="mixtral", modeling="transformers.models.mixtral.modeling_mixtral",
    norm="MixtralRMSNorm", norm_variant="llama", norm_eps="variance_epsilon",
    mlp="MixtralExperts", mlp_kind="experts", attention="MixtralAttention", sliding_window="config",
)
