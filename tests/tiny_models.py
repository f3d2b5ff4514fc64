"""Tiny random Hugging Face causal LMs of every supported family, built from configs (no downloads).

Shapes: hidden 64, 2 layers, 4 heads, 2 kv heads, head_dim 16, vocab 257, intermediate 96.
Each family gets its distinctive features switched on, so a patch that drops one shows up:
sliding windows shorter than the test sequences (Mistral, Qwen2/3, Gemma2/3, Phi3), softcaps that
bite (Gemma2), q/k norms (Qwen3, Gemma3), a partial rotary factor (Phi3 "phi3_partial"), query
scaling by query_pre_attn_scalar (Gemma2/3) and attention/QKV biases (Qwen2).
"""
import torch

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "phi3")
VOCAB = 257
SLIDING_WINDOW = 8

_COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
               attention_dropout=0.0, pad_token_id=0, bos_token_id=1, eos_token_id=None,
               tie_word_embeddings=False, initializer_range=0.1)
_ROPE = {"rope_type": "default", "rope_theta": 10000.0}

# family -> (config class name, extra config fields); "phi3_partial" is Phi3 with partial rotary
_CONFIGS = {
    "llama": ("LlamaConfig", dict(rope_parameters=_ROPE)),
    "mistral": ("MistralConfig", dict(rope_parameters=_ROPE, sliding_window=SLIDING_WINDOW)),
    "qwen2": ("Qwen2Config", dict(rope_parameters=_ROPE, use_sliding_window=True, sliding_window=SLIDING_WINDOW,
                                  max_window_layers=1)),
    "qwen3": ("Qwen3Config", dict(rope_parameters=_ROPE, use_sliding_window=True, sliding_window=SLIDING_WINDOW,
                                  max_window_layers=1)),
    "gemma": ("GemmaConfig", dict(rope_parameters=_ROPE, hidden_act="gelu_pytorch_tanh")),
    "gemma2": ("Gemma2Config", dict(rope_parameters=_ROPE, sliding_window=SLIDING_WINDOW, query_pre_attn_scalar=24,
                                    attn_logit_softcapping=2.0, final_logit_softcapping=3.0,
                                    layer_types=["sliding_attention", "full_attention"])),
    "gemma3": ("Gemma3TextConfig", dict(sliding_window=SLIDING_WINDOW, query_pre_attn_scalar=24,
                                        layer_types=["sliding_attention", "full_attention"],
                                        rope_parameters={"sliding_attention": dict(_ROPE),
                                                         "full_attention": dict(_ROPE, rope_theta=1e6)})),
    "phi3": ("Phi3Config", dict(rope_parameters=dict(_ROPE, partial_rotary_factor=1.0),
                                sliding_window=SLIDING_WINDOW)),
    "phi3_partial": ("Phi3Config", dict(rope_parameters=dict(_ROPE, partial_rotary_factor=0.75))),
    # MoE families (tests/patching/test_moe.py), not in FAMILIES: 4 experts, 2 per token
    "mixtral": ("MixtralConfig", dict(rope_parameters=_ROPE, sliding_window=SLIDING_WINDOW, num_local_experts=4,
                                      num_experts_per_tok=2)),
    "qwen3_moe": ("Qwen3MoeConfig", dict(rope_parameters=_ROPE, num_experts=4, num_experts_per_tok=2,
                                         moe_intermediate_size=48, norm_topk_prob=True)),
}

# LoRA targets per family: every attention and MLP projection
LORA_TARGETS = {f: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"] for f in FAMILIES}
LORA_TARGETS["phi3"] = LORA_TARGETS["phi3_partial"] = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]

# attention implementation per family: eager where HF's eager path carries a feature sdpa drops
# (Gemma2's attention softcap), sdpa elsewhere, so both interfaces are exercised
ATTN_IMPLEMENTATION = {"gemma2": "eager", "gemma3": "eager"}


def tiny_config(family: str, **overrides):
    """The tiny config of `family` (a name of FAMILIES or "phi3_partial"), with overrides."""
    import transformers

    name, extra = _CONFIGS[family]
    fields = {**_COMMON, **extra, **overrides}
    config = getattr(transformers, name)(**fields)
    config._attn_implementation = ATTN_IMPLEMENTATION.get(family, "sdpa")
    return config


def tiny_model(family: str, dtype: torch.dtype = torch.float32, seed: int = 0, **overrides):
    """A randomly initialised causal LM of `family` in `dtype`, in train mode (dropouts are 0)."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(family, **overrides)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, attn_implementation=config._attn_implementation,
                                                 dtype=torch.float32)
        # HF initialises RMSNorm weights to exactly 1 (or 0 for 1+w); perturb them so a norm weight
        # that goes missing or gets the wrong offset changes the result
        for name, p in model.named_parameters():
            if "norm" in name:
                p.data.add_(torch.randn_like(p) * 0.1)
    return model.to(dtype).train()


def lora_config(family: str, r: int = 8):
    from peft import LoraConfig

    return LoraConfig(r=r, lora_alpha=16, lora_dropout=0.0, target_modules=LORA_TARGETS[family],
                      task_type="CAUSAL_LM", init_lora_weights=False)


def add_lora(model, family: str, r: int = 8, seed: int = 0):
    """get_peft_model with LoRA r on every projection; B is random too (not zero), so the adapters
    change the outputs, and the same seed gives the same adapters."""
    from peft import get_peft_model

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return get_peft_model(model, lora_config(family, r))


def random_batch(batch: int = 2, seq: int = 16, seed: int = 1, device="cpu"):
    """Random token ids with labels = input_ids, a few of them ignored (-100)."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(2, VOCAB, (batch, seq), generator=g)
    labels = input_ids.clone()
    labels[:, :3] = -100
    return input_ids.to(device), labels.to(device)


TOKENIZER_TEXT = ("The quick brown fox jumps over the lazy dog. 안녕하세요, 반갑습니다! 12345 fusetune writes "
                  "GGUF files.\n") * 20
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def byte_level_tokenizer(split_regex: str | None = None):
    """A small byte-level BPE tokenizer (the kind Llama-3, Qwen and SmolLM use), trained here, with a
    ChatML template. split_regex: the family's rule for cutting text before BPE (GPT-2's by default)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    if split_regex is not None:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split_regex), behavior="isolated"),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TOKENIZER_TEXT], trainer)
    out = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                  pad_token="<|endoftext|>")
    out.chat_template = CHATML
    return out
