"""training.report_to: the run's numbers (loss, learning rate, tokens/s, memory, the objective's
metrics, eval loss) to TensorBoard (output.dir/runs, read with `tensorboard --logdir`) and/or
Weights & Biases, beside the progress line. Both are optional packages, checked before the model
loads; a resumed run appends to the same TensorBoard folder and W&B run."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

from fusetune.recipe.config import ConfigError


def _tensorboard():
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:
        raise ConfigError("training.report_to has tensorboard, which is not installed: pip install tensorboard (or "
                          "drop it from report_to)") from err
    return SummaryWriter


def _wandb():
    try:
        import wandb
    except ImportError as err:
        raise ConfigError("training.report_to has wandb, which is not installed: pip install wandb (and wandb login), "
                          "or drop it from report_to") from err
    return wandb


def check_reporters(names: list[str]) -> None:
    """ConfigError now, not after the model loaded, for a reporter whose package is missing."""
    for name in names:
        {"tensorboard": _tensorboard, "wandb": _wandb}[name]()


class Reporters:
    def __init__(self, names: list[str], output_dir: Path, settings: dict):
        self._sinks = []
        if "tensorboard" in names:
            writer = _tensorboard()(log_dir=str(output_dir / "runs"))
            self._sinks.append((lambda step, values: [writer.add_scalar(k, v, step) for k, v in values.items()],
                                writer.close))
        if "wandb" in names:
            # one W&B run per output folder and settings: a resumed run continues it
            run_id = hashlib.sha256(f"{output_dir.resolve()}{sorted(settings.items())}".encode()).hexdigest()[:16]
            run = _wandb().init(project=os.environ.get("WANDB_PROJECT", "fusetune"), name=output_dir.name, id=run_id,
                                resume="allow", config=settings, dir=str(output_dir))
            self._sinks.append((lambda step, values: run.log(values, step=step), run.finish))

    def log(self, step: int, values: dict[str, float]) -> None:
        for write, _ in self._sinks:
            write(step, values)

    def close(self) -> None:
        for _, close in self._sinks:
            close()
