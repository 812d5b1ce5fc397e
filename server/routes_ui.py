"""The playground: the page at ``/``, its static files, and ``GET /v1/status`` for its status strip.

The page is plain HTML, CSS and JavaScript modules from ``server/static/`` (no build step, no external
assets), served with a Content-Security-Policy that allows nothing but this origin, so a deployment works
offline and a string from the server can never run as code. Only the files listed in ``STATIC`` are served.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

from dcar.model.knobs import knob_values
from dcar.server.errors import ApiError
from dcar.server.routes import Authorized, RuntimeDep
from dcar.server.schemas import PRIORITY_MAX, PRIORITY_MIN

router = APIRouter()
STATIC_DIR = Path(__file__).resolve().parent / "static"
STATIC = {  # file name -> media type; nothing else is served
    "index.html": "text/html; charset=utf-8",
    "app.css": "text/css; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "api.js": "text/javascript; charset=utf-8",
    "gallery.js": "text/javascript; charset=utf-8",
    "mask.js": "text/javascript; charset=utf-8",
    "progress.js": "text/javascript; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}
HEADERS = {
    # 'self' only: no CDN, no inline script; data:/blob: images are the generated PNGs and the uploads.
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; script-src 'self'; "
    "style-src 'self'; connect-src 'self'; object-src 'none'; base-uri 'none'; "
    "form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",  # revalidate, so an upgraded server never runs an old script
}


def _file(name: str) -> FileResponse:
    if name not in STATIC:
        raise ApiError(
            404, "not_found", f"no static file {name!r}; the playground serves {', '.join(STATIC)}"
        )
    return FileResponse(STATIC_DIR / name, media_type=STATIC[name], headers=HEADERS)


@router.get("/", include_in_schema=False)
async def index() -> FileResponse:
    """The playground page."""
    return _file("index.html")


@router.get("/ui/{name}", include_in_schema=False)
async def static_file(name: str) -> FileResponse:
    """The page's scripts, style sheet and icon (a fixed list: no paths, no directory listing)."""
    return _file(name)


@router.get("/v1/status", tags=["operations"])
async def status(runtime: RuntimeDep, _: Authorized) -> dict:
    """What the playground's status strip shows: readiness, model, device, queue, recent throughput, and the
    sampling defaults and limits the page's inputs start from. 200 in every state (``status`` says which)."""
    body: dict = {
        "status": runtime.status,
        "model": None,
        "device": None,
        "dtype": None,
        **runtime.metrics.load(),
    }
    if runtime.pipeline is not None and runtime.limits is not None:
        info = runtime.pipeline.info()
        body.update(model=info["name"], device=info["device"], dtype=info["dtype"], compute=info["compute"])
        lim = runtime.limits
        defaults = knob_values(runtime.pipeline.config.sampling)
        # What a request that leaves a knob out gets: the model's default lowered to the setting's cap, as
        # schemas.to_params lowers it. The page fills its inputs from these, and the model's own 12 steps
        # under DCAR_MAX_STEPS=8 made every Generate a 400 for a value the user never typed.
        defaults.update(lim.capped(defaults))
        body["defaults"] = {**defaults, "size": f"{lim.native[0]}x{lim.native[1]}"}
        body["limits"] = {
            "sizes": [f"{w}x{h}" for w, h in lim.sizes],
            "max_n": lim.max_n,
            "max_steps": lim.max_steps,
            "max_residual_steps": lim.max_residual_steps,
            "max_guidance_scale": lim.max_guidance_scale,
            "max_prompt_chars": lim.max_prompt_chars,
            "max_prompt_tokens": lim.max_prompt_tokens,
            "request_timeout_s": lim.request_timeout_s,
            # whether a request's priority is honoured, or refused unless 0 (fcfs)
            "scheduling_policy": lim.scheduling_policy,
            "min_priority": PRIORITY_MIN,
            "max_priority": PRIORITY_MAX,
        }
    if runtime.engine is not None:
        body["admission"] = runtime.engine.admission_state()
    return body
