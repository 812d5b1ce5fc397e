"""Give freed heap memory back to the OS after the batch shapes change (CPU serving).

On CPU, PyTorch tensors live on the C heap. glibc keeps freed blocks for reuse, and every new batch shape
(rows x token grid) leaves blocks of new sizes behind, so the resident size grows in steps with each shape
seen and never comes back down (benchmarks/memory.py, embedded model: 466 -> 950 MiB over batches of 1 to 16
rows; with the trim it stays at 450-600 MiB). ``malloc_trim(0)`` returns the free pages; it takes up to
~40 ms after a batch of 16 rows on 2 CPU cores, so the engine calls it on the model thread between
iterations, only after a shape it had not seen since the last trim, at most once per ``interval_s`` (under
1% of a busy engine's time), and whenever the engine goes idle after such a change.
On CUDA the tensors are in the caching allocator (bounded by its own settings) and this is off; where the
C library has no ``malloc_trim`` (musl, macOS) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import time
from collections import Counter
from collections.abc import Hashable

log = logging.getLogger("dcar.engine")


def _malloc_trim():
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None


class HeapTrimmer:
    """Decides when to trim (``saw`` + ``due``, on the loop) and trims (``trim``, on the model thread)."""

    def __init__(self, enabled: bool = True, interval_s: float = 5.0):
        self._fn = _malloc_trim() if enabled else None
        self.interval_s = interval_s
        self._seen: set[tuple[Hashable, int]] = set()
        self._pending = False
        self._last = 0.0
        self.trims = 0

    @property
    def enabled(self) -> bool:
        return self._fn is not None

    def saw(self, rows_per_grid: Counter) -> None:
        """The running rows of the next iteration, counted per token grid (its forwards' shapes)."""
        if self._fn is None:
            return
        shapes = set(rows_per_grid.items())
        if not shapes <= self._seen:
            self._seen |= shapes
            self._pending = True

    def due(self, idle: bool) -> bool:
        if not self._pending:
            return False
        return idle or time.monotonic() - self._last >= self.interval_s

    def trim(self) -> None:
        self._pending = False
        self._seen.clear()  # shapes seen before the trim no longer hold freed blocks
        self._last = time.monotonic()
        if self._fn is not None:
            self._fn(0)
            self.trims += 1
