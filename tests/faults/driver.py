"""`fusetune train CONFIG` that stops itself at its Nth event, as a crash, a kill or Ctrl-C would.

An event is a training step (loop.accumulate) or a file-system call made on fusetune's behalf
(safetensors' save_file, rename, replace, fsync, rmtree, mkdir, unlink, write_text): each
boundary where an interruption could leave a half-written state.

    python -m tests.faults.driver CONFIG --at N|step:N --how kill|int|int-twice [--events FILE]

step:N stops at the Nth training step's start. kill: SIGKILL (a crash, an OOM kill, a power cut short of the disk); int: one Ctrl-C; int-twice:
two. --events FILE writes the names of the events seen (with --at 0: a full run, no stop).
"""
import argparse
import os
import pathlib
import shutil
import signal
import sys


def _from_fusetune(depth: int = 4) -> bool:
    frame = sys._getframe(2)
    for _ in range(depth):
        if frame is None:
            return False
        if frame.f_globals.get("__name__", "").startswith("fusetune"):
            return True
        frame = frame.f_back
    return False


def arm(at: str, how: str, seen: list[str]) -> None:
    import safetensors.torch

    from fusetune.recipe import loop

    def stop():
        if how == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGINT)
        if how == "int-twice":
            os.kill(os.getpid(), signal.SIGINT)

    kind, _, number = at.rpartition(":")
    kind, number = kind or "event", int(number)

    def wrap(owner, name, always=False):
        real = getattr(owner, name)

        def event(*args, **kwargs):
            if always or _from_fusetune():
                seen.append(name)
                if number == (len(seen) if kind == "event" else seen.count("accumulate") if name == "accumulate"
                              else -1):
                    stop()
            return real(*args, **kwargs)

        setattr(owner, name, event)

    wrap(loop, "accumulate", always=True)
    wrap(safetensors.torch, "save_file")
    for name in ("rename", "replace", "fsync", "mkdir", "unlink"):
        wrap(os, name)
    wrap(shutil, "rmtree")
    wrap(pathlib.Path, "write_text")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("config")
    parser.add_argument("--at", default="0")
    parser.add_argument("--how", choices=["kill", "int", "int-twice"], default="kill")
    parser.add_argument("--events")
    args = parser.parse_args()
    from fusetune.cli import main as fusetune

    if args.how != "kill":
        # the run stands for one started from a terminal; a test session started in the background
        # (CI's shards) passes SIGINT down ignored, which fusetune rightly leaves so
        signal.signal(signal.SIGINT, signal.default_int_handler)
    seen: list[str] = []
    arm(args.at, args.how, seen)
    try:
        return fusetune(["train", args.config])
    finally:
        if args.events:
            pathlib.Path(args.events).write_text("\n".join(seen))


if __name__ == "__main__":
    sys.exit(main())
