import subprocess
import sys

from fusetune.cli import main


def test_env_lists_versions_and_backends(capsys):
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    for word in ("torch", "triton", "transformers", "peft", "bitsandbytes", "rms_norm", "cross_entropy"):
        assert word in out


def test_bad_command_exits_with_usage():
    proc = subprocess.run([sys.executable, "-m", "fusetune.cli", "trian"], capture_output=True, text=True)
    assert proc.returncode == 2 and "invalid choice" in proc.stderr


def test_bench_runs_the_checkout_scripts():
    proc = subprocess.run([sys.executable, "-m", "fusetune.cli", "bench", "e2e", "--help"], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and "--workloads" in proc.stdout, proc.stderr
    import torch

    if not torch.cuda.is_available():  # on a GPU these would run the benchmarks
        for which in ("kernels", "plan"):
            proc = subprocess.run([sys.executable, "-m", "fusetune.cli", "bench", which], capture_output=True,
                                  text=True, timeout=300)
            assert proc.returncode == 1 and "needs a CUDA GPU" in proc.stderr, which


def test_version_and_help_answer_without_importing_torch():
    proc = subprocess.run([sys.executable, "-m", "fusetune.cli", "--version"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.startswith("fusetune ")
    probe = "import sys; from fusetune.cli import build_parser; build_parser().format_help(); " \
            "print(sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules))"
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert proc.stdout.strip() == "[]", proc.stdout + proc.stderr


def test_bench_sequence_search_doubles_then_bisects():
    """bench/e2e.py's longest-sequence search (W7, W7L): doubling until a step fails, then bisection
    to the search step; the longest that trained is a multiple of it."""
    from bench.e2e import search_longest

    def probe_below(limit):
        def probe(seq):
            return {"seq": seq} if seq <= limit else {"seq": seq, "error": "OOM"}
        return probe

    rows = search_longest(probe_below(600_000), 4096, 2**20, 32768)
    assert [r["seq"] for r in rows] == [4096, 8192, 16384, 32768, 65536, 131072, 262144, 524288, 1048576,
                                        786432, 655360, 589824, 622592]
    assert max(r["seq"] for r in rows if "error" not in r) == 589824
    assert [r["seq"] for r in search_longest(probe_below(3000), 4096, 2**20, 32768)] == [4096]  # nothing trains
    assert "error" not in search_longest(probe_below(10**9), 4096, 65536, 32768)[-1]  # the cap is reached


def test_bench_memory_slope_between_the_two_longest_points():
    """bench/e2e.py's GB of GPU memory per 1k tokens, per stack, from the two longest lengths that trained."""
    from bench.e2e import memory_slopes

    def row(stack, seq, peak_gb, error=False):
        r = dict(workload="W7", stack=stack, seq=seq, peak_bytes=peak_gb * 1e9, search=True)
        return dict(r, error="OOM") if error else r

    rows = [row("fusetune", 65536, 17.0), row("fusetune", 131072, 27.0), row("fusetune", 262144, 0, error=True),
            row("unsloth", 65536, 24.0), row("other", 65536, 5.0)]
    ((w, stack, slope),) = memory_slopes(rows)
    assert (w, stack) == ("W7", "fusetune")
    assert abs(slope - 10.0 / 65.536) < 1e-9
