"""A recipe: `fusetune train` on a config with `stages:` (recipe/config.py Recipe), e.g. cpt ->
sft -> dpo. Each stage is a run of its own in output.dir/NAME (checkpoints, adapter, summary.json)
that starts from the result of the stage it names; a rerun keeps the stages that finished with
the same settings from the same start and resumes the one that was stopped, so a kill at any
point loses at most the steps since the last checkpoint. stages.json compares the stages.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from fusetune.atomic import atomic_write
from fusetune.recipe.checkpoints import claimed_output_dir
from fusetune.recipe.config import Recipe
from fusetune.recipe.evaluation import read_run_data
from fusetune.recipe.objectives import load_reward
from fusetune.recipe.train import run_train


def _digest(summary: dict) -> str:
    """What a later stage's fingerprint records of its start: the earlier stage's settings and data."""
    return hashlib.sha256(json.dumps(summary["fingerprint"], sort_keys=True).encode()).hexdigest()[:16]


def _row(name: str, summary: dict) -> dict:
    evals, losses = summary.get("eval") or [], summary["losses"]
    row = {"stage": name, "kind": summary.get("stage", "sft"), "steps": summary["steps"],
           "loss": [losses[0], losses[-1]], "eval_loss": evals[-1]["loss"] if evals else None,
           "multiple_choice": (summary.get("multiple_choice") or {}).get("after", {}).get("accuracy"),
           "rouge_l": ((summary.get("rouge") or {}).get("after") or {}).get("rougeL")}
    rewards = [float(m["reward"]) for m in summary.get("metrics", []) if "reward" in m]
    if rewards:
        row["reward"] = [rewards[0], rewards[-1]]
    return row


def _table(rows: list[dict]) -> str:
    def show(value, fmt):
        return "-" if value is None else fmt.format(value)

    lines = [f"{'stage':<12} {'kind':<5} {'steps':>5}  {'loss first -> last':<20} {'eval loss':>9} {'choice acc':>10} "
             f"{'ROUGE-L':>7}  {'reward first -> last'}"]
    for r in rows:
        lines.append(f"{r['stage']:<12} {r['kind']:<5} {r['steps']:>5}  {r['loss'][0]:>7.4f} -> {r['loss'][1]:<9.4f} "
                     f"{show(r['eval_loss'], '{:.4f}'):>9} {show(r['multiple_choice'], '{:.1%}'):>10} "
                     f"{show(r['rouge_l'], '{:.3f}'):>7}  {show(r.get('reward'), '{0[0]:.3f} -> {0[1]:.3f}')}")
    return "\n".join(lines)


def _result(stage: str, summary: dict) -> str:
    """A stage's result (its adapter, or its model) relative to the recipe's folder: the stage's own
    folder, whatever path the summary recorded (a kept stage's folder may have moved since)."""
    return str(Path(stage) / Path(summary["adapter"]).name)


def run_recipe(recipe: Recipe, log=print) -> dict:
    """Every stage in order; everything each needs (its data, its reward function) is checked
    before the first trains."""
    for name, _, config in recipe.stages:
        read_run_data(config)
        if config.stage.kind == "grpo":
            load_reward(config.stage.reward)
    out = Path(recipe.output_dir)
    summaries = {}
    with claimed_output_dir(out, log):
        for number, (name, source, config) in enumerate(recipe.stages, 1):
            config.output.dir = str(out / name)
            log(f"\n== stage {number} of {len(recipe.stages)}: {name} ({config.stage.kind}), from "
                f"{f'stage {source}' if source else config.model.name} ==")
            start = None
            if source:
                start = {"adapter": str(out / _result(source, summaries[source])), "digest": _digest(summaries[source])}
            summaries[name] = run_train(config, log, start_from=start, keep_finished=True)
        rows = [_row(name, summaries[name]) for name, _, _ in recipe.stages]
        last = recipe.stages[-1][0]
        # relative to the recipe's folder: it stays right when the folder is moved or copied
        report = {"stages": rows, "result": _result(last, summaries[last])}
        log(f"\n{_table(rows)}\n\nthe recipe's result: {out / report['result']}")
        log(f"report: {atomic_write(out / 'stages.json', json.dumps(report, indent=1, ensure_ascii=False))}")
    return report
