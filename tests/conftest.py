"""Test set-up: CPU runs use the Triton interpreter, which must be on before any kernel import.

FUSETUNE_TEST_SHARD=i/n (CI, .ci/run) keeps shard i (0-based) of n: the tests are split into n
shards of about equal run time, from the durations in .ci/test-durations.json (a test not listed
there counts as the median). Tests that share a module-scoped fixture stay in one shard. Every
collected test lands in exactly one shard, whatever the durations file says.
FUSETUNE_TEST_DURATIONS=.ci/test-durations.json python -m pytest rewrites that file from the run.
"""
import json
import os
import statistics
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.hookimpl(trylast=True)  # after -m / -k selection, so the shards split what will run
def pytest_collection_modifyitems(config, items):
    shard = os.environ.get("FUSETUNE_TEST_SHARD")
    if shard:
        _keep_shard(config, items, shard)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run on the GPU machine: pytest -m gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def _keep_shard(config, items, shard: str) -> None:
    try:
        index, count = (int(n) for n in shard.split("/"))
        assert 0 <= index < count
    except (ValueError, AssertionError):
        raise pytest.UsageError(f"FUSETUNE_TEST_SHARD={shard!r}: expected i/n with 0 <= i < n, e.g. 0/2") from None
    path = Path(__file__).resolve().parent.parent / ".ci" / "test-durations.json"
    durations = json.loads(path.read_text()) if path.exists() else {}
    default = statistics.median(durations.values()) if durations else 1.0
    groups: dict[str, list] = {}
    for item in items:
        defs = getattr(item, "_fixtureinfo", None)
        shared = defs is not None and any(d.scope in ("class", "module", "package")
                                          for fixture in defs.name2fixturedefs.values() for d in fixture)
        groups.setdefault(item.nodeid.split("::")[0] if shared else item.nodeid, []).append(item)
    weights = {key: sum(durations.get(i.nodeid, default) for i in members) for key, members in groups.items()}
    loads, keep = [0.0] * count, set()
    # longest first, each to the least loaded shard: a greedy split within a few percent of even
    for key in sorted(groups, key=lambda k: -weights[k]):
        target = loads.index(min(loads))
        loads[target] += weights[key]
        if target == index:
            keep.update(id(i) for i in groups[key])
    config.hook.pytest_deselected(items=[i for i in items if id(i) not in keep])
    items[:] = [i for i in items if id(i) in keep]


_durations: dict[str, float] = {}


def pytest_runtest_logreport(report):
    if os.environ.get("FUSETUNE_TEST_DURATIONS"):
        _durations[report.nodeid] = _durations.get(report.nodeid, 0.0) + report.duration


def pytest_sessionfinish(session):
    path = os.environ.get("FUSETUNE_TEST_DURATIONS")
    if path and _durations:
        Path(path).write_text(json.dumps({k: round(v, 3) for k, v in sorted(_durations.items())}, indent=0) + "\n")


@pytest.fixture
def device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(autouse=True)
def _fresh_seed():
    # fresh random inputs every run; the seed is printed on failure so a run can be replayed
    seed = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(seed)
    yield seed


@pytest.fixture
def poison(monkeypatch):
    """Make torch.empty/empty_like return NaN-filled (or max-int) tensors, so an output element a
    kernel forgot to write shows up as a mismatch."""
    from tests.numerics import poisoned

    real_empty, real_empty_like = torch.empty, torch.empty_like
    monkeypatch.setattr(torch, "empty", lambda *a, **k: poisoned(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poisoned(real_empty_like(*a, **k)))
