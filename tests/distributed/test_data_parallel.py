"""Data parallelism through PyTorch's own engines on the CPU (gloo, 2 processes): a patched LoRA
model on packed rows trains under DDP and FSDP2 (fully_shard per decoder layer and the root) to the
loss curve and weights of one process on the whole batch; FSDP2's full state dict, gathered on rank 0,
holds the one-process weights (it reloads on one process)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).with_name("worker.py")


def _run(mode: str, tmp_path: Path, nproc: int) -> dict:
    out = tmp_path / f"{mode}.pt"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
                "--standalone"] if nproc > 1 else [sys.executable]
    proc = subprocess.run([*launcher, str(WORKER), mode, str(out)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    return torch.load(out, weights_only=True)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    return _run("one", tmp_path_factory.mktemp("one"), 1)


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_ranks_train_as_one_process(mode, one_process, tmp_path):
    result = _run(mode, tmp_path, 2)
    assert result["losses"] == pytest.approx(one_process["losses"], rel=1e-5)
    assert result["lora"].keys() == one_process["lora"].keys() and result["lora"]
    for name, weight in one_process["lora"].items():
        torch.testing.assert_close(result["lora"][name], weight, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
