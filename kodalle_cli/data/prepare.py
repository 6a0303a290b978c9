"""``kodalle prepare``: a source of images and captions/labels -> WebDataset image shards.

Reader (:mod:`~kodalle_cli.data.sources`), per-sample work (:func:`make_sample`: label ->
caption, image -> crop/resize/JPEG) and writer (:mod:`~kodalle_cli.data.shards`) are separate
pieces, as in img2dataset. The candidates are sorted by key, split into train/val by a hash
of the key and cut into shards of ``shard_size``; each shard is one task for a worker process.
Shards that are complete from an earlier run with the same options and inputs are skipped, so
an interrupted run resumes, and the same inputs always give byte-identical shards.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import queue
import re
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

from kodalle_cli.configs import PrepareConfig
from kodalle_cli.data.captions import caption_from_label
from kodalle_cli.data.images import ImageError, encode_jpeg, preprocess
from kodalle_cli.data.kfashion import LabelError, label_boxes, labeling, read_label
from kodalle_cli.data.shards import (
    ShardWriter,
    is_complete,
    remove_stale_temporaries,
    shard_name,
    stats_path,
    write_json_atomic,
)
from kodalle_cli.data.sources import Candidate, Skip, scan
from kodalle_cli.errors import KodalleError, UsageError

PARALLEL_SCAN_MIN = 2000  # labels read by the worker processes from this many on
class SampleError(Exception):
    """One sample cannot be used; ``reason`` goes to the manifest."""

    def __init__(self, source: str, reason: str):
        super().__init__(f"{source}: {reason}")
        self.source, self.reason = source, reason


def split_of(key: str, val_fraction: float) -> str:
    """``val`` for a stable ``val_fraction`` share of keys (a hash of the key), else ``train``."""
    if val_fraction <= 0:
        return "train"
    h = int.from_bytes(hashlib.sha1(key.encode("utf-8")).digest()[:8], "big")
    return "val" if h / 2**64 < val_fraction else "train"


# ---- one sample ------------------------------------------------------------------------------
def make_sample(c: Candidate, cfg: PrepareConfig) -> tuple[bytes, str, dict]:
    """(JPEG bytes, caption, metadata) for one candidate; raises SampleError with the reason."""
    root = Path(cfg.source)
    root = root.parent if root.is_file() else root
    labels = None
    boxes, space = None, None
    label_source = None
    if c.label is not None:
        label_source = Path(os.path.relpath(c.label, root)).as_posix()
        try:
            label = read_label(c.label)
        except LabelError as exc:
            raise SampleError(label_source, str(exc)) from None
        try:
            caption = caption_from_label(label, cfg.caption_style, cfg.include_style)
            labels = labeling(label)
        except (KeyError, TypeError, AttributeError):
            raise SampleError(
                label_source, "label lacks 데이터셋 정보.데이터셋 상세설명.라벨링"
            ) from None
        if cfg.crop == "garments":
            try:
                boxes, space = label_boxes(label)
            except (KeyError, TypeError, AttributeError):
                raise SampleError(label_source, "label lacks 렉트좌표 (rectangles)") from None
            except LabelError as exc:
                raise SampleError(label_source, str(exc)) from None
            if not boxes:
                raise SampleError(label_source, "degenerate crop box: label has no rectangles")
    else:
        caption = c.caption or ""
    caption = " ".join(caption.split())
    if not caption:
        raise SampleError(label_source or c.source, "caption is empty")
    try:
        prepared = preprocess(
            c.image, cfg.image_size, resize=cfg.resize, boxes=boxes, box_space=space,
            margin=cfg.crop_margin, max_pixels=cfg.max_pixels,
        )
    except ImageError as exc:
        raise SampleError(c.source, str(exc)) from None
    meta = {
        "key": c.key,
        "source": c.source,
        "label": label_source,
        "original_size": list(prepared.original_size),
        "crop_box": list(prepared.crop) if prepared.crop else None,
        "labels": labels,
    }
    return encode_jpeg(prepared.image), caption, meta


# ---- one shard -------------------------------------------------------------------------------
@dataclass
class ShardTask:
    split: str
    index: int
    candidates: list[Candidate]

    @property
    def name(self) -> str:
        return shard_name(self.split, self.index)

    def keys_hash(self) -> str:
        h = hashlib.sha1()
        for c in self.candidates:
            h.update(f"{c.key}\0{c.image}\0{c.label}\0{c.caption}\n".encode())
        return h.hexdigest()[:16]


_QUEUE = None  # progress queue in worker processes


def _init_worker(q) -> None:
    global _QUEUE
    _QUEUE = q


def build_shard(task: ShardTask, cfg: PrepareConfig, report: Callable[[int, int], None]) -> dict:
    """Write one shard (atomically) and its stats; returns the stats."""
    start = time.perf_counter()
    path = Path(cfg.out) / task.name
    writer = ShardWriter(path)
    skipped: list[dict] = []
    try:
        for c in task.candidates:
            try:
                jpg, caption, meta = make_sample(c, cfg)
            except SampleError as exc:
                if cfg.strict:
                    raise KodalleError(f"{exc.source}: {exc.reason} (--strict)") from None
                skipped.append({"source": exc.source, "reason": exc.reason})
                report(0, 1)
                continue
            writer.write(c.key, jpg, caption, meta)
            report(1, 0)
    except BaseException:
        writer.abort()
        raise
    stats = {
        "shard": task.name,
        "split": task.split,
        "candidates": len(task.candidates),
        "samples": writer.count,
        "skipped": skipped,
        "options": cfg.fingerprint(),
        "inputs": task.keys_hash(),
        "seconds": round(time.perf_counter() - start, 3),
    }
    writer.commit(stats)
    return stats


def _worker_task(args: tuple[ShardTask, PrepareConfig]) -> dict:
    task, cfg = args
    pending = [0, 0, time.monotonic()]

    def report(ok: int, bad: int) -> None:
        pending[0] += ok
        pending[1] += bad
        if time.monotonic() - pending[2] > 0.25:
            _QUEUE.put((pending[0], pending[1]))
            pending[0] = pending[1] = 0
            pending[2] = time.monotonic()

    stats = build_shard(task, cfg, report)
    _QUEUE.put((pending[0], pending[1]))
    return stats


# ---- the run ---------------------------------------------------------------------------------
def plan_shards(cands: list[Candidate], cfg: PrepareConfig) -> list[ShardTask]:
    tasks = []
    for split in ("train", "val"):
        members = [c for c in cands if split_of(c.key, cfg.val_fraction) == split]
        for i in range(0, len(members), cfg.shard_size):
            tasks.append(ShardTask(split, i // cfg.shard_size, members[i : i + cfg.shard_size]))
    return tasks


def _reusable(task: ShardTask, cfg: PrepareConfig) -> dict | None:
    path = Path(cfg.out) / task.name
    if not is_complete(path):
        return None
    try:
        stats = json.loads(stats_path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if stats.get("options") != cfg.fingerprint():
        raise KodalleError(
            f"{cfg.out} holds shards written with other options; remove them or use another --out"
        )
    return stats if stats.get("inputs") == task.keys_hash() else None


def _remove_extra_shards(out: Path, tasks: list[ShardTask]) -> None:
    """Shards left from an earlier, larger run of this command (they would be read as data)."""
    wanted = {t.name for t in tasks}
    for tar in out.glob("*-*.tar"):
        if re.fullmatch(r"(train|val)-\d{6}\.tar", tar.name) and tar.name not in wanted:
            if stats_path(tar).is_file():
                tar.unlink()
                stats_path(tar).unlink()


def reason_kind(reason: str) -> str:
    """The reason without its specifics: ``unreadable image: ...`` -> ``unreadable image``."""
    return reason.split(":", 1)[0]


def _progress(enabled: bool, total: int):
    from rich.progress import ProgressColumn
    from rich.text import Text

    from kodalle_cli.progress import progress_bar

    class Speed(ProgressColumn):
        def render(self, task):
            speed = task.finished_speed or task.speed
            return Text("  -   img/s" if speed is None else f"{speed:6.1f} img/s")

    return progress_bar(Speed(), "{task.fields[skipped]} skipped", title="[bold]prepare",
                        enabled=enabled)


class _Workers:
    """A spawn-safe process pool, started on first use; a crashed worker fails the run
    (BrokenProcessPool) instead of hanging it."""

    def __init__(self, n: int):
        self.n = n
        self.executor: ProcessPoolExecutor | None = None
        self.queue = None

    def get(self, n: int | None = None) -> ProcessPoolExecutor:
        if self.executor is None:
            ctx = mp.get_context("spawn")
            self.queue = ctx.Queue()
            self.executor = ProcessPoolExecutor(
                max_workers=min(self.n, n or self.n), mp_context=ctx,
                initializer=_init_worker, initargs=(self.queue,),
            )
        return self.executor

    def reports(self, timeout: float = 0.0) -> list[tuple[int, int]]:
        out = []
        while self.queue is not None:
            try:
                out.append(self.queue.get(timeout=timeout) if timeout else self.queue.get_nowait())
            except queue.Empty:
                break
        return out

    def close(self, kill: bool = False) -> None:
        if self.executor is None:
            return
        if kill:  # stop the shards in flight now (their temporary files are removed)
            for proc in list((getattr(self.executor, "_processes", None) or {}).values()):
                proc.terminate()
        self.executor.shutdown(wait=True, cancel_futures=kill)
        self.executor = None


def prepare(cfg: PrepareConfig) -> dict:
    """Write the shards for ``cfg`` and ``manifest.json``; returns the manifest."""
    cfg.validate()
    cfg.source = Path(cfg.source)
    cfg.out = Path(cfg.out)
    workers = _Workers(cfg.workers or os.cpu_count() or 1)
    try:
        def map_fn(fn, items):
            items = list(items)
            if workers.n <= 1 or len(items) < PARALLEL_SCAN_MIN:
                return map(fn, items)
            return workers.get().map(fn, items, chunksize=256)

        fmt, cands, scan_skips = scan(
            cfg.source, cfg.format, cfg.caption_pick, map_fn, exclude=cfg.out
        )
        if not cands and not scan_skips:
            raise KodalleError(f"no images found in {cfg.source}")
        if cfg.strict and scan_skips:
            s = scan_skips[0]
            raise KodalleError(f"{s.source}: {s.reason} (--strict)")
        if cfg.crop == "garments" and fmt != "kfashion":
            raise UsageError("--crop garments needs K-Fashion labels (--format kfashion)")
        cfg.out.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(cfg.out)
        tasks = plan_shards(cands, cfg)
        _remove_extra_shards(cfg.out, tasks)
        done: dict[str, dict] = {}
        todo = []
        for t in tasks:
            stats = _reusable(t, cfg)
            if stats is None:
                todo.append(t)
            else:
                done[t.name] = stats

        with _progress(cfg.progress, len(cands)) as progress:
            skipped_n = len(scan_skips) + sum(len(s["skipped"]) for s in done.values())
            bar = progress.add_task("prepare", total=len(cands), skipped=skipped_n)
            progress.update(bar, completed=sum(s["candidates"] for s in done.values()))

            def report(ok: int, bad: int) -> None:
                nonlocal skipped_n
                skipped_n += bad
                progress.update(bar, advance=ok + bad, skipped=skipped_n)

            if workers.n <= 1 or len(todo) <= 1:
                for t in todo:
                    done[t.name] = build_shard(t, cfg, report)
            else:
                executor = workers.get(len(todo))
                pending = {executor.submit(_worker_task, (t, cfg)) for t in todo}
                while pending:
                    finished, pending = wait(pending, timeout=0.1, return_when=FIRST_COMPLETED)
                    for future in finished:
                        stats = future.result()
                        done[stats["shard"]] = stats
                    for ok, bad in workers.reports():
                        report(ok, bad)
                for ok, bad in workers.reports(timeout=0.05):  # the last reports
                    report(ok, bad)
    except BaseException:
        workers.close(kill=True)
        if cfg.out.is_dir():
            remove_stale_temporaries(cfg.out)
        raise
    finally:
        workers.close()

    shard_skips = [s for t in tasks for s in done[t.name]["skipped"]]
    skipped = [s.as_dict() for s in scan_skips] + shard_skips
    shards = [
        {"name": t.name, "split": t.split, "samples": done[t.name]["samples"]} for t in tasks
    ]
    manifest = {
        "format": fmt,
        "options": cfg.options(),
        "samples": sum(s["samples"] for s in shards),
        "splits": {
            split: sum(s["samples"] for s in shards if s["split"] == split)
            for split in ("train", "val")
        },
        "skipped": skipped,
        "skip_reasons": dict(Counter(reason_kind(s["reason"]) for s in skipped).most_common()),
        "shards": shards,
    }
    write_json_atomic(cfg.out / "manifest.json", manifest)
    return manifest


def summary(manifest: dict, out: Path) -> str:
    """The one-paragraph report the CLI prints."""
    n_shards = len(manifest["shards"])
    lines = [
        f"wrote {manifest['samples']} samples ({manifest['splits']['train']} train, "
        f"{manifest['splits']['val']} val) in {n_shards} shard{'s' * (n_shards != 1)} to {out}"
    ]
    if manifest["skipped"]:
        reasons = ", ".join(f"{n} {k}" for k, n in manifest["skip_reasons"].items())
        lines.append(f"skipped {len(manifest['skipped'])}: {reasons} (see {out}/manifest.json)")
    return "\n".join(lines)


__all__ = ["PrepareConfig", "prepare", "summary", "make_sample", "split_of", "Skip"]
