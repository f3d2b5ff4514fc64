"""The sequence planner (training/plan.py, `fusetune plan`): the projection from two measured steps,
the check that steps down where the projection runs out of memory, the host-memory bound, and a
training step that leaves the model as it found it."""
import math
import random

import pytest
import torch

import fusetune
from fusetune.cli import main
from fusetune.training.checkpoint import HOST_BUDGET, enable_offloaded_checkpointing
from fusetune.training.plan import HEADROOM, STEP_DOWN, optimizer_state_bytes, plan_from_steps, \
    plan_longest_sequence, training_step
from tests.tiny_models import add_lora, tiny_model


class FakeGpu:
    """A GPU whose step of n tokens peaks at fixed + per_token * n (+ curve(n), memory the linear
    model does not see), out of memory past capacity; host_per_token bytes of layer inputs go
    through the host budget as offloaded checkpoints' do."""

    def __init__(self, capacity, fixed, per_token, curve=lambda n: 0, host_per_token=0):
        self.capacity, self.fixed, self.per_token, self.curve = capacity, fixed, per_token, curve
        self.host_per_token, self.steps, self._peak = host_per_token, [], 0

    def needs(self, n):
        return self.fixed + self.per_token * n + self.curve(n)

    def step(self, n):
        self.steps.append(n)
        if self.needs(n) > self.capacity:
            raise torch.cuda.OutOfMemoryError(f"fake: {n} tokens")
        if self.host_per_token:  # a layer input offloaded, then taken back in the backward
            held = self.host_per_token * n
            HOST_BUDGET.reserve(held, required=True)
            HOST_BUDGET.release(held, held)
        self._peak = self.needs(n)

    def reset(self):
        self._peak = 0

    def peak(self):
        return self._peak


@pytest.fixture
def host_budget():
    saved = (HOST_BUDGET.limit, HOST_BUDGET.required_step)
    yield HOST_BUDGET
    HOST_BUDGET.set_limit(saved[0])
    HOST_BUDGET.required_step = saved[1]


def _projection(gpu, tokens, reserved, multiple=1024):
    room = gpu.capacity * (1 - HEADROOM) - reserved - gpu.needs(tokens)
    return int(tokens + room / gpu.per_token) // multiple * multiple


def test_linear_costs_project_the_longest_and_a_step_there_confirms_it(host_budget):
    gb = 10**9
    gpu = FakeGpu(capacity=80 * gb, fixed=random.uniform(5, 20) * gb, per_token=random.uniform(0.1, 0.3) * gb / 1000)
    reserved = 2 * gb
    plan = plan_from_steps(gpu.step, gpu, probe_lengths=(4096, 8192), reserved=reserved, log=lambda *_: None)
    assert plan.gpu_per_token == pytest.approx(gpu.per_token)
    assert plan.projected == _projection(gpu, 8192, reserved) and plan.bound == "GPU memory"
    assert plan.longest == plan.projected and plan.verified
    assert gpu.steps == [4096, 4096, 8192, plan.projected]  # a warm-up, two probes, the check
    assert gpu.needs(plan.longest) <= gpu.capacity - reserved
    assert f"set model.max_seq_length to at most {plan.longest}" in plan.report()


def test_a_projection_that_runs_out_of_memory_steps_down_until_a_step_fits(host_budget):
    gb = 10**9
    # memory the two probes do not show: it grows with the square of the length past 100k tokens
    gpu = FakeGpu(capacity=80 * gb, fixed=10 * gb, per_token=0.15 * gb / 1000,
                  curve=lambda n: max(0, n - 100_000) ** 2 * 2e-2)
    plan = plan_from_steps(gpu.step, gpu, probe_lengths=(2048, 4096), log=lambda *_: None)
    truly = max(n for n in range(4096, plan.projected + 1, 1024) if gpu.needs(n) <= gpu.capacity)
    assert plan.verified and gpu.needs(plan.longest) <= gpu.capacity
    assert truly * (1 - STEP_DOWN) - 1024 <= plan.longest <= truly
    assert [p.gpu_peak for p in plan.tried][-1] > 0 and all(p.gpu_peak == -1 for p in plan.tried[:-1])
    assert len(plan.tried) > 1 and "ran out of GPU memory" in plan.report()


def test_without_the_check_the_projection_is_reported_as_such(host_budget):
    gpu = FakeGpu(capacity=10**10, fixed=10**9, per_token=10**5)
    plan = plan_from_steps(gpu.step, gpu, probe_lengths=(512, 1024), verify=False, log=lambda *_: None)
    assert not plan.verified and plan.longest == plan.projected and gpu.steps == [512, 512, 1024]
    assert "(projected, not run)" in plan.report()


def test_offloaded_layer_inputs_bound_the_length_by_the_host_budget(host_budget):
    gb = 10**9
    host_budget.set_limit(8 * gb)
    gpu = FakeGpu(capacity=80 * gb, fixed=5 * gb, per_token=0.05 * gb / 1000, host_per_token=0.25 * gb / 1000)
    plan = plan_from_steps(gpu.step, gpu, probe_lengths=(4096, 8192), log=lambda *_: None)
    assert plan.bound == "host memory" and plan.host_budget == 8 * gb
    assert plan.host_per_token == pytest.approx(gpu.host_per_token)
    assert plan.projected == 8 * gb // gpu.host_per_token // 1024 * 1024
    assert "pinned budget 8.0 GB" in plan.report()
    assert host_budget.required_step == gpu.host_per_token * plan.longest  # the budget's record kept


def test_a_probe_that_does_not_fit_says_what_to_change(host_budget):
    gpu = FakeGpu(capacity=10**9, fixed=9 * 10**8, per_token=10**6)
    with pytest.raises(torch.cuda.OutOfMemoryError, match="4096 tokens, a probe.*load_in_4bit.*--probe"):
        plan_from_steps(gpu.step, gpu, log=lambda *_: None)


@pytest.mark.parametrize("lengths", [(0, 10), (8, 8)])
def test_bad_probe_lengths_and_costs_that_do_not_grow_are_errors(host_budget, lengths):
    gpu = FakeGpu(capacity=10**9, fixed=10**8, per_token=0)
    with pytest.raises(ValueError, match="two different positive lengths"):
        plan_from_steps(gpu.step, gpu, probe_lengths=lengths, log=lambda *_: None)
    with pytest.raises(ValueError, match="did not grow"):
        plan_from_steps(gpu.step, gpu, probe_lengths=(8, 16), log=lambda *_: None)


def test_the_training_step_leaves_the_model_as_it_found_it(device):
    model = fusetune.patch_model(add_lora(tiny_model("llama"), "llama")).to(device)
    enable_offloaded_checkpointing(model)
    model.eval()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    seen = []
    model.get_input_embeddings().register_forward_hook(lambda m, args, out: seen.append(out.shape))
    training_step(model)(37)
    assert seen == [torch.Size([1, 37, model.config.hidden_size])] and not model.training
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert optimizer_state_bytes(model) == 8 * trainable and optimizer_state_bytes(model, True) == 2 * trainable


def test_the_planner_asks_for_a_gpu():
    with pytest.raises(ValueError, match="on cpu; load it on a CUDA GPU"):
        plan_longest_sequence(tiny_model("llama"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU's refusal")
def test_the_command_on_a_machine_without_a_gpu_says_so(capsys):
    assert main(["plan"]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["plan", "--probe", "8192,4096"])
    assert "the shorter first" in capsys.readouterr().err


@pytest.mark.gpu
def test_a_plan_on_the_gpu_runs_its_longest_within_the_cap():
    model = fusetune.patch_model(add_lora(tiny_model("llama", hidden_size=256, intermediate_size=512,
                                                     vocab_size=32000), "llama")).cuda()
    enable_offloaded_checkpointing(model)
    torch.cuda.empty_cache()
    cap = torch.cuda.memory_allocated() + 2 * 10**9
    try:
        plan = plan_longest_sequence(model, gpu_bytes=cap, probe_lengths=(2048, 4096), multiple=256,
                                     log=lambda *_: None)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    assert plan.verified and plan.longest >= 8192 and math.isfinite(plan.gpu_per_token)
    assert plan.tried[-1].tokens == plan.longest and plan.tried[-1].gpu_peak <= cap
