"""patch_model / unpatch_model: find the family, swap module classes in place, hook the loss, report.

A module is patched by giving it a class `Fused<Original>` made from a mixin of modules.py and its
own class (see fused_class); nothing in transformers is rewritten or reassigned. The causal-LM
loss is replaced per instance through the model's `loss_function` (transformers stores it as the
instance attribute `_loss_function`).
"""
from __future__ import annotations

import collections
import functools
import importlib
import logging
import sys

from fusetune.lora.adapters import keep_training_layout, lora_report
from fusetune.ops.glu import HF_ACTIVATIONS, op_name
from fusetune.patching import attention as fused_attention
from fusetune.patching import gemma, gemma2, gemma3, llama, mistral, mixtral, phi3, qwen2, qwen3, qwen3_moe, t5
from fusetune.patching.modules import (FusedAttention, FusedCausalLM, FusedCausalLMLoss, FusedExperts, FusedGatedMLP,
                                       FusedRMSNorm, FusedSeq2SeqLM, FusedT5GatedMLP, is_trl_fused_head)

logger = logging.getLogger("fusetune")

# model_type -> spec; an image-text checkpoint's type maps to its language model's family
SPECS = {model_type: spec for spec in (llama.SPEC, mistral.SPEC, qwen2.SPEC, qwen3.SPEC, gemma.SPEC, gemma2.SPEC,
                                       gemma3.SPEC, phi3.SPEC, t5.SPEC, mixtral.SPEC, qwen3_moe.SPEC)
         for model_type in (spec.model_type, *spec.multimodal)}
SUPPORTED = ("Llama, Mistral, Qwen2, Qwen3, Gemma, Gemma2, Gemma3 (text and image-text: Gemma3ForCausalLM, "
             "Gemma3ForConditionalGeneration), Phi3, T5 (encoder-decoder), Mixtral, Qwen3-MoE")
# FamilySpec.mlp_kind -> its fused forward (MoE experts: the gate's product only)
MLP_MIXINS = {"gated": FusedGatedMLP, "t5": FusedT5GatedMLP, "experts": FusedExperts}


class UnsupportedModelError(ValueError):
    """patch_model got a model of a family it has no spec for."""


@functools.lru_cache(maxsize=None)
def fused_class(original: type, mixin: type, options: tuple, keep_name: bool = False) -> type:
    """The subclass `Fused<original>` of (mixin, original) with `options` ((name, value) pairs) as
    class attributes; functions among them become staticmethods. One class per combination, so
    every module patched alike shares it. keep_name: the subclass keeps the original's name (the
    top-level model, whose class name save_pretrained writes into config.json's architectures)."""
    attrs = {name: staticmethod(value) if callable(value) else value for name, value in options}
    name = original.__name__ if keep_name else f"Fused{original.__name__}"
    attrs.update(_fusetune_original=original, __module__=mixin.__module__,
                 __qualname__=original.__qualname__ if keep_name else f"Fused{original.__qualname__}")
    return type(name, (mixin, original), attrs)


def hf_model(model):
    """The transformers model inside `model` (itself, or the base model of a PEFT wrapper)."""
    from transformers import PreTrainedModel

    if isinstance(model, PreTrainedModel):
        return model
    base = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else None
    if isinstance(base, PreTrainedModel):
        return base
    raise TypeError(f"fusetune.patch_model expects a Hugging Face PreTrainedModel or a PEFT model wrapping "
                    f"one, got {type(model).__name__}")


def family_spec(hf_model):
    model_type = getattr(hf_model.config, "model_type", None)
    spec = SPECS.get(model_type)
    if spec is None:
        raise UnsupportedModelError(
            f"fusetune has no fused kernels for {type(hf_model).__name__} (model_type {model_type!r}); "
            f"supported families: {SUPPORTED}")
    return spec


def _swap(model, original, mixin, options_for):
    """Give every module of exactly class `original` the fused class.

    options_for(module) returns the class options, or a string saying why the module stays as is.
    Returns (newly patched, already patched, Counter of reasons for those left alone).
    """
    new, already, left = 0, 0, collections.Counter()
    for module in model.modules():
        cls = type(module)
        if cls.__dict__.get("_fusetune_original") is original:
            already += 1
        elif cls is original:
            options = options_for(module)
            if isinstance(options, str):
                left[options] += 1
            else:
                module.__class__ = fused_class(original, mixin, options)
                new += 1
    return new, already, left


def _norm_options(spec, hf_model, lora):
    # "t5": llama's formula, then FusedRMSNorm casts the output to a 16-bit weight's dtype
    variant = "llama" if spec.norm_variant == "t5" else spec.norm_variant
    options = (("_fusetune_variant", variant), ("_fusetune_eps_attr", spec.norm_eps))
    if spec.norm_variant == "t5":
        options += (("_fusetune_weight_dtype", True),)
    return lambda module: options


def _mlp_options(spec, hf_model, lora, tile):
    def options_for(module):
        name = getattr(getattr(module, "config", hf_model.config), spec.act_key, None)
        activation = HF_ACTIVATIONS.get(name)
        if activation is None:
            return f"{spec.act_key} {name!r} has no fused kernel"
        options = (("_fusetune_activation", activation), ("_fusetune_gate_up", spec.gate_up), ("_fusetune_lora", lora))
        # only the gated MLP tiles (T5's FFN and MoE experts do not read the option)
        return options + ((("_fusetune_tile", tile),) if spec.mlp_kind == "gated" else ())
    return options_for


def _attention_options(spec, hf_model, lora, attention):
    eager = importlib.import_module(spec.modeling).eager_attention_forward
    options = (("_fusetune_qkv", spec.qkv), ("_fusetune_qk_norm", spec.qk_norm),
               ("_fusetune_sliding_window", spec.sliding_window), ("_fusetune_softcap", spec.attn_softcap),
               ("_fusetune_eager", eager), ("_fusetune_lora", lora))
    return lambda module: options


ATTENTION_MODES = (True, False, "always")


def _experts_left_alone(config) -> list[str]:
    """What of a MoE model's MLPs FusedExperts does not reach."""
    left = []
    if getattr(config, "_experts_implementation", None) == "eager":
        left.append("mlp: the experts' eager implementation computes act(gate) * up itself (experts_implementation="
                    "'grouped_mm', transformers' default, runs it fused)")
    if getattr(config, "mlp_only_layers", None):
        left.append(f"mlp: the dense layers {list(config.mlp_only_layers)} (mlp_only_layers) keep transformers' MLP")
    return left


def _use_fused_attention(hf_model, spec, modeling, mode):
    """Make fusetune's attention (patching/attention.py) the implementation of every config the
    model's attention modules read, each module told the mode (True / "always"); returns (configs
    switched, already, reason left alone or None)."""
    if hf_model.config.model_type in spec.multimodal:
        return 0, 0, "image tokens attend both ways (a mask the kernel does not take): transformers' attention"
    if getattr(hf_model.config.get_text_config(), "use_bidirectional_attention", False):
        return 0, 0, "bidirectional attention (its window is two-sided): transformers' attention"
    key = fused_attention.register()
    modules = [m for m in hf_model.modules() if isinstance(m, getattr(modeling, spec.attention))]
    for module in modules:  # an instance attribute: it holds with or without the RoPE patch
        module._fusetune_attention = mode
    configs = {id(m.config): m.config for m in modules if getattr(m, "config", None) is not None}
    configs = configs or {id(hf_model.config): hf_model.config}
    before = hf_model.__dict__.setdefault("_fusetune_attention_before", [])
    new = already = 0
    for config in configs.values():
        if config._attn_implementation == key:
            already += 1
            continue
        before.append((config, config._attn_implementation))
        config._attn_implementation = key
        new += 1
    if hf_model.config._attn_implementation != key:  # the top-level config builds the masks
        before.append((hf_model.config, hf_model.config._attn_implementation))
        hf_model.config._attn_implementation = key
    return new, already, None


# kind -> (spec field naming the class, mixin, options factory)
_MODULE_KINDS = {
    "rms_norm": ("norm", FusedRMSNorm, _norm_options),
    "rope": ("attention", FusedAttention, _attention_options),
    "mlp": ("mlp", FusedGatedMLP, _mlp_options),
}


def _patch_seq2seq_loss(hf_model, spec, modeling):
    """The encoder-decoder LM forward with the fused cross-entropy on its logits; returns (newly
    patched, already patched, reason left alone or None)."""
    if isinstance(hf_model, FusedSeq2SeqLM):
        return 0, 1, None
    if type(hf_model) is not getattr(modeling, spec.seq2seq_lm, None):
        return 0, 0, f"{type(hf_model).__name__} computes no language-model loss"
    hf_model.__class__ = fused_class(type(hf_model), FusedSeq2SeqLM, (), keep_name=True)
    return 1, 0, None


def _patch_loss(hf_model, fused_linear: bool):
    """Install the fused loss (and, with fused_linear, the causal-LM forward that computes it from
    the hidden states without logits); returns (newly patched, already patched, reason left alone
    or None)."""
    from transformers.loss.loss_utils import LOSS_MAPPING

    if is_trl_fused_head(hf_model.__dict__.get("forward")):
        return 0, 0, "TRL's fused LM head computes the loss (its trainer installed it)"
    current = hf_model.__dict__.get("_loss_function")
    if isinstance(current, FusedCausalLMLoss):
        return 0, 1, None
    if current is not None and current is not LOSS_MAPPING["ForCausalLM"]:
        return 0, 0, f"{type(hf_model).__name__} has a custom loss_function {current!r}"
    # image-text models (loss_type "ForConditionalGeneration") compute the same causal-LM loss
    if LOSS_MAPPING.get(getattr(hf_model, "loss_type", None)) is not LOSS_MAPPING["ForCausalLM"]:
        return 0, 0, f"{type(hf_model).__name__} computes no causal-LM loss"
    hf_model.loss_function = FusedCausalLMLoss(previous=current)
    if fused_linear:
        hf_model.__class__ = fused_class(type(hf_model), FusedCausalLM, (), keep_name=True)
    return 1, 0, None


def patch_model(model, *, rms_norm: bool = True, rope: bool = True, attention: bool | str = True, mlp: bool = True,
                cross_entropy: bool = True, fused_linear_cross_entropy: bool = True, lora: bool = True,
                tiled_mlp: bool | int = True, strict: bool = True):
    """Swap fused kernels into a supported Hugging Face model, in place; returns the model.

    model: a transformers model of a supported family (Llama, Mistral, Qwen2, Qwen3, Gemma,
    Gemma2, Gemma3 text and image-text, Phi3, T5), plain or wrapped by PEFT (get_peft_model may
    come before or after patching). Switches turn each kind off:
      rms_norm       every RMSNorm (decoder, final, q/k head norms; T5LayerNorm) -> fusetune rms_norm
      rope           every attention module -> one generic forward with the fused RoPE; the
                     attention itself stays the one HF picks (config._attn_implementation).
                     T5 has no RoPE: its attention stays as is
      attention      the attention itself -> fusetune's implementation (patching/attention.py):
                     its flash-attention kernel for packed rows (position ids that restart per
                     document: no token attends across a document), padded rows, softcaps and
                     sliding windows; torch SDPA (cuDNN / flash) for plain causal rows, where it
                     is faster; no (tokens x tokens) mask is ever built. "always": the kernel for
                     plain causal rows too. Image-text models keep transformers' attention
      mlp            gated MLPs -> fused SwiGLU / GeGLU between the projections (T5's gated-GELU
                     FFN too, with its dropout before wo)
      tiled_mlp      the patched gated MLPs (not T5's, not MoE experts) run a chunk of tokens at a
                     time (fusetune.ops.tiling) where their intermediates would take more
                     than half of the free GPU memory (long context), the chunk sized from it; an
                     int: always, in chunks of that many tokens; False: never
      cross_entropy  the model's causal-LM loss -> fused cross-entropy. With
                     fused_linear_cross_entropy (default), a forward given labels computes the loss
                     from the last hidden states and the lm_head weight in chunks: no
                     (tokens x vocab) logits are held and outputs.logits is None (Gemma2/3's
                     final_logit_softcapping is applied inside). Without it, or where the lm_head
                     carries adapters, HF's forward makes the logits (softcapped once there) and
                     the fused loss's backward overwrites outputs.logits with d(loss)/d(logits).
                     T5ForConditionalGeneration: the fused cross-entropy on HF's logits, the same way.
      lora           in the patched attention (rope) and MLP (mlp) modules, PEFT LoRA adapters on
                     nn.Linear or bitsandbytes NF4 Linear4bit run as fused blocks with a
                     hand-written backward (fusetune.lora): q/k/v (or qkv) as one group, o alone,
                     gate/up/down (or gate_up/down) with the GLU as one block (T5: wi_0/wi_1 as one
                     group, wo alone; its attention's q/k/v/o run PEFT's path). Checked at every
                     forward: adapters added after patching fuse too; disabled or merged adapters,
                     DoRA and other variants, several active adapters, lora_bias run PEFT's path
                     (named in the summary line). The LoRA products run in the activations' dtype
                     (fp32 adapters are cast for them; their gradients come back in fp32).
    Prints one line: what was patched, per kind, and why anything was left alone. Patching again
    patches only what is not yet patched. unpatch_model restores the model exactly; state_dict
    keys never change. Raises UnsupportedModelError for other families; with strict=False such a
    model is returned unpatched, with a summary line that says so (it trains through transformers
    and PEFT as it is).
    """
    hf = hf_model(model)
    name = type(hf).__name__ if hf is model else f"{type(model).__name__}({type(hf).__name__})"
    keep_training_layout(model)  # (unsupported families train through bitsandbytes too)
    try:
        spec = family_spec(hf)
    except UnsupportedModelError as err:
        if strict:
            raise
        print(f"fusetune: left {name} unpatched: {err}; it trains through transformers and PEFT, unfused")
        return model
    modeling = importlib.import_module(spec.modeling)
    if attention not in ATTENTION_MODES:
        raise ValueError(f"patch_model: attention={attention!r}; choose True (fusetune's attention where it is "
                         f"faster), 'always' (its kernel for every training shape) or False (transformers' own)")
    if not isinstance(tiled_mlp, bool) and not (isinstance(tiled_mlp, int) and tiled_mlp > 0):
        raise ValueError(f"patch_model: tiled_mlp={tiled_mlp!r}; choose True (chunks sized from free GPU memory "
                         f"when the MLP needs them), a positive number of tokens per chunk, or False")
    switches = {"rms_norm": rms_norm, "rope": rope, "attention": attention, "mlp": mlp,
                "cross_entropy": cross_entropy}

    done, left = [], []
    for kind, enabled in switches.items():
        if not enabled:
            left.append(f"{kind}: switched off")
            continue
        if kind == "cross_entropy":
            if spec.seq2seq_lm:
                new, already, reason = _patch_seq2seq_loss(hf, spec, modeling)
            else:
                new, already, reason = _patch_loss(hf, fused_linear_cross_entropy)
            reasons = collections.Counter([reason] if reason else [])
        elif kind == "attention":
            if spec.attention is None:
                left.append(f"attention: {spec.name}'s attention stays transformers' (no RoPE attention)")
                continue
            new, already, reason = _use_fused_attention(hf, spec, modeling, attention)
            reasons = collections.Counter([reason] if reason else [])
        else:
            field, mixin, options_factory = _MODULE_KINDS[kind]
            what = getattr(spec, field)
            if what is None:
                left.append(f"{kind}: {spec.name}'s attention has no RoPE")
                continue
            mixin = MLP_MIXINS[spec.mlp_kind] if kind == "mlp" else mixin  # T5's FFN has its own forward
            original = getattr(modeling, what, None)
            if original is None:
                left.append(f"{kind}: {spec.modeling} has no class {what}")
                continue
            extra = {"rope": (attention,), "mlp": (tiled_mlp,)}.get(kind, ())
            factory = options_factory(spec, hf, lora, *extra)
            new, already, reasons = _swap(model, original, mixin, factory)
        if new or already:
            detail = [f"{already} already"] if already else []
            if kind == "mlp":
                detail += sorted({op_name(type(m)._fusetune_activation) for m in model.modules()
                                  if isinstance(m, tuple(MLP_MIXINS.values()))})
                if new and not isinstance(tiled_mlp, bool):  # a chunk size (already patched ones keep theirs)
                    detail.append(f"gated MLPs {tiled_mlp} tokens at a time")
            if kind == "cross_entropy":
                detail.append("fused linear, no logits" if isinstance(hf, FusedCausalLM) else "on logits")
            if kind == "attention":
                detail.append("flash kernel always" if attention == "always" else
                              "flash kernel: packed, padded, softcap, window; SDPA: plain causal")
            count = "" if kind == "attention" else f" {new + already}"
            done.append(f"{kind}{count}" + (f" ({', '.join(detail)})" if detail else ""))
        for reason, count in reasons.items():
            left.append(f"{kind}: {reason}" + (f" ({count} modules)" if count > 1 else ""))
        if kind == "mlp" and spec.mlp_kind == "experts":
            left += _experts_left_alone(hf.config)
        if not (new or already or reasons):
            left.append(f"{kind}: no {what} in the model")

    if lora:
        fused, reasons = lora_report(model, (FusedAttention, *MLP_MIXINS.values()))
        if fused:
            done.append(f"lora {fused} projections")
        for reason, count in reasons.items():
            left.append(f"lora: {reason} ({count} projections)")
    else:
        left.append("lora: switched off")
    int8 = _int8_linears(model)
    if int8:
        left.append(f"projections: {int8} bitsandbytes 8-bit linears keep bitsandbytes' int8 matmul, and LoRA on "
                    f"them runs PEFT's path (16-bit or load_in_4bit bases fuse)")
    print(f"fusetune: patched {name} [{spec.name}]: {', '.join(done) or 'nothing'}; "
          f"left alone: {'; '.join(left) or 'nothing'}")
    return model


def _int8_linears(model) -> int:
    bnb = sys.modules.get("bitsandbytes")  # a model can only hold its layers if it was imported
    return 0 if bnb is None else sum(isinstance(m, bnb.nn.Linear8bitLt) for m in model.modules())


def unpatch_model(model):
    """Undo patch_model in place (every fused module gets its class back, the loss is restored);
    returns the model. A model that was never patched is returned unchanged. bitsandbytes' CPU
    inference repacking of 4-bit layers stays off (lora.adapters.keep_training_layout)."""
    restored = 0
    for module in model.modules():
        module.__dict__.pop("_fusetune_attention", None)
        module.__dict__.pop("_fusetune_tiles", None)
        original = type(module).__dict__.get("_fusetune_original")
        if original is not None:
            module.__class__ = original
            restored += 1
    hf = hf_model(model)
    for config, implementation in reversed(hf.__dict__.pop("_fusetune_attention_before", [])):
        config._attn_implementation = implementation
        restored += 1
    loss = hf.__dict__.get("_loss_function")
    if isinstance(loss, FusedCausalLMLoss):
        if loss.previous is None:
            del hf._loss_function
        else:
            hf._loss_function = loss.previous
        restored += 1
    logger.info("fusetune: unpatched %s (%d modules and hooks restored)", type(hf).__name__, restored)
    return model
