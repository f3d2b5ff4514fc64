"""`fusetune train --nproc 2` on the CPU (2 gloo processes under torchrun): the run trains to one
process's losses and adapter, only rank 0 reports and writes, and a checkpoint the two processes
wrote resumes on one process to the same adapter; so does a run that splits every sequence between
the processes (training.context_parallel)."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys

import pytest
import torch

from tests.recipe.test_train_command import CONVERSATIONS
from tests.tiny_models import byte_level_tokenizer, tiny_model


def _fusetune(*args, cwd):
    # the torch backend and gloo, as a CPU user's, on a GPU machine too
    env = {**os.environ, "TRITON_INTERPRET": "0", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run([sys.executable, "-m", "fusetune.cli", "train", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=900)


def _adapter(out):
    from safetensors.torch import load_file

    return load_file(out / "adapter" / "adapter_model.safetensors")


def _eval_losses(summary: dict) -> list[float]:
    assert len(summary["eval"]) == 2, summary["eval"]  # before and after training
    return [e["loss"] for e in summary["eval"]]


def _assert_same_adapter(ours: dict, truth: dict, atol: float = 1e-6):
    assert ours.keys() == truth.keys() and ours
    for name in truth:
        torch.testing.assert_close(ours[name], truth[name], rtol=1e-4, atol=atol, msg=lambda m: f"{name}: {m}")


def _assert_trained_as_one(tmp, directory: str):
    """The run in tmp/directory has the one-process run's losses, eval losses and adapter."""
    summary, truth = (json.loads((tmp / d / "summary.json").read_text()) for d in (directory, "one"))
    assert summary["losses"] == pytest.approx(truth["losses"], rel=1e-5)
    assert _eval_losses(summary) == pytest.approx(_eval_losses(truth), rel=1e-5)  # split over the processes
    _assert_same_adapter(_adapter(tmp / directory), _adapter(tmp / "one"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("nproc")
    tokenizer = byte_level_tokenizer()
    tiny_model("llama", vocab_size=len(tokenizer)).save_pretrained(tmp / "base")
    tokenizer.save_pretrained(tmp / "base")
    (tmp / "data.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in CONVERSATIONS * 3))
    (tmp / "run.yaml").write_text(f"""
model: {{name: {tmp / 'base'}, max_seq_length: 64}}
data: {{path: data.jsonl, eval_prompts: ["Who are you?"], max_new_tokens: 4, eval_split: 0.2}}
lora: {{r: 4, alpha: 8, target_modules: [q_proj, v_proj, down_proj]}}
training: {{max_steps: 4, effective_batch_size: 5, micro_batch_size: 2, learning_rate: 1.0e-2, save_steps: 2}}
output: {{dir: two}}
""")
    two = _fusetune("run.yaml", "--nproc", "2", cwd=tmp)
    one = _fusetune("run.yaml", "--set", "output.dir=one", cwd=tmp)
    return tmp, two, one


def test_two_processes_train_as_one(runs):
    tmp, two, one = runs
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-5000:]
    assert one.returncode == 0, one.stdout[-3000:] + one.stderr[-3000:]
    assert "data parallel: 2 processes (gloo)" in two.stdout, two.stdout[-3000:]
    # rank 0 alone reports
    assert two.stdout.count("\ndata: ") == 1 and two.stdout.count("  before: ") == 1, two.stdout[-3000:]
    _assert_trained_as_one(tmp, "two")


def test_accelerate_launch_trains_as_one(runs):
    """`accelerate launch --multi_gpu --num_processes 2 -m fusetune.cli train` (accelerate's torchrun
    launcher, gloo on the CPU): the command reads the variables it sets, as torchrun's."""
    tmp, _, one = runs
    assert one.returncode == 0, one.stdout[-3000:] + one.stderr[-3000:]
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    env = {**os.environ, "TRITON_INTERPRET": "0", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    run = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                          "--main_process_port", str(port), "-m", "fusetune.cli", "train", "run.yaml",
                          "--set", "output.dir=accelerate"], capture_output=True, text=True, cwd=tmp, env=env,
                         timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    assert "data parallel: 2 processes (gloo)" in run.stdout, run.stdout[-3000:]
    assert run.stdout.count("\ndata: ") == 1, run.stdout[-3000:]  # rank 0 alone reports
    _assert_trained_as_one(tmp, "accelerate")


def test_context_parallel_processes_train_as_one(runs):
    """training.context_parallel: both processes train every packed micro-batch, half its tokens each
    (attention exchanges heads for tokens), with gradient checkpointing (recomputed sharded)."""
    tmp, _, one = runs
    proc = _fusetune("run.yaml", "--nproc", "2", "--set", "training.context_parallel=true",
                     "--set", "lora.gradient_checkpointing=true", "--set", "output.dir=sharded", cwd=tmp)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "context parallel: 2 processes (gloo)" in proc.stdout, proc.stdout[-3000:]
    _assert_trained_as_one(tmp, "sharded")


def test_fsdp_processes_train_as_one_and_their_checkpoint_resumes_on_one(runs):
    """training.fsdp: weights, gradients and AdamW states sharded over the 2 processes (FSDP2), the
    same losses and adapter as one process; its checkpoint (gathered whole) resumes on one."""
    tmp, _, one = runs
    proc = _fusetune("run.yaml", "--nproc", "2", "--set", "training.fsdp=true", "--set", "output.dir=fsdp", cwd=tmp)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "fsdp: 2 decoder layers and the rest of the model sharded over 2 processes" in proc.stdout, proc.stdout[-3000:]
    assert proc.stdout.count("  before: ") == 1 and proc.stdout.count("  after: ") == 1, proc.stdout[-3000:]
    _assert_trained_as_one(tmp, "fsdp")
    resumed = tmp / "fsdp-resumed"
    resumed.mkdir()
    shutil.copytree(tmp / "fsdp" / "checkpoint-2", resumed / "checkpoint-2")
    proc = _fusetune("run.yaml", "--set", "output.dir=fsdp-resumed", cwd=tmp)
    assert proc.returncode == 0 and "resumed from" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
    _assert_same_adapter(_adapter(resumed), _adapter(tmp / "one"))


def test_fsdp_full_fine_tune_saves_the_whole_model(runs):
    tmp, _, _ = runs
    from safetensors.torch import load_file

    runs_of = {}
    for name, extra in (("full-one", []), ("full-fsdp", ["--nproc", "2", "--set", "training.fsdp=true"])):
        # one held-out row: the second process has no eval share and runs a zero-weight pass for FSDP's gathers
        proc = _fusetune("run.yaml", *extra, "--set", "model.full_finetuning=true", "--set", "training.max_steps=2",
                         "--set", "data.eval_split=0.06",
                         "--set", "training.learning_rate=1.0e-4", "--set", f"output.dir={name}", cwd=tmp)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
        runs_of[name] = load_file(tmp / name / "model" / "model.safetensors")
    one, fsdp = runs_of["full-one"], runs_of["full-fsdp"]
    assert one.keys() == fsdp.keys() and len(one) > 10
    base = load_file(tmp / "base" / "model.safetensors")
    assert (one["model.layers.0.mlp.up_proj.weight"] - base["model.layers.0.mlp.up_proj.weight"]).abs().max() > 1e-4
    # AdamW's first steps move a weight by about the learning rate whatever its gradient's size, so a
    # near-zero gradient summed in another order (last bits) can move its weight up to 2 x 1e-4 x 2 steps
    # the other way: a few such elements may differ by that much, every other one matches tightly
    off, total = 0, 0
    for name in one:
        diff = (fsdp[name] - one[name]).abs()
        assert diff.max() <= 4e-4 + 1e-6, name
        off += int((diff > 1e-6 + 1e-4 * one[name].abs()).sum())
        total += diff.numel()
    assert off <= max(2, total // 10000), f"{off} of {total} weights differ"


def test_fsdp_qlora_trains_as_one_process(runs):
    """training.fsdp on a 4-bit base: the NF4 weights stay whole on every process (FSDP2 would drop
    bitsandbytes' quantisation state), the rest is sharded; the same losses and adapter as one
    process training the same 4-bit model."""
    pytest.importorskip("bitsandbytes")
    tmp, _, _ = runs
    four_bit = ("--set", "model.load_in_4bit=true")
    one = _fusetune("run.yaml", *four_bit, "--set", "output.dir=qlora-one", cwd=tmp)
    assert one.returncode == 0, one.stdout[-3000:] + one.stderr[-3000:]
    proc = _fusetune("run.yaml", *four_bit, "--nproc", "2", "--set", "training.fsdp=true", "--set",
                     "output.dir=qlora-fsdp", cwd=tmp)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "4-bit base weights whole on every process" in proc.stdout, proc.stdout[-3000:]
    summary, truth = (json.loads((tmp / d / "summary.json").read_text()) for d in ("qlora-fsdp", "qlora-one"))
    assert summary["losses"] == pytest.approx(truth["losses"], rel=1e-5)
    assert _eval_losses(summary) == pytest.approx(_eval_losses(truth), rel=1e-5)
    # (AdamW divides by the root of the squared gradient: a near-zero gradient summed in another
    # order moves its weight a little differently, up to ~1e-5 here at lr 1e-2)
    _assert_same_adapter(_adapter(tmp / "qlora-fsdp"), _adapter(tmp / "qlora-one"), atol=5e-5)


def test_fsdp_trains_embeddings_beside_lora_as_one_process(runs):
    """A cpt stage trains embed_tokens and lm_head (PEFT modules_to_save, in FSDP's root unit) beside
    LoRA: the same losses and saved adapter as one process. (The root unit stays gathered after a
    forward: an optimizer built then stepped copies FSDP never gave gradients to; and PEFT's save
    made FSDP free the gathered weights it was reading.)"""
    tmp, _, _ = runs
    (tmp / "text.jsonl").write_text("\n".join(json.dumps({"text": f"row {i}: " + "a few plain words to read " * 3})
                                              for i in range(20)))
    cpt = ("--set", "stage.kind=cpt", "--set", "data.path=text.jsonl")
    one = _fusetune("run.yaml", *cpt, "--set", "output.dir=cpt-one", cwd=tmp)
    assert one.returncode == 0, one.stdout[-3000:] + one.stderr[-3000:]
    proc = _fusetune("run.yaml", *cpt, "--nproc", "2", "--set", "training.fsdp=true", "--set", "output.dir=cpt-fsdp",
                     cwd=tmp)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    summary, truth = (json.loads((tmp / d / "summary.json").read_text()) for d in ("cpt-fsdp", "cpt-one"))
    assert summary["losses"] == pytest.approx(truth["losses"], rel=1e-5)
    assert _eval_losses(summary) == pytest.approx(_eval_losses(truth), rel=1e-5)
    ours, theirs = _adapter(tmp / "cpt-fsdp"), _adapter(tmp / "cpt-one")
    assert any("embed_tokens" in name for name in ours) and any("lm_head" in name for name in ours)
    _assert_same_adapter(ours, theirs, atol=2e-5)


def test_context_parallel_over_processes_the_heads_do_not_split_is_refused(runs):
    tmp, _, _ = runs
    proc = _fusetune("run.yaml", "--nproc", "3", "--set", "training.context_parallel=true", "--set", "output.dir=three",
                     cwd=tmp)
    assert proc.returncode != 0
    assert "4 query and 2 key/value heads need a process count" in proc.stderr, proc.stderr[-3000:]


def test_a_checkpoint_of_two_processes_resumes_on_one(runs):
    tmp, two, _ = runs
    assert two.returncode == 0
    resumed = tmp / "resumed"
    resumed.mkdir()
    shutil.copytree(tmp / "two" / "checkpoint-2", resumed / "checkpoint-2")
    proc = _fusetune("run.yaml", "--set", "output.dir=resumed", cwd=tmp)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "resumed from" in proc.stdout
    ours, truth = _adapter(resumed), _adapter(tmp / "two")
    for name in truth:
        torch.testing.assert_close(ours[name], truth[name], rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_bad_process_counts_are_named(tmp_path):
    for args, message in ((["--nproc", "0"], "--nproc 0: at least one process"),
                          (["--nproc", "9", "--set", "training.effective_batch_size=4"],
                           "effective_batch_size 4 is less than the 9 processes")):
        proc = _fusetune(*args, cwd=tmp_path)
        assert proc.returncode != 0
        assert message in proc.stderr, proc.stderr[-3000:]


def test_sigterm_to_the_command_stops_every_process_with_a_checkpoint(runs):
    """A scheduler's SIGTERM to `fusetune train --nproc 2` reaches the processes through torchrun: they
    stop at the next step, rank 0 writes a checkpoint, and nothing keeps running."""
    tmp, _, _ = runs
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    proc = subprocess.Popen([sys.executable, "-m", "fusetune.cli", "train", "run.yaml", "--nproc", "2",
                             "--set", "output.dir=stopped", "--set", "training.max_steps=400",
                             "--set", "training.save_steps=1000", "--set", "training.logging_steps=1"],
                            cwd=tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:  # rank 0's progress lines
        if line.startswith("step "):
            break
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode != 0
    assert "stopped by SIGTERM" in err, err[-3000:]
    saved = sorted((tmp / "stopped").glob("checkpoint-*"))
    assert saved and (saved[-1] / "state.json").is_file()
    assert not (tmp / "stopped" / "summary.json").exists()
    if shutil.which("pgrep"):
        left = subprocess.run(["pgrep", "-f", "output.dir=stopped"], capture_output=True, text=True).stdout.split()
        assert not left, f"processes still running: {left}"


@pytest.mark.parametrize(("settings", "message"), [
    ({"model": {"load_in_8bit": True}}, "8-bit bases are not supported with it yet: use load_in_4bit"),
    ({"training": {"optim": "adamw_8bit"}}, "8-bit AdamW .* does not run on shards: set training.optim: adamw"),
    ({"training": {"context_parallel": True}}, "fsdp and training.context_parallel do not run together yet"),
])
def test_fsdp_refuses_what_it_cannot_shard(settings, message):
    from fusetune.recipe.config import ConfigError, build_config
    from fusetune.recipe.train import check_data_parallel
    from fusetune.training.distributed import Ranks

    raw = {"model": {"name": "any"}, "training": {"fsdp": True, "effective_batch_size": 4}}
    for section, values in settings.items():
        raw[section] = {**raw.get(section, {}), **values}
    with pytest.raises(ConfigError, match=message):
        check_data_parallel(build_config(raw), Ranks(rank=0, world=2), recipe_stage=False)
