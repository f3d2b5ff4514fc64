"""A tiny `fusetune train` job on disk (a llama model folder, a data file, a config) and a way to
run the command on it in its own process, as a user would, optionally stopped at an event
(tests/faults/driver.py)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.tiny_models import byte_level_tokenizer, tiny_model

ROOT = Path(__file__).resolve().parents[2]
ROWS = [
    {"messages": [{"role": "user", "content": "Who are you?"}, {"role": "assistant", "content": "I am Tuna."}]},
    {"messages": [{"role": "user", "content": "안녕하세요"}, {"role": "assistant", "content": "반갑습니다!"}]},
    {"instruction": "Say hello", "input": "in Korean", "output": "안녕하세요"},
    {"prompt": "The quick brown", "completion": "fox jumps"},
]


class Job:
    def __init__(self, root: Path):
        self.root = root
        tokenizer = byte_level_tokenizer()
        tiny_model("llama", vocab_size=len(tokenizer)).save_pretrained(root / "base")
        tokenizer.save_pretrained(root / "base")
        (root / "data.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in ROWS * 3))

    def config(self, name: str, out: str, **sections) -> Path:
        """A config file `name` writing to `out`; sections={"training": {...}} override the job's."""
        base = {"model": {"name": str(self.root / "base"), "max_seq_length": 64},
                "data": {"path": str(self.root / "data.jsonl")},
                "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"]},
                "training": {"max_steps": 6, "effective_batch_size": 4, "micro_batch_size": 2,
                             "learning_rate": 1.0e-2, "save_steps": 2, "save_total_limit": 2},
                "output": {"dir": str(self.root / out)}}
        for section, values in sections.items():
            base[section] = {**base.get(section, {}), **values}
        path = self.root / name
        path.write_text(json.dumps(base))  # JSON is YAML
        return path

    def run(self, config: Path, *driver_args, timeout=600) -> subprocess.CompletedProcess:
        """`fusetune train CONFIG` in a process of its own (through the driver when given its args)."""
        command = ["-m", "tests.faults.driver", str(config), *driver_args] if driver_args else \
            ["-m", "fusetune.cli", "train", str(config)]
        env = {**os.environ, "TRITON_INTERPRET": "0",  # on a CPU the torch backend runs, as for a user
               "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        return subprocess.run([sys.executable, *command], capture_output=True, text=True, cwd=self.root, env=env,
                              timeout=timeout)


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    return Job(tmp_path_factory.mktemp("job"))
