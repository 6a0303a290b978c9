"""``kodalle train vqgan``: train a VQGAN image tokenizer on image shards.

Loss (taming's VQLPIPSWithDiscriminator): L1 reconstruction + LPIPS (when
``--lpips-weights`` is given) + codebook/commitment loss, and from ``--disc-start`` on a
PatchGAN hinge loss with taming's adaptive weight. Codebook usage is tracked every step
(perplexity, share of dead codes) and codes unused for ``restart_after`` steps are
restarted from random encoder outputs of the current batch.

Training runs on the shared trainer (:mod:`kodalle_cli.train.trainer`) as a
:class:`VQGANTask`: checkpoints, exact resume, ``metrics.csv`` and the progress bar are
the trainer's. The generator (the VQGAN) is the trainer's model and optimizer; the
discriminator and its optimizer belong to the task, which steps them in ``after_step``
and saves them with the checkpoint.

The run directory (``--out``)::

    model.safetensors + config.yaml   the VQGAN (``load_vqgan(out)``; ``--vqgan out``)
    vqgan.ckpt + vqgan.yaml           the same in taming's Lightning format (+ discriminator)
    reconstructions.png               inputs (top) and reconstructions (bottom)
    metrics.csv                       step,split,metric,value,time (the trainer's)
    train_config.json                 the options of the run
    checkpoints/step-XXXXXXX/         model.safetensors (the VQGAN), optimizer.pt, rng.pt,
                                      trainer_state.json, codebook.pt (usage), and with a
                                      discriminator discriminator.safetensors + optimizer_d.pt
    latest                            names the newest checkpoint
"""

from __future__ import annotations

import io
import json
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

import torch

from kodalle_cli.atomic import jsonable, replacing, write_json_atomic
from kodalle_cli.configs import VQGANTrainConfig
from kodalle_cli.data import urls
from kodalle_cli.errors import KodalleError, UsageError
from kodalle_cli.runlock import run_lock
from kodalle_cli.runs import latest_checkpoint
from kodalle_cli.train.trainer import Task, TrainerConfig, train
from kodalle_cli.vqgan.io import save_taming_checkpoint, save_vqgan
from kodalle_cli.vqgan.losses import LPIPS, NLayerDiscriminator, adaptive_weight, hinge_d_loss
from kodalle_cli.vqgan.model import VQGAN


# ---- data ------------------------------------------------------------------------------------
def image_batches(data, batch_size: int, resolution: int, seed: int = 0, split: str = "train",
                  start: int = 0, state: ImageStream | None = None):
    """Endless batches ``[B, 3, R, R]`` in [-1, 1] from image shards (shards shuffled, random
    horizontal flips), positioned after ``start`` batches: batch ``i`` is the same whether
    the iterator started at 0 or at ``i`` (skipped samples are not decoded).

    Unreadable images and damaged tars are skipped, with a warning naming shard and key the
    first time; ``state`` counts them and the samples read (a resume starts after
    ``state.consumed`` of them, so skips do not shift it), and stops the run when more
    than ``state.max_bad_fraction`` of the images are bad."""
    from PIL import Image

    from kodalle_cli.data.images import to_tensor
    from kodalle_cli.data.shards import iter_image_samples

    state = state or ImageStream()
    state.expected = _listed_samples(data, split)
    samples = iter_image_samples(data, split, decode=False, shuffle_shards=True, seed=seed,
                                 repeat=True, on_bad=state.bad_sample)
    skip = state.consumed if state.consumed is not None else start * batch_size
    for _ in range(skip):
        next(samples)
    state.consumed = skip
    index, batch = start, []
    for sample in samples:
        state.consumed += 1
        try:
            with Image.open(io.BytesIO(sample.image)) as im:
                batch.append(im.convert("RGB"))
        except Exception as exc:  # PIL: bad or truncated image bytes
            state.bad_sample(sample.shard, sample.key,
                             f"unreadable image ({type(exc).__name__}: {exc})")
            continue
        if len(batch) == batch_size:
            x = to_tensor(batch, size=resolution).mul_(2).sub_(1)
            g = torch.Generator().manual_seed(seed * 1_000_003 + index)
            flip = torch.rand(batch_size, generator=g) < 0.5
            x[flip] = x[flip].flip(-1)
            yield x
            index, batch = index + 1, []


def fixed_images(data, n: int, resolution: int) -> torch.Tensor:
    """The first ``n`` images (val split when there is one) for the reconstruction grid."""
    from kodalle_cli.data.images import to_tensor
    from kodalle_cli.data.shards import iter_image_samples

    for split in ("val", "train"):
        try:
            images = [s.image for s in iter_image_samples(data, split, limit=n,
                                                          on_bad=_skip_quietly)]
        except KodalleError:
            continue
        if images:
            return to_tensor(images, size=resolution)
    raise KodalleError(f"no images in {data}")


@dataclass
class ImageStream:
    """Where :func:`image_batches` is in the stream of samples, and the bad ones it skipped
    (saved with each checkpoint: a resume continues at ``consumed`` samples)."""

    consumed: int | None = None  # samples read through the last batch yielded
    bad: list = field(default_factory=list)  # "shard: key: reason", each once
    max_bad_fraction: float = 0.01
    expected: int | None = None  # samples the shards hold, when their stats say

    def bad_sample(self, shard: str, key: str, reason: str) -> None:
        from kodalle_cli.errors import warn

        line = f"{shard}{': ' + key if key else ''}: {reason}"
        if line in self.bad:
            return  # seen in an earlier pass
        self.bad.append(line)
        warn(f"{line}; skipped")
        seen = self.expected or max(self.consumed or 0, 100)
        if len(self.bad) > self.max_bad_fraction * seen:
            raise KodalleError(
                f"{len(self.bad)} bad images in {seen if self.expected else 'the first'} "
                f"samples of {Path(shard).parent} (more than --max-bad-fraction "
                f"{self.max_bad_fraction:g}): repair or re-run `kodalle prepare`"
            )

    def state_dict(self) -> dict:
        return {"consumed": self.consumed, "bad": list(self.bad)}

    def load_state_dict(self, state: dict) -> None:
        self.consumed, self.bad = state.get("consumed"), list(state.get("bad", []))


def _listed_samples(data, split: str) -> int | None:
    """The samples `kodalle prepare` wrote to the shards of ``split`` (their stats files)."""
    from kodalle_cli.data.shards import shard_paths, stats_path

    total = 0
    try:
        for path in shard_paths(data, split):
            if urls.is_remote(path):  # remote shards: no stats files beside them
                return None
            total += int(json.loads(stats_path(path).read_text(encoding="utf-8"))["samples"])
    except (OSError, ValueError, KeyError, TypeError, KodalleError):
        return None
    return total


def _skip_quietly(shard: str, key: str, reason: str) -> None:
    """Bad images among the fixed validation ones: left out (training reports its own)."""


# ---- codebook usage --------------------------------------------------------------------------
class CodebookMonitor:
    """Counts code use; restarts codes unused for ``restart_after`` steps from encoder outputs."""

    def __init__(self, n_embed: int, restart_after: int, device):
        self.last_used = torch.zeros(n_embed, dtype=torch.long, device=device)
        self.restart_after = restart_after
        self.restarted = 0

    def update(self, codes: torch.Tensor, step: int) -> dict:
        """Mark the codes of a batch used at ``step``: perplexity of the batch's code
        distribution and the share of dead codes (tensors: no device sync)."""
        counts = torch.bincount(codes.flatten(), minlength=len(self.last_used)).float()
        self.last_used[counts > 0] = step
        p = counts / counts.sum()
        perplexity = torch.exp(-(p * torch.log(p + 1e-10)).sum())
        dead = (step - self.last_used >= self.restart_after).float().mean()
        return {"perplexity": perplexity, "dead_share": dead}

    @torch.no_grad()
    def restart(self, model: VQGAN, features: torch.Tensor, step: int, optimizer=None) -> int:
        """Re-seed dead codes with random encoder outputs (plus a little noise)."""
        dead = (step - self.last_used >= self.restart_after).nonzero().flatten()
        if len(dead) == 0:
            return 0
        flat = features.detach().permute(0, 2, 3, 1).reshape(-1, features.shape[1])
        pick = torch.randint(len(flat), (len(dead),), device=flat.device)
        table = model.codebook
        table.data[dead] = flat[pick] + 0.01 * flat.std() * torch.randn_like(flat[pick])
        if optimizer is not None:  # forget the old rows' Adam moments
            state = optimizer.state.get(table, {})
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    state[key][dead] = 0
        self.last_used[dead] = step
        self.restarted += len(dead)
        return len(dead)

    def state_dict(self) -> dict:
        return {"last_used": self.last_used.cpu(), "restarted": self.restarted}

    def load_state_dict(self, state: dict) -> None:
        self.last_used.copy_(state["last_used"])
        self.restarted = int(state["restarted"])


# ---- the loss --------------------------------------------------------------------------------
class VQGANLoss(torch.nn.Module):
    """taming's VQLPIPSWithDiscriminator: ``generator_loss`` and ``discriminator_loss``.
    The logged parts are detached tensors (no device sync)."""

    def __init__(self, cfg: VQGANTrainConfig):
        super().__init__()
        self.perceptual = LPIPS.from_file(cfg.lpips_weights) if cfg.lpips_weights else None
        self.perceptual_weight = cfg.perceptual_weight
        self.codebook_weight = cfg.codebook_weight
        self.disc_start = cfg.disc_start
        self.disc_weight = cfg.disc_weight
        self.discriminator = NLayerDiscriminator() if cfg.disc_start is not None else None

    def disc_active(self, step: int) -> bool:
        return self.discriminator is not None and step >= self.disc_start

    def generator_loss(self, x, xrec, qloss, step: int, last_layer) -> tuple[torch.Tensor, dict]:
        rec = (x - xrec).abs().mean()
        nll = rec
        logs = {"rec_loss": rec.detach(), "q_loss": qloss.detach()}
        if self.perceptual is not None:
            p = self.perceptual(x, xrec).mean()
            nll = nll + self.perceptual_weight * p
            logs["p_loss"] = p.detach()
        loss = nll + self.codebook_weight * qloss
        if self.disc_active(step):
            g = -self.discriminator(xrec).mean()
            w = adaptive_weight(nll, g, last_layer, self.disc_weight)
            loss = loss + w * g
            logs.update(g_loss=g.detach(), d_weight=w.detach())
        return loss, logs

    def discriminator_loss(self, x, xrec) -> tuple[torch.Tensor, dict]:
        d = hinge_d_loss(self.discriminator(x.detach()), self.discriminator(xrec.detach()))
        return d, {"d_loss": d.detach()}


def adam(params, lr: float) -> torch.optim.Adam:
    """taming's optimizer: Adam, betas 0.5/0.9."""
    return torch.optim.Adam(params, lr=lr, betas=(0.5, 0.9))


# ---- the task --------------------------------------------------------------------------------
class VQGANTask(Task):
    """The VQGAN on the shared trainer. ``self.step`` is the number of optimizer steps done
    (taming's ``global_step`` while a step's loss is computed)."""

    def __init__(self, cfg: VQGANTrainConfig, device: torch.device):
        self.cfg = cfg
        torch.manual_seed(cfg.seed)
        self.model = VQGAN(cfg.model_config()).to(device)
        self.model.quantize.l2_codes = cfg.l2_codes
        self.model.quantize.renormalise()
        self.loss_fn = VQGANLoss(cfg).to(device)
        disc = self.loss_fn.discriminator
        self.opt_d = adam(disc.parameters(), cfg.lr) if disc is not None else None
        self.monitor = CodebookMonitor(cfg.n_embed, cfg.restart_after, device)
        self.step = 0
        self._last = None  # (x, xrec, features) of the step in progress
        self._val = None
        self.stream = ImageStream(max_bad_fraction=cfg.max_bad_fraction)

    def train_batches(self, start, rank, world_size):
        return image_batches(urls.source(self.cfg.data, self.cfg.manifest), self.cfg.batch_size,
                             self.cfg.resolution, seed=self.cfg.seed, start=start,
                             state=self.stream)

    def batch_size(self, batch):
        return batch.shape[0]

    def batch_tokens(self, batch):  # image codes: tokens/s is the tokenizer's code rate
        return batch.shape[0] * (batch.shape[-1] // self.model.downsample_factor) ** 2

    def param_groups(self):
        return [{"params": [p for p in self.model.parameters() if p.requires_grad]}]

    def make_optimizer(self, groups, cfg):
        return adam(groups, cfg.lr)

    def loss(self, model, batch):
        xrec, qloss, codes, features = model(batch)
        last_layer = self.model.decoder.conv_out.weight
        loss, logs = self.loss_fn.generator_loss(batch, xrec, qloss, self.step, last_layer)
        logs.update(self.monitor.update(codes, self.step + 1))
        logs["skipped_images"] = float(len(self.stream.bad))
        self._last = (batch, xrec.detach(), features.detach())
        return loss, logs

    def after_step(self, model, step, optimizer):
        """The discriminator's step (on this step's reconstructions), then code restarts."""
        x, xrec, features = self._last
        self._last = None
        logs = {}
        if self.loss_fn.disc_active(self.step):
            d_loss, logs = self.loss_fn.discriminator_loss(x, xrec)
            self.opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            self.opt_d.step()
        self.step = step
        logs["restarted"] = self.monitor.restart(model, features, step, optimizer)
        self.model.quantize.renormalise()
        logs.update(urls.STATS.metrics())  # remote shards: streams reopened, shards skipped
        return logs

    def evaluate(self, model, step):
        """Reconstruction L1 and code perplexity on the fixed validation images."""
        if self._val is None:
            self._val = fixed_images(urls.source(self.cfg.data, self.cfg.manifest), 8,
                                     self.cfg.resolution)
        x = self._val.to(self.model.device) * 2 - 1
        xrec, qloss, codes, _ = model(x)
        counts = torch.bincount(codes.flatten(), minlength=self.cfg.n_embed).float()
        p = counts / counts.sum()
        return {"rec_loss": float((x - xrec).abs().mean()), "q_loss": float(qloss),
                "perplexity": float(torch.exp(-(p * torch.log(p + 1e-10)).sum()))}

    def sample(self, model, step, out_dir):
        """The preview grid: the fixed validation images above their reconstructions."""
        if self._val is None:
            self._val = fixed_images(urls.source(self.cfg.data, self.cfg.manifest), 8,
                                     self.cfg.resolution)
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"step-{step:07d}.png"
        save_reconstruction_grid(self.model, self._val, path)
        return path

    def save_extra(self, ckpt_dir):
        torch.save(self.monitor.state_dict(), ckpt_dir / "codebook.pt")
        (ckpt_dir / "data.json").write_text(json.dumps(self.stream.state_dict()), encoding="utf-8")
        if self.opt_d is not None:
            from safetensors.torch import save_file

            sd = self.loss_fn.discriminator.state_dict()
            save_file({k: v.detach().cpu().contiguous() for k, v in sd.items()},
                      str(ckpt_dir / "discriminator.safetensors"))
            torch.save(self.opt_d.state_dict(), ckpt_dir / "optimizer_d.pt")

    def load_extra(self, ckpt_dir):
        device = self.model.device
        state = (ckpt_dir / "trainer_state.json").read_text(encoding="utf-8")
        self.step = json.loads(state)["step"]
        self.monitor.load_state_dict(
            torch.load(ckpt_dir / "codebook.pt", map_location=device, weights_only=True))
        if (ckpt_dir / "data.json").is_file():  # older checkpoints: start * batch_size
            data = (ckpt_dir / "data.json").read_text(encoding="utf-8")
            self.stream.load_state_dict(json.loads(data))
        if self.opt_d is not None and (ckpt_dir / "discriminator.safetensors").is_file():
            from safetensors.torch import load_file

            self.loss_fn.discriminator.load_state_dict(
                load_file(str(ckpt_dir / "discriminator.safetensors"), device=str(device)))
            self.opt_d.load_state_dict(
                torch.load(ckpt_dir / "optimizer_d.pt", map_location=device, weights_only=True))


# ---- the run ---------------------------------------------------------------------------------
def train_vqgan(cfg: VQGANTrainConfig) -> Path:
    """Train (or resume) and write the run directory; returns it. Resuming refuses settings
    that differ from the run's but for :data:`VQGAN_RESUME_MAY_CHANGE`."""
    if cfg.batch_size < 1 or cfg.max_steps < 1:
        raise UsageError("--batch-size and --max-steps must be at least 1")
    out = Path(cfg.out)
    architecture = cfg.model_config().architecture()
    with run_lock(out):  # one run per directory (OUT/lock names its pid)
        return _train_vqgan(cfg, out, architecture)


# What a resumed `train vqgan` may change; any other setting that differs is refused.
VQGAN_RESUME_MAY_CHANGE = ("max_steps", "save_every", "keep_last", "log_every", "log",
                           "max_bad_fraction", "device", "progress", "resume", "out", "data",
                           "manifest")


def _train_vqgan(cfg: VQGANTrainConfig, out: Path, architecture: dict) -> Path:
    from kodalle_cli.device import pick_device
    from kodalle_cli.train.checkpoint import refuse_changed_settings

    saved = out / "train_config.json"
    if latest_checkpoint(out) is not None and saved.is_file():
        before = json.loads(saved.read_text(encoding="utf-8"))
        if before.get("architecture") not in (None, architecture):
            raise KodalleError(f"{out} holds a run of another VQGAN architecture: "
                               "use another --out")
        before.pop("architecture", None)
        defaults = {f.name: f.default for f in fields(VQGANTrainConfig)
                    if f.default is not MISSING}
        current = jsonable(asdict(cfg))
        del current["recipe"]  # a name: the settings it gave are compared
        refuse_changed_settings(out, before, current, defaults, VQGAN_RESUME_MAY_CHANGE)
    if cfg.lpips_weights is None:
        import warnings

        warnings.warn("no --lpips-weights: training without the perceptual loss", stacklevel=2)
    device = pick_device(cfg.device)
    task = VQGANTask(cfg, device)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(saved, {**jsonable(asdict(cfg)), "architecture": architecture})
    # taming's optimizer and schedule; validated and previewed at each checkpoint
    result = train(task, TrainerConfig.from_options(
        cfg, out=out, weight_decay=0.0, betas=(0.5, 0.9), schedule="constant", warmup_steps=0,
        grad_clip=0.0, precision="fp32", eval_every=cfg.save_every,
        sample_every=cfg.save_every, memory_hint="--batch-size or --resolution",
    ), device=device)
    task.model._identity = None
    save_outputs(task.model.eval(), task.loss_fn, out, result.step, cfg)
    return out


def save_outputs(model: VQGAN, loss_fn: VQGANLoss, out: Path, step: int, cfg) -> None:
    """The deliverables: safetensors + yaml, taming .ckpt + .yaml, reconstruction grid."""
    save_vqgan(model, out)
    extra = {}
    if loss_fn.discriminator is not None:
        extra = {f"loss.discriminator.{k}": v.detach().cpu()
                 for k, v in loss_fn.discriminator.state_dict().items()}
    save_taming_checkpoint(model, out / "vqgan.ckpt", global_step=step, extra_state=extra)
    images = fixed_images(urls.source(cfg.data, cfg.manifest), 8, cfg.resolution)
    save_reconstruction_grid(model, images, out / "reconstructions.png")


def save_reconstruction_grid(model: VQGAN, images: torch.Tensor, path: Path) -> None:
    from torchvision.utils import save_image

    recon = model.decode(model.encode(images)).cpu()
    with replacing(path) as tmp:
        save_image(torch.cat([images, recon]), str(tmp), nrow=len(images), format="png")
