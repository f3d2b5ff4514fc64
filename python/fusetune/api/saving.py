"""Saving adapters and merged models, atomically (fusetune.atomic: a crash leaves the previous save whole).

merged_16bit: each LoRA layer's weight becomes W + sum over active adapters of s * B @ A (in fp32,
then the model's dtype), trained token rows (trainable_token_indices) replace the embedding's,
4-bit base weights are dequantised, PEFT's wrappers and the adapters' own tensors disappear: the
directory loads with AutoModelForCausalLM.from_pretrained as the plain model. The model being
trained is not modified.
"""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import torch
from torch import nn

from fusetune.api.loading import bitsandbytes_bits, quantization_config
from fusetune.atomic import atomic_directory, recover_interrupted_saves
from fusetune.patching import hf_model
from fusetune.quant.nf4 import NF4State, NF4Weight

SAVE_METHODS = ("merged_16bit", "merged_4bit", "lora")


def _is_4bit(module: nn.Module) -> bool:
    bnb = sys.modules.get("bitsandbytes")
    return bnb is not None and isinstance(module, bnb.nn.Linear4bit)


def _weight_dtype(module: nn.Module) -> torch.dtype:
    return module.weight.quant_state.dtype if _is_4bit(module) else module.weight.dtype


def _dense(module: nn.Module) -> torch.Tensor:
    """The weight of a linear layer as a dense tensor (bitsandbytes 4-bit weights dequantised)."""
    if _is_4bit(module):
        state = NF4State.from_bitsandbytes(module.weight.quant_state)
        return NF4Weight(module.weight.data, state).dequantize()
    return module.weight.detach()


@torch.no_grad()
def merged_state_dict(model, dtype: torch.dtype | None = None,
                      device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
    """The plain model's state dict with every active LoRA adapter and trainable-tokens adapter merged
    (model unchanged), as PEFT's merge_and_unload makes it.

    device: where each tensor goes as soon as it is made ("cpu" for a save: the GPU then holds one
    layer's merge at a time, not the whole merged model); None keeps the model's devices. Tensors
    the model shares (tied embeddings) stay shared there."""
    from peft.tuners.lora import LoraLayer
    from peft.tuners.trainable_tokens import TrainableTokensLayer
    from peft.utils.other import ModulesToSaveWrapper, TrainableTokensWrapper

    out: dict[str, torch.Tensor] = {}
    moved: dict[tuple, torch.Tensor] = {}  # the model's own tensors, moved once each
    tokens: dict[int, torch.Tensor] = {}  # id(base weight) -> its rows replaced by trained tokens' (tied: once)

    def put(name: str, tensor: torch.Tensor, source: torch.Tensor | None = None):
        """tensor (made from the model's own `source`, when given) under `name`, on `device`."""
        if device is not None:
            if source is None:  # a merge made here: nothing else shares it
                tensor = tensor.to(device)
            else:  # (keyed by the model's tensor, which lives on, and so can be shared: tied embeddings)
                key = (source.data_ptr(), tuple(source.shape), tuple(source.stride()), source.dtype, tensor.dtype)
                if key not in moved or not source.numel():
                    moved[key] = tensor.to(device)
                tensor = moved[key]
        out[name] = tensor

    def visit(module: nn.Module, prefix: str):
        if isinstance(module, LoraLayer):
            base = module.get_base_layer()
            weight = _dense(base).float()
            bias = getattr(base, "bias", None)  # (an embedding has none)
            bias = None if bias is None else bias.detach().float()
            if not (module.disable_adapters or module.merged):
                for name in module.active_adapters:
                    if name in module.lora_variant:
                        raise NotImplementedError(f"merging {type(module.lora_variant[name]).__name__} "
                                                  f"adapters is not supported; use PEFT's merge_and_unload")
                    if name in module.lora_A:
                        delta = module.lora_B[name].weight.float() @ module.lora_A[name].weight.float()
                        if getattr(module, "fan_in_fan_out", False):  # Conv1D (GPT-2) keeps (in, out) weights
                            delta = delta.T
                    elif name in getattr(module, "lora_embedding_A", {}):  # an embedding's: (vocab, dim)
                        delta = (module.lora_embedding_B[name].float() @ module.lora_embedding_A[name].float()).T
                    else:
                        continue
                    weight = weight + module.scaling[name] * delta
                    if module.lora_bias.get(name):  # PEFT's lora_bias: B's bias, scaled, joins the base's
                        if bias is None:
                            raise ValueError(f"{prefix}: lora_bias adapter {name!r} on a layer without a bias "
                                             f"cannot be merged (as in PEFT)")
                        bias = bias + module.scaling[name] * module.lora_B[name].bias.detach().float()
            put(prefix + "weight", weight.to(dtype or _weight_dtype(base)))
            if bias is not None:
                put(prefix + "bias", bias.to(dtype or base.bias.dtype))
            return
        if isinstance(module, TrainableTokensWrapper):  # trainable_token_indices: the wrapped layer's own name
            return visit(module.token_adapter, prefix)
        if isinstance(module, TrainableTokensLayer):  # PEFT's merge: the trained rows replace the base's
            base = module.get_base_layer()
            if id(base.weight) not in tokens:
                weight = _dense(base)
                if not (module.disable_adapters or module.merged):
                    for name in module.active_adapters:
                        if name in module.trainable_tokens_delta:
                            rows = torch.tensor(module.token_indices[name], device=weight.device)
                            trained = module.trainable_tokens_delta[name].detach().to(weight)
                            weight = weight.index_copy(0, rows, trained)
                tokens[id(base.weight)] = weight.to(dtype or weight.dtype)
            # (keyed by the base weight, which a tied head shares: one tensor under both names)
            put(prefix + "weight", tokens[id(base.weight)], source=base.weight)
            if getattr(base, "bias", None) is not None:  # (an output layer's)
                put(prefix + "bias", base.bias.detach().to(dtype or base.bias.dtype), source=base.bias)
            return
        if isinstance(module, ModulesToSaveWrapper):
            active = [n for n in module.active_adapters if n in module.modules_to_save]
            inner = module.original_module if module.disable_adapters or not active else module.modules_to_save[active[0]]
            return visit(inner, prefix)
        if _is_4bit(module):
            put(prefix + "weight", _dense(module).to(dtype or _weight_dtype(module)))
            if module.bias is not None:
                put(prefix + "bias", module.bias.detach().to(dtype or module.bias.dtype))
            return
        for name, tensor in list(module.named_parameters(recurse=False)) + [
                (n, b) for n, b in module.named_buffers(recurse=False) if n not in module._non_persistent_buffers_set]:
            put(prefix + name, tensor.detach().to(dtype) if dtype and tensor.is_floating_point() else tensor.detach(),
                source=tensor)
        for name, child in module.named_children():
            visit(child, f"{prefix}{name}.")

    visit(hf_model(model), "")
    return out


def _without_tied_duplicates(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses shared storage: drop the names Hugging Face re-ties on load."""
    seen: dict[tuple, str] = {}
    result = {}
    for name, tensor in state.items():
        key = (tensor.data_ptr(), tensor.shape, tensor.dtype, tensor.device)
        if tensor.numel() and key in seen:
            continue
        seen[key] = name
        result[name] = tensor.contiguous()
    return result


def head_is_tied(config, state: dict[str, torch.Tensor]) -> bool:
    """Whether the merged weights' output layer is the input embedding: the config says tied and no
    lm_head differing from embed_tokens was merged (one trained apart, e.g. by PEFT directly)."""
    if not getattr(config.get_text_config(), "tie_word_embeddings", False):
        return False
    head = state.get("lm_head.weight")
    embed = next((t for name, t in state.items() if name.endswith("embed_tokens.weight")), None)
    return head is None or embed is None or torch.equal(head, embed)


def write_plain_model(model, directory: Path, dtype: torch.dtype | None = None):
    """model.safetensors + config of the merged model, in transformers' plain layout."""
    from safetensors.torch import save_file

    hf = hf_model(model)
    merged = merged_state_dict(model, dtype, device="cpu")
    tied = head_is_tied(hf.config, merged)
    state = _without_tied_duplicates(merged)
    save_file(state, directory / "model.safetensors", metadata={"format": "pt"})
    config = hf.config.__class__.from_dict(hf.config.to_dict())
    if not tied and getattr(config.get_text_config(), "tie_word_embeddings", False):
        config.tie_word_embeddings = config.get_text_config().tie_word_embeddings = False
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = [type(hf).__name__]
    config.dtype = str(dtype or next(iter(state.values())).dtype).removeprefix("torch.")
    config.save_pretrained(directory)
    if getattr(hf, "generation_config", None) is not None:
        hf.generation_config.save_pretrained(directory)


def _write_merged_4bit(model, directory: Path, dtype: torch.dtype | None):
    """The merged weights quantised to NF4 (double quantisation) by bitsandbytes through transformers,
    in transformers' 4-bit layout: it loads with from_pretrained when bitsandbytes is installed."""
    from transformers import AutoModelForCausalLM

    compute = dtype or next(p.dtype for p in model.parameters() if p.is_floating_point())
    config = quantization_config(True, False, compute, caller="save_method='merged_4bit' (or save merged_16bit)")
    staging = directory / ".merged_16bit"
    staging.mkdir()
    write_plain_model(model, staging, dtype)
    device = next(model.parameters()).device
    quantized = AutoModelForCausalLM.from_pretrained(
        staging, device_map={"": str(device)} if device.type == "cuda" else None, quantization_config=config)
    quantized.save_pretrained(directory)
    shutil.rmtree(staging)


LOAD_SETTINGS = "fusetune.json"  # beside a saved adapter: how its base was loaded for training


def write_load_settings(model, directory: Path) -> None:
    """The max_seq_length, RoPE parameters and base quantisation the adapter was trained with (RoPE
    scaling changes every position, a 4-bit base every weight: loading its base otherwise would run
    another model)."""
    import json

    hf = hf_model(model)
    settings = {"max_seq_length": getattr(hf, "max_seq_length", None),
                "rope_parameters": getattr(hf.config, "rope_parameters", None),
                "base_bits": bitsandbytes_bits(getattr(hf.config, "quantization_config", None) or {})}  # bitsandbytes' 4 or 8 bits the base trained in (None: as stored)
    (directory / LOAD_SETTINGS).write_text(json.dumps(settings, indent=1))


def read_load_settings(directory: str | os.PathLike) -> dict:
    import json

    path = Path(directory) / LOAD_SETTINGS
    return json.loads(path.read_text()) if path.is_file() else {}


def _is_fsdp(model) -> bool:
    if not torch.distributed.is_available():
        return False
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


# the names of what PEFT saves with an adapter: LoRA weights, modules_to_save copies (and the layers
# they wrap), trainable tokens, embedding layers
_ADAPTER_SIDE = ("lora_", "modules_to_save", "original_module", "trainable_tokens", "embed_tokens", "lm_head")


def _gathered_adapter_state(model) -> dict[str, torch.Tensor]:
    """What PEFT saves of an FSDP model, from its gathered weights (training.distributed.gathered;
    its state_dict() holds shards), copied to host memory first: PEFT lists a modules_to_save copy's
    keys with that module's state_dict(), which makes FSDP reshard its unit and free the gathered
    tensors (a crash when they are read after)."""
    return {name: p.detach().to("cpu", copy=True) for name, p in model.named_parameters(remove_duplicate=False)
            if p.requires_grad or any(part in name for part in _ADAPTER_SIDE)}


def _check_gathered(model):
    """An FSDP model's weights are shards outside its gathered state: refuse to save those."""
    if not _is_fsdp(model):
        return
    from torch.distributed.tensor import DTensor

    if any(isinstance(p, DTensor) for p in model.parameters()):
        raise ValueError("the model is sharded by FSDP: save it inside fusetune.training.distributed.gathered(model) "
                         "(every process enters it, one saves), which puts the whole weights on each process")


def _stop_at_eos(directory: Path, tokenizer) -> None:
    """The saved generation config stops at the tokenizer's EOS too: model.generate reads only the
    generation config, and get_chat_template makes the end-of-turn token (<|im_end|>) the EOS."""
    from transformers import GenerationConfig

    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None or not (directory / "generation_config.json").is_file():
        return
    config = GenerationConfig.from_pretrained(directory)
    stops = config.eos_token_id if isinstance(config.eos_token_id, list) else [config.eos_token_id]
    stops = [t for t in stops if t is not None]
    if eos not in stops:
        config.eos_token_id = stops + [eos] if stops else eos
        config.save_pretrained(directory)


def _keep_ggufs(directory: Path, tmp: Path) -> None:
    """The GGUF files in `directory` (save_pretrained_gguf's exports) go into its replacement `tmp`:
    this save replaces an earlier model save, not the exports beside it. Hard links (no copy of
    gigabytes; the old folder keeps its own until the new one is in place), copies on a file system
    without them."""
    kept = []
    for gguf in sorted(directory.glob("*.gguf")) if directory.is_dir() else []:
        if gguf.is_file():
            try:
                os.link(gguf, tmp / gguf.name)
            except OSError:
                shutil.copy2(gguf, tmp / gguf.name)
            kept.append(gguf.name)
    if kept:  # exports of the model as it was then, not of this save's weights
        print(f"fusetune: kept {', '.join(kept)} in {directory}, exported before this save: export again "
              f"(save_pretrained_gguf) for a GGUF of these weights")


GGUF_NAMES = r"model\.\w+\.gguf"  # the files save_gguf writes beside a merged save


def save_merged(model, save_directory: str | os.PathLike, tokenizer=None, save_method: str = "merged_16bit",
                dtype: torch.dtype | None = None) -> Path:
    """Save `model` (a PEFT model, or a plain one) to save_directory, atomically.

    save_method: "merged_16bit" (adapters merged into the weights, a plain transformers model in
    16 bits: the base dtype if it is bf16 or fp16, else bf16, e.g. for a CPU's fp32 model; 4-bit
    weights dequantised; dtype overrides, float32 included), "merged_4bit" (the same, then
    quantised to NF4 by bitsandbytes: loads with from_pretrained; for inference, since training
    on merged 4-bit weights loses the adapters' precision), or "lora" (the adapter only, PEFT's
    layout). The tokenizer, when given, is saved beside it (and its EOS joins the saved generation
    config's stop tokens). GGUF files in save_directory (save_pretrained_gguf's) are kept. Returns the
    directory.
    """
    if save_method not in SAVE_METHODS:
        raise ValueError(f"save_method must be one of {', '.join(SAVE_METHODS)}, got {save_method!r} "
                         f"(GGUF: save_pretrained_gguf)")
    if save_method == "lora" and not hasattr(model, "peft_config"):
        raise ValueError("save_method='lora' needs a PEFT model (FastLanguageModel.get_peft_model)")
    _check_gathered(model)
    source = getattr(hf_model(model), "name_or_path", None)
    if source and Path(source).is_dir() and Path(source).resolve() == Path(save_directory).resolve():
        raise ValueError(f"save_directory {str(save_directory)!r} is the folder the base model was loaded from: the "
                         f"save would replace the base it needs; choose another folder")
    if save_method == "merged_16bit" and dtype is None:
        base = hf_model(model).get_input_embeddings().weight.dtype
        dtype = base if base in (torch.bfloat16, torch.float16) else torch.bfloat16
    if Path(save_directory).is_dir():  # what a killed GGUF export left there would count as a stranger's file
        recover_interrupted_saves(Path(save_directory), GGUF_NAMES)
    with atomic_directory(save_directory) as tmp:
        if save_method == "lora":
            state = _gathered_adapter_state(model) if _is_fsdp(model) else None
            model.save_pretrained(tmp, **({"state_dict": state} if state is not None else {}))
            write_load_settings(model, tmp)
        elif save_method == "merged_4bit":
            _write_merged_4bit(model, tmp, dtype)
        else:
            write_plain_model(model, tmp, dtype)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
            _stop_at_eos(tmp, tokenizer)
        _keep_ggufs(Path(save_directory), tmp)
    return Path(save_directory)
