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

    if not torch.cuda.is_available():  # on a GPU this would run the whole kernel benchmark
        proc = subprocess.run([sys.executable, "-m", "fusetune.cli", "bench", "kernels"], capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 1 and "needs a CUDA GPU" in proc.stderr


def test_version_and_help_answer_without_importing_torch():
    proc = subprocess.run([sys.executable, "-m", "fusetune.cli", "--version"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.startswith("fusetune ")
    probe = "import sys; from fusetune.cli import build_parser; build_parser().format_help(); " \
            "print(sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules))"
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert proc.stdout.strip() == "[]", proc.stdout + proc.stderr
