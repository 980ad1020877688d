"""``streams.heap.settle``: start-up's objects frozen, young collections less often, cycles still collected."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from streams import heap


@pytest.fixture
def restored_gc() -> Iterator[None]:
    threshold = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*threshold)


class Node:
    def __init__(self) -> None:
        self.other: Node | None = None


@pytest.mark.usefixtures("restored_gc")
def test_settle_freezes_what_exists_and_still_collects_later_cycles() -> None:
    long_lived = [{"price": i} for i in range(1000)]
    heap.settle()
    assert gc.get_freeze_count() >= len(long_lived)
    assert gc.get_threshold()[0] == heap.YOUNG_COLLECTION_EVERY
    a, b = Node(), Node()
    a.other, b.other = b, a  # a cycle: reference counting alone never frees it
    gone = weakref.ref(a)
    del a, b
    gc.collect()
    assert gone() is None


@pytest.mark.usefixtures("restored_gc")
def test_stage_one_threshold_still_collects_garbage_cycles_that_pile_up_without_being_asked() -> None:
    heap.settle(heap.STAGE_ONE_YOUNG_COLLECTION_EVERY)
    collections = gc.get_stats()[0]["collections"]
    a, b = Node(), Node()
    a.other, b.other = b, a
    first = weakref.ref(a)
    del a, b
    for _ in range(heap.STAGE_ONE_YOUNG_COLLECTION_EVERY):  # a failure path leaving a cycle behind, again and again
        c, d = Node(), Node()
        c.other, d.other = d, c
    del c, d
    assert gc.get_stats()[0]["collections"] > collections  # the collector ran on its own
    assert first() is None


@pytest.mark.usefixtures("restored_gc")
def test_stage_one_threshold_is_above_what_two_full_batches_hold() -> None:
    """Else young collections would walk the batches in flight again (the cost the threshold removes)."""
    from deploy.bench.pipeline import encode
    from deploy.bench.workload import usage_events
    from deploy.settings import Settings
    from sinks.postgres import _row
    from streams.meter import priced_message
    from streams.pipeline import RawMessage, decode_batch, price_batch
    from streams.pricing import PriceBook

    book = PriceBook()
    raw = [RawMessage("usage.raw", 0, i, k, v, 0) for i, (k, v) in enumerate(encode(usage_events(1000)))]
    gc.collect()
    gc.disable()
    try:
        before = len(gc.get_objects())
        bodies: dict[str, bytes] = {}
        events, _ = decode_batch(raw, bodies)
        priced = price_batch(book, events, bodies)
        kept = ([priced_message(p) for p in priced], [_row(p) for p in priced])
        per_event = (len(gc.get_objects()) - before) / len(raw)
    finally:
        gc.enable()
    assert kept and 3 <= per_event < 20, per_event
    for batch_size in (Settings().worker_batch_size, 1_000, 100_000):
        assert 2 * batch_size * per_event * 2 < heap.stage_one_young_collection_every(batch_size)
