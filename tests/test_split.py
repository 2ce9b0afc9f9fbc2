"""The data split (version 2): held-out text is whole stretches of 16,384 tokens, the same whatever the block size,
never overlapping train; short corpora keep the every-10th-block rule."""

from __future__ import annotations

import pytest
import torch

from t2r.data import HELDOUT_STRETCH, DataError, _split, split_masks


def _token_sets(n_tokens: int, block_size: int) -> tuple[set, set]:
    train, heldout = split_masks(n_tokens // block_size, block_size)
    positions = lambda mask: {p for i in torch.nonzero(mask).flatten().tolist()  # noqa: E731
                              for p in range(i * block_size, (i + 1) * block_size)}
    return positions(train), positions(heldout)


@pytest.mark.parametrize("block_size", [512, 2048, 3000, HELDOUT_STRETCH])
def test_heldout_is_whole_stretches_and_never_overlaps_train(block_size):
    n_tokens = 25 * HELDOUT_STRETCH
    train, heldout = _token_sets(n_tokens, block_size)
    stretch_9 = set(range(9 * HELDOUT_STRETCH, 10 * HELDOUT_STRETCH))
    stretch_19 = set(range(19 * HELDOUT_STRETCH, 20 * HELDOUT_STRETCH))
    assert not train & heldout
    assert heldout <= stretch_9 | stretch_19 and not train & (stretch_9 | stretch_19)
    if HELDOUT_STRETCH % block_size == 0:  # blocks tile the stretches: nothing is dropped
        assert heldout == stretch_9 | stretch_19 and len(train) + len(heldout) == n_tokens


def test_the_same_heldout_text_at_every_dividing_block_size():
    sets = {b: _token_sets(12 * HELDOUT_STRETCH, b)[1] for b in (256, 512, 4096, HELDOUT_STRETCH)}
    assert len({frozenset(s) for s in sets.values()}) == 1


def test_short_corpora_keep_the_block_rule():
    train, heldout = split_masks(30, 64)
    assert torch.nonzero(heldout).flatten().tolist() == [9, 19, 29] and bool((train == ~heldout).all())
    train, heldout = split_masks(3, 64)
    assert heldout.tolist() == [False, False, True]


def test_blocks_longer_than_a_stretch_have_no_heldout_and_say_so():
    blocks = torch.zeros(12, 2 * HELDOUT_STRETCH, dtype=torch.long)
    with pytest.raises(DataError, match="held-out documents are stretches of 16,384 tokens; use a block size"):
        _split(blocks, "'big'")
