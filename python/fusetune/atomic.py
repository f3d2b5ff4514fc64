"""Atomic directory writes, for every save fusetune makes (models, adapters, training checkpoints).

A save writes into a temporary directory beside the target and renames it into place; a previous
save at the target is moved aside first and removed only after the new one is in place, so a
crash leaves either the old complete directory or the new complete one.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

# what marks a directory as an earlier save (a model, an adapter, a `fusetune train` checkpoint, or a
# GGUF file): only such a directory, or an empty one, may be replaced
SAVE_MARKERS = ("config.json", "adapter_config.json", "state.json", "trainable.safetensors")


def _holds_a_save(directory: Path) -> bool:
    return any((directory / name).exists() for name in SAVE_MARKERS) or any(directory.glob("*.gguf"))


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike):
    """Yields a fresh temporary directory; on success it replaces `target` (see module docstring).
    An existing target must be empty or hold an earlier save: other folders are never replaced."""
    target = Path(target)
    if target.is_file() or (target.is_dir() and any(target.iterdir()) and not _holds_a_save(target)):
        raise FileExistsError(f"{target} exists and holds no earlier model save: saving there would replace it; "
                              f"choose a new or empty directory")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
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
