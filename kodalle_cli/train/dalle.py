"""``kodalle train``: the DALLE transformer on token shards, with the shared trainer.

:func:`run_train` prepares the run directory (config, tokenizer and VQGAN copied in),
builds the model from the backbone's tables and hands a :class:`DalleTask` to
:func:`kodalle_cli.train.trainer.train`.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np
import torch

from kodalle_cli import runs
from kodalle_cli.atomic import replacing
from kodalle_cli.attributes import caption_record
from kodalle_cli.configs import DalleTrainConfig
from kodalle_cli.data import tokens as token_shards
from kodalle_cli.data import urls
from kodalle_cli.errors import KodalleError, UsageError
from kodalle_cli.model import DALLE, DALLEConfig, init_from_backbone
from kodalle_cli.runlock import run_lock
from kodalle_cli.text import check_raw_tokenizer
from kodalle_cli.train.dist import STRATEGIES, setup_distributed
from kodalle_cli.train.trainer import Task, TrainerConfig, TrainResult, train

MODEL_OPTIONS = ("dim", "depth", "heads", "dim_head", "text_seq_len")




def default_out(backbone: str) -> Path:
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(backbone).name if "/" in backbone else backbone)
    return Path("runs") / (name.strip("-") or "dalle")


# ---- the task --------------------------------------------------------------------------------
class DalleTask(Task):
    def __init__(self, model: DALLE, cfg: DalleTrainConfig, tokens_dir: Path, vqgan=None,
                 main: bool = True, run_dir: Path | None = None):
        self.model = model
        self.cfg = cfg
        self.tokens_dir = tokens_dir
        self.vqgan = vqgan
        self.manifest = token_shards.read_manifest(tokens_dir)
        # every shard read once, before the first step: bad samples are reported by shard and
        # key and left out, too many of them stop the run here (--max-bad-fraction)
        self.vocab = model.config.num_text_tokens
        self.checked = token_shards.check_shards(
            tokens_dir, num_text_tokens=self.vocab, max_bad_fraction=cfg.max_bad_fraction,
            report=None if main else (lambda message: None),  # DDP: rank 0 warns
            mode=cfg.check_shards, write_cache=main,  # --check-shards new: changed ones only
            cache=run_dir / token_shards.CHECK_CACHE if run_dir is not None else None)
        if self.checked["train"].good == 0:
            raise KodalleError(f"{tokens_dir}: no good train samples")
        self.epoch_samples = self.checked["train"].good
        self.has_val = self.checked["val"].good > 0
        self.data_metrics = {k: v for split, c in self.checked.items()
                             for k, v in c.metrics(split).items()}
        self.worker_streams: dict[int, urls.StreamStats] = {}  # the latest of each worker

    def train_batches(self, start, rank, world_size):
        dataset = token_shards.TokenBatches(
            self.tokens_dir, "train", batch_size=self.cfg.batch_size, seed=self.cfg.seed,
            rank=rank, world_size=world_size, start_batch=start,
            counts=self.checked["train"].counts, num_text_tokens=self.vocab,
            caption_style=self.cfg.caption_style,
        )
        # iter() here, not at the first batch: the loader draws its workers' seed from torch's
        # generator now, before a resumed run restores its RNG state (exact resume)
        return self._noting_streams(iter(torch.utils.data.DataLoader(
            dataset, batch_size=None, num_workers=self.cfg.workers,
            persistent_workers=False, prefetch_factor=4 if self.cfg.workers else None,
        )))

    def _noting_streams(self, batches):
        """The batches, with each data-loader worker's remote-stream counts taken out."""
        for batch in batches:
            if token_shards.WORKER_STREAMS in batch:
                worker, stats = batch.pop(token_shards.WORKER_STREAMS)
                self.worker_streams[worker] = stats
            yield batch

    def after_step(self, model, step, optimizer):
        """Remote shards: streams reopened and shards skipped so far, by this process and its
        data-loader workers (metrics.csv)."""
        stats = urls.STATS
        for worker_stats in self.worker_streams.values():
            stats = stats.add(worker_stats)
        return stats.metrics()

    def loss(self, model, batch):
        return model(batch["ids"], batch["codes"], return_loss=True, cond_drop=self.cfg.cond_drop)

    def shard_units(self, model):
        return list(model.blocks)  # --strategy fsdp: one block at a time, then the rest

    def batch_size(self, batch):
        return batch["ids"].shape[0]

    def batch_tokens(self, batch):
        return batch["ids"].shape[0] * (batch["ids"].shape[1] + batch["codes"].shape[1])

    def param_groups(self):
        decay, no_decay = [], []
        for name, p in self.model.named_parameters():
            if not p.requires_grad:
                continue
            # embeddings and linear weights decay (as KoDALLE's AdamW did for all parameters
            # but the norms); biases, norms and LayerScale scales do not
            (decay if p.dim() >= 2 or name.startswith("image_pos") else no_decay).append(p)
        return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]

    def _val_batches(self):
        batch = []
        for sample in token_shards.iter_split(self.tokens_dir, "val",
                                              num_text_tokens=self.vocab):
            batch.append(sample)
            if len(batch) == self.cfg.batch_size:
                yield batch
                batch = []
        if batch:
            yield batch

    def evaluate(self, model, step):
        if not self.has_val:
            return {}
        device = next(model.parameters()).device
        totals, n = {}, 0
        for i, samples in enumerate(self._val_batches()):
            if i >= self.cfg.eval_batches:
                break
            ids = torch.from_numpy(np.stack([s["ids"] for s in samples]))
            codes = torch.from_numpy(np.stack([s["codes"] for s in samples]))
            # through forward (not model.loss): under FSDP it gathers the weights
            loss, parts = model(ids.to(device), codes.to(device), return_loss=True)
            b = ids.shape[0]
            for key, value in {"loss": loss, **parts}.items():  # text_loss: with a text head
                totals[key] = totals.get(key, 0.0) + float(value) * b
            n += b
        return {k: v / n for k, v in totals.items()} if n else {}

    def sample(self, model, step, out_dir):
        if self.vqgan is None or not self.has_val or self.cfg.sample_captions <= 0:
            return
        from torchvision.utils import save_image

        from kodalle_cli.model.sampling import SamplingSettings, generate_codes, row_uniforms

        samples = list(token_shards.iter_split(self.tokens_dir, "val",
                                               limit=self.cfg.sample_captions,
                                               num_text_tokens=self.vocab))
        device = next(model.parameters()).device
        text = torch.from_numpy(np.stack([s["ids"] for s in samples])).to(device)
        steps = model.image_seq_len
        uniforms = torch.stack([row_uniforms(0, i, 0, steps) for i in range(len(samples))])
        codes = generate_codes(model, text, uniforms, SamplingSettings())
        images = self.vqgan.decode(codes.cpu())
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"step-{step:07d}.png"
        with replacing(path) as tmp:
            save_image(images, tmp, format="png", nrow=len(samples))
        (out_dir / f"step-{step:07d}.txt").write_text(
            "\n".join(s["txt"] for s in samples) + "\n", encoding="utf-8"
        )
        return path


# ---- the run ---------------------------------------------------------------------------------
def find_tokens(cfg: DalleTrainConfig, main: bool, dist) -> Path | urls.Place:
    """Token shards: DATA itself, DATA/tokens, or image shards tokenized with --vqgan; or
    remote ones (a URL, pattern or pipe: command, kodalle_cli.data.urls) or ones whose
    manifest is given apart (--manifest)."""
    if cfg.manifest is not None or urls.is_remote(cfg.data) or "{" in str(cfg.data):
        where = urls.place(cfg.data, cfg.manifest)
        token_shards.read_manifest(where)  # one line when there is none
        return where
    data = Path(cfg.data)
    for candidate in (data, data / "tokens"):
        if (candidate / token_shards.MANIFEST).is_file():
            try:
                token_shards.read_manifest(candidate)
                return candidate
            except KodalleError:
                continue
    if cfg.vqgan is None:
        raise KodalleError(
            f"no token shards in {data} (no manifest.json): run `kodalle tokenize` first, or "
            "pass --vqgan to tokenize image shards now"
        )
    from kodalle_cli.tokenize_shards import TokenizeConfig, ensure_tokens

    tcfg = TokenizeConfig(shards=data, vqgan=cfg.vqgan, backbone=cfg.backbone,
                          backbone_path=cfg.backbone_path, text_seq_len=cfg.text_seq_len or 128,
                          device=cfg.device, progress=cfg.progress,
                          max_bad_fraction=cfg.max_bad_fraction)
    out = None
    if main:
        out = ensure_tokens(tcfg)
    dist.barrier()
    return out or data / "tokens"


def run_train(cfg: DalleTrainConfig) -> TrainResult:
    """Train (or resume) a DALLE run; returns the trainer's result. ``OUT/lock`` holds this
    process's pid meanwhile; resuming refuses settings other than the run's, except
    :data:`kodalle_cli.configs.TRAIN_RESUME_MAY_CHANGE`."""
    dist, device = setup_distributed(cfg.device)
    out = Path(cfg.out) if cfg.out else default_out(cfg.backbone)
    try:
        with run_lock(out, dist.main):  # one run per directory, before anything is written
            result = _run_train(cfg, dist, device, out)
        dist.barrier()  # a finished run: the ranks leave together (none tears down mid-save)
        return result
    finally:
        dist.close()


def new_model_config(cfg: DalleTrainConfig, manifest: dict, emb) -> DALLEConfig:
    """The model a new run builds: sizes from the options, the token shards' ``manifest``
    and the backbone's tables ``emb`` (its ``vocab_size``, ``dim``, ``pad_id``, ``bos_id``;
    ``kodalle train --dry-run`` passes the sizes alone)."""
    mcfg = DALLEConfig(
        num_text_tokens=emb.vocab_size, num_image_tokens=manifest["num_image_tokens"],
        image_fmap_size=manifest["image_fmap_size"], dim=cfg.dim or emb.dim,
        depth=cfg.depth, heads=cfg.heads, dim_head=cfg.dim_head,
        text_seq_len=manifest["text_seq_len"], text_dim=emb.dim,
        pad_id=manifest.get("pad_id", emb.pad_id),
        bos_id=emb.bos_id if emb.bos_id is not None else 0,
        loss_img_weight=cfg.loss_img_weight, text_loss_on_padding=cfg.text_loss_on_padding,
        reversible=cfg.reversible, rotary_emb=cfg.rotary, shift_tokens=cfg.shift_tokens,
        attn_types=cfg.attn_types, text_loss_weight=cfg.text_loss_weight,
        text_encoder=cfg.text_encoder, text_layer=cfg.text_layer,
        null_caption=cfg.null_caption,
    )
    if mcfg.text_dim == mcfg.dim and not mcfg.contextual:
        mcfg.text_dim = None
    return mcfg


def _run_train(cfg: DalleTrainConfig, dist, device, out: Path) -> TrainResult:
    from kodalle_cli.backbone import get_backbone

    if cfg.strategy not in STRATEGIES:
        raise UsageError(f"--strategy {cfg.strategy}: choose one of {', '.join(STRATEGIES)}")
    contextual = cfg.text_encoder == "contextual"
    if cfg.strategy == "fsdp" and cfg.reversible:
        raise UsageError("--strategy fsdp does not work with --reversible yet (its blocks run "
                         "outside their forward, which FSDP needs to gather them)")
    existing = (out / runs.CONFIG).is_file() and runs.latest_checkpoint(out) is not None
    if cfg.resume and not existing:
        raise KodalleError(f"--resume: {out} has no checkpoint to resume from")
    tokens_dir = find_tokens(cfg, dist.main, dist)
    manifest = token_shards.read_manifest(tokens_dir)
    token_shards.style_index(manifest, cfg.caption_style, tokens_dir)  # one line, before work

    backbone = get_backbone(cfg.backbone, cfg.backbone_path)
    if contextual and backbone.refuse_contextual:
        raise UsageError(f"--text-encoder contextual: backbone {backbone.name} cannot run as "
                         f"one ({backbone.refuse_contextual})")
    from kodalle_cli.tokenize_shards import tokenizer_identity

    if manifest.get("tokenizer_hash") and manifest["tokenizer_hash"] != tokenizer_identity(
        backbone
    ):
        raise KodalleError(
            f"the token shards in {tokens_dir} were made with another tokenizer than "
            f"{backbone.name}'s: re-run `kodalle tokenize --backbone {cfg.backbone}`"
        )
    if cfg.text_seq_len is not None and cfg.text_seq_len != manifest["text_seq_len"]:
        raise UsageError(
            f"--text-seq-len {cfg.text_seq_len} but the token shards in {tokens_dir} have "
            f"{manifest['text_seq_len']}: re-tokenize or drop the option"
        )
    emb = backbone.load_embeddings()  # contextual too: the pad/bos ids and the width
    if existing:
        saved = runs.read_config(out)
        _refuse_changed_settings(out, saved, cfg)
        mcfg = DALLEConfig.from_dict(saved["model"])
        if (mcfg.num_image_tokens, mcfg.image_fmap_size, mcfg.text_seq_len) != (
            manifest["num_image_tokens"], manifest["image_fmap_size"], manifest["text_seq_len"]
        ):
            raise KodalleError(f"the run in {out} was trained on other token shards")
    else:
        mcfg = new_model_config(cfg, manifest, emb)
    from kodalle_cli.plan import check_train_memory

    # the estimated peak against the device's memory (--force skips), before any shard is read
    check_train_memory(cfg, mcfg, device, dist.world_size)

    torch.manual_seed(cfg.seed)
    model = DALLE(mcfg)
    init_from_backbone(model, emb, freeze=cfg.freeze_text_emb)
    model.grad_checkpointing = cfg.grad_checkpointing
    if mcfg.contextual:
        _attach_language_model(model, backbone, out, existing, dist)

    vq = None
    if dist.main:
        out.mkdir(parents=True, exist_ok=True)
        if not existing:
            runs.write_config(out, {
                "kind": "dalle",
                "model": mcfg.to_dict(),
                "backbone": {"name": backbone.name, "source": backbone.location,
                             "revision": backbone.revision, "dim": emb.dim,
                             "position_offset": emb.position_offset, "pad_id": emb.pad_id,
                             "bos_id": emb.bos_id, "eos_id": emb.eos_id},
                "train": {k: (str(v) if isinstance(v, Path) else v)
                          for k, v in dataclasses.asdict(cfg).items()},
                "data": {"tokens": str(tokens_dir), "tokenizer_hash":
                         manifest.get("tokenizer_hash"), "vqgan": manifest.get("vqgan")},
                # caption style, part/attribute order and values (sample --attr)
                "captions": caption_record(tokens_dir, manifest) if isinstance(
                    tokens_dir, Path) else {"format": None, "note": "remote token shards: "
                                            "their image shards' labels are not read"},
            })
            tokenizer = backbone.load_tokenizer()
            tokenizer.save_pretrained(out / runs.TOKENIZER_DIR)
            # sampling may then skip importing transformers (kodalle_cli.text.RawTokenizer)
            captions = [s["txt"] for s in token_shards.iter_split(tokens_dir, "train", 512)]
            check_raw_tokenizer(out / runs.TOKENIZER_DIR, tokenizer, captions,
                                mcfg.text_seq_len)
        vq = _copy_vqgan(cfg, manifest, out)

    trainer_cfg = TrainerConfig.from_options(cfg, out=out)
    task = DalleTask(model, cfg, tokens_dir, vqgan=vq, main=dist.main, run_dir=out)
    return train(task, trainer_cfg, dist, device)


def _attach_language_model(model: DALLE, backbone, out: Path, existing: bool, dist) -> None:
    """Contextual text: the backbone's language model, frozen. A new run saves it into
    ``OUT/text_encoder`` (rank 0) and every rank reads it back from there, so that training,
    resuming and sampling all use the same weights."""
    from kodalle_cli.progress import quiet_libraries

    quiet_libraries()
    if dist.main and not existing:
        runs.save_text_encoder(out, backbone.load_model())
    dist.barrier()
    runs.attach_text_encoder(model, out)


def _copy_vqgan(cfg: DalleTrainConfig, manifest: dict, out: Path):
    """Copy the VQGAN into the run (once) and return it loaded, or None when unavailable."""
    from kodalle_cli.vqgan import load_vqgan, save_vqgan

    target = out / runs.VQGAN_DIR
    if target.is_dir():
        vq = load_vqgan(str(target))
        token_shards.check_vqgan(manifest, vq, Path(cfg.data), f"the run's VQGAN ({target})")
        return vq
    source = cfg.vqgan or (manifest.get("vqgan") or {}).get("source")
    if not source:
        print(f"note: the token shards name no VQGAN; {out} has no vqgan/ (sampling will "
              "need --vqgan)", flush=True)
        return None
    try:
        vq = load_vqgan(source)
    except KodalleError as exc:
        print(f"note: cannot copy the VQGAN into the run ({exc}); sampling will need --vqgan",
              flush=True)
        return None
    token_shards.check_vqgan(manifest, vq, Path(cfg.data), f"--vqgan {source}")
    save_vqgan(vq, target)
    return vq


def _refuse_changed_settings(out: Path, saved: dict, cfg: DalleTrainConfig) -> None:
    """Resuming: one error listing every setting that differs from the run's config.json,
    but for those that may change (``TRAIN_RESUME_MAY_CHANGE``)."""
    from kodalle_cli.configs import TRAIN_RESUME_MAY_CHANGE
    from kodalle_cli.train.checkpoint import refuse_changed_settings

    defaults = {f.name: f.default for f in dataclasses.fields(DalleTrainConfig)
                if f.default is not dataclasses.MISSING}
    refuse_changed_settings(out, saved.get("train") or {}, dataclasses.asdict(cfg), defaults,
                            TRAIN_RESUME_MAY_CHANGE)


def dry_run(cfg: DalleTrainConfig) -> dict:
    """``kodalle train --dry-run``: the parameters, FLOPs per sample, memory per GPU and time
    of the exact model this command would train (a run in ``--out`` keeps its saved model
    config), from the manifests and the backbone's config alone; nothing is written."""
    import os
    from types import SimpleNamespace

    from kodalle_cli import plan
    from kodalle_cli.device import pick_device

    device = pick_device(cfg.device)
    data = plan.read_data(cfg.data, cfg.vqgan, None, cfg.text_seq_len or 128)
    out = Path(cfg.out) if cfg.out else default_out(cfg.backbone)
    if (out / runs.CONFIG).is_file():
        mcfg, source = DALLEConfig.from_dict(runs.read_config(out)["model"]), f"the run in {out}"
    else:
        sizes = plan.backbone_sizes(cfg.backbone, cfg.backbone_path)
        emb = SimpleNamespace(vocab_size=sizes["vocab"], dim=sizes["dim"], pad_id=1, bos_id=0)
        shape = {"num_image_tokens": data.num_image_tokens, "text_seq_len": data.text_seq_len,
                 "image_fmap_size": data.image_fmap_size}
        mcfg, source = new_model_config(cfg, shape, emb), "a new run"
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return plan.dry_run_estimate(cfg, mcfg, device, world, data, source)
