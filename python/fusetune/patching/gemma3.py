"""Gemma3 text (Gemma3ForCausalLM): Gemma2 plus q/k norms; its attention passes no softcap
(as in HF), and its per-layer-type RoPE arrives as position_embeddings like everywhere else.
The image-text checkpoints (Gemma3ForConditionalGeneration, model_type "gemma3") have the same
language model classes, patched alike; their SigLIP vision tower stays as is."""
from fusetune.patching.spec import FamilySpec

SPEC = FamilySpec(
    name="Gemma3", model_type="gemma3_text", modeling="transformers.models.gemma3.modeling_gemma3",
    norm="Gemma3RMSNorm", norm_variant="gemma", norm_eps="eps",
    mlp="Gemma3MLP", attention="Gemma3Attention", act_key="hidden_activation",
    qk_norm=True, sliding_window="module", multimodal=("gemma3",),
)
