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


def _not_saved_by_us(directory: Path) -> list[str]:
    """What replacing `directory` would delete that no save wrote."""
    written = _written_by_a_save(directory)
    return sorted(entry.name + ("/" if entry.is_dir() else "") for entry in directory.iterdir()
                  if entry.name != MANIFEST and not written(entry))


class SaveError(OSError):
    """A save that could not be written; the message names the target and what to do."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.errno = code


FULL_DISK = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def _save_error(target: Path, err: BaseException) -> SaveError | None:
    """`err` (raised while writing `target`) as a SaveError, or None for errors that are not about
    the disk (a bug or a refusal keeps its own message). safetensors reports I/O errors as
    SafetensorError with the OS error in its text."""
    text = str(err)
    code = getattr(err, "errno", None)
    if code in FULL_DISK or "No space left" in text or "os error 28" in text:
        try:
            free = f" ({shutil.disk_usage(target.parent).free / 2**20:.0f} MiB free)"
        except OSError:
            free = ""
        return SaveError(errno.ENOSPC, f"the disk is full{free}: could not write {target}; free space there or "
                                       f"choose a folder on another disk; nothing at {target} was replaced")
    if isinstance(err, OSError) or type(err).__name__ == "SafetensorError":
        reason = err.strerror if isinstance(err, OSError) and err.strerror else text
        return SaveError(code or errno.EIO, f"could not write {target}: {reason}; check that the folder is writable "
                                            f"or choose another; nothing at {target} was replaced")
    return None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _flush_to_disk(directory: Path) -> None:
    """fsync every file under `directory` and the directory itself: after a power loss the renamed
    save holds its data, not empty files."""
    for path in [*directory.rglob("*"), directory]:
        if path.is_file() or path.is_dir():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike):
    """Yields a fresh temporary directory; on success it replaces `target` (see module docstring).
    An existing target must be empty or hold an earlier save and nothing else: a save never deletes
    what it did not write."""
    target = Path(target)
    if target.is_file() or (target.is_dir() and any(target.iterdir()) and not _holds_a_save(target)):
        raise FileExistsError(f"{target} exists and holds no earlier model save: saving there would replace it; "
                              f"choose a new or empty directory")
    others = _not_saved_by_us(target) if target.is_dir() else []
    if others:
        raise FileExistsError(f"{target} holds an earlier save and also {', '.join(others[:5])}"
                              f"{' ...' if len(others) > 5 else ''}, which a save did not write; saving there would "
                              f"delete them: choose a new or empty directory")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}{TMP}", dir=target.parent))
    except OSError as err:
        raise _save_error(target, err) from err
    try:
        yield tmp
        (tmp / MANIFEST).write_text(json.dumps(sorted(p.name for p in tmp.iterdir())))
        _flush_to_disk(tmp)
        tmp.chmod(0o777 & ~_umask())  # mkdtemp's is private to its owner; a save is not
    except BaseException as err:
        failure = _save_error(target, err) if isinstance(err, Exception) else None
        shutil.rmtree(tmp, ignore_errors=True)
        if failure is not None:
            raise failure from err
        raise
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}{OLD}{os.getpid()}")
        target.rename(old)
    tmp.rename(target)
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
        os.chmod(name, 0o666 & ~_umask())  # mkstemp's is private to its owner; a save is not
        os.replace(name, target)
    except BaseException as err:
        with contextlib.suppress(OSError):
            os.remove(name)
        failure = _save_error(target, err) if isinstance(err, Exception) else None
        if failure is not None:
            raise failure from err
        raise
    return target


def remove_directory(path: Path) -> None:
    """Delete a directory so that no half-deleted copy is left under its name: it is renamed out of
    the way first (one atomic step), then removed."""
    doomed = path.with_name(f".{path.name}{DELETING}{os.getpid()}")
    path.rename(doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def recover_interrupted_saves(directory: Path) -> list[str]:
    """Undo what a crash in the middle of a save or a deletion left in `directory`: unfinished
    temporaries and half-deleted directories are removed; an earlier save that was moved aside and
    whose replacement never landed is put back. Returns what was done, a line each."""
    done = []
    for entry in sorted(directory.glob(".*")):
        name = entry.name[1:]
        if TMP in name or DELETING in name:
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            done.append(f"removed {entry.name} (left by a save or deletion that was interrupted)")
        elif OLD in name:
            original = directory / name.rsplit(OLD, 1)[0]
            if original.exists():
                shutil.rmtree(entry, ignore_errors=True)
                done.append(f"removed {entry.name} (the save that replaced it is complete)")
            else:
                entry.rename(original)
                done.append(f"restored {original.name} (its replacement was interrupted before it landed)")
    return done
