"""Offloaded activation checkpointing: the same loss and gradients as no checkpointing (fp32,
LoRA with dropout: the replay draws the same masks), patched and unpatched, and on the GPU the
layer inputs leave GPU memory."""
import copy
import warnings

import pytest
import torch
from peft import LoraConfig, get_peft_model

import fusetune
from fusetune.backend import triton_interpreting as interpreting
from fusetune.training.checkpoint import enable_checkpointing, enable_offloaded_checkpointing, offloaded_checkpoint
from tests.helpers import assert_same_step, step_loss_and_grads
from tests.numerics import assert_close
from tests.tiny_models import LORA_TARGETS, random_batch, tiny_model


def _lora_model(family, device, dropout=0.1):
    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, target_modules=LORA_TARGETS[family],
                        init_lora_weights=False)
    torch.manual_seed(0)
    return get_peft_model(tiny_model(family), config).to(device)


@pytest.mark.parametrize("patched", [False, True], ids=["hf", "patched"])
@pytest.mark.parametrize("family", ["llama", "phi3"])
def test_same_loss_and_grads_as_without_checkpointing(family, patched, device):
    ref = _lora_model(family, device)
    model = copy.deepcopy(ref)
    if patched:
        fusetune.patch_model(ref)
        fusetune.patch_model(model)
    enable_offloaded_checkpointing(model)
    assert_same_step(model, ref, *random_batch(device=device))


def _count_attention_forwards(monkeypatch, attention="always") -> list:
    """Calls of the attention forward patch_model(attention=...) runs: fusetune's kernel ("always")
    or, for plain causal rows (True), torch's SDPA kernels through fusetune.ops.sdpa."""
    import fusetune.ops.sdpa as sdpa
    from fusetune.triton_kernels import attention as kernels

    calls = []
    for module, name in ([(kernels, "attention_fwd")] if attention == "always" else
                         [(sdpa, "_forward"), (sdpa.F, "scaled_dot_product_attention")]):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *args, real=real, **kwargs: calls.append(1) or real(*args, **kwargs))
    return calls


@pytest.mark.skipif(not torch.cuda.is_available() and not interpreting(), reason="the attention kernel runs on "
                    "CUDA or under TRITON_INTERPRET=1")
@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_recompute_takes_the_attention_outputs_of_the_forward(family, device, monkeypatch):
    """With fusetune's attention kernel in every layer (attention="always"; Gemma-2: softcap and
    sliding window), the offloaded checkpoint's recompute takes the forward's attention outputs:
    one attention forward per layer and step instead of two, and the loss and every gradient of
    the model without checkpointing (LoRA dropout on)."""
    ref = _lora_model(family, device)
    model = copy.deepcopy(ref)
    fusetune.patch_model(ref, attention="always")
    fusetune.patch_model(model, attention="always")
    enable_offloaded_checkpointing(model)
    calls = _count_attention_forwards(monkeypatch)
    ids, labels = random_batch(device=device)
    assert_same_step(model, ref, ids, labels)
    layers = model.config.num_hidden_layers
    assert len(calls) == 2 * layers  # model: one per layer (the recompute took them), ref: one per layer


@pytest.mark.skipif(not torch.cuda.is_available() and not interpreting(), reason="the patched attention routes "
                    "plain rows to SDPA where its kernel runs: on CUDA or under TRITON_INTERPRET=1")
def test_recompute_takes_sdpas_outputs_of_the_forward(device, monkeypatch):
    """Plain causal rows go to torch's SDPA kernels (patch_model's default attention): the recompute
    takes the forward's output and log-sum-exp there too, one SDPA forward per layer and step, with
    the loss and every gradient of the model without checkpointing (LoRA dropout on)."""
    ref = _lora_model("llama", device)
    model = copy.deepcopy(ref)
    fusetune.patch_model(ref)
    fusetune.patch_model(model)
    enable_offloaded_checkpointing(model)
    calls = _count_attention_forwards(monkeypatch, attention=True)
    assert_same_step(model, ref, *random_batch(device=device))
    assert len(calls) == 2 * model.config.num_hidden_layers  # model: one per layer (the recompute took them), ref: one


@pytest.mark.gpu
@pytest.mark.parametrize("attention", ["always", True], ids=["kernel", "sdpa"])
def test_attention_outputs_past_the_host_budget_are_recomputed(attention, monkeypatch):
    """bf16 on the GPU, fusetune's kernel ("always") or SDPA's (True): with room in the host budget
    the attention outputs go to the host beside the layer inputs from the second step on (one
    attention forward per layer); with none, neither is offloaded and the recompute runs the
    attention again (two); the gradients agree."""
    from fusetune.training.checkpoint import HOST_BUDGET

    model = get_peft_model(tiny_model("llama", dtype=torch.bfloat16, hidden_size=1024, intermediate_size=2048,
                                      num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
                                      head_dim=128), LoraConfig(r=8, target_modules=LORA_TARGETS["llama"]))
    model = fusetune.patch_model(model.cuda(), attention=attention)
    enable_offloaded_checkpointing(model)
    ids = torch.randint(0, 257, (2, 2048), device="cuda")
    calls = _count_attention_forwards(monkeypatch, attention)
    results = []
    for limit in (None, 0):
        HOST_BUDGET.set_limit(limit)
        for _ in range(2):  # the first step shows the budget what the layer inputs take
            calls.clear()
            model.zero_grad(set_to_none=True)
            model(input_ids=ids, labels=ids).loss.backward()
        results.append((len(calls), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
    HOST_BUDGET.set_limit(None)
    (kept_calls, kept_grads), (recomputed_calls, grads) = results
    assert (kept_calls, recomputed_calls) == (4, 8)
    for name, g in grads.items():
        assert_close(g, kept_grads[name], torch.bfloat16, name)


def test_recompute_of_other_attention_calls_is_refused():
    """A recompute that calls attention more or less often than its forward, or through another
    kernel, is a broken layer (or settings changed between forward and backward): an error."""
    from fusetune.ops.attention import KeptAttention

    pair = [torch.zeros(1, 3, 2, 4), torch.zeros(1, 2, 3)]
    kept = KeptAttention(pair, ["fusetune"])
    with pytest.raises(RuntimeError, match="less often"):
        kept.check_all_taken()
    with pytest.raises(RuntimeError, match=r"attention of q \(1, 2, 5, 4\)"):
        kept.take(torch.zeros(1, 2, 5, 4), "fusetune")
    kept = KeptAttention(pair, ["cudnn", None])
    with pytest.raises(RuntimeError, match="recompute ran flash attention where its forward ran cudnn"):
        kept.take(torch.zeros(1, 2, 3, 4), "flash")
    kept = KeptAttention(pair, ["cudnn", None])
    out, lse = kept.take(torch.zeros(1, 2, 3, 4), "cudnn")
    assert out.shape == (1, 2, 3, 4)
    assert kept.take(torch.zeros(1, 2, 3, 4), None) is None  # a call that kept nothing runs again
    kept.check_all_taken()
    with pytest.raises(RuntimeError, match="more often"):
        kept.take(torch.zeros(1, 2, 3, 4), None)


def test_other_arguments_must_not_require_grad():
    with pytest.raises(ValueError, match="only the first argument"):
        offloaded_checkpoint(lambda h, w: h * w, torch.ones(2), torch.ones(2, requires_grad=True))


def test_host_budget_refuses_past_its_limit_and_warns_once(caplog, monkeypatch):
    from fusetune.training import checkpoint

    budget = checkpoint.HostBudget()
    monkeypatch.setattr(checkpoint, "_available_host_bytes", lambda: 1000)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # four processes of a launch share the host
    assert budget.reserve(150) and budget.limit == 200 and budget.held == 150
    with caplog.at_level("WARNING", logger="fusetune"):
        assert not budget.reserve(60) and not budget.reserve(60)
    assert len([r for r in caplog.records if "stay on the GPU" in r.message]) == 1
    budget.release(150)
    assert budget.reserve(200) and budget.held == 200


def test_host_budget_keeps_room_for_the_inputs_of_a_step():
    """Optional tensors (kept attention outputs) never take room a step's layer inputs need: none
    before a step has shown how many inputs it offloads, then only what leaves room for the rest of
    them, each the size of this step's (longer than before: more than the last step took)."""
    from fusetune.training.checkpoint import HostBudget

    budget = HostBudget()
    budget.set_limit(100)
    assert not budget.reserve(10, required=False)  # no step measured yet
    assert all(budget.reserve(20) for _ in range(3))  # a step's three inputs
    for _ in range(3):
        budget.release(20, 20)  # its backward
    assert budget.required_step == 60 and budget.held == 0
    assert budget.reserve(20)  # the next step's first input
    assert budget.reserve(20, required=False)  # 20 + 20 + 40 inputs to come <= 100
    assert not budget.reserve(30, required=False)  # 40 + 30 + 40 > 100
    assert budget.reserve(20) and budget.reserve(20)  # the inputs still fit
    assert not budget.warned
    budget.release(80, 60)  # the inputs and the optional 20
    assert budget.last_step_inputs == 60 and budget.held == 0
    # a longer step than any before: its three inputs of 30 need 90, more than the 60 a step took
    assert budget.reserve(30)
    assert not budget.reserve(20, required=False)  # 30 + 20 + 60 to come > 100
    assert budget.reserve(10, required=False)  # 30 + 10 + 60 <= 100
    assert budget.reserve(30) and budget.reserve(30) and not budget.warned
    budget.release(100, 90)
    assert budget.last_step_inputs == 90 == budget.required_step
    budget.reserve(10)
    budget.release(10, 10)  # a shorter step: its own record, the most kept
    assert budget.last_step_inputs == 10 and budget.required_step == 90


def test_available_host_memory_is_read():
    from fusetune.training.checkpoint import _available_host_bytes

    assert _available_host_bytes() > 2**20


@pytest.mark.gpu
def test_layer_inputs_past_the_host_budget_stay_on_the_gpu():
    """A budget of 3 layer inputs over 8 layers: 5 inputs stay on the GPU after the forward, the
    budget is all given back after the backward, and the gradients are those of the full offload."""
    from fusetune.training.checkpoint import HOST_BUDGET

    model = get_peft_model(tiny_model("llama", dtype=torch.bfloat16, hidden_size=1024, intermediate_size=2048,
                                      num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8,
                                      head_dim=128), LoraConfig(r=8, target_modules=LORA_TARGETS["llama"]))
    model = fusetune.patch_model(model.cuda())
    enable_offloaded_checkpointing(model)
    ids = torch.randint(0, 257, (8, 1024), device="cuda")
    layer_input = 8 * 1024 * 1024 * 2
    results = []
    for limit in (None, 3 * layer_input):
        HOST_BUDGET.set_limit(limit)
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        start = torch.cuda.memory_allocated()
        loss = model(input_ids=ids, labels=ids).loss
        # (the layer inputs' part: with room to spare the budget keeps the attention outputs too)
        held, host = torch.cuda.memory_allocated() - start, HOST_BUDGET.required_held
        loss.backward()
        assert HOST_BUDGET.held == 0
        results.append((held, host, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
    HOST_BUDGET.set_limit(None)
    (held_all, host_all, grads_all), (held_3, host_3, grads_3) = results
    assert host_all == 8 * layer_input and host_3 == 3 * layer_input
    assert held_3 - held_all >= 5 * layer_input - 2**20, (held_all, held_3)
    for name, g in grads_3.items():  # (attention's backward may sum in another order: not bitwise)
        assert_close(g, grads_all[name], torch.bfloat16, name)


@pytest.mark.gpu
def test_layer_inputs_leave_the_gpu():
    """8 layers of hidden 1024 at 8 x 1024 tokens: each layer input is 16 MB in bf16; with offloading
    the peak after the forward holds none of them."""
    def peak_after_forward(offload):
        model = get_peft_model(tiny_model("llama", dtype=torch.bfloat16, hidden_size=1024, intermediate_size=2048,
                                          num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8,
                                          head_dim=128), LoraConfig(r=8, target_modules=LORA_TARGETS["llama"]))
        model = fusetune.patch_model(model.cuda())
        if offload:
            enable_offloaded_checkpointing(model)
        else:
            enable_checkpointing(model)
        ids = torch.randint(0, 257, (8, 1024), device="cuda")
        torch.cuda.synchronize()
        start = torch.cuda.memory_allocated()
        loss = model(input_ids=ids, labels=ids).loss
        held = torch.cuda.memory_allocated() - start
        loss.backward()
        return held
    plain, offloaded = peak_after_forward(False), peak_after_forward(True)
    assert plain - offloaded >= 7 * 16 * 2**20, (plain, offloaded)


def test_recompute_runs_under_the_forwards_autocast(device):
    """Trainers call backward outside autocast: the replay must still run in the forward's dtype."""
    ref = _lora_model("llama", device, dropout=0.0)
    model = copy.deepcopy(ref)
    enable_offloaded_checkpointing(model)
    ids, labels = random_batch(device=device)
    results = []
    for m in (model, ref):
        m.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = m(input_ids=ids, labels=labels).loss
        loss.backward()
        results.append({n: p.grad for n, p in m.named_parameters() if p.requires_grad})
    for name, g in results[0].items():
        assert_close(g, results[1][name], torch.float32, name, 10.0)


def test_recompute_runs_under_the_forwards_backend_on_any_thread(device, monkeypatch):
    """use_backend is per thread and autograd runs a CUDA backward on a thread of its own (here: the
    backward called from another thread): the recompute still runs the backend its forward asked for."""
    import importlib
    import threading

    from fusetune.backend import get_backend

    rms_norm = importlib.import_module("fusetune.ops.rms_norm")  # (fusetune.ops.rms_norm is also the function)

    model = _lora_model("llama", device, dropout=0.0)
    fusetune.patch_model(model)
    enable_offloaded_checkpointing(model)
    seen, real = [], rms_norm.resolve
    monkeypatch.setattr(rms_norm, "resolve", lambda *args: seen.append(get_backend()) or real(*args))
    ids, labels = random_batch(device=device)
    with fusetune.use_backend("torch"):
        loss = model(input_ids=ids, labels=labels).loss
    forward = len(seen)
    backward = threading.Thread(target=loss.backward)
    backward.start()
    backward.join()
    assert forward and len(seen) > forward and set(seen) == {"torch"}, seen
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_no_offload_without_grad(device, monkeypatch):
    import fusetune.training.checkpoint as checkpoint

    model = _lora_model("llama", device)
    enable_offloaded_checkpointing(model)
    monkeypatch.setattr(checkpoint, "_Slot", None)  # would fail if a forward under no_grad offloaded
    with torch.no_grad():
        model(input_ids=random_batch(device=device)[0])


def test_adapters_cast_together_for_the_forward_and_again_for_the_backward(monkeypatch):
    """fp32 adapters on a bf16 model: under the offloaded checkpoint each layer casts its adapters to
    bf16 in one foreach copy for its forward (what its last forward used) and one for its recompute
    and backward (what this forward used), not one launch per tensor and use; the forward's copies
    are gone before the backward (held, they would add to the peak); the loss and the gradients are
    those of casting each time."""
    import gc
    import weakref

    from torch.utils._python_dispatch import TorchDispatchMode

    import fusetune.training.checkpoint as checkpoint
    from fusetune import use_backend

    model = _lora_model("llama", torch.device("cpu"), dropout=0.0)
    model.base_model.model.to(torch.bfloat16)
    lora = {n: p for n, p in model.named_parameters() if p.requires_grad}
    for p in lora.values():
        p.data = p.data.float()
    shapes = {tuple(p.shape) for p in lora.values()}
    layers = len(model.base_model.model.model.layers)
    fusetune.patch_model(model)
    enable_offloaded_checkpointing(model)
    ids, labels = random_batch()

    class CountCasts(TorchDispatchMode):
        """Per-tensor casts of adapters, the foreach casts (weak references to their copies)."""
        def __init__(self):
            super().__init__()
            self.single, self.together = 0, []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if (func is torch.ops.aten._to_copy.default and args[0].dtype == torch.float32
                    and kwargs.get("dtype") == torch.bfloat16 and tuple(args[0].shape) in shapes):
                self.single += 1
            if func is torch.ops.aten._foreach_copy_.default:
                self.together.append([weakref.ref(t) for t in args[0]])
            return func(*args, **kwargs)

    with use_backend("torch"):
        counts = CountCasts()
        with counts:  # the first step: the forward casts on use, the backward all at once
            step_loss_and_grads(model, ids, labels)
        assert counts.single == len(lora) and len(counts.together) == layers
        model.zero_grad(set_to_none=True)
        counts = CountCasts()
        with counts:
            loss = model(input_ids=ids, labels=labels).loss
            gc.collect()
            assert len(counts.together) == layers
            assert all(ref() is None for refs in counts.together for ref in refs), "forward casts still held"
            loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        model.zero_grad(set_to_none=True)
        assert counts.single == 0 and len(counts.together) == 2 * layers
        assert sum(len(refs) for refs in counts.together) == 2 * len(lora)
        # no layer found: each tensor cast on its first use in the forward, all at once for the backward
        monkeypatch.setattr(checkpoint, "_layer_of", lambda function: None)
        counts = CountCasts()
        with counts:
            ref_loss, ref_grads = step_loss_and_grads(model, ids, labels)
        assert counts.single == len(lora) and len(counts.together) == layers
    assert torch.equal(loss, ref_loss)
    for name, g in grads.items():
        assert g.dtype == torch.float32 and torch.equal(g, ref_grads[name]), name


def test_the_layer_is_found_in_the_forms_transformers_passes_it():
    """5.25 passes partial(forward, layer, **kwargs), 5.17 partial(layer.__call__, **kwargs); the
    checkpoint wraps either in its own partial for keyword arguments."""
    import functools

    from fusetune.training.checkpoint import _layer_of

    layer = torch.nn.Linear(2, 2)
    for function in (functools.partial(type(layer).forward, layer, x=1), functools.partial(layer.__call__, x=1),
                     functools.partial(functools.partial(type(layer).forward, layer), x=1), layer.forward):
        assert _layer_of(function) is layer
    assert _layer_of(lambda x: x) is None


def test_what_a_layer_casts_ahead_follows_what_its_forward_used():
    """A frozen adapter is still used (cast); one the layer no longer calls (another adapter made active)
    drops out after a step, and the new one comes in."""
    from fusetune import use_backend
    from fusetune.training.checkpoint import _CAST

    model = _lora_model("llama", torch.device("cpu"), dropout=0.0)
    model.add_adapter("other", LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]))
    model.base_model.model.to(torch.bfloat16)
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.data = p.data.float()
    fusetune.patch_model(model)
    enable_offloaded_checkpointing(model)
    layer = model.base_model.model.model.layers[0]
    ids, labels = random_batch()

    def cast():
        with use_backend("torch"):  # (the interpreter computes bf16 in fp32: it casts otherwise)
            step_loss_and_grads(model, ids, labels)
        return {id(p) for p in _CAST[layer]}

    def adapter(name):
        return {id(p) for n, p in layer.named_parameters() if f".{name}." in n}

    assert cast() == adapter("default") and cast() == adapter("default")
    layer.self_attn.q_proj.lora_A["default"].weight.requires_grad_(False)
    assert cast() == adapter("default")
    model.set_adapter("other")
    assert cast() == adapter("other")


def test_a_trainer_turning_checkpointing_on_again_keeps_the_offloaded_one():
    """transformers' Trainer and TRL's (gradient_checkpointing=True by default in TRL's configs) call
    gradient_checkpointing_enable / activation_checkpointing_enable, and TRL's DPO/GRPO/KTO turn it
    off and on around each no-grad forward: offloaded checkpointing stays through both, until
    fusetune's enable_checkpointing picks Hugging Face's; a deep copy keeps its own."""
    model = _lora_model("llama", "cpu")
    base = model.get_base_model()

    def functions(m):
        return {getattr(layer, "_gradient_checkpointing_func", None) for layer in m.get_base_model().model.layers}

    enable_offloaded_checkpointing(model)
    for name, kwargs in (("gradient_checkpointing_enable", {"gradient_checkpointing_kwargs": {"use_reentrant": False}}),
                         ("activation_checkpointing_enable", {})):
        if hasattr(base, name):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # transformers' deprecated name
                getattr(model, name)(**kwargs)
            assert functions(model) == {offloaded_checkpoint}, name
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        base.gradient_checkpointing_disable()  # as trl.models.utils.disable_gradient_checkpointing does
        assert not any(layer.gradient_checkpointing for layer in base.model.layers)
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert functions(model) == {offloaded_checkpoint}  # off, then on: still offloaded
    assert all(layer.gradient_checkpointing for layer in base.model.layers)
    twin = copy.deepcopy(model)
    assert twin.get_base_model()._set_gradient_checkpointing.__self__ is twin.get_base_model()
    enable_checkpointing(twin)  # fusetune's own choice of plain checkpointing wins
    assert offloaded_checkpoint not in functions(twin) and functions(model) == {offloaded_checkpoint}
