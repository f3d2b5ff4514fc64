"""What a user can get wrong, or what can go wrong around a run, ends in one line that names the
file or key and the fix, found before the model loads where it can be; a damaged checkpoint falls
back to the previous intact one; nothing an earlier run wrote is overwritten."""
import contextlib
import json
import shutil
import subprocess

import pytest

from fusetune.backend import use_backend
from fusetune.recipe.config import ConfigError, load_config
from fusetune.recipe.train import run_train


def train(config):
    """`fusetune train CONFIG` in this process (the torch backend: the kernels have their own tests)."""
    log = []
    with use_backend("torch"):
        summary = run_train(load_config(str(config)), log.append)
    return summary, log


def without_weights(job):
    """The job's model folder without its weights: a run that gets as far as loading them fails."""
    folder = job.root / "no-weights"
    if not folder.exists():
        shutil.copytree(job.root / "base", folder, ignore=shutil.ignore_patterns("*.safetensors"))
    return {"name": str(folder)}


# --- found before the model loads -----------------------------------------------------------------
@pytest.mark.parametrize("content, message", [
    (None, r"data.path '.*missing.jsonl' not found"),
    (b"", r"data.path '.*' holds no rows: give a file with at least one example"),
    (b'{"question": "?", "answer": "!"}\n', r"data row 0 has keys \['answer', 'question'\]: fusetune reads messages"),
    (b'{"text": "ok"}\n{"text": "broken\n', r"line 2 is not valid JSON .*: fix or remove that line"),
    ('{"text": "한국어"}\n'.encode("cp949"), r"is not UTF-8 text \(byte 0x\w\w on line 1\): save it as UTF-8, e.g. "
                                            r"iconv -f cp949 -t utf-8"),
    (b'[1, 2]\n', r"row 0 is list '\[1, 2\]', not an object of fields"),
])
def test_bad_data_is_named_before_the_model_loads(job, content, message):
    data = job.root / ("missing.jsonl" if content is None else f"bad-{abs(hash(content))}.jsonl")
    if content is not None:
        data.write_bytes(content)
    config = job.config("bad-data.yaml", "bad-data", model=without_weights(job), data={"path": str(data)})
    with pytest.raises(ConfigError, match=message):
        train(config)


def test_a_max_seq_length_too_short_for_every_row_is_named_before_the_model_loads(job):
    config = job.config("short.yaml", "short", model={**without_weights(job), "max_seq_length": 8})
    with pytest.raises(ConfigError, match=r"model.max_seq_length = 8 cuts every row before its first answer token "
                                          r"\(the shortest row needs \d+ tokens\): raise model.max_seq_length"):
        train(config)


def test_an_output_path_that_is_a_file_or_not_writable_is_named_before_the_model_loads(job, tmp_path):
    (tmp_path / "taken").write_text("my notes")
    config = job.config("file-out.yaml", "unused", model=without_weights(job), output={"dir": str(tmp_path / "taken")})
    with pytest.raises(ConfigError, match="output.dir '.*taken' is a file: choose a folder"):
        train(config)
    assert (tmp_path / "taken").read_text() == "my notes"
    with read_only_folder(tmp_path / "ro") as folder:
        config = job.config("ro-out.yaml", "unused", model=without_weights(job), output={"dir": str(folder / "out")})
        with pytest.raises(ConfigError, match=r"output.dir '.*out' cannot be written: .*; choose another folder, or make it writable"):
            train(config)


def test_a_checkpoint_of_other_settings_is_refused_naming_each_difference(job):
    config = job.config("settings.yaml", "settings", training={"max_steps": 2})
    train(config)
    shutil.rmtree(job.root / "settings" / "adapter")  # as if stopped after its final checkpoint
    (job.root / "settings" / "summary.json").unlink()
    (job.root / "data-more.jsonl").write_text((job.root / "data.jsonl").read_text() + '\n{"text": "one more"}')
    changed = job.config("settings.yaml", "settings", model={**without_weights(job), "max_seq_length": 48},
                         lora={"alpha": 16}, training={"max_steps": 2, "warmup_steps": 1},
                         data={"path": str(job.root / "data-more.jsonl")})
    with pytest.raises(ConfigError) as refused:
        train(changed)
    message = str(refused.value)
    for difference in ("lora.alpha 8 then, 16 now", "model.max_seq_length 64 then, 48 now",
                       "training.warmup_steps 0 then, 1 now", "data.tokens '12 rows, sha256 ",
                       "model.name '"):
        assert difference in message, message
    assert "Restore them to resume, set training.resume: false to start over" in message
    # what provably does not change the result may change
    same = job.config("settings.yaml", "settings", training={"max_steps": 2, "save_steps": 5, "logging_steps": 3,
                                                             "micro_batch_size": 1}, data={"eval_prompts": ["Hi"]})
    _, log = train(same)
    assert any("resumed from" in line and "checkpoint-2 (step 2 of 2)" in line for line in log), log


# --- an earlier run's work is kept --------------------------------------------------------------
def test_a_finished_runs_results_are_kept_aside_when_training_again(job):
    config = job.config("twice.yaml", "twice", training={"max_steps": 2})
    first, _ = train(config)
    out = job.root / "twice"
    adapter = (out / "adapter" / "adapter_model.safetensors").read_bytes()
    _, log = train(config)
    assert any("holds a finished run (summary.json): training again from the start" in line for line in log)
    assert any(line.startswith("the earlier run's results and checkpoints (") and line.endswith(
        f") kept in {out / 'previous-1'}") for line in log), log
    kept = out / "previous-1"
    assert sorted(p.name for p in kept.iterdir()) == sorted(["checkpoint-2", "adapter", "summary.json"] +
                                                             (["loss.png"] if (out / "loss.png").exists() else []))
    assert (kept / "adapter" / "adapter_model.safetensors").read_bytes() == adapter
    assert json.loads((kept / "summary.json").read_text())["losses"] == first["losses"]
    config = job.config("twice.yaml", "twice", training={"max_steps": 2, "resume": True})
    with pytest.raises(ConfigError, match="training.resume is true but .* holds a finished run"):
        train(config)


# --- damaged checkpoints ------------------------------------------------------------------------
def _two_checkpoints(job, name):
    """A run stopped after checkpoint-2 and checkpoint-4 of 6, and its config."""
    config = job.config(f"{name}.yaml", name, training={"max_steps": 4})
    train(config)
    out = job.root / name
    for result in ("adapter", "summary.json", "loss.png"):
        path = out / result
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    return job.config(f"{name}.yaml", name, training={"max_steps": 4}), out


@pytest.mark.parametrize("damage, why", [
    (lambda c: c.joinpath("optimizer.safetensors").write_bytes(c.joinpath("optimizer.safetensors").read_bytes()[:100]),
     r"optimizer.safetensors has 100 bytes, not the \d+ written \(truncated\?\)"),
    (lambda c: c.joinpath("trainable.safetensors").write_bytes(
        c.joinpath("trainable.safetensors").read_bytes()[:-1] + b"\x00"), "does not match its checksum"),
    (lambda c: c.joinpath("state.json").write_text('{"step": 4, "fil'), "state.json is not valid JSON"),
    (lambda c: c.joinpath("trainable.safetensors").unlink(), "trainable.safetensors is missing"),
    (lambda c: c.joinpath("state.json").write_text('{"step": 4}'), "is not a fusetune checkpoint's state"),
])
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(job, damage, why):
    config, out = _two_checkpoints(job, "damaged")
    damage(out / "checkpoint-4")
    _, log = train(config)
    assert any(line.startswith("skipping checkpoint-4: ") and __import__("re").search(why, line) for line in log), log
    assert any("resumed from" in line and "checkpoint-2 (step 2 of 4)" in line for line in log), log
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert sorted(p.name for p in (out / "previous-1").iterdir()) == ["checkpoint-4"]  # kept, out of the way
    shutil.rmtree(out)


def test_what_a_crashed_save_left_is_cleaned_at_the_next_start(job):
    config, out = _two_checkpoints(job, "leftovers")
    (out / ".checkpoint-6.tmp-abc1_x9z").mkdir()
    (out / ".checkpoint-6.tmp-abc1_x9z" / "trainable.safetensors").write_bytes(b"half")
    (out / ".summary.json.tmp-k2j3h4g5").write_text("{")
    (out / "checkpoint-2").rename(out / ".checkpoint-2.deleting-77aa")
    (out / "adapter").mkdir()
    (out / "adapter" / "adapter_config.json").write_text("{}")
    (out / "adapter").rename(out / ".adapter.old-55bb")  # moved aside, its replacement never landed
    mine = {".bashrc.tmp-edit": "x", ".env.old-backup": "KEY=1", ".notes.txt.old-1": "notes"}  # the user's own
    for name, text in mine.items():
        (out / name).write_text(text)
    _, log = train(config)
    for line in ("removed .checkpoint-6.tmp-abc1_x9z", "removed .summary.json.tmp-k2j3h4g5",
                 "removed .checkpoint-2.deleting-77aa",
                 "restored adapter (its replacement was interrupted before it landed)"):
        assert any(line in entry for entry in log), (line, log)
    left = {p.name for p in out.iterdir() if p.name.startswith(".")}
    assert left == {".fusetune-lock", *mine} and all((out / n).read_text() == t for n, t in mine.items())


# --- the disk, the lock, the model source ---------------------------------------------------------
@contextlib.contextmanager
def mounted_tmpfs(folder, size, *options):
    """A small RAM disk at `folder` (needs root, as on the CI machines); skips where it cannot mount."""
    folder.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join([f"size={size}", *options]), "tmpfs", str(folder)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip()}): the full-disk and read-only cases need one")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


@contextlib.contextmanager
def read_only_folder(folder):
    import os

    if os.geteuid() != 0:  # permission bits bind everyone but root
        folder.mkdir()
        folder.chmod(0o555)
        try:
            yield folder
        finally:
            folder.chmod(0o755)
    else:
        with mounted_tmpfs(folder, "1m", "ro") as mounted:
            yield mounted


def test_a_full_disk_is_named_and_loses_nothing(job, tmp_path):
    with mounted_tmpfs(tmp_path / "small", "2m") as disk:
        config = job.config("full.yaml", "unused", output={"dir": str(disk / "out")})
        free = shutil.disk_usage(disk).free
        (disk / "filler").write_bytes(b"\0" * (free - 16 * 1024))  # room for the start-up check, not a checkpoint
        proc = job.run(config)
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert "Traceback" not in proc.stderr and "fusetune train: the disk is full" in proc.stderr, proc.stderr
        assert f"could not write {disk / 'out' / 'checkpoint-2'}; free space there or choose a folder on another " \
               f"disk; nothing at" in proc.stderr, proc.stderr
        assert [p.name for p in (disk / "out").iterdir()] == [".fusetune-lock"]  # no half-written checkpoint
        (disk / "filler").unlink()
        proc = job.run(config)
        assert proc.returncode == 0, proc.stdout + proc.stderr


def test_a_second_run_on_the_same_output_is_refused(job):
    import fcntl

    out = job.root / "locked"
    out.mkdir()
    with open(out / ".fusetune-lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        lock.write("4242")
        lock.flush()
        config = job.config("locked.yaml", "locked")
        proc = job.run(config)
    assert proc.returncode == 2 and "another fusetune train (pid 4242) is writing to" in proc.stderr, proc.stderr


def test_model_sources_are_explained(job, tmp_path):
    import torch

    from fusetune import FastLanguageModel

    custom = tmp_path / "custom"
    shutil.copytree(job.root / "base", custom)
    config = json.loads((custom / "config.json").read_text())
    config.update(model_type="my-llama", auto_map={"AutoConfig": "configuration_my.MyConfig",
                                                   "AutoModelForCausalLM": "modeling_my.MyModel"})
    (custom / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="ships its own modelling code, which runs only with trust_remote_code=True"):
        FastLanguageModel.from_pretrained(str(custom))

    pickled = tmp_path / "pickled"
    shutil.copytree(job.root / "base", pickled, ignore=shutil.ignore_patterns("*.safetensors"))

    class Payload:
        def __reduce__(self):
            return (print, ("this ran",))

    torch.save({"model.embed_tokens.weight": Payload()}, pickled / "pytorch_model.bin")
    with pytest.raises(OSError, match=r"hold pickled code, not only tensors \(print\), which is not run "
                                      r"\(torch.load weights_only\): get the model as safetensors"):
        FastLanguageModel.from_pretrained(str(pickled))
    damaged = tmp_path / "damaged"
    shutil.copytree(job.root / "base", damaged)
    (damaged / "model.safetensors").write_bytes((job.root / "base" / "model.safetensors").read_bytes()[:1000])
    with pytest.raises(OSError, match="the weights of .* cannot be read .*: a file is damaged or incomplete; download it again"):
        FastLanguageModel.from_pretrained(str(damaged))
