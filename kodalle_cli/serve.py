"""``kodalle serve``: a local page to try a trained model. Caption in, images streamed back.

The model (and the reranker, when given) is loaded once. Requests never run the model
themselves: ``POST /api/jobs`` checks the request and puts a job in a queue; one worker
thread (:class:`Generator`) takes the jobs in order and runs
:func:`kodalle_cli.sample.sample` on each, so one generation runs at a time while the server
stays responsive. Each image is published as soon as it is decoded; the page follows a job
through server-sent events.

Endpoints (JSON unless said otherwise; every error is ``{"error": "..."}`` with a 4xx)::

    GET    /                                 the page (kodalle_cli/static/)
    GET    /api/info                         checkpoint, defaults, limits, reranker, queue
    GET    /api/attributes                   the run's attributes for the picker ([] if none)
    POST   /api/caption   {"attributes"}     a caption built from picked attributes
    POST   /api/encode    {"caption"}        token counts and the tokenizer's warnings
    POST   /api/jobs      {"caption", "n", "seed", "top_k", "top_p", "temperature",
                           "cond_scale", "keep"}      -> 202 {"id", ...}
    GET    /api/jobs/ID                      the job: state, queue position, progress, images
    DELETE /api/jobs/ID                      cancel it (waiting or running)
    GET    /api/jobs/ID/events               the job as server-sent events, until it ends
    GET    /api/jobs/ID/images/I.png         image I (generation order) of the job
    GET    /api/jobs/ID/grid.png             the grid, once the job is done

Safety: a request names files only by job id and image number, never by path; every file
a request reads or writes is under ``--out`` (``OUT/<job id>/<caption slug>/``, written by
:mod:`kodalle_cli.output`). The page's own files are read once at start-up. Bound to a
loopback address (the default), requests must name a loopback host (no DNS rebinding), and
POSTs must be ``application/json`` (a cross-site form cannot send that without a preflight,
which is never allowed).
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import ipaddress
import json
import math
import re
import socket
import sys
import threading
import time
import traceback
import uuid
from collections import OrderedDict, deque
from pathlib import Path

from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from kodalle_cli.configs import SampleConfig, ServeConfig
from kodalle_cli.errors import ConfigError, KodalleError, UsageError, warn

# ---- limits ----------------------------------------------------------------------------------
MAX_IMAGES = 64  # images per request
MAX_CAPTION_CHARS = 1000
MAX_SEED = 2**53 - 1  # the largest integer the page's JavaScript holds exactly
MAX_TOP_K = 1_000_000
MAX_TEMPERATURE = 10.0
MAX_COND_SCALE = 50.0
MAX_WAITING = 16  # jobs waiting behind the running one
MAX_BODY_BYTES = 64 * 1024
KEEP_JOBS = 200  # finished jobs remembered (their files stay on disk)

STATIC = Path(__file__).parent / "static"
PAGE_FILES = {"index.html": "text/html; charset=utf-8",
              "app.js": "text/javascript; charset=utf-8",
              "style.css": "text/css; charset=utf-8"}
_JOB_ID = re.compile(r"[0-9a-f]{32}")
_IMAGE_NAME = re.compile(r"(\d{1,4})\.png")
_FIELDS = ("caption", "n", "seed", "top_k", "top_p", "temperature", "cond_scale", "keep")


def sample_defaults() -> dict:
    """The CLI's defaults for what a request may set (:class:`SampleConfig`'s fields)."""
    fields = {f.name: f.default for f in dataclasses.fields(SampleConfig)}
    return {name: fields[name] for name in _FIELDS if name != "caption"}


class BadRequest(Exception):
    """A request the server refuses: its status and a message for the page."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


# ---- checking a request ----------------------------------------------------------------------
def _show(value) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 40 else text[:40] + "…"


def _whole(body: dict, name: str, lo: int, hi: int, *, optional: bool = False):
    value = body.get(name)
    if value is None and optional:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"{name} must be a whole number, not {_show(value)}")
    if not lo <= value <= hi:
        raise BadRequest(f"{name} {_show(value)} is out of range: give {lo} to {hi}")
    return value


def _number(body: dict, name: str, lo: float, hi: float, *, optional: bool = False):
    value = body.get(name)
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BadRequest(f"{name} must be a number, not {_show(value)}")
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not (math.isfinite(number) and lo <= number <= hi):
        raise BadRequest(f"{name} {_show(value)} is out of range: give {lo:g} to {hi:g}")
    return number


def check_caption(value, *, allow_empty: bool = False) -> str:
    """The caption as text of at most :data:`MAX_CAPTION_CHARS` characters."""
    if not isinstance(value, str):
        raise BadRequest(f"caption must be text, not {_show(value)}")
    if len(value) > MAX_CAPTION_CHARS:
        raise BadRequest(f"the caption is {len(value)} characters: at most "
                         f"{MAX_CAPTION_CHARS} are allowed")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise BadRequest("the caption holds characters that are not text (lone surrogates)") \
            from None
    if not allow_empty and not value.strip():
        raise BadRequest("the caption is empty: type what to draw")
    return value


def check_job_request(body, *, reranker: bool) -> dict:
    """A job request's fields with the CLI's defaults filled in, or :class:`BadRequest`."""
    if not isinstance(body, dict):
        raise BadRequest("send a JSON object such as {\"caption\": \"...\", \"n\": 4}")
    unknown = sorted(set(body) - set(_FIELDS))
    if unknown:
        raise BadRequest(f"unknown field {_show(unknown[0])}: the fields are "
                         f"{', '.join(_FIELDS)}")
    if "caption" not in body:
        raise BadRequest("caption is missing: type what to draw")
    given = {**sample_defaults(), **body}  # a field sent as null: none (seed: a random one)
    out = {"caption": check_caption(body["caption"])}
    out["n"] = _whole(given, "n", 1, MAX_IMAGES)
    out["seed"] = _whole(given, "seed", 0, MAX_SEED, optional=True)
    out["top_k"] = _number(given, "top_k", 0, MAX_TOP_K, optional=True)
    out["top_p"] = _number(given, "top_p", 0, 1, optional=True)
    out["temperature"] = _number(given, "temperature", 0, MAX_TEMPERATURE)
    out["cond_scale"] = _number(given, "cond_scale", 0, MAX_COND_SCALE)
    out["keep"] = _whole(given, "keep", 1, out["n"], optional=True)
    if out["keep"] is not None and not reranker:
        raise BadRequest("keep needs a reranker: start the server with --reranker DIR")
    try:  # the library's own checks (top-k a count or a fraction, top-p in (0, 1], ...)
        SampleConfig(captions=[out["caption"]], out=None, rerank=None, **{
            k: v for k, v in out.items() if k not in ("caption", "keep")}).validate()
    except ConfigError as exc:
        raise BadRequest(f"{exc.name} {_show(exc.value)}: {exc.reason}") from None
    except UsageError as exc:
        raise BadRequest(str(exc)) from None
    return out


# ---- jobs and the worker ---------------------------------------------------------------------
class _Cancelled(Exception):
    pass


@dataclasses.dataclass
class Job:
    """One request's generation: what was asked, where it stands, what it made."""

    id: str
    request: dict
    seed: int
    tokens_total: int
    state: str = "queued"  # queued | running | done | error | cancelled
    tokens_done: int = 0
    live: dict[int, bytes] = dataclasses.field(default_factory=dict)  # PNGs while running
    order: list[int] = dataclasses.field(default_factory=list)  # image indices as finished
    files: dict[int, str] = dataclasses.field(default_factory=dict)  # when done: index -> file
    scores: list[float] | None = None
    directory: Path | None = None
    warnings: list[str] = dataclasses.field(default_factory=list)
    error: str | None = None
    created: float = dataclasses.field(default_factory=time.time)
    seconds: float | None = None
    version: int = 0
    cancel: threading.Event = dataclasses.field(default_factory=threading.Event)

    @property
    def finished(self) -> bool:
        return self.state in ("done", "error", "cancelled")


class Generator:
    """The loaded model, the queue of jobs and the one thread that runs them."""

    def __init__(self, run, out: str | Path, *, reranker=None, reranker_path=None,
                 run_dir: str | Path | None = None, batch_size: int = 4,
                 device: str = "auto", precision: str = "auto"):
        self.run = run.ready_to_sample()
        self.run = dataclasses.replace(self.run, caption_encoder=_LockedEncoder(
            self.run.caption_encoder))
        self.out = Path(out)
        self.reranker = reranker
        self.reranker_path = Path(reranker_path) if reranker_path is not None else None
        if reranker is not None and self.reranker_path is None:
            self.reranker_path = Path("reranker")  # recorded in metadata.json only
        self.attributes = Attributes(Path(run_dir) if run_dir is not None else None)
        self.batch_size, self.device, self.precision = batch_size, device, precision
        self.jobs: OrderedDict[str, Job] = OrderedDict()
        self.running: Job | None = None
        self._waiting: deque[Job] = deque()
        self._lock = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

    # -- the queue --
    def start(self) -> Generator:
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="kodalle-serve-worker",
                                            daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        with self._lock:
            self._stopping = True
            for job in [*self._waiting, *([self.running] if self.running else [])]:
                job.cancel.set()
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, request: dict) -> Job:
        from kodalle_cli.model.sampling import new_seed

        seed = request["seed"] if request["seed"] is not None else new_seed()
        job = Job(uuid.uuid4().hex, request, seed,
                  request["n"] * self.run.model.image_seq_len)
        with self._lock:
            if len(self._waiting) >= MAX_WAITING:
                raise BadRequest(f"the queue is full ({MAX_WAITING} requests waiting): try "
                                 "again when one has finished", 429)
            self.jobs[job.id] = job
            self._waiting.append(job)
            self._forget_old()
            self._lock.notify_all()
        return job

    def get(self, job_id: str) -> Job:
        job = self.jobs.get(job_id) if _JOB_ID.fullmatch(job_id) else None
        if job is None:
            raise BadRequest(f"no job {_show(job_id)} (unknown, or finished long ago)", 404)
        return job

    def position(self, job: Job) -> int | None:
        """1 for the next job to run, 2 for the one after it ...; None unless waiting."""
        with self._lock:
            for i, waiting in enumerate(self._waiting, 1):
                if waiting is job:
                    return i
        return None

    def cancel(self, job: Job) -> None:
        with self._lock:
            job.cancel.set()
            if job in self._waiting:
                self._waiting.remove(job)
                job.state = "cancelled"
                job.version += 1
            self._lock.notify_all()

    def queue_info(self) -> dict:
        with self._lock:
            return {"running": self.running is not None, "waiting": len(self._waiting)}

    def _forget_old(self) -> None:
        finished = [j for j in self.jobs.values() if j.finished]
        for job in finished[: max(0, len(finished) - KEEP_JOBS)]:
            del self.jobs[job.id]

    # -- the worker thread --
    def _work(self) -> None:
        while True:
            with self._lock:
                while not self._waiting and not self._stopping:
                    self._lock.wait()
                if self._stopping:
                    return
                job = self._waiting.popleft()
                self.running = job
                job.state = "running"
                job.version += 1
                self._lock.notify_all()  # positions of the others moved
            try:
                self._generate(job)
            finally:
                with self._lock:
                    self.running = None
                    self._lock.notify_all()

    def _generate(self, job: Job) -> None:
        from kodalle_cli.sample import sample

        r = job.request
        config = SampleConfig(
            captions=[r["caption"]], n=r["n"], out=self.out / job.id,
            batch_size=self.batch_size, top_k=r["top_k"], top_p=r["top_p"],
            temperature=r["temperature"], cond_scale=r["cond_scale"], seed=job.seed,
            rerank=self.reranker_path if self.reranker is not None else None, keep=r["keep"],
            device=self.device, precision=self.precision, progress=False)

        def on_image(caption_index: int, image_index: int, image) -> None:
            if job.cancel.is_set():
                raise _Cancelled
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            with self._lock:
                job.live[image_index] = buffer.getvalue()
                job.order.append(image_index)
                job.version += 1

        def on_tokens(k: int) -> None:
            if job.cancel.is_set():
                raise _Cancelled
            with self._lock:
                job.tokens_done = min(job.tokens_total, job.tokens_done + k)
                job.version += 1

        def on_warning(message: str) -> None:
            with self._lock:
                job.warnings.append(message)
                job.version += 1

        started = time.perf_counter()
        state, error, result = "done", None, None
        try:
            (result,) = sample(config, self.run, warn=on_warning, on_image=on_image,
                               on_tokens=on_tokens, reranker=self.reranker)
        except _Cancelled:
            state = "cancelled"
        except ConfigError as exc:
            state, error = "error", f"{exc.name} {_show(exc.value)}: {exc.reason}"
        except KodalleError as exc:
            state, error = "error", str(exc)
        except Exception as exc:  # a bug: the page says so, the terminal has the traceback
            traceback.print_exc(file=sys.stderr)
            state, error = "error", f"generation failed ({type(exc).__name__}: {exc})"
        with self._lock:
            if result is not None:
                job.directory = result.directory
                job.files = {img["image_index"]: img["file"]
                             for img in result.metadata["images"]}
                job.order = [img["image_index"] for img in result.metadata["images"]]
                job.scores = result.metadata.get("rerank_scores")
            job.live = {}
            job.state, job.error = state, error
            job.seconds = round(time.perf_counter() - started, 3)
            job.version += 1

    # -- what the page sees --
    def snapshot(self, job: Job) -> dict:
        position = self.position(job)
        with self._lock:
            base = f"/api/jobs/{job.id}"
            images = []
            for rank, i in enumerate(job.order):
                entry = {"index": i, "url": f"{base}/images/{i}.png",
                         "name": f"kodalle-{job.seed}-{i:04d}.png"}
                if job.scores is not None and job.state == "done":
                    entry.update(rank=rank, score=job.scores[i])
                images.append(entry)
            r = job.request
            return {
                "id": job.id, "state": job.state, "position": position,
                "caption": r["caption"], "seed": job.seed,
                "settings": {k: r[k] for k in _FIELDS if k not in ("caption", "seed")},
                "tokens_done": job.tokens_done, "tokens_total": job.tokens_total,
                "images_done": len(job.order) if job.state != "done" else r["n"],
                "images": images,
                "grid_url": f"{base}/grid.png" if job.state == "done" else None,
                "grid_name": f"kodalle-{job.seed}-grid.png",
                "folder": (str(job.directory.relative_to(self.out))
                           if job.directory is not None else None),
                "warnings": list(job.warnings), "error": job.error, "seconds": job.seconds,
                "version": job.version,
            }

    def image(self, job: Job, index: int) -> bytes:
        with self._lock:
            if index in job.live:
                return job.live[index]
            name = job.files.get(index)
            directory = job.directory
        if job.state == "done" and name is None:
            raise BadRequest(f"image {index} was not kept (the job kept {len(job.files)} of "
                             f"{job.request['n']}, best first)", 404)
        if name is None or directory is None:
            raise BadRequest(f"image {index} is not ready (the job has "
                             f"{job.request['n']} images: 0 to {job.request['n'] - 1})", 404)
        return self._read(directory / name)

    def grid(self, job: Job) -> bytes:
        if job.state != "done" or job.directory is None:
            raise BadRequest(f"the job is {job.state}: the grid exists once it is done", 409)
        return self._read(job.directory / "grid.png")

    def _read(self, path: Path) -> bytes:
        """A file of a job's folder; never anything outside ``out``."""
        resolved, root = path.resolve(), self.out.resolve()
        if not resolved.is_relative_to(root):
            raise BadRequest("not found", 404)
        try:
            return resolved.read_bytes()
        except OSError:
            raise BadRequest("the file is gone from the output folder", 404) from None

    # -- captions --
    def encode(self, caption: str) -> dict:
        encoder = self.run.caption_encoder
        if not caption.strip():
            return {"caption": caption, "tokens": 0, "full_length": 0, "unknown": 0,
                    "text_seq_len": encoder.text_seq_len, "warnings": []}
        enc = encoder.encode(caption)
        return {"caption": enc.caption, "tokens": enc.num_tokens,
                "full_length": enc.full_length, "unknown": enc.unknown_tokens,
                "text_seq_len": encoder.text_seq_len, "warnings": enc.warnings}


class _LockedEncoder:
    """The run's caption encoder, used by the worker and by the page's warnings at once:
    a fast tokenizer must not be entered from two threads."""

    def __init__(self, encoder):
        self._encoder = encoder
        self._lock = threading.Lock()

    def encode(self, caption: str):
        with self._lock:
            return self._encoder.encode(caption)

    def encode_batch(self, captions):
        with self._lock:
            return self._encoder.encode_batch(captions)

    def encode_with_mask(self, captions):
        with self._lock:
            return self._encoder.encode_with_mask(captions)

    def __getattr__(self, name):
        return getattr(self._encoder, name)


# ---- attributes (from kodalle_cli.attributes, when that module exists) -----------------------
class Attributes:
    """The run's attribute record (:func:`kodalle_cli.attributes.run_attributes`), read once,
    as the picker's choices; and captions built from picked values. Without that module, or
    for a run not trained on K-Fashion shards, there are no choices and the page shows only
    the caption box."""

    def __init__(self, run_dir: Path | None):
        self.run_dir = run_dir
        self._lock = threading.Lock()
        self._read = False
        self.record: dict | None = None
        self.reason: str | None = None

    def _load(self) -> None:
        with self._lock:
            if self._read:
                return
            self._read = True
            if self.run_dir is None:
                self.reason = "the checkpoint is not in a run directory"
                return
            try:
                from kodalle_cli.attributes import run_attributes
            except ImportError:
                self.reason = "this build has no attribute captions"
                return
            try:
                self.record = run_attributes(self.run_dir)
            except KodalleError as exc:
                self.reason = str(exc)
            except Exception as exc:  # the picker is optional: the page works without it
                self.reason = f"the run's attributes could not be read ({type(exc).__name__})"

    def choices(self) -> tuple[list[dict], str | None]:
        """``[{"key": "상의.색상", "part", "name", "values": [{"value", "count"}]}]`` in the
        training captions' order (values most frequent first), and why there are none."""
        self._load()
        if self.record is None:
            return [], self.reason
        rows = [{"key": f"{part}.{name}", "part": part, "name": name,
                 "values": [{"value": v, "count": c} for v, c in values.items()]}
                for part, info in self.record.get("parts", {}).items()
                for name, values in info.get("attributes", {}).items()]
        return rows, None if rows else "the run's training captions hold no attributes"

    def caption(self, picked: dict[str, str]) -> str:
        """The caption for ``{"part.name": value}``, built as the run's captions were."""
        self._load()
        if self.record is None:
            raise BadRequest(f"no attribute captions here: {self.reason}", 404)
        from kodalle_cli.attributes import attribute_caption

        try:
            return attribute_caption(self.record, [f"{k}={v}" for k, v in picked.items()])
        except KodalleError as exc:
            raise BadRequest(str(exc).removeprefix("--attr ")) from None


# ---- the web app -----------------------------------------------------------------------------
async def _json_body(request: Request):
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/json":
        raise BadRequest("send the request as JSON (Content-Type: application/json)", 415)
    size = request.headers.get("content-length")
    if size is not None and (not size.isdigit() or int(size) > MAX_BODY_BYTES):
        raise BadRequest(f"the request is larger than {MAX_BODY_BYTES} bytes", 413)
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise BadRequest(f"the request is larger than {MAX_BODY_BYTES} bytes", 413)

    def constant(name):
        raise ValueError(f"{name} is not a number JSON allows")

    try:
        return json.loads(body.decode("utf-8"), parse_constant=constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise BadRequest(f"the request is not valid JSON ({str(exc)[:80]})") from None


def _png(data: bytes, download: str | None = None) -> Response:
    headers = {"Cache-Control": "no-store"}
    if download:
        headers["Content-Disposition"] = f'attachment; filename="{download}"'
    return Response(data, media_type="image/png", headers=headers)


class _LoopbackOnly:
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
                response = JSONResponse({"error": f"host {_show(host)} refused: this server "
                                         "answers only on 127.0.0.1 / localhost"}, 421)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(generator: Generator, *, loopback_only: bool = False) -> Starlette:
    """The ASGI app around a :class:`Generator` (started here if it is not yet).
    ``loopback_only``: answer only requests addressed to a loopback host name."""
    page = {name: (STATIC / name).read_bytes() for name in PAGE_FILES}
    defaults = sample_defaults()
    generator.start()

    def static(name: str):
        async def endpoint(request: Request) -> Response:
            return Response(page[name], media_type=PAGE_FILES[name], headers={
                "Cache-Control": "no-cache",
                "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; "
                "frame-ancestors 'none'"})
        return endpoint

    async def info(request: Request) -> Response:
        run = generator.run
        return JSONResponse({
            "checkpoint": run.source, "reranker": generator.reranker is not None,
            "text_seq_len": run.model.config.text_seq_len,
            "image_tokens": run.model.image_seq_len,
            "defaults": defaults,
            "limits": {"n": [1, MAX_IMAGES], "caption_chars": MAX_CAPTION_CHARS,
                       "seed": [0, MAX_SEED], "top_k": [0, MAX_TOP_K], "top_p": [0, 1],
                       "temperature": [0, MAX_TEMPERATURE], "cond_scale": [0, MAX_COND_SCALE],
                       "waiting": MAX_WAITING},
            "queue": generator.queue_info(),
        })

    async def attributes(request: Request) -> Response:
        from starlette.concurrency import run_in_threadpool

        choices, reason = await run_in_threadpool(generator.attributes.choices)
        return JSONResponse({"attributes": choices, "reason": reason})

    async def caption(request: Request) -> Response:
        from starlette.concurrency import run_in_threadpool

        body = await _json_body(request)
        picked = body.get("attributes") if isinstance(body, dict) else None
        if not isinstance(picked, dict) or not picked or not all(
                isinstance(k, str) and isinstance(v, str) and len(k) + len(v) < 200
                for k, v in picked.items()) or len(picked) > 100:
            raise BadRequest('send {"attributes": {"part.name": "value", ...}}')
        text = await run_in_threadpool(generator.attributes.caption, picked)
        return JSONResponse({"caption": text})

    async def encode(request: Request) -> Response:
        from starlette.concurrency import run_in_threadpool

        body = await _json_body(request)
        if not isinstance(body, dict) or "caption" not in body:
            raise BadRequest('send {"caption": "..."}')
        text = check_caption(body["caption"], allow_empty=True)
        return JSONResponse(await run_in_threadpool(generator.encode, text))

    async def submit(request: Request) -> Response:
        body = await _json_body(request)
        job = generator.submit(check_job_request(body, reranker=generator.reranker
                                                 is not None))
        return JSONResponse(generator.snapshot(job), status_code=202,
                            headers={"Location": f"/api/jobs/{job.id}"})

    async def job_state(request: Request) -> Response:
        job = generator.get(request.path_params["job_id"])
        if request.method == "DELETE":
            generator.cancel(job)
        return JSONResponse(generator.snapshot(job))

    async def events(request: Request) -> Response:
        job = generator.get(request.path_params["job_id"])

        async def stream():
            seen, quiet = None, 0.0
            while True:
                snap = generator.snapshot(job)
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
                                 headers={"Cache-Control": "no-store",
                                          "X-Accel-Buffering": "no"})

    async def image(request: Request) -> Response:
        job = generator.get(request.path_params["job_id"])
        match = _IMAGE_NAME.fullmatch(request.path_params["name"])
        if match is None:
            raise BadRequest("images are named by their number: .../images/0.png", 404)
        index = int(match.group(1))
        if index >= job.request["n"]:
            raise BadRequest(f"the job has {job.request['n']} images: 0 to "
                             f"{job.request['n'] - 1}", 404)
        data = generator.image(job, index)
        name = f"kodalle-{job.seed}-{index:04d}.png"
        return _png(data, name if "download" in request.query_params else None)

    async def grid(request: Request) -> Response:
        job = generator.get(request.path_params["job_id"])
        return _png(generator.grid(job), f"kodalle-{job.seed}-grid.png"
                    if "download" in request.query_params else None)

    async def refused(request: Request, exc: BadRequest) -> Response:
        return JSONResponse({"error": str(exc)}, status_code=exc.status)

    async def http_error(request: Request, exc: HTTPException) -> Response:
        message = {404: "no such page or endpoint", 405: "method not allowed here"}.get(
            exc.status_code, exc.detail)
        return JSONResponse({"error": message}, status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    routes = [
        Route("/", static("index.html")),
        Route("/app.js", static("app.js")),
        Route("/style.css", static("style.css")),
        Route("/api/info", info),
        Route("/api/attributes", attributes),
        Route("/api/caption", caption, methods=["POST"]),
        Route("/api/encode", encode, methods=["POST"]),
        Route("/api/jobs", submit, methods=["POST"]),
        Route("/api/jobs/{job_id}", job_state, methods=["GET", "DELETE"]),
        Route("/api/jobs/{job_id}/events", events),
        Route("/api/jobs/{job_id}/grid.png", grid),
        Route("/api/jobs/{job_id}/images/{name}", image),
    ]
    middleware = [Middleware(_LoopbackOnly)] if loopback_only else []
    return Starlette(routes=routes, middleware=middleware,
                     exception_handlers={BadRequest: refused, HTTPException: http_error})


# ---- the command -----------------------------------------------------------------------------
def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def listen(host: str, port: int) -> socket.socket:
    """A listening socket, or one line saying why not (taken port, unknown address)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, kind, proto, _, address = infos[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(64)
    except OSError as exc:
        raise KodalleError(f"cannot listen on {host}:{port}: {exc.strerror or exc}"
                           + (f" (is another server using the port? try --port {port + 1})"
                              if getattr(exc, "errno", None) == 98 else "")) from None
    sock.setblocking(False)
    return sock


def serve(config: ServeConfig) -> None:
    """``kodalle serve``: load the run once, then serve the page until Ctrl+C."""
    import uvicorn

    from kodalle_cli.device import pick_device, pick_dtype
    from kodalle_cli.runs import load_run, resolve

    device = pick_device(config.device)  # a wrong --device or --precision: before loading
    pick_dtype(config.precision, device)
    sock = listen(config.host, config.port)  # a taken port: said before the model loads
    if not is_loopback(config.host):
        warn(f"--host {config.host}: the page is served to every machine that can reach "
             "this one, with no password; anyone there can run the model and see every "
             "image it makes (the default, 127.0.0.1, keeps it to this machine)")
    generator = None
    try:
        run = load_run(config.checkpoint, "cpu", runs_dir=config.runs_dir,
                       backbone=config.backbone, vqgan=config.vqgan).ready_to_sample()
        reranker = None
        if config.reranker is not None:
            from kodalle_cli.rerank.rank import load_reranker

            reranker = load_reranker(config.reranker, device=device)
        try:
            run_dir = resolve(run.source).run
        except KodalleError:
            run_dir = None
        generator = Generator(run, config.out, reranker=reranker,
                              reranker_path=config.reranker, run_dir=run_dir,
                              batch_size=config.batch_size, device=config.device,
                              precision=config.precision)
        app = create_app(generator, loopback_only=is_loopback(config.host))
        port = sock.getsockname()[1]
        shown = f"[{config.host}]" if ":" in config.host else config.host
        print(f"kodalle serve: {run.source} at http://{shown}:{port}/ (images under "
              f"{config.out}/; Ctrl+C stops)", flush=True)
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning",
                                               timeout_graceful_shutdown=2))
        server.run(sockets=[sock])
    finally:
        if generator is not None:
            generator.stop()
        sock.close()
