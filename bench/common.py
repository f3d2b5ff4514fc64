"""Shared by the benchmarks: device ceilings, timing, and the results file."""
from __future__ import annotations

import datetime
import json
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def do_bench(fn, grad_to_none=None) -> float:
    """Median milliseconds of fn over ~100 ms of repeats (CUDA events, L2 flushed between runs)."""
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none,
                                   return_mode="median")


def copy_bandwidth() -> float:
    """Measured device-to-device copy bandwidth in bytes/s (bytes read + bytes written)."""
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src))
    return 2 * src.numel() / (ms * 1e-3)


def matmul_flops() -> float:
    """Measured bf16 dense matmul rate in FLOP/s (median of 8192^3 torch.matmul on random data)."""
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    ms = do_bench(lambda: a @ b)
    return 2 * n**3 / (ms * 1e-3)


def git_revision() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, cwd=Path(__file__).parent).stdout
        return rev + ("-dirty" if dirty.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("FUSETUNE_GIT_REVISION", "unknown")


def environment() -> dict:
    import transformers
    import triton

    info = {"gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "none",
            "torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(),
            "git": git_revision(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    try:
        import peft

        info["peft"] = peft.__version__
    except ImportError:
        pass
    return info


def write_results(kind: str, payload: dict, out_dir: Path | None = None) -> Path:
    """Write results atomically to bench/results/<kind>-<gpu>-<date>.json (and $OUT when set)."""
    env = payload["environment"]
    gpu = env["gpu"].replace(" ", "-").replace("/", "-")
    name = f"{kind}-{gpu}-{env['date'][:10]}.json"
    paths = [(out_dir or RESULTS) / name]
    if os.environ.get("OUT"):
        paths.append(Path(os.environ["OUT"]) / name)
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(payload, indent=2) + "\n")
        os.replace(tmp, path)
    return paths[0]


def unsloth_lora_model(config: dict, targets: list[str], max_seq_length: int, load_in_4bit: bool = False):
    """(model, tokenizer): the best-known library's own path on a benchmark's random Llama, for
    side-by-side runs only (../shared/tools/pack-gpu-extras.sh carries it). The model of `config`
    (seed 0, bf16) is saved to a temporary folder, since it loads from files, with a word-level
    tokenizer over the vocabulary; FastLanguageModel.from_pretrained loads it (quantising to NF4 with
    double quantisation, bf16 compute, when load_in_4bit) and get_peft_model adds LoRA r=16, alpha 16,
    dropout 0 on `targets` with its own checkpointing ("unsloth"). The folder is removed once loaded."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import unsloth  # noqa: F401  (first, as it asks)
    from tokenizers import Tokenizer, models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from unsloth import FastLanguageModel

    folder = Path(tempfile.mkdtemp(prefix="unsloth-model-"))
    try:
        torch.manual_seed(0)
        with torch.device("cuda"):
            LlamaForCausalLM(LlamaConfig(**config, torch_dtype=torch.bfloat16)).to(torch.bfloat16).save_pretrained(folder)
        vocab = {f"t{i}": i for i in range(config["vocab_size"])}
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")),
                                            unk_token="t0", pad_token="t0", bos_token="t1", eos_token="t2")
        tokenizer.save_pretrained(folder)
        torch.cuda.empty_cache()
        model, tokenizer = FastLanguageModel.from_pretrained(str(folder), max_seq_length=max_seq_length,
                                                             dtype=torch.bfloat16, load_in_4bit=load_in_4bit)
    finally:
        shutil.rmtree(folder, ignore_errors=True)  # 16 GB for 8B: several workers would fill the disk
    model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=16, lora_dropout=0, target_modules=targets,
                                             use_gradient_checkpointing="unsloth", random_state=0)
    # from_pretrained leaves the model in eval mode, where its forward does not checkpoint
    FastLanguageModel.for_training(model, use_gradient_checkpointing="unsloth")
    if not model.training:
        raise RuntimeError("unsloth_lora_model: the model is not in training mode after for_training")
    return model, tokenizer
