"""Reward functions for examples/grpo.yaml (stage.reward: rewards:answer_and_brevity).

A reward function gets the prompts and completions (one entry per completion; a prompt repeats
once per sampled completion) and the data rows' other fields as lists of the same length, and
returns one number per completion."""


def answer_and_brevity(prompts, completions, answer, **columns):
    """1 for a completion that names the row's answer, plus 0.5 for one of at most 80 characters."""
    return [float(a.lower() in c.lower()) + 0.5 * (len(c) <= 80) for c, a in zip(completions, answer)]
