"""``kodalle serve``'s web app: the routes of the page and its API around a
:class:`~kodalle_cli.serve.jobs.JobQueue`, and the loopback-only middleware. Handlers check
requests with :mod:`.checks` and leave the work to the queue."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from kodalle_cli.serve.checks import (
    MAX_CAPTION_CHARS,
    MAX_COND_SCALE,
    MAX_IMAGES,
    MAX_PROMPT_BYTES,
    MAX_PROMPT_PIXELS,
    MAX_SEED,
    MAX_TEMPERATURE,
    MAX_TOP_K,
    PROMPT_ID,
    PROMPT_TYPES,
    BadRequest,
    check_encode_request,
    check_image_name,
    check_job_request,
    check_picked_attributes,
    check_prompt_image,
    image_body,
    is_loopback,
    json_body,
    sample_defaults,
    shown,
)
from kodalle_cli.serve.jobs import MAX_WAITING, JobQueue

STATIC = Path(__file__).resolve().parent.parent / "static"
PAGE_FILES = {"index.html": "text/html; charset=utf-8",
              "app.js": "text/javascript; charset=utf-8",
              "style.css": "text/css; charset=utf-8"}


def create_app(jobs: JobQueue, *, loopback_only: bool = False) -> Starlette:
    """The ASGI app around a :class:`JobQueue` (started here if it is not yet).
    ``loopback_only``: answer only requests addressed to a loopback host name."""
    routes = [
        *(Route("/" if name == "index.html" else f"/{name}", _static(name))
          for name in PAGE_FILES),
        Route("/api/info", info),
        Route("/api/attributes", attributes),
        Route("/api/caption", caption, methods=["POST"]),
        Route("/api/encode", encode, methods=["POST"]),
        Route("/api/prompts", upload_prompt, methods=["POST"]),
        Route("/api/prompts/{name}", prompt_image),
        Route("/api/jobs", submit, methods=["POST"]),
        Route("/api/jobs/{job_id}", job_state, methods=["GET", "DELETE"]),
        Route("/api/jobs/{job_id}/events", events),
        Route("/api/jobs/{job_id}/grid.png", grid),
        Route("/api/jobs/{job_id}/prompt.png", job_prompt),
        Route("/api/jobs/{job_id}/images/{name}", image),
    ]
    middleware = [Middleware(LoopbackOnly)] if loopback_only else []
    app = Starlette(routes=routes, middleware=middleware,
                    exception_handlers={BadRequest: refused, HTTPException: http_error})
    app.state.jobs = jobs.start()
    app.state.defaults = sample_defaults()
    return app


def _jobs(request: Request) -> JobQueue:
    return request.app.state.jobs


# ---- the page --------------------------------------------------------------------------------
def _static(name: str):
    """The page's file ``name``, read once (at start-up)."""
    data = (STATIC / name).read_bytes()

    async def endpoint(request: Request) -> Response:
        return Response(data, media_type=PAGE_FILES[name], headers={
            "Cache-Control": "no-cache",
            "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; "
            "frame-ancestors 'none'"})
    return endpoint


# ---- the API ---------------------------------------------------------------------------------
async def info(request: Request) -> Response:
    jobs = _jobs(request)
    run = jobs.run
    return JSONResponse({
        "checkpoint": run.source, "reranker": jobs.reranker is not None,
        "text_seq_len": run.model.config.text_seq_len,
        "image_tokens": run.model.image_seq_len,
        "defaults": request.app.state.defaults,
        "limits": {"n": [1, MAX_IMAGES], "caption_chars": MAX_CAPTION_CHARS,
                   "seed": [0, MAX_SEED], "top_k": [0, MAX_TOP_K], "top_p": [0, 1],
                   "temperature": [0, MAX_TEMPERATURE], "cond_scale": [0, MAX_COND_SCALE],
                   "waiting": MAX_WAITING, "init_rows": [1, jobs.image_rows - 1],
                   "prompt_bytes": MAX_PROMPT_BYTES, "prompt_pixels": MAX_PROMPT_PIXELS,
                   "prompt_types": sorted(PROMPT_TYPES)},
        "image_rows": jobs.image_rows, "image_size": jobs.image_size,
        "queue": jobs.queue_info(),
    })


async def attributes(request: Request) -> Response:
    choices, reason = await run_in_threadpool(_jobs(request).attributes.choices)
    return JSONResponse({"attributes": choices, "reason": reason})


async def caption(request: Request) -> Response:
    picked = check_picked_attributes(await json_body(request))
    text = await run_in_threadpool(_jobs(request).attributes.caption, picked)
    return JSONResponse({"caption": text})


async def encode(request: Request) -> Response:
    text = check_encode_request(await json_body(request))
    return JSONResponse(await run_in_threadpool(_jobs(request).encode, text))


async def submit(request: Request) -> Response:
    jobs = _jobs(request)
    body = await json_body(request)
    job = jobs.submit(check_job_request(body, reranker=jobs.reranker is not None,
                                        image_rows=jobs.image_rows))
    return JSONResponse(jobs.snapshot(job), status_code=202,
                        headers={"Location": f"/api/jobs/{job.id}"})


async def upload_prompt(request: Request) -> Response:
    """An image prompt: the picture's bytes as the body (Content-Type image/png, image/jpeg
    or image/webp; a cross-site form cannot send those without a preflight either)."""
    jobs = _jobs(request)
    data = await image_body(request)
    image = await run_in_threadpool(check_prompt_image, data)
    made = await run_in_threadpool(jobs.add_prompt, image)
    return JSONResponse(made, status_code=201, headers={"Location": made["url"]})


async def prompt_image(request: Request) -> Response:
    name = request.path_params["name"]
    prompt_id = name.removesuffix(".png")
    if not name.endswith(".png") or not PROMPT_ID.fullmatch(prompt_id):
        raise BadRequest("image prompts are named by their id: /api/prompts/ID.png", 404)
    return _png(await run_in_threadpool(_jobs(request).prompt, prompt_id))


async def job_prompt(request: Request) -> Response:
    jobs = _jobs(request)
    return _png(jobs.prompt_of(jobs.get(request.path_params["job_id"])))


async def job_state(request: Request) -> Response:
    jobs = _jobs(request)
    job = jobs.get(request.path_params["job_id"])
    if request.method == "DELETE":
        jobs.cancel(job)
    return JSONResponse(jobs.snapshot(job))


async def events(request: Request) -> Response:
    jobs = _jobs(request)
    job = jobs.get(request.path_params["job_id"])

    async def stream():
        seen, quiet = None, 0.0
        while True:
            snap = jobs.snapshot(job)
            key = (snap["version"], snap["position"])
            if key != seen:
                seen, quiet = key, 0.0
                data = json.dumps(snap, ensure_ascii=False)
                yield f"event: job\ndata: {data}\n\n"
                if job.finished:
                    return
            elif quiet >= 15:
                quiet = 0.0
                yield ": still working\n\n"  # keeps proxies from closing the stream
            await asyncio.sleep(0.1)
            quiet += 0.1

    return StreamingResponse(stream(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})


async def image(request: Request) -> Response:
    jobs = _jobs(request)
    job = jobs.get(request.path_params["job_id"])
    index = check_image_name(request.path_params["name"], job.request["n"])
    name = f"kodalle-{job.seed}-{index:04d}.png"
    return _png(jobs.image(job, index), name if "download" in request.query_params else None)


async def grid(request: Request) -> Response:
    jobs = _jobs(request)
    job = jobs.get(request.path_params["job_id"])
    return _png(jobs.grid(job), f"kodalle-{job.seed}-grid.png"
                if "download" in request.query_params else None)


def _png(data: bytes, download: str | None = None) -> Response:
    headers = {"Cache-Control": "no-store"}
    if download:
        headers["Content-Disposition"] = f'attachment; filename="{download}"'
    return Response(data, media_type="image/png", headers=headers)


# ---- errors and the middleware ---------------------------------------------------------------
async def refused(request: Request, exc: BadRequest) -> Response:
    return JSONResponse({"error": str(exc)}, status_code=exc.status)


async def http_error(request: Request, exc: HTTPException) -> Response:
    message = {404: "no such page or endpoint", 405: "method not allowed here"}.get(
        exc.status_code, exc.detail)
    return JSONResponse({"error": message}, status_code=exc.status_code,
                        headers=getattr(exc, "headers", None))


class LoopbackOnly:
    """Refuse a request whose Host is not a loopback name: a web page elsewhere cannot
    reach a server on 127.0.0.1 by pointing its own domain there (DNS rebinding)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            host = Headers(scope=scope).get("host", "")
            name = (host[1:].partition("]")[0] if host.startswith("[")
                    else host.rpartition(":")[0] if host.count(":") == 1 else host)
            if not is_loopback(name):
                response = JSONResponse({"error": f"host {shown(host)} refused: this server "
                                         "answers only on 127.0.0.1 / localhost"}, 421)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
