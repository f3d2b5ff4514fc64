"""FamilySpec: what patch_model needs to know about one model family, declared, not coded.

Everything else (which attention interface, the query scale, dropout, eps, the KV cache) is read
from the modules themselves at run time, exactly as the Hugging Face forward reads it.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FamilySpec:
    name: str                    # family name in messages, e.g. "Llama"
    model_type: str              # config.model_type of the models it covers
    modeling: str                # the transformers modeling module that defines the classes below
    norm: str                    # RMSNorm class (decoder norms, final norm and q/k head norms)
    norm_variant: str            # "llama": cast(x*rstd) * w  |  "gemma": cast(x*rstd * (1 + w)), fp32  |
    #                              "t5": llama's, output in a 16-bit weight's dtype (T5's residual may be fp32)
    norm_eps: str                # attribute of the norm holding eps
    mlp: str                     # gated MLP class
    attention: str | None        # attention class with RoPE (None: the family has no RoPE, e.g. T5)
    act_key: str = "hidden_act"  # config field naming the MLP activation
    gate_up: str | None = None   # fused gate/up projection (output [gate | up]); None: gate_proj, up_proj
    qkv: str | None = None       # fused q/k/v projection (output [q | k | v]); None: q_proj, k_proj, v_proj
    qk_norm: bool = False        # per-head RMSNorm on q and k (modules q_norm, k_norm) before RoPE
    sliding_window: str | None = None  # what HF passes as sliding_window: "module" (self.sliding_window),
    #                                    "config" (config.sliding_window) or None (not passed)
    attn_softcap: bool = False   # HF passes softcap=self.attn_logit_softcapping to the attention
    mlp_kind: str = "gated"      # "gated": down(act(gate) * up)  |  "t5": wo(dropout(act(wi_0) * wi_1)),
    #                              the product cast to wo's dtype first (T5 keeps wo in fp32)
    seq2seq_lm: str | None = None  # the encoder-decoder LM class whose loss is fused (on its logits); None:
    #                                a causal LM, whose loss_function is fused
    projections: tuple[tuple[str, str], ...] = ()  # usual LoRA target names the family spells otherwise
    multimodal: tuple[str, ...] = ()  # model types of image-text checkpoints whose language model is this
    #                                   family (patched alike; their vision tower stays as is)
