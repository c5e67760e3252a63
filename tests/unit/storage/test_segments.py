"""storage/segments.py: index arithmetic over items stored segment after segment, against Python lists."""

from __future__ import annotations

import torch

from kvsqueeze.storage.segments import merge_order, offsets, segment_ids, take_segments

COUNTS = torch.tensor([2, 0, 3, 1])  # items a0 a1 | - | c0 c1 c2 | d0


def test_segment_ids_and_offsets():
    assert segment_ids(COUNTS).tolist() == [0, 0, 2, 2, 2, 3]
    assert offsets(COUNTS).tolist() == [0, 1, 0, 1, 2, 0]


def test_take_segments_in_the_given_order_with_repeats():
    assert take_segments(COUNTS, torch.tensor([3, 0, 1, 3])).tolist() == [5, 0, 1, 5]
    assert take_segments(COUNTS, torch.tensor([2])).tolist() == [2, 3, 4]


def test_merge_order_puts_each_segments_new_items_after_its_old_ones():
    old, new = segment_ids(COUNTS), torch.tensor([0, 1, 3, 3])  # 6 old items, then 4 new
    items = ["a0", "a1", "c0", "c1", "c2", "d0", "A", "B", "D1", "D2"]
    merged = [items[i] for i in merge_order(old, new).tolist()]
    assert merged == ["a0", "a1", "A", "B", "c0", "c1", "c2", "d0", "D1", "D2"]
