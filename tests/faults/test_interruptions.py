"""Kill `fusetune train` anywhere (a step, a checkpoint being written, the rotation deleting an old
one, the adapter or summary being written) and run it again: the final adapter equals an
uninterrupted run's bit for bit, and nothing half-written is left. Ctrl-C stops at the next step
with a checkpoint; a second Ctrl-C stops at once.

Each run draws fresh kill points (FUSETUNE_FAULT_TRIALS trials, default 1; `all` kills once at
every event); the counts are printed (pytest -s).
"""
import json
import os
import random
import signal

import pytest

LEFTOVERS = (".tmp-", ".old-", ".deleting-")


@pytest.fixture(scope="module")
def reference(job):
    """An uninterrupted run: its adapter's bytes, its losses, and the events it went through."""
    config = job.config("reference.yaml", "reference")
    proc = job.run(config, "--at", "0", "--events", str(job.root / "events.txt"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = job.root / "reference"
    return {"adapter": (out / "adapter" / "adapter_model.safetensors").read_bytes(),
            "losses": json.loads((out / "summary.json").read_text())["losses"],
            "events": (job.root / "events.txt").read_text().split("\n")}


def _finish_and_compare(job, config, out, reference):
    proc = job.run(config)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (out / "adapter" / "adapter_model.safetensors").read_bytes() == reference["adapter"]
    assert json.loads((out / "summary.json").read_text())["losses"] == reference["losses"]
    assert not [p.name for p in out.iterdir() if any(mark in p.name for mark in LEFTOVERS)]
    return proc


def _kill_points(events: list[str], seed: int) -> list[list[int]]:
    """Each trial: one or two kills (the second in the resumed run), at random events."""
    trials = os.environ.get("FUSETUNE_FAULT_TRIALS", "1")  # (fresh points every run: CI's runs add up)
    if trials == "all":
        return [[k] for k in range(1, len(events) + 1)]
    rng = random.Random(seed)
    return [[rng.randint(1, len(events)) for _ in range(rng.choice((1, 2)))] for _ in range(int(trials))]


def test_killed_anywhere_the_run_resumes_to_the_same_adapter(job, reference, _fresh_seed):
    events = reference["events"]
    assert events.count("accumulate") == 6 and "save_file" in events and "rmtree" in events
    tried = survived = 0
    for trial, kills in enumerate(_kill_points(events, _fresh_seed)):  # the seed is printed on a failure
        config = job.config(f"trial-{trial}.yaml", f"trial-{trial}")
        out = job.root / f"trial-{trial}"
        where = []
        for at in kills:
            proc = job.run(config, "--at", str(at), "--how", "kill")
            assert proc.returncode in (-signal.SIGKILL, 0), proc.stdout + proc.stderr
            where.append(f"{events[at - 1]}#{at}" if proc.returncode else f"#{at} (finished first)")
        tried += 1
        print(f"trial {trial}: killed at {where}; finishing")  # shown with a failure below
        _finish_and_compare(job, config, out, reference)
        survived += 1
        print(f"trial {trial}: killed at {', '.join(where)}: the final adapter is bit-identical")
    print(f"fault injection: {survived}/{tried} runs killed at random points ended bit-identical "
          f"({len(events)} events in a run)")


def test_ctrl_c_saves_a_checkpoint_at_the_next_step(job, reference):
    config = job.config("ctrl-c.yaml", "ctrl-c", training={"save_steps": 0})  # no checkpoints of its own
    out = job.root / "ctrl-c"
    proc = job.run(config, "--at", "step:3", "--how", "int")
    assert proc.returncode == 130, proc.stdout + proc.stderr
    assert f"stopped by SIGINT after step 3 of 6, before writing the results; saved {out / 'checkpoint-3'}: run " \
           f"the same command again to resume from it" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    proc = _finish_and_compare(job, config, out, reference)
    assert "resumed from" in proc.stdout and "checkpoint-3 (step 3 of 6)" in proc.stdout
    assert "micro-batch: 2 (training.micro_batch_size)" in proc.stdout
    # Ctrl-C in the last step: the final checkpoint, no results; the rerun writes them
    config = job.config("ctrl-c-last.yaml", "ctrl-c-last", training={"micro_batch_size": "auto"})
    out = job.root / "ctrl-c-last"
    proc = job.run(config, "--at", "step:6", "--how", "int")
    assert proc.returncode == 130 and "after step 6 of 6, before writing the results" in proc.stderr, proc.stderr
    assert not (out / "adapter").exists() and not (out / "summary.json").exists()
    proc = job.run(config)  # auto: the micro-batch of the run it resumes (the whole batch of 4 on a CPU)
    assert proc.returncode == 0 and (out / "summary.json").is_file(), proc.stdout + proc.stderr
    assert "micro-batch: 4 (as in the run it resumes, so the result is the same bit for bit)" in proc.stdout


def test_a_second_ctrl_c_stops_at_once(job, reference):
    config = job.config("ctrl-c-twice.yaml", "ctrl-c-twice")
    out = job.root / "ctrl-c-twice"
    proc = job.run(config, "--at", "step:4", "--how", "int-twice")
    assert proc.returncode == 130, proc.stdout + proc.stderr
    assert "stopped at once (SIGINT)" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]  # step 4 was lost, step 2 kept
    _finish_and_compare(job, config, out, reference)


@pytest.mark.gpu
def test_a_paged_8bit_optimizer_run_killed_on_the_gpu_resumes_bit_for_bit(job):
    pytest.importorskip("bitsandbytes")
    outs = {}
    for name, kill in (("paged-straight", None), ("paged-killed", "step:4")):
        config = job.config(f"{name}.yaml", name, training={"optim": "paged_adamw_8bit"})
        if kill:
            assert job.run(config, "--at", kill, "--how", "kill").returncode == -signal.SIGKILL
        proc = job.run(config)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        outs[name] = (job.root / name / "adapter" / "adapter_model.safetensors").read_bytes()
        assert "NVIDIA" in proc.stdout or "GPU" in proc.stdout  # it ran on the GPU
    assert outs["paged-straight"] == outs["paged-killed"]
