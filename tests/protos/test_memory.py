"""protos/memory.py: the start-up heap moved out of the garbage collector's sight (both daemons call it)."""

from __future__ import annotations

import gc

from seamline.protos import memory


def test_settle_heap_leaves_a_full_collection_nothing_of_the_start_up_heap_to_walk():
    kept = [{"i": i} for i in range(10_000)]  # tracked objects a long-lived process holds after start-up
    before = len(gc.get_objects())
    try:
        memory.settle_heap()
        assert gc.get_freeze_count() >= len(kept)
        assert len(gc.get_objects()) < before // 10  # what a full collection still walks
    finally:
        gc.unfreeze()  # the test process goes on collecting as before
    assert len(gc.get_objects()) >= len(kept)
