"""A cpt -> sft -> dpo recipe killed in the middle of its sft stage (and once at a random event of
the whole recipe) and run again ends with every stage's adapter equal, bit for bit, to an
uninterrupted run's; the stages that had finished are kept, not trained again."""
import json
import random
import signal

import pytest

STAGES = ("cpt", "sft", "dpo")
TEXTS = ["Tuna is a small fish that swims fast and far.", "서울은 한국의 수도입니다. 한강이 흐릅니다.",
         "The sea is wide and blue, and the fish are many.", "물은 영도에서 얼고 백 도에서 끓어요."]
PAIRS = [{"prompt": "Who are you?", "chosen": "I am Tuna.", "rejected": "I am a cat."},
         {"prompt": [{"role": "user", "content": "안녕하세요"}], "chosen": [{"role": "assistant", "content": "반갑습니다!"}],
          "rejected": "Go away."}]


def _recipe(job, name: str):
    for file, rows in (("corpus.jsonl", [{"text": t} for t in TEXTS]), ("pairs.jsonl", PAIRS * 2)):
        (job.root / file).write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows))
    config = json.loads(job.config(name, name.removesuffix(".yaml")).read_text())
    config["training"].update(max_steps=2, save_steps=1)
    config["stages"] = [
        {"name": "cpt", "kind": "cpt", "data": {"path": str(job.root / "corpus.jsonl")}},
        {"name": "sft", "training": {"max_steps": 4}},  # the job's conversations, its data.path
        {"name": "dpo", "kind": "dpo", "beta": 0.5, "data": {"path": str(job.root / "pairs.jsonl")}},
    ]
    path = job.root / name
    path.write_text(json.dumps(config))
    return path, job.root / name.removesuffix(".yaml")


def _adapters(out) -> dict[str, bytes]:
    return {s: (out / s / "adapter" / "adapter_model.safetensors").read_bytes() for s in STAGES}


@pytest.fixture(scope="module")
def straight(job):
    config, out = _recipe(job, "recipe-straight.yaml")
    proc = job.run(config, "--at", "0", "--events", str(job.root / "recipe-events.txt"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((out / "stages.json").read_text())
    assert [r["stage"] for r in report["stages"]] == list(STAGES) and report["result"] == "dpo/adapter"
    return {"adapters": _adapters(out), "events": (job.root / "recipe-events.txt").read_text().split("\n")}


def test_a_recipe_killed_in_its_sft_stage_resumes_to_the_same_adapters(job, straight):
    assert straight["events"].count("accumulate") == 2 + 4 + 2
    config, out = _recipe(job, "recipe-killed.yaml")
    proc = job.run(config, "--at", "step:4", "--how", "kill")  # sft's second step (cpt ran 2)
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr
    assert (out / "cpt" / "summary.json").is_file() and not (out / "sft" / "summary.json").exists()
    proc = job.run(config)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"{out / 'cpt'} holds this stage finished with the same settings: kept" in proc.stdout
    assert "resumed from" in proc.stdout and "checkpoint-1 (step 1 of 4)" in proc.stdout
    assert _adapters(out) == straight["adapters"]
    # a changed earlier stage trains it and every stage after it again
    changed = json.loads(config.read_text())
    changed["stages"][0]["training"] = {"learning_rate": 0.02}
    config.write_text(json.dumps(changed))
    proc = job.run(config)
    assert proc.returncode == 0 and "holds this stage finished" not in proc.stdout, proc.stdout + proc.stderr
    assert proc.stdout.count("holds a finished run (summary.json): training again from the start") == 3


def test_a_recipe_killed_at_a_random_event_resumes_to_the_same_adapters(job, straight, _fresh_seed):
    events = straight["events"]
    at = random.Random(_fresh_seed).randint(1, len(events))
    config, out = _recipe(job, "recipe-random.yaml")
    proc = job.run(config, "--at", str(at), "--how", "kill")
    assert proc.returncode in (-signal.SIGKILL, 0), proc.stdout + proc.stderr
    proc = job.run(config)
    assert proc.returncode == 0, f"killed at {events[at - 1]}#{at}\n" + proc.stdout + proc.stderr
    assert _adapters(out) == straight["adapters"], f"killed at {events[at - 1]}#{at}"
