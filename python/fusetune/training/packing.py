"""Padding-free packing: several examples in one row, each attending only to itself.

An example is {"input_ids": [...], "labels": [...] (optional: every token a label)}. pack_examples
concatenates examples into one row with position ids that restart at 0 for each example; a model
patched by fusetune (attention=True) reads the restarts as document boundaries, so no token attends
to another example, and the first label of each example is masked (-100) so no example's last token
is trained to predict the next example's first. The loss of a packed batch is the loss of the same
examples padded, with no compute spent on padding. Usable as a DataLoader / Trainer collator:

    loader = DataLoader(dataset, batch_size=16, collate_fn=PackingCollator(max_length=2048))
    for batch in loader:   # input_ids, labels, position_ids: (1, total tokens)
        model(**batch).loss.backward()

pack_groups splits examples into micro-batches by a token budget instead of a row count.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

IGNORE_INDEX = -100
logger = logging.getLogger("fusetune")


def _tokens(example, index: int) -> tuple[list[int], list[int]]:
    try:
        ids = example["input_ids"]
    except (KeyError, TypeError):
        raise ValueError(f"packing: example {index} has no input_ids (got {type(example).__name__}"
                         f"{' with keys ' + ', '.join(map(str, example)) if isinstance(example, dict) else ''})") from None
    ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
    labels = example.get("labels") if isinstance(example, dict) else None
    labels = ids if labels is None else labels
    labels = labels.tolist() if isinstance(labels, torch.Tensor) else list(labels)
    if not ids:
        raise ValueError(f"packing: example {index} has no tokens (empty input_ids); drop it from the data")
    if len(labels) != len(ids):
        raise ValueError(f"packing: example {index} has {len(ids)} input_ids but {len(labels)} labels")
    return ids, labels


def pack_examples(examples: list, max_length: int | None = None) -> dict[str, torch.Tensor]:
    """One row (1, total tokens) of input_ids, labels and position_ids, no padding.

    max_length: an example longer than this is cut to it, with a warning naming it (None: no cap); it
    caps each example, not the row (the row holds all the examples given).
    Raises ValueError naming an example without tokens or with labels of another length.
    """
    if not examples:
        raise ValueError("packing: no examples to pack")
    ids, labels, positions = [], [], []
    for index, example in enumerate(examples):
        tokens, targets = _tokens(example, index)
        if max_length is not None and len(tokens) > max_length:
            logger.warning("fusetune packing: example %d has %d tokens; cut to max_length %d", index, len(tokens),
                           max_length)
            tokens, targets = tokens[:max_length], targets[:max_length]
        ids += tokens
        labels += [IGNORE_INDEX] + targets[1:]  # the first token is nobody's target
        positions += range(len(tokens))
    as_row = lambda values: torch.tensor(values, dtype=torch.long)[None]  # noqa: E731
    return {"input_ids": as_row(ids), "labels": as_row(labels), "position_ids": as_row(positions)}


@dataclass
class PackingCollator:
    """A collate_fn: the batch's examples packed into one row (pack_examples)."""

    max_length: int | None = None

    def __call__(self, examples: list) -> dict[str, torch.Tensor]:
        return pack_examples(examples, self.max_length)


def pack_groups(lengths: list[int], budget: int) -> list[list[int]]:
    """Consecutive indices grouped so each group's total length stays within `budget` tokens (an
    example longer than the budget gets a group of its own)."""
    groups, current, total = [], [], 0
    for index, n in enumerate(lengths):
        if current and total + n > budget:
            groups.append(current)
            current, total = [], 0
        current.append(index)
        total += n
    if current:
        groups.append(current)
    return groups
