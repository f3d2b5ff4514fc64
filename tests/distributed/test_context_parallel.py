"""Context parallelism on the CPU (gloo): a packed batch sharded over 2 or 3 processes gives the loss
and LoRA gradients of the whole batch on one (fp32), through fusetune's attention kernel (under the
Triton interpreter) and its dense fallback; plus the errors a wrong setup gets."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).with_name("context_parallel_worker.py")


def _run(tmp_path: Path, nproc: int, *args, interpret: bool = True, padded: bool = False) -> dict:
    out = tmp_path / "result.pt"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
                           "--standalone", str(WORKER),
                           *map(str, args), str(out), *(["--padded"] if padded else [])],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "1" if interpret else "0"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    return torch.load(out, weights_only=True)


# llama: 2 kv heads over 2 ranks (split); mistral: 1 kv head repeated for 2 ranks, a sliding window
# shorter than the documents; every batch an odd length (shard_batch pads it)
# padded: right-padded rows (no packing) whose padding mask only some shards hold
CASES = [("llama", 2, 2, True, False), ("mistral", 1, 2, True, False), ("llama", 2, 2, False, False),
         ("qwen2", 2, 2, True, True)]


@pytest.mark.slow
@pytest.mark.parametrize("family, kv_heads, nproc, interpret, padded", CASES,
                         ids=["llama-kernel", "mistral-repeat-kv-kernel", "llama-dense", "qwen2-padded-kernel"])
def test_sharded_batch_trains_as_the_whole(family, kv_heads, nproc, interpret, padded, tmp_path):
    seed = int.from_bytes(os.urandom(2), "little")
    result = _run(tmp_path, nproc, family, kv_heads, seed, interpret=interpret, padded=padded)
    (loss, grads), (sharded_loss, sharded_grads) = result["expected"], result["sharded"]
    assert result["shard"] * nproc >= result["tokens"] > result["shard"] * (nproc - 1)
    torch.testing.assert_close(sharded_loss, loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == sharded_grads.keys() and grads
    for name, grad in grads.items():
        torch.testing.assert_close(sharded_grads[name], grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("world", [2, 3])
def test_shard_batch_cuts_shifts_and_pads(world, monkeypatch):
    import fusetune.training.context_parallel as cp

    ids = torch.randint(2, 257, (2, 10))
    labels = torch.where(torch.rand(2, 10) < 0.3, -100, ids)
    positions = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1, 2]] * 2)
    shards = []
    for rank in range(world):
        monkeypatch.setattr(cp.dist, "get_world_size", lambda group: world)
        monkeypatch.setattr(cp.dist, "get_rank", lambda group, rank=rank: rank)
        shards.append(cp.shard_batch({"input_ids": ids, "labels": labels, "position_ids": positions}, pad_token_id=0))
    whole = {k: torch.cat([s[k] for s in shards], dim=1) for k in ("input_ids", "labels", "shift_labels", "position_ids")}
    pad = -10 % world
    assert whole["input_ids"].shape == (2, 10 + pad) and len({s["input_ids"].shape for s in shards}) == 1
    assert torch.equal(whole["input_ids"][:, :10], ids) and (whole["input_ids"][:, 10:] == 0).all()
    assert torch.equal(whole["labels"][:, :10], labels) and (whole["labels"][:, 10:] == -100).all()
    assert torch.equal(whole["shift_labels"][:, :9], labels[:, 1:]) and (whole["shift_labels"][:, 9:] == -100).all()
    assert torch.equal(whole["position_ids"][:, 10:], torch.arange(3, 3 + pad).expand(2, pad))  # the last run goes on
    assert all(s["num_items_in_batch"] == int((labels[:, 1:] != -100).sum()) for s in shards)


def test_context_parallel_needs_a_process_group_and_fusetunes_attention(tmp_path):
    import torch.distributed as dist
    import fusetune
    from fusetune.training.context_parallel import context_parallel
    from tests.tiny_models import tiny_model

    model = tiny_model("llama")
    with pytest.raises(RuntimeError, match="init_process_group"), context_parallel(model):
        pass
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        with pytest.raises(ValueError, match="patch_model"), context_parallel(model):
            pass
        with context_parallel(fusetune.patch_model(model)):  # one process: nothing to shard
            assert model(torch.randint(2, 257, (1, 9))).logits.shape == (1, 9, 257)
    finally:
        dist.destroy_process_group()


def test_heads_the_processes_do_not_divide_get_a_clear_error(monkeypatch):
    from fusetune.patching import context_parallel as cp

    monkeypatch.setattr(cp.dist, "get_world_size", lambda group: 3)
    q, kv = torch.zeros(1, 4, 5, 8), torch.zeros(1, 2, 5, 8)
    with pytest.raises(ValueError, match="4 query and 2 key/value heads"):
        cp.sharded_attention(None, None, None, q, kv, kv, None, torch.arange(5)[None])
    monkeypatch.setattr(cp.dist, "get_world_size", lambda group: 2)
    with pytest.raises(ValueError, match="position ids"):
        cp.sharded_attention(None, None, None, q, kv, kv, None, None)
