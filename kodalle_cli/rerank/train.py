"""Training the reranker: batches from image shards, the contrastive step, retrieval accuracy.

Captions in a domain data set repeat (K-Fashion captions are built from labels), so two
images in a batch often share one caption: :func:`collate` records which captions are equal
and the loss (:func:`kodalle_cli.rerank.model.contrastive_loss`) counts them all as positives.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from kodalle_cli.configs import RerankerTrainConfig
from kodalle_cli.data import urls
from kodalle_cli.rerank.model import Reranker, preprocess_images
from kodalle_cli.train.trainer import Task


# ---- data -------------------------------------------------------------------------------------
def iter_pairs(data, split: str, *, repeat: bool, seed: int = 0, shuffle_buffer: int = 0,
               limit: int | None = None, decode: bool = True) -> Iterator[tuple[object, str]]:
    """(image, caption) pairs from image shards, optionally through a shuffle buffer; the
    image is PIL, or the JPEG bytes with ``decode=False`` (:func:`preprocess_images` takes
    both)."""
    from kodalle_cli.data.shards import iter_image_samples

    samples = iter_image_samples(
        data, split=split, shuffle_shards=repeat, seed=seed, repeat=repeat, limit=limit,
        decode=decode,
    )
    if shuffle_buffer <= 1:
        for s in samples:
            yield s.image, s.caption
        return
    rng = random.Random(seed)
    buffer: list = []
    for s in samples:
        buffer.append((s.image, s.caption))
        if len(buffer) >= shuffle_buffer:
            yield buffer.pop(rng.randrange(len(buffer)))
    rng.shuffle(buffer)
    yield from buffer


def collate(model: Reranker, images: Sequence, captions: Sequence[str]) -> dict:
    """A training batch: normalised pixels, token ids, mask, and the caption-equality matrix."""
    enc = model.caption_encoder.encode_with_mask(captions)
    index: dict[str, int] = {}
    groups = torch.tensor([index.setdefault(c, len(index)) for c in captions])
    return {
        "pixels": preprocess_images(list(images), model.config.image_size, model.config.resize),
        "input_ids": enc["input_ids"],
        "attention_mask": enc["attention_mask"],
        "same": groups[:, None] == groups[None, :],
    }


# ---- validation -------------------------------------------------------------------------------
def retrieval_accuracy(sims: torch.Tensor, captions: Sequence[str]) -> dict:
    """Top-1 retrieval among pairs, from their similarities ``[images, captions]`` (image i's
    caption is ``captions[i]``). A retrieved caption (image) counts as right when its text
    equals the true caption, so repeated captions are not counted as misses."""
    captions = list(captions)
    i2t = sum(captions[j] == captions[i] for i, j in enumerate(sims.argmax(1).tolist()))
    t2i = sum(captions[i] == captions[j] for j, i in enumerate(sims.argmax(0).tolist()))
    n = len(captions)
    distinct = len(set(captions))
    return {
        "val_image_to_text": i2t / n,
        "val_text_to_image": t2i / n,
        "val_pairs": n,
        "val_chance": 1 / distinct if distinct else 0.0,
    }


def load_val_pairs(data, count: int, split: str = "val") -> tuple[list, list[str]]:
    """Up to ``count`` validation pairs (falls back to nothing when there is no val split)."""
    from kodalle_cli.errors import KodalleError

    try:
        pairs = list(iter_pairs(data, split, repeat=False, limit=count))
    except KodalleError:
        return [], []
    return [p[0] for p in pairs], [p[1] for p in pairs]


# ---- the task for the shared trainer ---------------------------------------------------------
PREVIEW_ROWS, PREVIEW_COLUMNS, PREVIEW_TILE = 4, 6, 64  # captions, images each, pixels
RIGHT, WRONG = (40, 160, 60), (200, 40, 40)  # a preview image's frame


class RerankerTask(Task):
    """``kodalle train reranker`` as a :class:`kodalle_cli.train.trainer.Task`."""

    def __init__(self, model: Reranker, cfg: RerankerTrainConfig):
        self.model = model
        self.cfg = cfg
        self.val_images, self.val_captions = load_val_pairs(
            urls.source(cfg.data, cfg.manifest), cfg.eval_samples)
        self.last_sims: tuple[int, torch.Tensor] | None = None  # (step, its validation sims)

    def train_batches(self, start: int, rank: int, world_size: int) -> Iterator[dict]:
        # the sample order depends only on the seed, so resuming skips `start` batches of
        # undecoded samples (iter_image_samples splits shards across ranks by itself)
        pairs = iter_pairs(urls.source(self.cfg.data, self.cfg.manifest), "train", repeat=True,
                           seed=self.cfg.seed, shuffle_buffer=self.cfg.shuffle_buffer,
                           decode=False)
        for _ in range(start * self.cfg.batch_size):
            next(pairs)
        while True:
            chunk = [next(pairs) for _ in range(self.cfg.batch_size)]
            yield collate(self.model, [c[0] for c in chunk], [c[1] for c in chunk])

    def loss(self, model, batch) -> tuple[torch.Tensor, dict]:
        loss, _ = model(batch["pixels"], batch["input_ids"], batch["attention_mask"],
                        batch["same"])
        return loss, {"temperature": 1.0 / float(self.model.logit_scale.detach().exp())}

    def batch_size(self, batch) -> int:
        return len(batch["pixels"])

    def after_step(self, model, step: int, optimizer) -> dict:
        """Remote shards: streams reopened and shards skipped so far (metrics.csv)."""
        return urls.STATS.metrics()

    def evaluate(self, model, step: int) -> dict[str, float]:
        if not self.val_captions:
            return {}
        self.last_eval = (step, retrieval_accuracy(self._val_sims(model, step),
                                                   self.val_captions))
        return self.last_eval[1]

    @torch.no_grad()
    def _val_sims(self, model, step: int) -> torch.Tensor:
        """``[images, captions]`` similarities of the validation pairs at ``step``, computed
        once for the validation and the preview of that step."""
        if self.last_sims is None or self.last_sims[0] != step:
            self.last_sims = (step, model.score(self.val_images, self.val_captions))
        return self.last_sims[1]

    def sample(self, model, step: int, out_dir: Path) -> Path | None:
        """The preview grid (``samples/step-N.png``, and the dashboards'): one row per
        validation caption, its first :data:`PREVIEW_ROWS` distinct ones, holding the
        validation images the reranker ranks first for it, framed green where the image's
        own caption is that caption and red where it is not."""
        if not self.val_captions:
            return None
        from PIL import ImageOps

        from kodalle_cli.atomic import replacing
        from kodalle_cli.output import make_grid

        first = {}  # each distinct caption's first column
        for i, caption in enumerate(self.val_captions):
            first.setdefault(caption, i)
        captions = list(first)[:PREVIEW_ROWS]
        sims = self._val_sims(model, step)[:, [first[c] for c in captions]]
        best = sims.topk(min(PREVIEW_COLUMNS, len(self.val_images)), dim=0).indices.t()
        tiles = []
        for caption, row in zip(captions, best.tolist(), strict=True):
            for i in row:
                right = self.val_captions[i] == caption
                tile = self.val_images[i].convert("RGB").resize((PREVIEW_TILE, PREVIEW_TILE))
                tiles.append(ImageOps.expand(tile, border=3, fill=RIGHT if right else WRONG))
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"step-{step:07d}.png"
        with replacing(path) as tmp:
            make_grid(tiles, columns=best.shape[1]).save(tmp, format="PNG")
        return path


TRAIN_CONFIG = "train_config.json"  # the options of the run, beside its checkpoints


def _check_resume(cfg: RerankerTrainConfig) -> None:
    """Resuming: one error listing every setting that differs from the run's
    ``train_config.json`` but for :data:`~kodalle_cli.configs.RERANKER_RESUME_MAY_CHANGE`;
    then (a new run, or an allowed resume) the options are written there."""
    import dataclasses
    import json

    from kodalle_cli.atomic import jsonable, write_json_atomic
    from kodalle_cli.configs import RERANKER_RESUME_MAY_CHANGE
    from kodalle_cli.errors import KodalleError
    from kodalle_cli.runlock import run_lock
    from kodalle_cli.runs import latest_checkpoint
    from kodalle_cli.train.checkpoint import refuse_changed_settings

    out = Path(cfg.out)
    saved = out / TRAIN_CONFIG
    current = jsonable(dataclasses.asdict(cfg))
    with run_lock(out):  # a run writing there keeps its file
        # an existing checkpoint is resumed, with or without --resume (the trainer's rule)
        if latest_checkpoint(out) is not None and saved.is_file():
            try:
                before = json.loads(saved.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise KodalleError(
                    f"cannot read {saved}: damaged ({type(exc).__name__})") from None
            defaults = {f.name: f.default for f in dataclasses.fields(RerankerTrainConfig)
                        if f.default is not dataclasses.MISSING}
            refuse_changed_settings(out, before, current, defaults, RERANKER_RESUME_MAY_CHANGE)
        write_json_atomic(saved, current)


def train_reranker(cfg: RerankerTrainConfig, progress: bool = True) -> dict:
    """Train a reranker on image shards with the shared trainer, then write the reranker
    directory (config.json, text/, model.safetensors) into ``cfg.out``, beside the run's
    checkpoints and metrics.csv. Returns the final validation metrics (empty without a val
    split) and where things are."""
    from kodalle_cli.backbone import get_backbone
    from kodalle_cli.data.shards import shard_paths
    from kodalle_cli.errors import UsageError
    from kodalle_cli.rerank.model import build_reranker, save_reranker
    from kodalle_cli.train.trainer import TrainerConfig, train

    if cfg.max_steps < 1 or cfg.batch_size < 2:
        raise UsageError("--max-steps must be >= 1 and --batch-size >= 2 (contrastive loss)")
    shard_paths(urls.source(cfg.data, cfg.manifest), "train")  # one clear error, before models
    _check_resume(cfg)
    torch.manual_seed(cfg.seed)
    model = build_reranker(
        get_backbone(cfg.backbone, cfg.backbone_path), image_size=cfg.image_size,
        embed_dim=cfg.embed_dim, text_seq_len=cfg.text_seq_len, image_weights=cfg.image_weights,
    )
    task = RerankerTask(model, cfg)
    # the retrieval preview at each validation (samples/, and the dashboards' images)
    trainer_cfg = TrainerConfig.from_options(cfg, out=Path(cfg.out), sample_every=cfg.eval_every,
                                             progress=progress)
    result = train(task, trainer_cfg)
    model.eval()
    last = getattr(task, "last_eval", None)  # the trainer evaluates at the last step
    final = last[1] if last and last[0] == result.step else task.evaluate(model, result.step)
    save_reranker(model, cfg.out)
    return {"step": result.step, "loss": result.last_loss, "out": str(cfg.out),
            "checkpoint": str(result.checkpoint) if result.checkpoint else None, **final}
