"""Checkpoints of `fusetune train` and what a run's output folder holds between runs.

A checkpoint (output_dir/checkpoint-STEP, written atomically) holds the trainable tensors, the
optimizer's tensors and the RNG states in safetensors files (nothing is pickled), and state.json:
the position in the data, the losses, the optimizer's and scheduler's other settings, the run's
fingerprint and a SHA-256 of each file. state.json is written last, so a checkpoint whose files
do not match it (truncated, corrupted, half-deleted) is skipped at resume in favour of the newest
intact one, with a line saying why.

The fingerprint lists every setting that changes the result (model, data, LoRA, training, and a
digest of the tokenized data); resuming under other settings is refused with each differing key
and both values. Left out, because they provably do not change the trained weights: where and how
often to log and save, how many checkpoints to keep, the prompts answered before and after, the
outputs exported, the micro-batch size (gradient accumulation gives the same update), and the data
file's path (the digest of its tokens stands for its content).
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch

from fusetune.atomic import atomic_directory, no_room, not_saved_by_us, recover_interrupted_saves, remove_directory
from fusetune.recipe.config import ConfigError, TrainConfig
from fusetune.training import distributed

PREFIX = "checkpoint-"
STATE = "state.json"
FORMAT = 2  # the layout above; the checkpoints of earlier versions (a pickled optimizer.pt) have none
NOT_IN_FINGERPRINT = {"model.trust_remote_code", "data.path", "data.eval_prompts", "data.max_new_tokens",
                      "training.micro_batch_size", "training.logging_steps", "training.save_steps",
                      "training.save_total_limit", "training.resume", "training.report_to", "training.eval_steps", "data.eval_path",
                      "data.choices_path", "data.generation_path",
                      # how the processes share the work, not what is computed: a checkpoint resumes across them
                      "training.fsdp", "training.context_parallel"}
# stage keys that only some kinds read, by kind (the others ignore them: a change there resumes)
STAGE_KEYS = {"dpo": {"beta"}, "orpo": {"beta"}, "grpo": {"reward", "generations", "temperature", "max_completion_length"}}
STAGE_ONLY = set().union(*STAGE_KEYS.values())
# what a finished or interrupted run wrote into its output folder (a recipe's stages.json, TensorBoard's
# runs/); a new run sets them aside
RESULTS = ("adapter", "model", "merged", "gguf", "loss.png", "summary.json", "eval.json", "stages.json", "runs")


LOCK = ".fusetune-lock"
# what a run writes at the top of its output folder (what atomic.recover_interrupted_saves may tidy)
OUTPUT_NAMES = r"checkpoint-\d+|adapter|model|merged|gguf|summary\.json|loss\.png|eval\.json"


@contextlib.contextmanager
def claimed_output_dir(path: Path, log):
    """The output folder, checked before any model loads: a folder (not a file) where a file can be
    written, used by no other `fusetune train` (a lock held while this one runs); what a crashed
    save left there is cleaned up (atomic.recover_interrupted_saves)."""
    if path.exists() and not path.is_dir():
        raise ConfigError(f"output.dir {str(path)!r} is a file: choose a folder (it is created if missing)")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path) as probe:  # a real write: root ignores permission bits
            probe.write(b"\0" * 4096)
            probe.flush()
            os.fsync(probe.fileno())
    except OSError as err:
        room = no_room(err)
        why = f"{room[0]}; {room[1]}" if room else f"{err.strerror or err}; choose another folder, or make it writable"
        raise ConfigError(f"output.dir {str(path)!r} cannot be written: {why}") from err
    with open(path / LOCK, "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                log(f"note: {path} cannot be locked here ({err.strerror}, e.g. a network file system): nothing stops "
                    f"a second run from writing there at the same time")
            else:
                lock.seek(0)
                raise ConfigError(f"another fusetune train (pid {lock.read().strip() or '?'}) is writing to "
                                  f"{path}: wait for it to finish, or choose another output.dir") from err
        lock.seek(0)
        lock.truncate()
        lock.write(str(os.getpid()))
        lock.flush()
        for line in recover_interrupted_saves(path, OUTPUT_NAMES):
            log(f"{path}: {line}")
        yield path


def fingerprint(config: TrainConfig, examples: list[dict], dtype: str, device: str) -> dict:
    """The settings a checkpoint must share with this run to continue it exactly, as
    {"section.key": value}, plus "data.tokens" (the count and a digest of the tokenized rows) and
    the dtype and device type the config resolved to (auto means another on another machine)."""
    flat = {f"{section}.{key}": value for section, values in dataclasses.asdict(config).items()
            if section != "output" for key, value in values.items()}
    flat["data.tokens"] = rows_digest(examples)
    flat["run.dtype"], flat["run.device"] = dtype, device
    return {k: v for k, v in flat.items() if k not in NOT_IN_FINGERPRINT}


WEIGHT_FILES = ("*.safetensors", "pytorch_model*.bin", "*.gguf")
SAMPLE = 4096  # bytes digested from the middle of each tensor (or at each of WINDOWS places in another file)
WINDOWS = 256


def _sampled(f, size: int) -> bytes:
    """What a weight file's digest reads: of a safetensors file its header (names, dtypes, shapes,
    offsets) and SAMPLE bytes from the middle of every tensor, so that a change to any tensor's
    values shows (fine-tuning or merging an adapter changes all of a tensor); of other files
    SAMPLE bytes at WINDOWS evenly spaced places."""
    head = f.read(8)
    try:  # safetensors: a little-endian header length, the JSON header, then the tensors' bytes
        header_size = int.from_bytes(head, "little")
        header = json.loads(f.read(header_size)) if 8 + header_size <= size else None
    except ValueError:
        header = None
    if isinstance(header, dict):
        parts = [json.dumps(header, sort_keys=True).encode()]
        for name in sorted(k for k in header if k != "__metadata__"):
            begin, end = header[name].get("data_offsets", (0, 0))
            f.seek(8 + header_size + max(begin, (begin + end - SAMPLE) // 2))
            parts.append(f.read(min(SAMPLE, end - begin)))
        return b"".join(parts)
    parts = [head]
    for k in range(WINDOWS):
        f.seek(size * k // WINDOWS)
        parts.append(f.read(SAMPLE))
    return b"".join(parts)


def weights_digest(source: str) -> str | None:
    """A digest of the base model's weight files in the local folder (or file) `source` names (each
    file's name, size and _sampled bytes), so that other weights put under the same name are not
    resumed onto, without reading gigabytes. None where `source` is no local path (a Hub name:
    its files are not here to read)."""
    path = Path(source)
    files = sorted(f for pattern in WEIGHT_FILES for f in path.glob(pattern)) if path.is_dir() else \
        [path] if path.is_file() else []
    if not files:
        return None
    digest = hashlib.sha256()
    for file in files:
        size = file.stat().st_size
        digest.update(f"{file.name} {size}".encode())
        with open(file, "rb") as f:
            digest.update(_sampled(f, size))
    return f"{len(files)} file{'s' if len(files) > 1 else ''}, sha256 {digest.hexdigest()[:16]}"


def read_summary(output_dir: Path) -> dict | None:
    """The summary.json a finished run wrote in output_dir (None: none that reads as one)."""
    try:
        summary = json.loads((output_dir / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) else None


def rows_digest(examples) -> str:
    """The count and a digest of tokenized rows (sft/cpt rows as earlier fusetune digested them; pairs
    and prompts whole)."""
    digest = hashlib.sha256()
    for e in examples:
        digest.update(json.dumps([e["input_ids"], e["labels"]] if "input_ids" in e else e, sort_keys=True).encode())
    return f"{len(examples)} rows, sha256 {digest.hexdigest()[:16]}"


def _default(key: str):
    """The default of a config key ("section.key"), or a marker no value equals."""
    section, _, name = key.partition(".")
    for f in dataclasses.fields(TrainConfig):
        if f.name == section:
            for g in dataclasses.fields(f.default_factory):
                if g.name == name:
                    return g.default_factory() if g.default is dataclasses.MISSING else g.default
    return object()


def _unread(now: dict) -> set[str]:
    """Keys of fingerprint `now` that its run does not read: epochs where max_steps is set, and the
    stage keys of other kinds (STAGE_KEYS). A change there changes nothing computed."""
    unread = {"training.epochs"} if now.get("training.max_steps") is not None else set()
    kind = now.get("stage.kind", "sft")
    return unread | {f"stage.{key}" for key in STAGE_ONLY - STAGE_KEYS.get(kind, set())}


def differences(saved: dict, now: dict) -> list[str]:
    """The keys whose values differ, except those this run does not read (_unread); a key an older
    fusetune did not record matches its default (model.weights: any)."""
    missing = object()
    out = []
    for key in sorted((set(saved) | set(now)) - _unread(now)):
        then, current = saved.get(key, missing), now.get(key, missing)
        if then is missing and (current == _default(key) or key == "model.weights"):
            continue
        if key == "model.weights" and then != current:
            out.append(f"the weights under model.name changed ({then} then, "
                       f"{'none found' if current is missing else current} now): put the earlier ones back")
        elif then != current:
            out.append(f"{key} {'(unset)' if then is missing else repr(then)} then, "
                       f"{'(unset)' if current is missing else repr(current)} now")
    return out


def _step(path: Path) -> int:
    return int(path.name[len(PREFIX):])


def checkpoints(output_dir: Path) -> list[Path]:
    """Checkpoint directories in output_dir, oldest first (not yet checked: see `problem`)."""
    found = [p for p in output_dir.glob(PREFIX + "*") if p.is_dir() and p.name[len(PREFIX):].isdigit()]
    return sorted(found, key=_step)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def read_state(path: Path) -> dict:
    """A checkpoint's state.json; ConfigError naming the file if it is not one fusetune wrote."""
    try:
        state = json.loads((path / STATE).read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise ConfigError(f"{path / STATE} is missing") from err
    except (OSError, ValueError) as err:
        raise ConfigError(f"{path / STATE} is not valid JSON ({err})") from err
    if not isinstance(state, dict) or not isinstance(state.get("files"), dict) or "step" not in state:
        raise ConfigError(f"{path / STATE} is not a fusetune checkpoint's state (written by an older fusetune or "
                          f"changed by hand)")
    return state


def problem(path: Path) -> str | None:
    """Why the checkpoint at `path` cannot be resumed from (None: complete and intact)."""
    try:
        state = read_state(path)
    except ConfigError as err:
        return str(err)
    if state.get("format") != FORMAT:
        return f"{path} was written by another version of fusetune (format {state.get('format')})"
    try:
        for name, expected in state["files"].items():
            file = path / name
            if not file.is_file():
                return f"{file} is missing"
            if file.stat().st_size != expected["bytes"]:
                return f"{file} has {file.stat().st_size} bytes, not the {expected['bytes']} written (truncated?)"
            if _sha256(file) != expected["sha256"]:
                return f"{file} does not match its checksum (corrupted)"
        int(state["step"]), dict(state["fingerprint"]), state["extra"]["dict"]
    except (KeyError, TypeError, ValueError) as err:
        return f"{path / STATE} is not a fusetune checkpoint's state ({type(err).__name__}: {err}; changed by hand?)"
    return None


def _flatten(state: dict, tensors: dict[str, torch.Tensor] | None, prefix: str):
    """A state dict's tensors into `tensors` (keyed by path; whole, when FSDP shards them: every
    process gathers, the one that writes keeps them, the others pass None), its other values
    returned as JSON."""
    if isinstance(state, torch.Tensor):
        whole = distributed.full_tensor(state.detach())
        if tensors is not None:
            tensors[prefix] = whole.cpu().contiguous()
        return {"tensor": prefix}
    if isinstance(state, dict):
        return {"dict": [[k, _flatten(v, tensors, f"{prefix}.{k}")] for k, v in state.items()]}
    if isinstance(state, (list, tuple)):
        return {type(state).__name__: [_flatten(v, tensors, f"{prefix}.{i}") for i, v in enumerate(state)]}
    return {"value": state}


def _unflatten(spec, tensors: dict[str, torch.Tensor]):
    (kind, value), = spec.items()
    if kind == "tensor":
        return tensors[value]
    if kind == "dict":
        return {k: _unflatten(v, tensors) for k, v in value}
    if kind in ("list", "tuple"):
        items = [_unflatten(v, tensors) for v in value]
        return items if kind == "list" else tuple(items)
    return value


def trainable_parameters(model) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(output_dir: Path, model, optimizer, scheduler, state: dict, keep: int,
                    write: bool = True) -> Path | None:
    """checkpoint-STEP with state.json last; then only the newest `keep` checkpoints remain. Under
    FSDP every process calls it (each sharded tensor is gathered whole in turn, on the GPU) and the
    one that writes (`write`) keeps them in host memory: the same files as one process's, so a
    checkpoint resumes on any number of processes."""
    from safetensors.torch import save_file

    target = output_dir / f"{PREFIX}{state['step']}"
    tensors = {} if write else None
    extra = _flatten({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                      "rng_cpu": torch.get_rng_state(),
                      "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
                     tensors, "extra")
    trainable = {}
    for name, p in trainable_parameters(model).items():
        whole = distributed.full_tensor(p.detach())
        if write:
            trainable[name] = whole.cpu().contiguous()
    if not write:
        return None
    with atomic_directory(target) as tmp:
        save_file(trainable, tmp / "trainable.safetensors")
        save_file(tensors, tmp / "optimizer.safetensors")
        files = {name: {"bytes": (tmp / name).stat().st_size, "sha256": _sha256(tmp / name)}
                 for name in ("trainable.safetensors", "optimizer.safetensors")}
        (tmp / STATE).write_text(json.dumps({**state, "format": FORMAT, "extra": extra, "files": files}))
    for old in checkpoints(output_dir)[:-keep]:
        remove_directory(old)
    return target


def load_checkpoint(path: Path, model, optimizer, scheduler) -> dict:
    """Restore the trainable tensors, optimizer, scheduler and RNG states; returns the run state."""
    from safetensors.torch import load_file

    state = read_state(path)
    saved = load_file(path / "trainable.safetensors")
    params = trainable_parameters(model)
    if set(saved) != set(params) or any(saved[k].shape != params[k].shape for k in saved):
        raise ConfigError(f"{path} was written for another model or LoRA configuration: choose another output.dir, "
                          f"or set training.resume: false to start over there")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(distributed.shard_like(saved[name], p))
    extra = _unflatten(state.pop("extra"), load_file(path / "optimizer.safetensors"))
    optimizer.load_state_dict(_shard_states(extra["optimizer"], optimizer))
    scheduler.load_state_dict(extra["scheduler"])
    torch.set_rng_state(extra["rng_cpu"])
    if extra["rng_cuda"] and torch.cuda.is_available():  # (a run resumed on fewer GPUs: theirs)
        for index, rng in enumerate(extra["rng_cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(rng, index)
    return state


def _shard_states(saved: dict, optimizer) -> dict:
    """An optimizer state dict of whole tensors with each parameter's states (those of its shape)
    laid out as the parameter is (FSDP's shards); unchanged without FSDP."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for index, per_param in saved["state"].items():
        param = params[int(index)]
        for key, value in per_param.items():
            if isinstance(value, torch.Tensor) and value.shape == param.shape:
                per_param[key] = distributed.shard_like(value, param)
    return saved


def _set_aside(output_dir: Path, entries: list[Path], why: str, log) -> None:
    """Entries go to output_dir/previous-N/ (kept, out of this run's way)."""
    n = 1
    while (output_dir / f"previous-{n}").exists():
        n += 1
    aside = output_dir / f"previous-{n}"
    aside.mkdir()
    for path in entries:
        path.rename(aside / path.name)
    log(f"{why} ({', '.join(p.name for p in entries)}) kept in {aside}")


def _written_by_a_run(path: Path) -> bool:
    """A result an earlier run wrote: its files (by name), a folder of what saves write (atomic's rule
    for replacing one), TensorBoard's runs/ of event files only."""
    if not path.is_dir():
        return True
    if path.name == "runs":
        return all(f.name.startswith("events.out.tfevents") for f in path.rglob("*") if f.is_file())
    return not not_saved_by_us(path)


def _holds(folder: Path, path: str) -> bool:
    resolved, inside = folder.resolve(), Path(path).expanduser().resolve()
    return inside == resolved or resolved in inside.parents


def resume_point(output_dir: Path, resume: bool | str, now: dict, log, reads: tuple[str, ...] = ()) -> Path | None:
    """The checkpoint this run continues from (None: start over). What an earlier run left that
    this one would overwrite, and checkpoints that cannot be resumed from, are set aside first;
    a checkpoint of other settings is refused, and so is a result-named entry of output_dir that
    holds what no save writes or what this run reads (`reads`: the model, the data files), which
    setting aside would take from under the user."""
    results = [output_dir / name for name in RESULTS if (output_dir / name).exists()]
    foreign = [p for p in results if not _written_by_a_run(p) or any(_holds(p, r) for r in reads)]
    if foreign:
        names = ", ".join(p.name + ("/" if p.is_dir() else "") for p in foreign)
        raise ConfigError(f"output.dir {str(output_dir)!r} holds {names}, where a run writes its results, but it "
                          f"holds files no save writes, or this run reads from it: choose another output.dir (e.g. "
                          f"a new folder), or move it")
    found = checkpoints(output_dir)
    finished = (output_dir / "summary.json").is_file()
    intact, skipped = None, []
    for path in reversed(found):
        why = problem(path)
        if why is None:
            intact = path
            break
        log(f"skipping {path.name}: {why}")
        skipped.append(path)
    if resume is True and (finished or intact is None):
        raise ConfigError(f"training.resume is true but {output_dir} holds "
                          f"{'a finished run' if finished else 'no intact checkpoint'}: set training.resume: auto "
                          f"(or false) to train from the start")
    if intact is not None and not finished and resume is not False:
        saved = read_state(intact)["fingerprint"]
        if differences(saved, now):
            raise ConfigError(f"{intact} belongs to a run with other settings: {'; '.join(differences(saved, now))}. "
                              f"Restore them to resume, set training.resume: false to start over (its checkpoints "
                              f"are kept aside), or choose another output.dir")
        if skipped:
            _set_aside(output_dir, skipped, "the checkpoints that cannot be resumed from", log)
        return intact
    if finished:
        log(f"{output_dir} holds a finished run (summary.json): training again from the start")
    elif resume is False and (found or results):
        log("training.resume is false: starting over")
    if found or results:
        _set_aside(output_dir, found + results, "the earlier run's results and checkpoints", log)
    return None
