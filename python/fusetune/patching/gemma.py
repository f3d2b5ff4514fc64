"""Gemma: (1 + w) RMSNorm in fp32, GeGLU (tanh) MLP; embedding scaling stays in HF's embedding."""
from fusetune.patching.spec import FamilySpec

SPEC = FamilySpec(
    name="Gemma", model_type="gemma", modeling="transformers.models.gemma.modeling_gemma",
    norm="GemmaRMSNorm", norm_variant="gemma", norm_eps="eps",
    mlp="GemmaMLP", attention="GemmaAttention",
)
