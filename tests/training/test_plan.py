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
    """A GPU whose step of n tokens peaks at held + fixed + per_token * n (+ curve(n), memory the
    linear model does not see), out of memory past capacity. With host_per_token, each of `layers`
    layer inputs (host_per_token / layers bytes a token) goes through the host budget in a
    power-of-two block, as the offloaded checkpoints' do."""

    def __init__(self, capacity, fixed, per_token, curve=lambda n: 0, host_per_token=0, layers=4, held=0):
        self.capacity, self.fixed, self.per_token, self.curve, self.held = capacity, fixed, per_token, curve, held
        self.host_per_token, self.layers, self.steps, self._peak = host_per_token, layers, [], 0

    def needs(self, n):
        return self.held + self.fixed + self.per_token * n + self.curve(n)

    def block(self, n):
        return 1 << max(0, int(n * self.host_per_token / self.layers) - 1).bit_length()

    def step(self, n):
        self.steps.append(n)
        if self.needs(n) > self.capacity:
            raise torch.cuda.OutOfMemoryError(f"fake: {n} tokens")
        if self.host_per_token:  # the layer inputs offloaded, then taken back in the backward
            for _ in range(self.layers):
                HOST_BUDGET.reserve(self.block(n), required=True)
            for _ in range(self.layers):
                HOST_BUDGET.release(self.block(n), self.block(n))
        self._peak = self.needs(n)

    def reset(self):
        self._peak = 0

    def peak(self):
        return self._peak


@pytest.fixture
def host_budget():
    saved = dict(vars(HOST_BUDGET))
    HOST_BUDGET.__init__()  # no step of an earlier test counts
    yield HOST_BUDGET
    vars(HOST_BUDGET).update(saved)


def _quiet(*_):
    pass


GB = 10**9


def test_linear_costs_project_the_longest_and_a_step_there_confirms_it(host_budget):
    gpu = FakeGpu(capacity=80 * GB, fixed=random.uniform(5, 20) * GB, per_token=random.uniform(0.1, 0.3) * GB / 1000,
                  held=2 * GB)
    plan = plan_from_steps(gpu.step, gpu, probe_lengths=(4096, 8192), held=gpu.held, log=_quiet)
    assert plan.gpu_per_token == pytest.approx(gpu.per_token)
    room = gpu.capacity * (1 - HEADROOM) - gpu.needs(8192)  # the optimizer states are in every peak
    assert plan.projected == int(8192 + room / gpu.per_token) // 1024 * 1024 and plan.bound == "GPU memory"
    assert plan.longest == plan.projected and plan.verified
    assert gpu.steps == [4096, 4096, 8192, plan.projected]  # a warm-up, two probes, the check
    assert f"set model.max_seq_length to at most {plan.longest}" in plan.report()
    assert "2.00 GB held back for the optimizer states" in plan.report()


def test_a_projection_that_runs_out_of_memory_is_bisected_to_the_longest_that_runs(host_budget):
    # memory the two probes do not show: it grows with the square of the length past 100k tokens
    square = random.uniform(5e-2, 2e-1)
    gpu = FakeGpu(capacity=80 * GB, fixed=10 * GB, per_token=0.15 * GB / 1000,
                  curve=lambda n: max(0, n - 100_000) ** 2 * square)
    plan = plan_from_steps(gpu.step, gpu, probe_lengths=(2048, 4096), log=_quiet)
    truly = max(n for n in range(4096, plan.projected + 1, 1024) if gpu.needs(n) <= gpu.capacity)
    assert plan.verified and gpu.needs(plan.longest) <= gpu.capacity
    assert truly * (1 - STEP_DOWN) - 1024 <= plan.longest <= truly
    assert plan.tried[0].tokens == plan.projected and plan.tried[0].gpu_peak == -1
    assert len(plan.tried) <= 7  # bisection: a few steps, not one per 5%
    assert {p.tokens for p in plan.tried if p.gpu_peak > 0} >= {plan.longest} and "ran out of GPU memory" in \
        plan.report()


def test_a_projection_below_the_longer_probe_reports_the_probe_that_ran(host_budget):
    # the probe of 8192 tokens ran beside the optimizer states, within the capacity but not its headroom
    gpu = FakeGpu(capacity=10 * GB, fixed=9.7 * GB, per_token=10_000, held=GB // 10)
    plan = plan_from_steps(gpu.step, gpu, probe_lengths=(4096, 8192), held=gpu.held, log=_quiet)
    assert plan.projected < 8192 and plan.longest == 8192 and plan.verified and plan.tried == []
    assert "longest: 8192 tokens at batch 1 (ran)" in plan.report()


def test_without_the_check_the_projection_is_reported_as_such(host_budget):
    gpu = FakeGpu(capacity=10**10, fixed=10**9, per_token=10**5)
    plan = plan_from_steps(gpu.step, gpu, probe_lengths=(512, 1024), verify=False, log=_quiet)
    assert not plan.verified and plan.longest == plan.projected and gpu.steps == [512, 512, 1024]
    assert "(projected, not run)" in plan.report()


@pytest.mark.parametrize("budget_gb", [8, 11])
def test_offloaded_layer_inputs_bound_the_length_by_the_host_budget_in_power_of_two_blocks(host_budget, budget_gb):
    host_budget.set_limit(budget_gb * GB)
    gpu = FakeGpu(capacity=80 * GB, fixed=5 * GB, per_token=0.05 * GB / 1000, host_per_token=32 * 8192, layers=32)
    gpu.step(16384)  # a longer step than the probes before the plan (earlier training): not theirs to count
    plan = plan_from_steps(gpu.step, gpu, probe_lengths=(4096, 8192), layers=32, verify=False, log=_quiet)
    longest = max(n for n in range(8192, 400_000, 1024) if 32 * gpu.block(n) <= budget_gb * GB)
    assert plan.bound == "host memory" and plan.host_budget == budget_gb * GB
    assert plan.host_per_token == 8192 * 32
    assert plan.projected == longest  # 262,144 tokens both times: 11 GB holds no larger blocks than 8 GB
    assert "pinned budget" in plan.report()


def test_a_probe_that_does_not_fit_says_what_to_change(host_budget):
    gpu = FakeGpu(capacity=10**9, fixed=9 * 10**8, per_token=10**6)
    with pytest.raises(torch.cuda.OutOfMemoryError, match="4096 tokens, a probe .*--probe.*load_in_4bit"):
        plan_from_steps(gpu.step, gpu, log=_quiet)


@pytest.mark.parametrize("lengths", [(0, 10), (8, 8)])
def test_bad_probe_lengths_and_costs_that_do_not_grow_are_errors(host_budget, lengths):
    gpu = FakeGpu(capacity=10**9, fixed=10**8, per_token=0)
    with pytest.raises(ValueError, match="two different positive lengths"):
        plan_from_steps(gpu.step, gpu, probe_lengths=lengths, log=_quiet)
    with pytest.raises(ValueError, match="did not grow"):
        plan_from_steps(gpu.step, gpu, probe_lengths=(8, 16), log=_quiet)


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
def test_a_plan_on_the_gpu_runs_its_longest_within_the_cap_and_lifts_the_cap_after(host_budget):
    model = fusetune.patch_model(add_lora(tiny_model("llama", hidden_size=256, intermediate_size=512,
                                                     vocab_size=32000), "llama")).cuda()
    enable_offloaded_checkpointing(model)
    torch.cuda.empty_cache()
    cap = torch.cuda.memory_allocated() + 2 * 2**30
    plan = plan_longest_sequence(model, gpu_bytes=cap, probe_lengths=(2048, 4096), multiple=256, log=print)
    assert plan.verified and plan.longest >= 8192 and math.isfinite(plan.gpu_per_token), plan.report()
    ran = [p for p in plan.tried if p.tokens == plan.longest]
    assert ran and ran[0].gpu_peak <= cap, plan.report()
    torch.empty(cap + 2**30, dtype=torch.uint8, device="cuda")  # the cap is lifted


def test_the_command_plans_the_model_train_would_train(monkeypatch):
    """run_plan prepares the config's model as run_train does (a recipe: its first stage; a cpt stage
    trains embed_tokens and lm_head beside LoRA) and names a preference stage's several rows."""
    import fusetune.recipe.plan as plan_job
    from fusetune.recipe.config import build_config

    planned, log = [], []
    answers = iter([True])  # a GPU for run_plan's check; none for PEFT and the others after it
    monkeypatch.setattr(torch.cuda, "is_available", lambda: next(answers, False))
    monkeypatch.setattr(plan_job, "describe_hardware", lambda device, dtype: "a GPU")
    monkeypatch.setattr(plan_job, "load_model", lambda m, source, dtype, gguf_file=None: (tiny_model("llama"), None))
    monkeypatch.setattr(plan_job, "plan_longest_sequence", lambda model, **kw: planned.append((model, kw)) or
                        type("Plan", (), {"report": lambda self: "the report"})())
    recipe = build_config({"model": {"name": "base", "dtype": "float32"}, "lora": {"r": 4, "target_modules": ["q_proj"]},
                           "stages": [{"name": "cpt", "kind": "cpt", "data": {"path": "corpus.jsonl"}},
                                      {"name": "pairs", "kind": "dpo", "data": {"path": "pairs.jsonl"}}]})
    from fusetune.training.checkpoint import HOST_BUDGET, host_share
    monkeypatch.setattr(HOST_BUDGET, "limit", HOST_BUDGET.limit)  # restored after the test
    plan_job.run_plan(recipe, gpu_gib=40, probe_lengths=(1024, 2048), processes=4, log=log.append)
    assert abs(HOST_BUDGET.limit - host_share(1) / 4) < 2**30  # one process's share of a 4-process launch
    model, kw = planned[0]
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_A" in n for n in trained) and any("embed_tokens" in n for n in trained)
    assert kw["gpu_bytes"] == 40 * 2**30 and kw["probe_lengths"] == (1024, 2048)
    assert any(line.startswith("plan: one of 4 processes on this host") for line in log)
    assert log[0] == "plan: the recipe's first stage, cpt" and any("a dpo stage's step runs several rows" in line
                                                                    for line in log)
    assert log[-1] == "the report"
