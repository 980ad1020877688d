"""Garbage collection for the long-running stage processes.

CPython's cycle collector runs after every 700 net container allocations and, every so often, walks
every tracked object. A stage process allocates a few dozen containers per event (decoded records,
events, prices, rows), nearly all freed by reference counting, and holds a large graph that never
changes after start-up (genai-prices' price data alone is ~50,000 objects; a full collection of it
took ~11 ms). So, once start-up is done, that graph is moved out of the collector's sight
(``gc.freeze``) and young collections run ten times less often: cycles are still collected, later.
"""

from __future__ import annotations

import gc

YOUNG_COLLECTION_EVERY = 7_000  # net container allocations between two young collections (CPython: 700)


def settle() -> None:
    """Call once a process has built its long-lived objects (price book, followers, clients)."""
    gc.collect()
    gc.freeze()
    _young, middle, old = gc.get_threshold()
    gc.set_threshold(YOUNG_COLLECTION_EVERY, middle, old)
