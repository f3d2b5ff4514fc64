import subprocess
import sys

from fusetune.cli import main


def test_env_lists_versions_and_backends(capsys):
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    for word in ("torch", "triton", "transformers", "peft", "bitsandbytes", "rms_norm", "cross_entropy"):
        assert word in out


def test_train_quickstart_learns(capsys):
    # the README's main job, shortened; on CPU it runs the torch backend (no interpreter)
    proc = subprocess.run([sys.executable, "-m", "fusetune.cli", "train", "--steps", "12",
                           "--seq-len", "64", "--batch-size", "4"], capture_output=True, text=True,
                          env={**__import__("os").environ, "TRITON_INTERPRET": "0"}, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "patched" in proc.stdout and "tokens/s" in proc.stdout and "peak memory" in proc.stdout


def test_bad_command_exits_with_usage():
    proc = subprocess.run([sys.executable, "-m", "fusetune.cli", "trian"], capture_output=True, text=True)
    assert proc.returncode == 2 and "invalid choice" in proc.stderr
