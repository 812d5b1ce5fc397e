"""The model worker: what the engine's single model thread does with one ``Plan``.

The engine (server/engine.py) decides on the event loop what happens at a step boundary and hands the
worker a ``Plan`` of plain data: row ids to drop, ``RowSpec``s of rows to admit, and the per-forward cap. The
worker owns the model, the running ``BatchState``s and its copies of the row specs; it drops and starts
rows, packs the groups into forwards under the cap, steps every group, runs head + decode for rows that
took their last step, and returns an ``Outcome``: per-row progress, results and failures by row id, and the
measured seconds of every forward. It never reads the loop's jobs, and the loop never reads its batches.

The loop keeps running meanwhile: new rows, cancellations and drain set ``attention`` (the one object both
threads touch), and the worker keeps stepping without a round trip through the loop only while that event
is clear and no row needs the loop (``_keep_going``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from dcar.model.params import EditSpec, NonFiniteOutput, RowResult
from dcar.model.sampler import BatchState, StepEvent
from dcar.server.batching import GroupView, pack
from dcar.server.imaging import encode_preview
from dcar.server.jobs import RowSpec

log = logging.getLogger("dcar.engine")
OutOfMemory = torch.cuda.OutOfMemoryError


@dataclass(frozen=True)
class Plan:
    """What the worker does in one iteration (decided on the loop)."""

    cap: int  # rows per forward (the policy's one cap)
    admit: tuple[RowSpec, ...] = ()
    drop: frozenset[int] = frozenset()  # row ids whose request ended (client gone, deadline, failed sibling)
    release: tuple[str, ...] = ()  # edit keys of jobs that ended: their tokenized input may go


@dataclass(frozen=True)
class Forward:
    """One measured forward: one unmasking step of ``rows``, then the finish of ``finished`` of them."""

    grid: tuple[int, int]
    rows: tuple[int, ...]  # row ids
    step_s: float
    finished: int
    finish_s: float


@dataclass
class Outcome:
    """What one plan produced (returned by the worker to the loop); rows are named by their ids."""

    progress: list[tuple[StepEvent, str | None]] = field(
        default_factory=list
    )  # event (tag = row id), preview
    results: list[RowResult] = field(default_factory=list)  # tag = row id
    failures: list[tuple[int, BaseException]] = field(default_factory=list)
    forwards: list[Forward] = field(default_factory=list)
    starts: list[tuple[tuple[int, int], int, float]] = field(default_factory=list)  # (grid, rows, seconds)
    ooms: list[int] = field(default_factory=list)  # sizes that ran out of memory
    rounds: int = 0  # how many times every group was stepped


def _select_list(items: list, idx: Sequence[int]) -> list:
    return [items[i] for i in idx]


def _select_state(state: BatchState, idx: Sequence[int]) -> BatchState:
    return state.select(list(idx))


class ModelWorker:
    """Runs plans on the model thread. ``attention`` is set by the loop when a step boundary needs it."""

    def __init__(self, pipe, attention: threading.Event, preview_size: int):
        self.pipe = pipe
        self._attention = attention
        self.preview_size = preview_size
        self._groups: list[BatchState] = []
        self._rows: dict[int, RowSpec] = {}
        self._edits: dict[str, EditSpec] = {}

    def work(self, plan: Plan) -> Outcome:
        """Drop, admit and pack; then step every group, and keep stepping while nothing needs the loop."""
        out = Outcome()
        try:
            self._apply(plan, out)
            while self._groups:
                groups, self._groups = self._groups, []
                for g in groups:
                    self._advance(g, out)  # puts the rows that keep running back into self._groups
                out.rounds += 1
                if not self._keep_going(out):
                    break
        except BaseException:
            # A bug outside any one forward: the loop fails every row in flight; hold nothing stale.
            self._groups, self._rows, self._edits = [], {}, {}
            raise
        return out

    def _apply(self, plan: Plan, out: Outcome) -> None:
        if plan.drop:
            for rid in plan.drop:
                self._rows.pop(rid, None)
            kept = []
            for g in self._groups:
                idx = [i for i, r in enumerate(g.rows) if r.tag not in plan.drop]
                if idx:
                    kept.append(g if len(idx) == len(g) else g.select(idx))
            self._groups = kept
        for key in plan.release:
            self._edits.pop(key, None)
        by_grid: dict[tuple[int, int], list[RowSpec]] = defaultdict(list)
        for spec in plan.admit:
            self._rows[spec.id] = spec
            by_grid[spec.grid].append(spec)
        for grid, specs in by_grid.items():
            t0 = time.monotonic()
            for part, state in self._run_split(specs, self._start, _select_list, out):
                if isinstance(state, BaseException):
                    self._fail([s.id for s in part], state, out)
                else:
                    self._groups.append(state)
            out.starts.append((grid, len(specs), time.monotonic() - t0))
        self._groups = self._pack(self._groups, plan.cap)

    def _keep_going(self, out: Outcome) -> bool:
        """Whether the worker may take another step without a step boundary on the loop.

        Only when nothing happened that the loop must handle: no row finished or failed, no out-of-memory, no
        new rows, cancellations or drain (``_attention``), no deadline passed, no stream waiting for its
        progress event. Each step boundary costs a round trip through the event loop; at low load that was
        most of the gap between an HTTP request and a direct Pipeline call.
        """
        if out.results or out.failures or out.ooms or not self._groups or self._attention.is_set():
            return False
        now = time.monotonic()
        return not any(s.stream or s.deadline < now for s in self._rows.values())

    def _start(self, specs: list[RowSpec]) -> BatchState:
        edits = [self._edit_spec(s) for s in specs]
        return self.pipe.sampler.start(
            [s.params for s in specs],
            edits if any(e is not None for e in edits) else None,
            tags=[s.id for s in specs],
        )

    def _edit_spec(self, spec: RowSpec) -> EditSpec | None:
        if spec.edit is None:
            return None
        key = spec.edit_key or str(spec.id)
        if key not in self._edits:
            e = spec.edit
            self._edits[key] = self.pipe.prepare_edit(e.image, e.mask, blend=e.blend)
        return self._edits[key]

    @staticmethod
    def _pack(groups: list[BatchState], cap: int) -> list[BatchState]:
        """Cut groups above the cap; merge same-grid groups that fit together under it (batching.pack)."""
        packed = []
        for part in pack([GroupView(g.grid, len(g)) for g in groups], cap):
            states = [
                groups[i] if (a, b) == (0, len(groups[i])) else groups[i].select(list(range(a, b)))
                for i, a, b in part
            ]
            state = states[0]
            for s in states[1:]:
                state = BatchState.merge(state, s)
            packed.append(state)
        return packed

    def _fail(self, rows: Sequence[int], exc: BaseException, out: Outcome) -> None:
        for rid in rows:
            self._rows.pop(rid, None)
            out.failures.append((rid, exc))

    def _advance(self, group: BatchState, out: Outcome) -> None:
        """One step for a group, then head + decode for its rows that are done.

        A failure fails the rows of the forward it happened in; rows that were not part of it keep running.
        A row whose image holds NaN or inf fails alone (``NonFiniteOutput``); it is never delivered.
        """
        t0 = time.monotonic()
        parts = self._run_split(group, self.pipe.sampler.step, _select_state, out)
        step_s = time.monotonic() - t0  # split into parts only after out-of-memory: shared by row count
        for part, events in parts:
            if isinstance(events, BaseException):
                self._fail([r.tag for r in part.rows], events, out)
                continue
            t1 = time.monotonic()
            for i, ev in enumerate(events):
                spec = self._rows[ev.tag]
                preview = self._preview(part, i, spec.preview_size) if spec.wants_preview(ev.step) else None
                out.progress.append((ev, preview))
            t2 = time.monotonic()
            finished = 0
            for sub, result in self._run_split(part, self.pipe.sampler.finish, _select_state, out):
                if isinstance(result, BaseException):
                    self._fail([r.tag for r in sub.rows if r.done], result, out)
                    rest = [i for i, r in enumerate(sub.rows) if not r.done]
                    if rest:
                        self._groups.append(sub.select(rest))
                    continue
                results, rest = result
                finished += len(results)
                for r in results:
                    if r.finite:
                        self._rows.pop(r.tag, None)
                        out.results.append(r)
                    else:
                        self._fail(
                            [r.tag], NonFiniteOutput("the generated image held NaN or inf values"), out
                        )
                if len(rest):
                    self._groups.append(rest)
            out.forwards.append(
                Forward(
                    part.grid,
                    tuple(r.tag for r in part.rows),
                    step_s * len(part) / len(group) + (t2 - t1),
                    finished,
                    time.monotonic() - t2,
                )
            )

    def _run_split(self, items, run: Callable, select: Callable, out: Outcome) -> list[tuple[Any, Any]]:
        """``run(items)`` as (part, result) pairs; the result is the exception where a part failed.

        On CUDA out-of-memory the items are split in halves and each half is run (recursively), so a batch
        that does not fit still completes; a single item that does not fit fails alone.
        """
        try:
            return [(items, run(items))]
        except OutOfMemory as exc:
            n = len(items)
            out.ooms.append(n)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if n <= 1:
                return [(items, exc)]
            log.warning("out of memory on a batch of %d rows; splitting it in halves", n)
            h = n // 2
            return self._run_split(select(items, range(h)), run, select, out) + self._run_split(
                select(items, range(h, n)), run, select, out
            )
        except Exception as exc:
            return [(items, exc)]

    def _preview(self, state: BatchState, index: int, size: int | None = None) -> str | None:
        try:
            size = size or self.preview_size  # downscaled on the device, before the copy to the host
            return encode_preview(self.pipe.sampler.preview(state, index, size), size)
        except Exception:  # a preview is a courtesy; never fail a row for it
            log.exception("preview failed")
            return None
