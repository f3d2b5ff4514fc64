"""The packing collator on its edge cases."""
import logging

import pytest
import torch

from fusetune.training.packing import IGNORE_INDEX, PackingCollator, pack_examples, pack_groups


def test_rows_restart_positions_and_mask_each_first_label():
    batch = pack_examples([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": torch.tensor([8, 9])},
                           {"input_ids": [4]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 4]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0]]
    # no example's last token learns the next example's first; missing labels: every token a label
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 6, 7, IGNORE_INDEX, 9, IGNORE_INDEX]]
    assert all(t.dtype == torch.long and t.shape == (1, 6) for t in batch.values())
    assert "attention_mask" not in batch  # no padding anywhere


def test_an_example_over_max_length_is_cut_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="fusetune"):
        batch = PackingCollator(max_length=4)([{"input_ids": [1, 2]}, {"input_ids": list(range(10, 20))}])
    assert batch["input_ids"].tolist() == [[1, 2, 10, 11, 12, 13]]
    assert "example 1 has 10 tokens; cut to max_length 4" in caplog.text


@pytest.mark.parametrize("examples, message", [
    ([{"input_ids": [1, 2]}, {"input_ids": []}], "example 1 has no tokens"),
    ([{"input_ids": [1, 2], "labels": [1]}], "example 0 has 2 input_ids but 1 labels"),
    ([{"text": "hi"}], "example 0 has no input_ids .* keys text"),
    ([], "no examples"),
])
def test_bad_examples_are_named(examples, message):
    with pytest.raises(ValueError, match=message):
        pack_examples(examples)


def test_groups_keep_to_the_token_budget():
    assert pack_groups([3, 4, 2, 9, 1, 1], budget=8) == [[0, 1], [2], [3], [4, 5]]
    assert pack_groups([], budget=8) == []
