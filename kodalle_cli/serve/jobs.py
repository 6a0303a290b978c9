"""``kodalle serve``'s job queue: :class:`JobQueue` holds the loaded model, the jobs and the
one worker thread that runs them in order through :func:`kodalle_cli.sample.sample`, so one
generation runs at a time while the server stays responsive. Each image is published as
soon as it is decoded; :meth:`JobQueue.snapshot` is what the page sees of a job."""

from __future__ import annotations

import dataclasses
import io
import math
import re
import sys
import threading
import time
import traceback
import uuid
from collections import OrderedDict, deque
from pathlib import Path

from kodalle_cli.configs import SampleConfig
from kodalle_cli.errors import ConfigError, KodalleError
from kodalle_cli.serve.checks import FIELDS, BadRequest, shown
from kodalle_cli.serve.picker import Attributes

MAX_WAITING = 16  # jobs waiting behind the running one
KEEP_JOBS = 200  # finished jobs remembered (their files stay on disk)
KEEP_PROMPTS = 100  # uploaded image prompts kept (OUT/prompts/ID.png; older ones deleted)
PROMPTS = "prompts"  # their folder under --out (job folders are 32 hex digits)
_JOB_ID = re.compile(r"[0-9a-f]{32}")


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
    logprobs: list[float] | None = None  # each image's mean code log-probability
    ranked_by: str | None = None  # "rerank" | "perplexity" once done, when ranked
    prompt_path: Path | None = None  # the image prompt (OUT/prompts/ID.png)
    prompt_tile: bytes | None = None  # ... as the grid shows it (PNG)
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


class JobQueue:
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
        self.prompts: OrderedDict[str, Path] = OrderedDict()  # uploaded image prompts
        self.running: Job | None = None
        self._waiting: deque[Job] = deque()
        self._lock = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

    # -- the queue --
    def start(self) -> JobQueue:
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

    @property
    def image_rows(self) -> int:
        """The model's rows (and columns) of image codes."""
        return self.run.model.config.image_fmap_size

    @property
    def image_size(self) -> int:
        """The pixels a side of the model's images (an image prompt is fitted to it)."""
        return self.image_rows * self.run.vqgan.downsample_factor

    def submit(self, request: dict) -> Job:
        from kodalle_cli.model.sampling import new_seed

        seed = request["seed"] if request["seed"] is not None else new_seed()
        job = Job(uuid.uuid4().hex, request, seed,
                  request["n"] * self.run.model.image_seq_len)
        if request["init_image"] is not None:
            job.prompt_path = self._prompt_path(request["init_image"])
            job.prompt_tile = self._prompt_tile(job.prompt_path, request["init_rows"])
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
            raise BadRequest(f"no job {shown(job_id)} (unknown, or finished long ago)", 404)
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

    # -- image prompts --
    def add_prompt(self, image) -> dict:
        """Keep an uploaded picture (decoded by :func:`~.checks.check_prompt_image`) as an
        image prompt: fitted to the model's image size as ``sample --init-image`` fits it
        (white padding), saved as ``OUT/prompts/ID.png``. Returns what the page shows."""
        from kodalle_cli.atomic import write_bytes_atomic
        from kodalle_cli.data.images import fit

        size = self.image_size
        if image.size != (size, size):
            image = fit(image, size, "pad")
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        prompt_id = uuid.uuid4().hex
        path = self.out / PROMPTS / f"{prompt_id}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(path, buffer.getvalue())
        with self._lock:
            self.prompts[prompt_id] = path
            while len(self.prompts) > KEEP_PROMPTS:
                _, old = self.prompts.popitem(last=False)
                old.unlink(missing_ok=True)
        return {"id": prompt_id, "url": f"/api/prompts/{prompt_id}.png", "size": size,
                "rows": self.image_rows, "default_rows": self.image_rows // 2}

    def _prompt_path(self, prompt_id: str) -> Path:
        with self._lock:
            path = self.prompts.get(prompt_id)
        if path is None or not path.is_file():
            raise BadRequest(f"image prompt {prompt_id} is not on the server (it keeps the "
                             f"last {KEEP_PROMPTS}, and none across restarts): upload the "
                             "picture again", 404)
        return path

    def prompt(self, prompt_id: str) -> bytes:
        """An uploaded image prompt as the model sees it (PNG)."""
        return self._read(self._prompt_path(prompt_id))

    def _prompt_tile(self, path: Path, rows: int) -> bytes:
        from PIL import Image

        from kodalle_cli.output import prompt_tile

        with Image.open(path) as image:
            tile = prompt_tile(image.convert("RGB"), rows * self.image_rows, self.image_rows)
        buffer = io.BytesIO()
        tile.save(buffer, format="PNG")
        return buffer.getvalue()

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
        reranker = self.reranker if r["rank"] is None else None  # rank: "perplexity"
        config = SampleConfig(
            captions=[r["caption"]] if r["caption"].strip() else [], n=r["n"],
            out=self.out / job.id, batch_size=self.batch_size, top_k=r["top_k"],
            top_p=r["top_p"], temperature=r["temperature"], cond_scale=r["cond_scale"],
            seed=job.seed, rerank=self.reranker_path if reranker is not None else None,
            rank=r["rank"], keep=r["keep"], init_image=job.prompt_path,
            init_rows=r["init_rows"], device=self.device, precision=self.precision,
            progress=False)

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
                               on_tokens=on_tokens, reranker=reranker)
        except _Cancelled:
            state = "cancelled"
        except ConfigError as exc:
            state, error = "error", f"{exc.name} {shown(exc.value)}: {exc.reason}"
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
                job.logprobs = result.metadata.get("mean_logprobs")
                job.ranked_by = result.metadata.get("ranked_by")
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
                elif job.ranked_by == "perplexity" and job.state == "done":
                    entry.update(rank=rank, perplexity=math.exp(-job.logprobs[i]))
                images.append(entry)
            r = job.request
            prompt = None if r["init_image"] is None else {
                "url": f"{base}/prompt.png", "rows": r["init_rows"], "of": self.image_rows}
            return {
                "id": job.id, "state": job.state, "position": position,
                "caption": r["caption"], "seed": job.seed,
                "settings": {k: r[k] for k in FIELDS if k not in ("caption", "seed")},
                "tokens_done": job.tokens_done, "tokens_total": job.tokens_total,
                "images_done": len(job.order) if job.state != "done" else r["n"],
                "images": images,
                "grid_url": f"{base}/grid.png" if job.state == "done" else None,
                "prompt": prompt, "ranked_by": job.ranked_by,
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

    def prompt_of(self, job: Job) -> bytes:
        """A job's image prompt as the grid shows it: the kept rows, the rest faded."""
        if job.prompt_tile is None:
            raise BadRequest("the job has no image prompt", 404)
        return job.prompt_tile

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
