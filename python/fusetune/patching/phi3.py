"""Phi3: fused qkv_proj and gate_up_proj, partial rotary (the rotary dim comes from cos/sin) and a
sliding window read from the config."""
from fusetune.patching.spec import FamilySpec

SPEC = FamilySpec(
    name="Phi3", model_type="phi3", modeling="transformers.models.phi3.modeling_phi3",
    norm="Phi3RMSNorm", norm_variant="llama", norm_eps="variance_epsilon",
    mlp="Phi3MLP", attention="Phi3Attention", gate_up="gate_up_proj", qkv="qkv_proj",
    sliding_window="config",
)
