"""Gemma2: Gemma plus query_pre_attn_scalar (self.scaling), per-layer sliding windows and the
attention logit softcap. final_logit_softcapping stays in HF's forward, which applies it before
calling the loss, so the fused loss gets capped logits and must not cap them again."""
from fusetune.patching.spec import FamilySpec

SPEC = FamilySpec(
    name="Gemma2", model_type="gemma2", modeling="transformers.models.gemma2.modeling_gemma2",
    norm="Gemma2RMSNorm", norm_variant="gemma", norm_eps="eps",
    mlp="Gemma2MLP", attention="Gemma2Attention", act_key="hidden_activation",
    sliding_window="module", attn_softcap=True,
)
