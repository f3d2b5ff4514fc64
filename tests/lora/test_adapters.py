"""patch_model with PEFT LoRA: the fused LoRA blocks replace PEFT's layers in the forward (checked by
counting PEFT's own forwards), fall back where they must (and say so), and train the same: DoRA,
disabled adapters, modules_to_save on lm_head, dropout, adapters added after patching, and QLoRA
on bitsandbytes NF4 Linear4bit (20-step curve, patched vs unpatched)."""
import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import Linear as PeftLinear

import fusetune
from fusetune.backend import triton_interpreting as interpreting
from fusetune.lora import LoRALinearFunction, LoRAMLPFunction
from tests.helpers import step_loss_and_grads, train_steps
from tests.numerics import assert_close
from tests.tiny_models import LORA_TARGETS, add_lora, random_batch, tiny_model


@pytest.fixture
def calls(monkeypatch):
    """Counts of PEFT lora.Linear forwards and of fused LoRA Function applications."""
    counts = {"peft": 0, "fused": 0}

    def counting(fn, key):
        def wrapper(*args, **kwargs):
            counts[key] += 1
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(PeftLinear, "forward", counting(PeftLinear.forward, "peft"))
    for cls in (LoRALinearFunction, LoRAMLPFunction):
        monkeypatch.setattr(cls, "apply", counting(cls.apply, "fused"))
    return counts


def _assert_same_training(fused, ref, device, tol=1e-5):
    ids, labels = random_batch(device=device)
    loss, grads = step_loss_and_grads(fused, ids, labels)
    ref_loss, ref_grads = step_loss_and_grads(ref, ids, labels)
    assert_close(loss, ref_loss, torch.float32, "loss", tol / 1e-5)
    assert grads.keys() == ref_grads.keys() and grads
    for name, g in grads.items():
        assert_close(g, ref_grads[name], torch.float32, name, tol / 1e-5)


@pytest.mark.parametrize("family", ["llama", "phi3", "gemma"])
def test_fused_path_replaces_peft_layers(family, device, calls, capsys):
    ref = add_lora(tiny_model(family), family).to(device)
    model = fusetune.patch_model(copy.deepcopy(ref))
    out = capsys.readouterr().out
    layers = 2 * len(LORA_TARGETS[family])
    assert f"lora {layers} projections" in out and "lora:" not in out, out
    _assert_same_training(model, ref, device)
    # the reference ran PEFT's layers, the patched model only the fused blocks (3 per layer)
    assert calls["peft"] == layers and calls["fused"] == 2 * 3


def test_adapters_added_after_patching_fuse_and_unpatch_restores_peft(device, calls):
    ref = add_lora(tiny_model("llama"), "llama").to(device)
    model = add_lora(fusetune.patch_model(tiny_model("llama").to(device)), "llama")
    _assert_same_training(model, ref, device)
    assert calls["fused"] == 6
    fusetune.unpatch_model(model)
    calls.update(peft=0, fused=0)
    _assert_same_training(model, ref, device)
    assert calls["fused"] == 0 and calls["peft"] == 28


def test_only_some_projections_targeted(device, calls):
    """q and v carry adapters, k, o and the MLP do not: the group fuses with adapter-less members."""
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    ref = get_peft_model(tiny_model("llama"), config).to(device)
    model = fusetune.patch_model(copy.deepcopy(ref))
    _assert_same_training(model, ref, device)
    assert calls["fused"] == 2 * 2  # per layer: the q/k/v group and the MLP; o has no adapter


def test_dora_and_disabled_adapters_run_peft_and_say_so(device, calls, capsys):
    config = LoraConfig(r=8, lora_alpha=16, use_dora=True, target_modules=LORA_TARGETS["llama"], init_lora_weights=False)
    ref = get_peft_model(tiny_model("llama"), config).to(device)
    model = fusetune.patch_model(copy.deepcopy(ref))
    assert "lora: DoRA adapters (14 projections)" in capsys.readouterr().out
    _assert_same_training(model, ref, device)
    assert calls["fused"] == 0
    ref = add_lora(tiny_model("llama"), "llama").to(device)
    model = fusetune.patch_model(copy.deepcopy(ref))
    with model.disable_adapter(), ref.disable_adapter():
        ids, labels = random_batch(device=device)
        calls.update(fused=0)
        assert_close(model(input_ids=ids, labels=labels).loss, ref(input_ids=ids, labels=labels).loss,
                     torch.float32, "loss")
        assert calls["fused"] == 0


def test_modules_to_save_lm_head_trains_through_the_fused_loss(device):
    config = LoraConfig(r=8, lora_alpha=16, target_modules=LORA_TARGETS["llama"], modules_to_save=["lm_head"],
                        init_lora_weights=False)
    ref = get_peft_model(tiny_model("llama"), config).to(device)
    model = fusetune.patch_model(copy.deepcopy(ref))
    ids, labels = random_batch(device=device)
    assert model(input_ids=ids, labels=labels).logits is None  # the fused linear loss ran
    _assert_same_training(model, ref, device)


def test_dropout_trains_and_eval_is_deterministic(device, calls):
    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.2, target_modules=LORA_TARGETS["llama"],
                        init_lora_weights=False)
    ref = get_peft_model(tiny_model("llama"), config).to(device)
    model = fusetune.patch_model(copy.deepcopy(ref))
    ids, labels = random_batch(device=device)
    torch.manual_seed(0)
    a = model(input_ids=ids, labels=labels).loss
    torch.manual_seed(0)
    b = model(input_ids=ids, labels=labels).loss
    c = model(input_ids=ids, labels=labels).loss
    assert a == b and a != c and calls["fused"] == 18
    model.eval()
    ref.eval()
    with torch.no_grad():
        assert_close(model(input_ids=ids).logits, ref(input_ids=ids).logits, torch.float32, "eval logits")


def _qlora(model):
    """Every decoder nn.Linear -> a bitsandbytes NF4 Linear4bit (double quantisation), as
    BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_use_double_quant=True) loading gives."""
    bnb = pytest.importorskip("bitsandbytes")
    for layer in model.model.layers:
        for name, old in list(layer.named_modules()):
            if type(old) is not torch.nn.Linear:
                continue
            new = bnb.nn.Linear4bit(old.in_features, old.out_features, bias=old.bias is not None,
                                    compute_dtype=old.weight.dtype, quant_type="nf4", compress_statistics=True)
            new.weight = bnb.nn.Params4bit(old.weight.data.cpu(), requires_grad=False, quant_type="nf4",
                                           compress_statistics=True, blocksize=64)._quantize(old.weight.device)
            if old.bias is not None:
                new.bias = old.bias
            parent, _, child = name.rpartition(".")
            setattr(layer.get_submodule(parent) if parent else layer, child, new)
    model.is_loaded_in_4bit = True
    return model


@pytest.mark.slow
def test_qlora_training_curve_matches_unpatched(device, capsys):
    """Tiny Llama on bitsandbytes NF4 weights + PEFT LoRA: 20 AdamW steps (8 under the interpreter),
    patched vs unpatched.
    Both dequantise the same bits (fusetune's kernel is bit-exact with bitsandbytes), so fp32
    curves agree tightly. Intermediate 128: bitsandbytes 0.50.2's CPU dequantisation is wrong for
    rows whose width is not a multiple of the blocksize (down_proj at the default 96)."""
    ref = add_lora(_qlora(tiny_model("llama", intermediate_size=128)).to(device), "llama")
    model = fusetune.patch_model(copy.deepcopy(ref))
    assert "lora 14 projections" in capsys.readouterr().out
    _assert_same_training(model, ref, device, tol=1e-4)
    ids, labels = random_batch(device=device)
    curves = []
    for m in (model, ref):
        torch.manual_seed(0)
        curves.append(torch.tensor(train_steps(m, 8 if interpreting() else 20, (ids, labels))))
    assert curves[0][-1] < curves[0][0] - 0.5  # it learns
    torch.testing.assert_close(curves[0], curves[1], rtol=1e-4, atol=1e-5)


def test_modules_with_hooks_run_peft(device, calls):
    """A forward hook (PEFT's adapter_names, accelerate's device moves) needs the module itself called."""
    ref = add_lora(tiny_model("llama"), "llama").to(device)
    model = fusetune.patch_model(copy.deepcopy(ref))
    model.base_model.model.model.layers[0].mlp.down_proj.register_forward_pre_hook(lambda m, args: None)
    # accelerate puts its device hooks on the leaves: one deep inside a projection counts too
    model.base_model.model.model.layers[1].self_attn.q_proj.base_layer.register_forward_hook(lambda m, a, o: None)
    # accelerate's own hook wraps forward (AlignDevicesHook: weights offloaded until the call)
    model.base_model.model.model.layers[1].self_attn.o_proj.lora_B["default"]._hf_hook = object()
    _assert_same_training(model, ref, device)
    assert calls["fused"] == 6 - 3  # layer 0's MLP, layer 1's q/k/v group and its o run PEFT's layers


def test_an_adapter_layer_below_the_lora_layer_runs_peft(device):
    """PEFT's mixed adapters (LoHa under LoRA on q_proj): the layer below adds its own delta, which
    the fused projection would drop, so q, k, v run PEFT's layers."""
    from peft import LoHaConfig

    ref = get_peft_model(tiny_model("llama"), LoHaConfig(target_modules=["q_proj"], init_weights=False),
                         adapter_name="loha", mixed=True)
    ref.add_adapter("lora", LoraConfig(target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    ref.set_adapter(["loha", "lora"])
    ref = ref.to(device)
    model = copy.deepcopy(ref)
    fusetune.patch_model(model.base_model.model)  # (patch_model takes PeftModel, not PeftMixedModel)
    _assert_same_training(model, ref, device)


def test_adapters_that_do_not_fuse_run_peft_and_say_why(device, capsys):
    """AdaLoRA (its lora_A / lora_B are parameters) and a QLoRA base whose bias trains (bias='lora_only'
    on Qwen2's q/k/v biases) run PEFT's layers, the same as unpatched, and the summary names why."""
    from peft import AdaLoraConfig

    torch.manual_seed(0)  # AdaLoRA draws its init from the global generator
    ada = get_peft_model(tiny_model("llama"), AdaLoraConfig(init_r=8, target_r=4, total_step=100, init_lora_weights=False,
                                                            target_modules=LORA_TARGETS["llama"])).to(device)
    model = fusetune.patch_model(copy.deepcopy(ada))
    assert "SVDLinear layers (lora_A a Parameter)" in capsys.readouterr().out
    # (AdaLoRA's layers run PEFT's own code here; a lora_A gradient is scaled by its singular values
    # lora_E, which some draws make tiny (1e-4 against 0.1-10 elsewhere), so the fused kernels' fp32
    # rounding alone moves it by up to 100% relative: hence a fixed draw and a loose tolerance)
    _assert_same_training(model, ada, device, tol=1e-2)
    biased = get_peft_model(_qlora(tiny_model("qwen2", intermediate_size=128)).to(device),
                            LoraConfig(r=8, lora_alpha=16, target_modules=LORA_TARGETS["qwen2"], bias="lora_only",
                                       init_lora_weights=False))
    model = fusetune.patch_model(copy.deepcopy(biased))
    assert "a base bias trains" in capsys.readouterr().out
    _assert_same_training(model, biased, device, tol=1e-4)
    dense = get_peft_model(tiny_model("qwen2"), LoraConfig(r=8, target_modules=LORA_TARGETS["qwen2"], bias="all"))
    fusetune.patch_model(dense)  # (the 16-bit base: the bias trains, not the weight)
    out = capsys.readouterr().out
    assert "a base bias trains" in out and "full fine-tuning" not in out


def test_a_hooked_lm_head_is_called_not_read(device):
    """The fused loss reads lm_head's weight without calling it: where hooks need the call (a user's hook
    that changes the logits, PEFT's mixed-adapter batch on a modules_to_save head), Hugging Face's
    forward and loss run instead."""
    ref = add_lora(tiny_model("llama"), "llama").to(device)
    ref.base_model.model.lm_head.register_forward_hook(lambda module, args, out: out * 0.5)
    _assert_same_training(fusetune.patch_model(copy.deepcopy(ref)), ref, device)

    def config(**changes):
        return LoraConfig(**{**dict(r=8, lora_alpha=16, target_modules=LORA_TARGETS["llama"], init_lora_weights=False,
                                    modules_to_save=["lm_head"]), **changes})

    ref = get_peft_model(tiny_model("llama"), config()).to(device)
    ref.add_adapter("b", config(r=4, target_modules=["q_proj"]))
    with torch.no_grad():
        ref.base_model.model.lm_head.modules_to_save["b"].weight.mul_(1.5)
    ref.eval()  # (PEFT takes adapter_names in eval mode only; gradients still flow: per-adapter scoring)
    model = fusetune.patch_model(copy.deepcopy(ref))
    ids, labels = random_batch(device=device)
    for m in (model, ref):
        m.zero_grad(set_to_none=True)
    losses = [m(input_ids=ids, labels=labels, adapter_names=["default", "b"]).loss for m in (model, ref)]
    assert_close(losses[0], losses[1], torch.float32, "mixed-batch loss")
