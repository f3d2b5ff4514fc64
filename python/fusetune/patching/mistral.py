"""Mistral: Llama plus a model-wide sliding window read from the config."""
from fusetune.patching.spec import FamilySpec

SPEC = FamilySpec(
    name="Mistral", model_type="mistral", modeling="transformers.models.mistral.modeling_mistral",
    norm="MistralRMSNorm", norm_variant="llama", norm_eps="variance_epsilon",
    mlp="MistralMLP", attention="MistralAttention", sliding_window="config",
)
