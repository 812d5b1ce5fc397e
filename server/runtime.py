"""``Runtime``: what one app owns (settings, metrics, the model, the engine) and how it boots and drains.

Startup never blocks the HTTP server: the lifespan runs ``Runtime.boot`` as a task (load the weights, start
the engine, warm up one real generation per allowed size), so ``/healthz`` answers while the model loads
and ``/readyz`` says 503 until the engine is ready (Kubernetes startup and readiness probes).
"""

from __future__ import annotations

import asyncio
import logging
import time

import torch

from dcar.model.devices import resolve_device
from dcar.model.loading import LoadError
from dcar.model.pipeline import Pipeline
from dcar.model.sampler import SamplerOptions
from dcar.server.engine import Engine
from dcar.server.errors import ApiError
from dcar.server.metrics import Metrics
from dcar.server.provenance import weights_digest
from dcar.server.schemas import Limits
from dcar.server.settings import Settings, parse_size
from dcar.server.tracing import Tracing

log = logging.getLogger("dcar.server")


def load_pipeline(settings: Settings) -> Pipeline:
    """The weights directory named by the settings, or ``preset:<name>`` for a random model of that preset."""
    options = SamplerOptions(
        compile=settings.compile,
        cuda_graphs=settings.cuda_graphs,
        pad_buckets=settings.pad_buckets,
        channels_last_decoder=settings.channels_last,
    )
    return Pipeline.load(
        settings.weights, device=resolve_device(settings.device), dtype=settings.dtype, options=options
    )


class Runtime:
    """What one app owns (on ``app.state.runtime``): settings, metrics, and once booted the model and engine."""

    def __init__(self, settings: Settings, pipeline: Pipeline | None = None):
        self.settings = settings
        self.metrics = Metrics()
        self.tracing = Tracing(settings)
        self.pipeline = pipeline
        self.engine: Engine | None = None
        self.limits: Limits | None = None
        self.sizes: list[tuple[int, int]] = []
        self.error: str | None = None
        self.weights_digest = ""  # provenance: the digest of the weights served, set at boot
        self.booting = True
        self.created = int(time.time())

    @property
    def status(self) -> str:
        """loading, warming, ready, draining, stopped or failed."""
        if self.error is not None:
            return "failed"
        if self.engine is None:
            return "loading"
        if self.engine.status == "starting":
            return "warming"
        return self.engine.status

    @property
    def pipe(self) -> Pipeline:
        """The served pipeline, for routes that passed ``serving()`` (it is loaded before the engine starts)."""
        assert self.pipeline is not None, "only after the model loaded"
        return self.pipeline

    def serving(self) -> tuple[Engine, Limits]:
        """The engine and limits, or the 503 that explains why there are none yet."""
        if self.engine is None or self.limits is None:
            if self.error is not None:
                raise ApiError(
                    503, "engine_failed", f"the model failed to load: {self.error}", reason="not_ready"
                )
            raise ApiError(
                503,
                "not_ready",
                "the model is still loading; retry shortly",
                headers={"Retry-After": "1"},
                reason="not_ready",
            )
        return self.engine, self.limits

    async def boot(self) -> None:
        s = self.settings
        try:
            injected = self.pipeline is not None
            if self.pipeline is None:
                self.pipeline = await asyncio.to_thread(load_pipeline, s)
            pipe = self.pipeline
            self.weights_digest = await asyncio.to_thread(
                weights_digest, None if injected else s.weights, pipe
            )
            self.sizes = served_sizes(s, pipe)
            # its own tokenizer copy: prompts are counted on the event loop while the worker tokenizes
            counter = pipe.text_encoder.token_counter()
            self.limits = Limits(
                tuple(self.sizes),
                s.max_n,
                s.max_steps,
                s.max_residual_steps,
                s.max_guidance_scale,
                s.max_prompt_chars,
                pipe.text_encoder.max_length,
                s.request_timeout_s,
                counter,
                pipe.params,
                s.scheduling_policy,
            )
            info = pipe.info()
            self.metrics.set_model(
                {
                    "name": info["name"],
                    "device": info["device"],
                    "dtype": info["dtype"],
                    # WIDTHxHEIGHT, as in `sizes` and /v1/models (the bare side "256" read differently)
                    "native_size": f"{info['native_size']}x{info['native_size']}",
                    "sizes": ",".join(f"{w}x{h}" for w, h in self.sizes),
                }
            )
            if pipe.device.type == "cuda":
                dev = pipe.device
                self.metrics.watch_gpu_memory(
                    lambda: torch.cuda.memory_allocated(dev), lambda: torch.cuda.memory_reserved(dev)
                )
            engine = Engine(
                pipe,
                max_batch_size=s.max_batch_size,
                max_wait_s=s.max_wait_ms / 1000,
                max_queue=s.max_queue,
                max_queue_delay_s=s.max_queue_delay_s,
                admission_quantile=s.admission_quantile,
                trim_heap=s.trim_heap,
                metrics=self.metrics,
                preview_size=s.preview_size,
                probe_size=self.sizes[0],
            )
            await engine.start()
            self.engine = engine
            if s.warmup:
                await engine.warmup(self.sizes)
            engine.set_ready()
            log.info(
                "ready: %s on %s (%s), sizes %s",
                info["name"],
                info["device"],
                info["dtype"],
                ", ".join(f"{w}x{h}" for w, h in self.sizes),
            )
        except (LoadError, ValueError) as e:  # bad weights or settings: the message says it all
            self.error = f"{type(e).__name__}: {e}"
            log.error("startup failed: %s", self.error)
        except Exception as e:
            self.error = f"{type(e).__name__}: {e}"
            log.exception("startup failed")
        finally:
            self.booting = False

    def begin_drain(self) -> None:
        if self.engine is not None:
            self.engine.begin_drain()

    async def shutdown(self) -> None:
        if self.engine is not None:
            drained = await self.engine.drain(self.settings.drain_timeout_s)
            if not drained:
                log.warning(
                    "drain timeout (%g s) passed; unfinished requests got 503", self.settings.drain_timeout_s
                )
            await self.engine.stop()


def served_sizes(settings: Settings, pipe: Pipeline) -> list[tuple[int, int]]:
    """Allowed (width, height) sizes, native first; each a positive multiple of the tokenizer's compression."""
    native = pipe.config.sampling.size
    sizes = [parse_size(s) for s in settings.allowed_sizes] or [(native, native)]
    f = pipe.tokenizer.compression
    for w, h in sizes:
        if w <= 0 or h <= 0 or w % f or h % f:
            raise ValueError(
                f"allowed size {w}x{h} is not a positive multiple of {f} (the tokenizer's compression)"
            )
    if (native, native) in sizes:  # the native size first: it is the default and the probe size
        sizes.remove((native, native))
        sizes.insert(0, (native, native))
    return sizes
