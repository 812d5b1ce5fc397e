"""The model worker: what the engine's single model thread does with one ``Plan``.

The engine (server/engine.py) decides on the event loop what happens at a step boundary and hands the
worker a ``Plan``; the worker starts the admitted rows, merges them into the running groups, steps every
group, runs head + decode for rows that took their last step, and returns an ``Outcome``. It only touches the
model and the ``BatchState``s, and the loop's scheduling never touches those while a plan runs. The loop itself
keeps running: new rows, cancellations and drain set ``attention``, and the worker keeps stepping without a
round trip through the loop only while that event is clear and no row needs the loop (``_keep_going``).
"""

from __future__ import annotations

import base64
import io
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from dcar.model.images import tensor_to_pil
from dcar.model.params import EditSpec, NonFiniteOutput, RowResult
from dcar.model.sampler import BatchState, StepEvent
from dcar.server.batching import BatchPolicy, GroupView
from dcar.server.jobs import Job, Ticket

log = logging.getLogger("dcar.engine")
OutOfMemory = torch.cuda.OutOfMemoryError


@dataclass
class Plan:
    """What the worker does in one iteration (decided on the loop)."""

    groups: list[BatchState]
    keep: list[list[int] | None]  # per group: rows to keep (None: all, []: drop the group)
    admit: dict[int, list[Ticket]]  # target group index (after drops) -> new rows
    cap: int


@dataclass
class Outcome:
    """What one iteration produced (returned by the worker to the loop)."""

    groups: list[BatchState] = field(default_factory=list)
    progress: list[tuple[Ticket, StepEvent, str | None]] = field(default_factory=list)
    results: list[tuple[Ticket, RowResult]] = field(default_factory=list)
    failures: list[tuple[Ticket, BaseException]] = field(default_factory=list)
    batches: list[tuple[int, float]] = field(default_factory=list)  # (rows, seconds) per forward batch
    ooms: list[int] = field(default_factory=list)  # sizes that ran out of memory
    steps: list[tuple[int, float]] = field(default_factory=list)  # (rows advanced, seconds) per engine step


def _select_list(items: list, idx: Sequence[int]) -> list:
    return [items[i] for i in idx]


def _select_state(state: BatchState, idx: Sequence[int]) -> BatchState:
    return state.select(list(idx))


class ModelWorker:
    """Runs plans on the model thread. ``attention`` is set by the loop when a step boundary needs it."""

    def __init__(self, pipe, policy: BatchPolicy, attention: threading.Event, preview_size: int):
        self.pipe = pipe
        self.policy = policy
        self._attention = attention
        self.preview_size = preview_size

    def work(self, plan: Plan) -> Outcome:
        """Admit, then step every group; keep stepping while nothing needs the loop (see ``_keep_going``)."""
        out = Outcome()
        t_start = time.monotonic()
        slots: dict[int, BatchState] = {}
        for g, k in zip(plan.groups, plan.keep):
            if k != []:
                slots[len(slots)] = g if k is None else g.select(k)
        for target, tickets in plan.admit.items():
            for part, state in self._run_split(tickets, self._start, _select_list, out):
                if isinstance(state, BaseException):
                    out.failures += [(t, state) for t in part]
                    continue
                prev = slots.get(target)
                slots[target] = state if prev is None else BatchState.merge(prev, state)
        groups = self._pack([slots[k] for k in sorted(slots)], plan.cap)
        while True:
            for g in groups:
                self._advance(g, out)
            now = time.monotonic()
            out.steps.append((sum(len(g) for g in groups), now - t_start))
            t_start = now
            if not self._keep_going(out):
                return out
            groups, out.groups = out.groups, []

    def _keep_going(self, out: Outcome) -> bool:
        """Whether the worker may take another step without a step boundary on the loop.

        Only when nothing happened that the loop must handle: no row finished or failed, no out-of-memory, no
        new rows, cancellations or drain (``_attention``), no deadline passed, no stream waiting for its
        progress event. Each step boundary costs a round trip through the event loop; at low load that was
        most of the gap between an HTTP request and a direct Pipeline call.
        """
        if out.results or out.failures or out.ooms or not out.groups or self._attention.is_set():
            return False
        now = time.monotonic()
        for g in out.groups:
            for r in g.rows:
                job = r.tag.job
                if job.done or job.events is not None or job.deadline < now:
                    return False
        return True

    def _start(self, tickets: list[Ticket]) -> BatchState:
        edits = [self._edit_spec(t.job) for t in tickets]
        return self.pipe.sampler.start([t.params for t in tickets],
                                       edits if any(e is not None for e in edits) else None, tags=tickets)

    def _edit_spec(self, job: Job) -> EditSpec | None:
        if job.edit is None:
            return None
        if job.spec is None:
            job.spec = self.pipe.prepare_edit(job.edit.image, job.edit.mask, blend=job.edit.blend)
        return job.spec

    def _pack(self, groups: list[BatchState], cap: int) -> list[BatchState]:
        """Split groups above the cap; merge same-grid groups that fit together under it."""
        chunks = []
        for g in groups:
            if len(g) <= cap:
                chunks.append(g)
            else:
                chunks += [g.select(list(range(s, min(s + cap, len(g))))) for s in range(0, len(g), cap)]
        packed = []
        for part in self.policy.merges([GroupView(g.grid, len(g)) for g in chunks]):
            state = chunks[part[0]]
            for i in part[1:]:
                state = BatchState.merge(state, chunks[i])
            packed.append(state)
        return packed

    def _advance(self, group: BatchState, out: Outcome) -> None:
        """One step for a group, then head + decode for its rows that are done.

        A failure fails the rows of the forward it happened in; rows that were not part of it keep running.
        """
        t0 = time.monotonic()
        for part, events in self._run_split(group, self.pipe.sampler.step, _select_state, out):
            if isinstance(events, BaseException):
                out.failures += [(r.tag, events) for r in part.rows]
                continue
            for i, ev in enumerate(events):
                job = ev.tag.job
                preview = self._preview(part, i, job.preview_size) if job.wants_preview(ev.step) else None
                out.progress.append((ev.tag, ev, preview))
            for sub, finished in self._run_split(part, self.pipe.sampler.finish, _select_state, out):
                if isinstance(finished, BaseException):
                    out.failures += [(r.tag, finished) for r in sub.rows if r.done]
                    rest = [i for i, r in enumerate(sub.rows) if not r.done]
                    if rest:
                        out.groups.append(sub.select(rest))
                    continue
                results, rest = finished
                for r in results:  # a NaN/inf image is never delivered: that row fails alone
                    if r.finite:
                        out.results.append((r.tag, r))
                    else:
                        out.failures.append((r.tag, NonFiniteOutput("the generated image held NaN or inf values")))
                if len(rest):
                    out.groups.append(rest)
            seconds = time.monotonic() - t0
            t0 = time.monotonic()
            out.batches.append((len(part), seconds))
            for r in part.rows:
                r.tag.compute_s += seconds / len(part)

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
            return (self._run_split(select(items, range(h)), run, select, out)
                    + self._run_split(select(items, range(h, n)), run, select, out))
        except Exception as exc:
            return [(items, exc)]

    def _preview(self, state: BatchState, index: int, size: int | None = None) -> str | None:
        try:
            image = tensor_to_pil(self.pipe.sampler.preview(state, index))
        except Exception:  # a preview is a courtesy; never fail a row for it
            log.exception("preview failed")
            return None
        size = size or self.preview_size
        image.thumbnail((size, size))
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return base64.b64encode(buf.getvalue()).decode("ascii")
