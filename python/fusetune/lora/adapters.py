"""Reading PEFT's LoRA layers (on nn.Linear or bitsandbytes Linear4bit) as fused projections.

`projection_of(module)` turns one projection module into a LoRAProjection, or says in words why
it cannot be fused; the patched attention and MLP forwards call `fused_projections` on every
forward (adapters may be added, switched, disabled or merged at any time) and run PEFT's own
path whenever it returns None. `lora_report` gives patch_model's summary of the same decisions.
"""
from __future__ import annotations

import collections
import sys

import torch
from torch import nn

from fusetune.lora.projection import LoRAProjection
from fusetune.quant.nf4 import NF4State, NF4Weight


_VARIANT_NAMES = {"Dora": "DoRA", "ALora": "aLoRA"}  # PEFT's LoRA variant classes, as papers name them


def _lora_layer_type():
    peft = sys.modules.get("peft")  # a model can only hold PEFT layers if PEFT was imported
    if peft is None:
        return None
    from peft.tuners.lora import LoraLayer

    return LoraLayer


def _base_weight(base: nn.Module):
    """The frozen weight of a base layer (dense or NF4Weight), or why there is none."""
    bias_trains = "a base bias trains (LoRA bias='all' or 'lora_only')"
    if type(base) is nn.Linear:
        if base.weight.requires_grad:
            return "a base weight trains (full fine-tuning)"
        return bias_trains if base.bias is not None and base.bias.requires_grad else base.weight
    bnb = sys.modules.get("bitsandbytes")
    if bnb is not None and isinstance(base, bnb.nn.Linear4bit):
        if base.bias is not None and base.bias.requires_grad:
            return bias_trains
        state = getattr(base.weight, "quant_state", None)
        if state is None or state.quant_type != "nf4":
            return f"4-bit quant_type {getattr(state, 'quant_type', None)!r} (only nf4 is fused)"
        return NF4Weight(base.weight.data, NF4State.from_bitsandbytes(state))
    return (f"base layer {type(base).__name__} runs PEFT's path, unfused (fused bases: 16-bit nn.Linear, "
            f"bitsandbytes Linear4bit nf4)")


def keep_training_layout(model: nn.Module) -> None:
    """bitsandbytes (0.50) repacks a CPU Linear4bit's weight for its AVX512-BF16 inference kernel at
    the first forward in eval mode without grad (an eval loss, a generate) and keeps it that way: a
    later training forward then runs that kernel, which has no backward (no gradient reaches the
    layer's input: the adapters below it train on a wrong gradient, silently), and fusetune's NF4
    path would read the repacked bytes as NF4. Turned off here for every Linear4bit of the model.
    A weight already repacked is refused: bitsandbytes rounded its scales to bf16, and its inverse
    does not give the loaded weight back."""
    bnb = sys.modules.get("bitsandbytes")  # a model can only hold its layers if it was imported
    if bnb is None:
        return
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    repacked = sum(getattr(getattr(m.weight, "quant_state", None), "packing_format_for_cpu", False) for m in layers)
    if repacked:
        raise ValueError(f"{repacked} of the model's {len(layers)} 4-bit layers were repacked by bitsandbytes for its "
                         f"CPU inference kernel (an eval-mode forward or generate ran before patch_model), which "
                         f"cannot train and has lost the exact scales: load the model again and patch it first "
                         f"(FastLanguageModel.from_pretrained does)")
    for layer in layers:
        layer.support_avx512bf16_for_cpu = False


HOOKED = "forward hooks (PEFT's adapter_names, accelerate's device moves) need the modules called"


def hooked(*modules: nn.Module) -> bool:
    """Whether any of these modules has forward hooks of torch, or accelerate's hook (which wraps
    forward itself: offloaded weights arrive only when the module is called)."""
    return any(m._forward_hooks or m._forward_pre_hooks or "_hf_hook" in m.__dict__ for m in modules)


def projection_of(module: nn.Module) -> LoRAProjection | str:
    """The projection `module` computes, with its active LoRA adapter if any, or why it runs unfused.
    It runs for every projection at every forward, so it reads what PEFT's forward would run and no
    more: hooks are looked for only on the modules that forward calls."""
    lora_layer = _lora_layer_type()
    if lora_layer is None or not isinstance(module, lora_layer):
        if hooked(module):
            return HOOKED
        weight = _base_weight(module)
        if isinstance(weight, str):
            return weight
        return LoRAProjection(weight, bias=module.bias)
    if module.disable_adapters or module.merged:
        return "adapters disabled or merged"
    active = [name for name in module.active_adapters if name in module.lora_A]
    if len(active) > 1:
        return "several active adapters"
    base = module.get_base_layer()
    if module.base_layer is not base:  # PEFT's mixed adapters: the layer below adds its own delta
        return f"{type(module.base_layer).__module__.split('.')[-2]} adapter layer below the LoRA layer"
    if hooked(module, base):
        return HOOKED
    weight = _base_weight(base)
    if isinstance(weight, str):
        return weight
    if not active:
        return LoRAProjection(weight, bias=base.bias)
    name = active[0]
    if name in module.lora_variant:
        variant = type(module.lora_variant[name]).__name__.removesuffix("LinearVariant")
        return f"{_VARIANT_NAMES.get(variant, variant)} adapters"
    if getattr(module, "fan_in_fan_out", False):
        return "fan_in_fan_out"
    lora_a, lora_b, dropout = module.lora_A[name], module.lora_B[name], module.lora_dropout[name]
    if type(lora_a) is not nn.Linear or type(lora_b) is not nn.Linear or lora_b.bias is not None:
        if type(lora_b) is nn.Linear and lora_b.bias is not None:
            return "lora_bias"
        return f"{type(module).__name__} layers (lora_A a {type(lora_a).__name__})"  # AdaLoRA: parameters
    if hooked(lora_a, lora_b, dropout):
        return HOOKED
    if isinstance(dropout, nn.Dropout):
        p = dropout.p if dropout.training else 0.0
    elif isinstance(dropout, nn.Identity):
        p = 0.0
    else:
        return f"lora_dropout of type {type(dropout).__name__}"
    return LoRAProjection(weight, lora_a.weight, lora_b.weight, float(module.scaling[name]), base.bias, p)


def fused_projections(modules, x: torch.Tensor):
    """(projections, compute dtype) for modules that all fuse and of which one carries an adapter,
    else None. Under autocast the block computes in the autocast dtype, as the linears would."""
    projections = [projection_of(m) for m in modules]
    if any(isinstance(p, str) for p in projections) or all(p.lora_A is None for p in projections):
        return None
    device = x.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
    if any(isinstance(p.weight, torch.Tensor) and p.weight.dtype != dtype for p in projections):
        return None
    for p in projections:
        if p.bias is not None and p.bias.dtype != dtype:
            p.bias = p.bias.to(dtype)  # as bitsandbytes' Linear4bit does with a bias kept in fp32
    return projections, dtype


def lora_report(model: nn.Module, fused_parents: tuple[type, ...]):
    """(number of LoRA layers that fuse, Counter of reasons for those that do not)."""
    lora_layer = _lora_layer_type()
    fused, left, outside = 0, collections.Counter(), collections.Counter()
    if lora_layer is None:
        return fused, left
    for parent in model.modules():
        inside = isinstance(parent, fused_parents) and parent._fusetune_lora
        for name, child in parent.named_children():
            if not isinstance(child, lora_layer):
                continue
            if not inside:
                outside[name] += 1
                continue
            p = projection_of(child)
            if isinstance(p, str):
                left[p] += 1
            else:
                fused += 1
    if outside:  # one reason for all of them (T5's attention, a vision tower): q, k, v, o: ...
        left[f"{', '.join(outside)}: outside fused attention/MLP, PEFT's path"] = sum(outside.values())
    return fused, left
