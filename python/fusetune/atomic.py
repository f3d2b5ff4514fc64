"""Atomic directory writes, for every save fusetune makes (models, adapters, training checkpoints).

A save writes into a temporary directory beside the target and renames it into place; a previous
save at the target is moved aside first and removed only after the new one is in place, so a
crash leaves either the old complete directory or the new complete one.
"""
from __future__ import annotations

import contextlib
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
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        (tmp / MANIFEST).write_text(json.dumps(sorted(p.name for p in tmp.iterdir())))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        target.rename(old)
    tmp.rename(target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
