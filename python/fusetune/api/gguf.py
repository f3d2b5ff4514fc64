"""GGUF export (llama.cpp, Ollama, LM Studio) with the `gguf` package.

The adapters are merged first (merged_state_dict: the training model is not touched), then each
tensor gets llama.cpp's name (gguf's own name map), the model's hyper-parameters and the
tokenizer (vocabulary, merges, special tokens, chat template) go into the metadata, and the file
is written atomically. Layout facts followed from llama.cpp's converter: the "llama"
architecture stores q/k rows with each head's two rotary halves interleaved (the permutation
below); 1-D tensors (norms) stay float32; Llama-3.1's "llama3" RoPE scaling becomes the
per-frequency factor tensor rope_freqs.

quantization_method: f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1 are written here (gguf's
quantisers); the k-quants and i-quants (q4_k_m, q5_k_m, q6_k, ...) need llama.cpp's
`llama-quantize` (on PATH, or named by LLAMA_QUANTIZE), which is run on an f16 file.
"""
from __future__ import annotations

import json
import logging
import math
import os
import secrets
import shutil
import subprocess
from pathlib import Path

import numpy as np
import torch

from fusetune.api.saving import GGUF_NAMES, head_is_tied, merged_state_dict
from fusetune.atomic import TMP, add_to_save, recover_interrupted_saves, save_error
from fusetune.patching import hf_model

logger = logging.getLogger("fusetune")
PYTHON_METHODS = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1")
LLAMA_QUANTIZE_METHODS = ("q2_k", "q3_k_s", "q3_k_m", "q3_k_l", "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m", "q6_k",
                          "iq4_nl", "iq4_xs")
# HF model_type -> GGUF architecture (Mistral is written as llama, as llama.cpp does)
ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED = 1, 3, 4, 5


def _require_gguf():
    try:
        import gguf
    except ImportError as err:
        raise ImportError("GGUF export needs the gguf package: pip install gguf") from err
    return gguf


def interleave_rotary_halves(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of a q/k projection from Hugging Face's layout (per head: first half, second half of
    the rotary pairs) to llama.cpp's (pairs adjacent)."""
    out, rest = weight.shape[0], weight.shape[1:]
    return weight.reshape(heads, 2, out // heads // 2, *rest).transpose(1, 2).reshape(out, *rest)


def llama3_rope_factors(config) -> np.ndarray | None:
    """The per-frequency divisors of Llama-3.1's RoPE scaling (None for other models)."""
    scaling = getattr(config, "rope_scaling", None) or {}
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind in (None, "default", "linear"):
        return None
    if kind != "llama3":
        raise NotImplementedError(f"GGUF export of rope_scaling type {kind!r} is not supported (default, linear "
                                  f"and llama3 are): save merged_16bit and run llama.cpp's convert_hf_to_gguf.py")
    theta = _rope_theta(config)
    dim = _head_dim(config)
    factor, low, high = scaling["factor"], scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    old = scaling.get("original_max_position_embeddings", 8192)
    factors = []
    for i in range(0, dim, 2):
        wavelen = 2 * math.pi * theta ** (i / dim)
        if wavelen < old / high:
            factors.append(1.0)
        elif wavelen > old / low:
            factors.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            factors.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.asarray(factors, dtype=np.float32)


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _rope_theta(config) -> float:
    theta = getattr(config, "rope_theta", None)
    if theta is None:  # transformers 5 keeps it in rope_parameters
        theta = (getattr(config, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
    return float(theta)


def _write_hparams(writer, config, arch: str):
    import gguf

    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(_head_dim(config))
    writer.add_value_length(_head_dim(config))
    writer.add_rope_dimension_count(_head_dim(config))
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    scaling = getattr(config, "rope_scaling", None) or {}
    if scaling.get("rope_type", scaling.get("type")) == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(scaling["factor"])


# the text-splitting rules of byte-level BPE tokenizers that llama.cpp implements under these names, as
# the tokenizers library writes them: a Split regex before a ByteLevel step that applies none of its own
SPLIT_RULES = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+": "llama-bpe",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+": "qwen2",
}


def _pre_tokenizer_name(backend: dict) -> str:
    """llama.cpp's name of the text-splitting rule of a byte-level BPE tokenizer, recognised exactly:
    a near miss written under another name would split text as the model never saw it, silently."""
    pre = backend.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [step.get("type") for step in steps]
    last = steps[-1] if steps else {}
    plain = last.get("type") == "ByteLevel" and not last.get("add_prefix_space", False)
    if plain and kinds == ["ByteLevel"] and last.get("use_regex", True):
        return "gpt-2"
    if plain and kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and last.get("use_regex", True):
        return "smollm"
    if plain and kinds == ["Split", "ByteLevel"] and not last.get("use_regex", True):
        name = SPLIT_RULES.get(steps[0].get("pattern", {}).get("Regex"))
        if name is not None and steps[0].get("behavior") == "Isolated" and not steps[0].get("invert"):
            return name
    raise NotImplementedError(f"GGUF export writes the text-splitting rules of GPT-2, Llama-3, Qwen2 and SmolLM; this "
                              f"tokenizer splits text otherwise ({json.dumps(pre)[:300]}), and llama.cpp would split "
                              f"it another way than training did: save merged_16bit and run llama.cpp's "
                              f"convert_hf_to_gguf.py on it")


def _byte_level_backend(tokenizer) -> dict:
    """The tokenizer's tokenizers-library JSON, if it is a byte-level BPE (the kind GGUF's "gpt2"
    tokenizer model describes); a clear error otherwise."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    data = json.loads(backend.to_str()) if backend is not None else {}
    byte_level = "ByteLevel" in json.dumps([data.get("pre_tokenizer"), data.get("decoder")])
    if data.get("model", {}).get("type") != "BPE" or not byte_level:
        raise NotImplementedError("GGUF export supports byte-level BPE tokenizers (Llama-3, Qwen, SmolLM, GPT-2 "
                                  "splitting); for SentencePiece ones (Llama-2, Gemma, Phi-3) save merged_16bit and run "
                                  "llama.cpp's convert_hf_to_gguf.py on it")
    return data


def _write_tokenizer(writer, tokenizer, vocab_size: int):
    backend = _byte_level_backend(tokenizer)
    model = backend["model"]
    vocab = dict(model["vocab"])
    added = {t["id"]: t for t in backend.get("added_tokens", [])}
    for index, token in added.items():
        vocab[token["content"]] = index
    by_id = {i: t for t, i in vocab.items()}
    tokens, types = [], []
    for i in range(vocab_size):  # padded embedding rows get unused placeholder tokens, as llama.cpp writes them
        tokens.append(by_id.get(i, f"[PAD{i}]"))
        if i in added:
            types.append(TOKEN_CONTROL if added[i].get("special") else TOKEN_USER_DEFINED)
        else:
            types.append(TOKEN_NORMAL if i in by_id else TOKEN_UNUSED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer_name(backend))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for name, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                      ("unk", writer.add_unk_token_id), ("pad", writer.add_pad_token_id)):
        token_id = getattr(tokenizer, f"{name}_token_id", None)
        if token_id is not None:
            add(token_id)
    # what the tokenizer does, not a flag it may not carry (Llama-3 adds BOS through its post-processor)
    bos = tokenizer.bos_token_id
    writer.add_add_bos_token(bos is not None and tokenizer("a")["input_ids"][:1] == [bos])
    template = tokenizer.chat_template
    if isinstance(template, dict):  # named templates: llama.cpp reads the default one
        template = template.get("default")
    if template:
        writer.add_chat_template(template)
        if tokenizer.eos_token and tokenizer.eos_token in template:  # the EOS ends a turn (get_chat_template's)
            writer.add_eot_token_id(tokenizer.eos_token_id)  # (llama.cpp would guess another by its name)


def _encode(array: np.ndarray, method: str):
    """(data, raw_dtype) of one tensor in the file: 1-D tensors stay float32, a row length the
    block size does not divide falls back to f16."""
    import gguf

    if array.ndim == 1 or method == "f32":
        return array.astype(np.float32), None
    if method == "f16":
        return array.astype(np.float16), None
    qtype = getattr(gguf.GGMLQuantizationType, method.upper())
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if array.shape[-1] % block:
        return array.astype(np.float16), None
    return gguf.quants.quantize(array.astype(np.float32), qtype), qtype


def _file_type(method: str):
    import gguf

    named = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
             "bf16": gguf.LlamaFileType.MOSTLY_BF16}
    # (not `.get(method) or ...`: ALL_F32 is 0)
    return named[method] if method in named else getattr(gguf.LlamaFileType, f"MOSTLY_{method.upper()}")


def check_exportable(model, tokenizer) -> str:
    """The GGUF architecture of the model, if fusetune can write it with this tokenizer; else a clear error."""
    config = hf_model(model).config
    arch = ARCHITECTURES.get(config.model_type)
    if arch is None:
        raise NotImplementedError(f"GGUF export supports {', '.join(sorted(ARCHITECTURES))} models, not "
                                  f"{config.model_type!r}: save merged_16bit and run llama.cpp's convert_hf_to_gguf.py")
    if tokenizer is None:
        raise ValueError("save_pretrained_gguf needs the tokenizer: the GGUF file carries the vocabulary")
    _pre_tokenizer_name(_byte_level_backend(tokenizer))
    llama3_rope_factors(config)
    return arch


def write_gguf(model, tokenizer, path: Path, method: str, arch: str) -> Path:
    """One GGUF file of the merged model (see the module docstring); arch from check_exportable."""
    gguf = _require_gguf()
    hf = hf_model(model)
    config = hf.config
    window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None
    if window is not None and window < config.max_position_embeddings:
        logger.warning("fusetune: %s uses a sliding window of %d tokens; GGUF's %s architecture has none, so "
                       "llama.cpp attends over the whole context (the same up to %d tokens)", config.model_type, window,
                       arch, window)
    state = merged_state_dict(model, torch.float32, device="cpu")  # (the GPU holds one merge at a time)
    arch_id = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    names = gguf.get_tensor_name_map(arch_id, config.num_hidden_layers)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(model_name(config) or type(hf).__name__)
    _write_hparams(writer, config, arch)
    writer.add_file_type(_file_type(method))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _write_tokenizer(writer, tokenizer, config.vocab_size)
    factors = llama3_rope_factors(config)
    if factors is not None:
        writer.add_tensor(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", factors)
    tied = head_is_tied(config, state)
    for hf_name, tensor in state.items():
        if hf_name.endswith("rotary_emb.inv_freq") or (tied and hf_name == "lm_head.weight"):
            continue
        stem, suffix = hf_name.rsplit(".", 1)
        name = names.get_name(stem)
        if name is None:
            raise NotImplementedError(f"GGUF export: no llama.cpp name for the tensor {hf_name}")
        if arch == "llama" and stem.endswith(("self_attn.q_proj", "self_attn.k_proj")):
            heads = config.num_attention_heads if stem.endswith("q_proj") else config.num_key_value_heads
            tensor = interleave_rotary_halves(tensor, heads)
        data, raw_dtype = _encode(tensor.cpu().numpy(), method)
        writer.add_tensor(f"{name}.{suffix}", data, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _llama_quantize() -> str | None:
    return os.environ.get("LLAMA_QUANTIZE") or shutil.which("llama-quantize")


def check_method(quantization_method: str) -> str:
    """The method, lower-cased, if this machine can write it; else a clear error (before any work)."""
    method = quantization_method.lower()
    if method not in PYTHON_METHODS + LLAMA_QUANTIZE_METHODS:
        raise ValueError(f"quantization_method {quantization_method!r} is not known: fusetune writes "
                         f"{', '.join(PYTHON_METHODS)}; llama.cpp's llama-quantize makes {', '.join(LLAMA_QUANTIZE_METHODS)}")
    _require_gguf()
    if method in LLAMA_QUANTIZE_METHODS and _llama_quantize() is None:
        raise FileNotFoundError(f"quantization_method {method!r} needs llama.cpp's quantiser: build llama.cpp and put "
                           f"llama-quantize on PATH (or set LLAMA_QUANTIZE=/path/to/llama-quantize); without it use "
                           f"one of {', '.join(PYTHON_METHODS)}")
    return method


def model_name(config) -> str:
    """general.name: what the user named (from_pretrained records it), a local folder by its own name
    rather than the path into someone's disk."""
    name = getattr(config, "_name_or_path", "") or ""
    return Path(name).name if name and Path(name).expanduser().exists() else name


def save_gguf(model, save_directory: str | os.PathLike, tokenizer, quantization_method: str = "f16") -> Path:
    """The merged model as save_directory/model.<METHOD>.gguf, the file written atomically (other files
    in the directory, e.g. other methods' GGUFs, stay). Returns the file."""
    method = check_method(quantization_method)
    arch = check_exportable(model, tokenizer)
    directory = Path(save_directory)
    if directory.is_file():
        raise FileExistsError(f"{directory} is a file: give a directory for the GGUF file")
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / f"model.{method.upper()}.gguf"
    recover_interrupted_saves(directory, GGUF_NAMES)  # what a killed export left: several GB each
    partial = [directory / f".{target.name}{TMP}{secrets.token_hex(4)}" for _ in ("gguf", "f16")]
    try:
        if method in PYTHON_METHODS:
            write_gguf(model, tokenizer, partial[0], method, arch)
        else:
            write_gguf(model, tokenizer, partial[1], "f16", arch)
            result = subprocess.run([_llama_quantize(), str(partial[1]), str(partial[0]), method.upper()],
                                    capture_output=True, text=True)
            if result.returncode != 0:
                tail = result.stderr.strip().splitlines()[-1:] or ["no message"]
                raise OSError(f"llama-quantize could not write {target} (exit code {result.returncode}: {tail[0]})")
        with open(partial[0], "rb+") as f:
            os.fsync(f.fileno())
        os.replace(partial[0], target)
        add_to_save(directory, target.name)  # beside a merged save: the next one keeps it
    except OSError as err:
        raise (save_error(target, err) or err) from err
    finally:
        for path in partial:
            path.unlink(missing_ok=True)
    return target
