"""The QLoRA base model of the end-to-end benchmark (W4-W7 of bench/e2e.py), for every stack alike.

quantise_decoder(model) replaces every nn.Linear inside the decoder layers (not lm_head, not the
embeddings) by a bitsandbytes Linear4bit holding that layer's (random bf16) weight quantised to
NF4: quant_type "nf4", double quantisation (compress_statistics=True), blocksize 64, uint8
storage, compute dtype bf16. That is what transformers' loading with
BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
bnb_4bit_compute_dtype=torch.bfloat16) gives: the same modules and Params4bit, quantised by
Params4bit.to(device); the embeddings, norms and lm_head stay bf16; model.is_loaded_in_4bit is
set, which PEFT reads to wrap the layers with its bitsandbytes LoRA (peft.tuners.lora.bnb).
transformers' replace_with_bnb_linear is not used: it builds the new modules on the meta device
for its checkpoint loader to fill, which a model with weights in memory has no public way to do.

Set-up memory: every bf16 decoder weight is first moved to host memory (the GPU then holds no
bf16 decoder weight, and its cached blocks are returned whole), then each one is copied back,
quantised and its bf16 copy dropped, one weight at a time, as a checkpoint load would. So the
quantised weights do not sit scattered inside freed bf16 blocks that empty_cache cannot return,
and the GPU never holds both full copies.

peft.prepare_model_for_kbit_training is not called. In peft 0.21 it (1) freezes every
parameter, (2) casts every bf16/fp16 parameter that is not a Params4bit to fp32 (embeddings,
norms, lm_head), (3) with reentrant checkpointing, makes the embedding output require grad, and
(4) turns gradient checkpointing on. (2) is the part that changes the benchmark: without autocast
(the e2e loop has none, the same loop for every workload) fp32 embeddings and norms make the
whole residual stream fp32, so attention runs in fp32 and the 128k-vocabulary lm_head matmul runs
in fp32 (+2.1 GB of weights on 8B besides): a slow baseline nobody trains with. Trainer users run
it under bf16 autocast; TRL 1.15's SFTTrainer does not call it at all, and the helper in
trl.experimental that does casts the fp32 parameters back to bf16 under bf16=True. (1) is done by
get_peft_model, (4) by the loop (non-reentrant, as for W1-W3), and (3) by
enable_input_require_grads() here: PEFT calls it itself for unquantised models (W1-W3) but skips
it when is_loaded_in_4bit is set, expecting prepare_model_for_kbit_training to; calling it keeps
the autograd graph (layer 0's input gradient) the same as in W1-W3 and as TRL's SFTTrainer has.
The LoRA weights stay fp32 (PEFT's default, as in W1-W3; TRL's SFTTrainer casts them to bf16 for
quantised models).

bitsandbytes is imported only here, on the QLoRA path; it is not installed on the GPU machine,
which gets it from the tarball of ../shared/tools/pack-gpu-extras.sh (bench/gpu_run.sh unpacks it).
"""
from __future__ import annotations

import torch
from torch import nn

BNB_MISSING = ("bitsandbytes is not importable, and the QLoRA workloads need it: in the repository root run "
               "`bash ../shared/tools/pack-gpu-extras.sh .gpu` and carry .gpu to the GPU machine "
               "(bench/gpu_run.sh unpacks .gpu/gpu-extras.tar.gz onto PYTHONPATH)")
QUANT = dict(quant_type="nf4", compress_statistics=True, blocksize=64, quant_storage=torch.uint8)
COMPUTE_DTYPE = torch.bfloat16


class QLoRAUnavailable(ImportError):
    """bitsandbytes cannot be imported."""


def import_bnb():
    try:
        import bitsandbytes as bnb
    except ImportError as err:
        raise QLoRAUnavailable(f"{BNB_MISSING} ({err})") from err
    return bnb


@torch.no_grad()
def quantise_decoder(model, device=None):
    """Replace every nn.Linear in model.model.layers by an NF4 bitsandbytes Linear4bit, in place.

    device: where the quantised weights go (default: where the model is). Returns the model.
    """
    bnb = import_bnb()
    device = torch.device(device) if device is not None else model.get_input_embeddings().weight.device
    replaced = []
    for layer in model.model.layers:
        for name, old in list(layer.named_modules()):
            if type(old) is not nn.Linear:
                continue
            new = bnb.nn.Linear4bit(old.in_features, old.out_features, bias=old.bias is not None,
                                    compute_dtype=COMPUTE_DTYPE, compress_statistics=QUANT["compress_statistics"],
                                    quant_type=QUANT["quant_type"], quant_storage=QUANT["quant_storage"],
                                    device="meta")
            # not yet quantised: Params4bit quantises when moved to a device (below)
            new.weight = bnb.nn.Params4bit(old.weight.detach().to("cpu"), requires_grad=False, module=new, **QUANT)
            if old.bias is not None:
                new.bias = nn.Parameter(old.bias.detach().to(device), requires_grad=False)
            new.requires_grad_(False)
            layer.set_submodule(name, new)  # drops the bf16 module
            replaced.append(new)
    old = new = None  # the last bf16 module too, before the cache is emptied
    if device.type == "cuda":
        torch.cuda.empty_cache()
    for new in replaced:
        new.weight = new.weight.to(device)  # copy to the device, quantise, drop the bf16 copy
    if not replaced:
        raise ValueError("quantise_decoder: no nn.Linear inside model.model.layers")
    model.is_loaded_in_4bit = True  # PEFT reads it to dispatch its bitsandbytes LoRA layers
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return model


def prepare_qlora(model, device=None):
    """quantise_decoder, then what this benchmark keeps of prepare_model_for_kbit_training (see above)."""
    quantise_decoder(model, device)
    model.enable_input_require_grads()
    return model


def weight_numel(param) -> int:
    """Elements of the weight a parameter stands for: a Params4bit holds packed 4-bit data (numel
    half the weight's, shape (n/2, 1)); its quant_state keeps the weight's own shape."""
    state = getattr(param, "quant_state", None)
    if state is not None and getattr(state, "shape", None) is not None:
        return torch.Size(state.shape).numel()
    return param.numel()
