"""Atomic writes, for every save fusetune makes (models, adapters, training checkpoints, results).

A save writes into a temporary directory beside the target, flushes it to the disk and renames it
into place; a previous save at the target is moved aside first and removed only after the new one
is in place, so a crash leaves either the old complete directory or the new complete one (and
`recover_interrupted_saves` puts back an old one whose replacement never landed). Single files
(`atomic_write`) go the same way. A write that fails (a full disk, a read-only folder) raises
SaveError naming the target and the fix; nothing at the target was replaced.
"""
from __future__ import annotations

import contextlib
import errno
import fnmatch
import json
import os
import re
import secrets
import shutil
import tempfile
from pathlib import Path

# what marks a directory as an earlier save (a model, an adapter, a `fusetune train` checkpoint, or a
# GGUF file): only such a directory, or an empty one, may be replaced
SAVE_MARKERS = ("config.json", "adapter_config.json", "state.json", "trainable.safetensors")
# every save lists what it wrote here; replacing it deletes exactly those, and anything else in the
# folder (the user's notes, evaluations) refuses the save
MANIFEST = ".fusetune-save.json"
# names of what a save leaves beside its target while it runs: ".NAME" + one of these + a suffix
TMP, OLD, DELETING = ".tmp-", ".old-", ".deleting-"
# a folder saved without a manifest (by transformers, PEFT, or an older fusetune) may be replaced when
# it holds only what such saves consist of
SAVE_FILES = ("config.json", "generation_config.json", "*.safetensors", "*.safetensors.index.json",
              "tokenizer*", "special_tokens_map.json", "added_tokens.json", "chat_template.*", "vocab.*",
              "merges.txt", "*.model", "*.tiktoken", "preprocessor_config.json", "adapter_config.json", "README.md",
              "*.gguf", "state.json", "optimizer.pt")


def _holds_a_save(directory: Path) -> bool:
    return (directory / MANIFEST).is_file() or any((directory / name).exists() for name in SAVE_MARKERS) \
        or any(directory.glob("*.gguf"))


def _written_by_a_save(directory: Path):
    """A test of directory's entries: listed in its manifest or, with none, one of the usual save files."""
    try:
        listed = set(json.loads((directory / MANIFEST).read_text()))
    except (OSError, ValueError):
        return lambda entry: entry.is_file() and any(fnmatch.fnmatch(entry.name, f) for f in SAVE_FILES)
    return lambda entry: entry.name in listed


def not_saved_by_us(directory: Path) -> list[str]:
    """What replacing `directory` would delete that no save wrote."""
    written = _written_by_a_save(directory)
    return sorted(entry.name + ("/" if entry.is_dir() else "") for entry in directory.iterdir()
                  if entry.name != MANIFEST and not written(entry))


class SaveError(OSError):
    """A save that could not be written; the message names the target and what to do."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.errno = code


# what each errno of a write that did not fit means, and what to do about it
NO_ROOM = {errno.ENOSPC: ("the disk is full", "free space there or choose a folder on another disk"),
           errno.EDQUOT: ("your disk quota is used up", "free space within it or choose a folder outside it"),
           errno.EFBIG: ("a file grew past what this file system or `ulimit -f` allows",
                         "choose a folder on another file system (FAT32 holds at most 4 GiB a file)")}


def no_room(err: BaseException) -> tuple[str, str] | None:
    """(what happened, the fix) when `err` says a write did not fit; None otherwise. safetensors
    reports I/O errors as SafetensorError with the OS error in its text."""
    code = getattr(err, "errno", None)
    if code in NO_ROOM:
        return NO_ROOM[code]
    if "No space left" in str(err) or "os error 28" in str(err):
        return NO_ROOM[errno.ENOSPC]
    return None


def save_error(target: Path, err: BaseException) -> SaveError | None:
    """`err` (raised while writing `target`) as a SaveError, or None for errors that are not about
    the disk (a bug or a refusal keeps its own message)."""
    room = no_room(err)
    if room is not None:
        try:
            free = f" ({shutil.disk_usage(target.parent).free / 2**20:.0f} MiB free there)"
        except OSError:
            free = ""
        return SaveError(getattr(err, "errno", None) or errno.ENOSPC,
                         f"{room[0]}{free}: could not write {target}; {room[1]}; nothing at {target} was replaced")
    if isinstance(err, OSError) or type(err).__name__ == "SafetensorError":
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
        return SaveError(getattr(err, "errno", None) or errno.EIO,
                         f"could not write {target}: {reason}; check that the folder is writable or choose another; "
                         f"nothing at {target} was replaced")
    return None


UMASK = os.umask(0o022)  # read once (setting it is the only way to read it), then put back
os.umask(UMASK)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _flush_to_disk(directory: Path) -> None:
    """fsync every file under `directory` and the directory itself: after a power loss the renamed
    save holds its data, not empty files."""
    for path in [*directory.rglob("*"), directory]:
        if path.is_file() or path.is_dir():
            _fsync(path)


def _suffix() -> str:
    return secrets.token_hex(4)  # not the pid: a container restarts with the same pids


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike):
    """Yields a fresh temporary directory; on success it replaces `target` (see module docstring).
    An existing target must be empty or hold an earlier save and nothing else: a save never deletes
    what it did not write."""
    target = Path(target)
    if target.is_file() or (target.is_dir() and any(target.iterdir()) and not _holds_a_save(target)):
        raise FileExistsError(f"{target} exists and holds no earlier model save: saving there would replace it; "
                              f"choose a new or empty directory")
    others = not_saved_by_us(target) if target.is_dir() else []
    if others:
        raise FileExistsError(f"{target} holds an earlier save and also {', '.join(others[:5])}"
                              f"{' ...' if len(others) > 5 else ''}, which a save did not write; saving there would "
                              f"delete them: choose a new or empty directory")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        recover_interrupted_saves(target.parent, re.escape(target.name))  # what an earlier crash left of it
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}{TMP}", dir=target.parent))
    except OSError as err:
        raise save_error(target, err) from err
    try:
        yield tmp
        (tmp / MANIFEST).write_text(json.dumps(sorted(p.name for p in tmp.iterdir())))
        _flush_to_disk(tmp)
        tmp.chmod(0o777 & ~UMASK)  # mkdtemp's is private to its owner; a save is not
    except BaseException as err:
        failure = save_error(target, err) if isinstance(err, Exception) else None
        shutil.rmtree(tmp, ignore_errors=True)
        if failure is not None:
            raise failure from err
        raise
    old = target.with_name(f".{target.name}{OLD}{_suffix()}") if target.exists() else None
    try:
        if old is not None:
            target.rename(old)
        tmp.rename(target)
        _fsync(target.parent)  # the renames themselves reach the disk before anything is deleted
    except OSError as err:
        if old is not None and old.exists() and not target.exists():
            old.rename(target)  # the earlier save back in its place
        shutil.rmtree(tmp, ignore_errors=True)
        raise save_error(target, err) from err
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def atomic_write(target: str | os.PathLike, data: bytes | str) -> Path:
    """Write one file whole: a temporary file beside it, flushed, renamed over it."""
    target = Path(target)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}{TMP}", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(name, 0o666 & ~UMASK)  # mkstemp's is private to its owner; a save is not
        os.replace(name, target)
        _fsync(target.parent)
    except BaseException as err:
        with contextlib.suppress(OSError):
            os.remove(name)
        failure = save_error(target, err) if isinstance(err, Exception) else None
        if failure is not None:
            raise failure from err
        raise
    return target


def add_to_save(directory: Path, name: str) -> None:
    """List `name`, a file written into `directory` beside a save (a GGUF export), in the save's
    manifest: a later save there keeps it rather than refusing the folder as holding others' files."""
    try:
        listed = set(json.loads((directory / MANIFEST).read_text()))
    except (OSError, ValueError):
        return  # no save of ours there: nothing to list it in
    if name not in listed:
        atomic_write(directory / MANIFEST, json.dumps(sorted(listed | {name})))


def remove_directory(path: Path) -> None:
    """Delete a directory so that no half-deleted copy is left under its name: it is renamed out of
    the way first (one atomic step), then removed."""
    doomed = path.with_name(f".{path.name}{DELETING}{_suffix()}")
    path.rename(doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def recover_interrupted_saves(directory: Path, names: str) -> list[str]:
    """Undo what a crash in the middle of a save or a deletion left in `directory` for the targets
    whose names match the regular expression `names` (nothing else there is touched): unfinished
    temporaries and half-deleted directories are removed; an earlier save that was moved aside and
    whose replacement never landed is put back. Returns what was done, a line each."""
    left = re.compile(rf"\.({names})({re.escape(TMP)}\w{{8}}|{re.escape(OLD)}\w+|{re.escape(DELETING)}\w+)")
    done = []
    for entry in sorted(directory.iterdir()):
        match = left.fullmatch(entry.name)
        if match is None or entry.is_symlink():
            continue
        original, kind = directory / match.group(1), match.group(2)
        if kind.startswith(OLD) and entry.is_dir() and _holds_a_save(entry) and not original.exists():
            entry.rename(original)
            done.append(f"restored {original.name} (its replacement was interrupted before it landed)")
            continue
        if entry.is_dir():
            shutil.rmtree(entry)
        else:
            entry.unlink()
        done.append(f"removed {entry.name} (left by a save or a deletion that was interrupted)")
    return done
