"""Helpers shared by several test files, one copy of each. Tiny models, LoRA and random batches are
in tests/tiny_models.py, tolerances and error measures in tests/numerics.py, fixtures in conftest.py.
"""
import contextlib

import pytest
import torch

from fusetune import rms_norm, use_backend
from fusetune.backend import build_cuda_extension
from fusetune.reference.rms_norm import rms_norm as rms_norm_reference
from tests.numerics import assert_close, leaf
from tests.tiny_models import VOCAB, random_batch


# --- backends ------------------------------------------------------------------------------------
# every backend of an op, for its parametrised tests; "cuda" (the extension) where a GPU is
BACKENDS = ["triton", "torch", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="the CUDA extension's ops run on a GPU"))]


@contextlib.contextmanager
def on_backend(name: str):
    """use_backend(name), with the CUDA extension built first for "cuda" (just in time, once per
    process, when fusetune._C was not installed with it)."""
    if name == "cuda":
        build_cuda_extension()
    with use_backend(name):
        yield


# --- models on disk, through the facade ----------------------------------------------------------
def word_tokenizer():
    """A word-level tokenizer over the tiny models' vocabulary: "<unk>" 0, "<s>" 1 (bos and eos),
    "w2" .. "w256" the ids 2 .. 256."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, **{f"w{i}": i for i in range(2, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="<s>")


def save_model_dir(model, path):
    """Save `model` and word_tokenizer() into `path`, a local model directory; returns path."""
    model.save_pretrained(path)
    word_tokenizer().save_pretrained(path)
    return path


def load_model(model_dir, **kwargs):
    """FastLanguageModel.from_pretrained(model_dir) in float32: (model, tokenizer)."""
    from fusetune import FastLanguageModel

    model, tokenizer = FastLanguageModel.from_pretrained(str(model_dir), dtype=torch.float32, **kwargs)
    return model, tokenizer


# --- training ------------------------------------------------------------------------------------
def train_steps(model, steps, batch=None, lr=1e-2, backend=None) -> list[float]:
    """`steps` AdamW steps over the trainable parameters on one batch (input_ids, labels); by
    default random_batch() on the model's device. backend: run forward and backward under
    use_backend(backend). Returns the loss of every step."""
    ids, labels = batch if batch is not None else random_batch(device=model.device)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        with use_backend(backend) if backend else contextlib.nullcontext():
            loss = model(input_ids=ids, labels=labels).loss
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


# --- ops -----------------------------------------------------------------------------------------
def check_rms_norm_against_float64(backend, variant, dtype, shape, device, eps=1e-6):
    """rms_norm on `backend` vs the float64 reference: y, dx and dw (the Triton, torch and CUDA
    extension tests)."""
    n = shape[-1]
    x = leaf(torch.randn(shape, device=device, dtype=dtype) * 3)
    w = leaf((torch.randn(n, device=device) * 0.2 + (0.0 if variant == "gemma" else 1.0)).to(dtype))
    with use_backend(backend):
        y = rms_norm(x, w, eps, variant)
    dy = torch.randn_like(y) * 0.5  # grad_output != 1
    y.backward(dy)
    x64, w64 = leaf(x.double()), leaf(w.double())
    y64 = rms_norm_reference(x64, w64, eps, variant)
    y64.backward(dy.double())
    assert y.dtype == dtype
    assert_close(y, y64, dtype, "y")
    assert_close(x.grad, x64.grad, dtype, "dx")
    assert_close(w.grad, w64.grad, dtype, "dw")


class FixedMask(torch.nn.Module):
    """nn.Dropout with a given mask: x * (mask / (1 - p)), as torch's dropout scales. It stands in
    for PEFT's lora_dropout in the float64 references of the fused LoRA blocks."""

    def __init__(self, mask, p):
        super().__init__()
        self.mask, self.p = mask, p

    def forward(self, x):
        return x * self.mask.to(x.dtype).div_(1 - self.p)


def step_loss_and_grads(model, ids, labels, seed=3):
    """One forward and backward from a fixed seed (LoRA dropout draws the same masks): the loss and
    {name: grad} of every trainable parameter."""
    torch.manual_seed(seed)
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=labels).loss
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def assert_same_step(model, ref, ids, labels):
    """model's step gives ref's loss and every gradient, within the fp32 tolerance."""
    loss, grads = step_loss_and_grads(model, ids, labels)
    ref_loss, ref_grads = step_loss_and_grads(ref, ids, labels)
    assert_close(loss, ref_loss, torch.float32, "loss")
    assert grads.keys() == ref_grads.keys()
    for name, g in grads.items():
        assert g is not None, f"{name} got no gradient"
        assert_close(g, ref_grads[name], torch.float32, name)
