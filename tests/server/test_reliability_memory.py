"""The heap trim's schedule: after a batch shape not seen since the last trim, at most once per interval while
busy, at once when the engine goes idle; never for shapes already trimmed after. (The RSS figures it gives
are in benchmarks/memory.py.)"""

from __future__ import annotations

import time
from collections import Counter

from dcar.server.memory import HeapTrimmer

A, B = (8, 8), (4, 4)


def test_trim_follows_new_batch_shapes_rate_limited_while_busy():
    trimmer = HeapTrimmer(interval_s=3600)
    assert trimmer.enabled  # glibc: the test machines and the images run on it
    assert not trimmer.due(idle=True)  # nothing seen yet
    trimmer.saw(Counter({A: 4}))
    assert trimmer.due(idle=True)
    trimmer.trim()
    assert trimmer.trims == 1 and not trimmer.due(idle=True)
    trimmer.saw(Counter({A: 4}))
    trimmer.saw(Counter({A: 5, B: 1}))  # new shapes while busy: wait for the interval...
    assert not trimmer.due(idle=False)
    assert trimmer.due(idle=True)  # ...or for the engine to go idle
    trimmer._last = time.monotonic() - 3601
    assert trimmer.due(idle=False)


def test_a_disabled_trimmer_never_trims():
    trimmer = HeapTrimmer(enabled=False)
    trimmer.saw(Counter({A: 16}))
    assert not trimmer.enabled and not trimmer.due(idle=True)
