"""T5 (and Flan-T5), encoder-decoder: T5LayerNorm is an RMSNorm, the gated-GELU FFN (wi_0 gate,
wi_1 up, wo down, with dropout before wo) a GeGLU, the LM head's loss a cross-entropy on its
logits. Its attention has relative position buckets, no RoPE: it stays as is. The non-gated FFN
(T5 v1.0's wi/wo, ReLU) is not a GLU and stays as is too."""
from fusetune.patching.spec import FamilySpec

SPEC = FamilySpec(
    name="T5", model_type="t5", modeling="transformers.models.t5.modeling_t5",
    norm="T5LayerNorm", norm_variant="t5", norm_eps="variance_epsilon",
    mlp="T5DenseGatedActDense", attention=None, act_key="dense_act_fn", mlp_kind="t5",
    seq2seq_lm="T5ForConditionalGeneration",
    projections=(("q_proj", "q"), ("k_proj", "k"), ("v_proj", "v"), ("o_proj", "o"),
                 ("gate_proj", "wi_0"), ("up_proj", "wi_1"), ("down_proj", "wo")),
)
