"""``kodalle train vqgan``: train a VQGAN image tokenizer on image shards.

Loss (taming's VQLPIPSWithDiscriminator): L1 reconstruction + LPIPS (when
``--lpips-weights`` is given) + codebook/commitment loss, and from ``--disc-start`` on a
PatchGAN hinge loss with taming's adaptive weight. Codebook usage is tracked every step
(perplexity, share of dead codes) and codes unused for ``restart_after`` steps are
restarted from random encoder outputs of the current batch.

The run directory (``--out``)::

    model.safetensors + config.yaml   the VQGAN (``load_vqgan(out)``; ``--vqgan out``)
    vqgan.ckpt + vqgan.yaml           the same in taming's Lightning format (+ discriminator)
    reconstructions.png               inputs (top) and reconstructions (bottom)
    metrics.csv                       one row per logged step
    checkpoints/step-XXXXXXX/         model.safetensors (VQGAN + loss.discriminator.*),
                                      optimizer.pt, trainer_state.json; ``latest`` names one

The pieces a trainer needs are functions: :func:`build`, :class:`VQGANLoss` (one
generator step / one discriminator step), :class:`CodebookMonitor` (usage + restarts),
:func:`image_batches`, :func:`save_outputs`.
"""

from __future__ import annotations

import csv
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from kodalle_cli.errors import KodalleError, UsageError
from kodalle_cli.vqgan.load import save_taming_checkpoint, save_vqgan
from kodalle_cli.vqgan.losses import LPIPS, NLayerDiscriminator, adaptive_weight, hinge_d_loss
from kodalle_cli.vqgan.model import VQGAN, VQGANConfig


@dataclass
class VQGANTrainConfig:
    data: Path | str = Path("shards")
    out: Path | str = Path("runs/vqgan")
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    n_embed: int = 16384
    embed_dim: int = 256
    resolution: int = 256
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] | None = None  # default: the code grid (taming: 16)
    lpips_weights: Path | str | None = None
    perceptual_weight: float = 1.0
    disc_start: int | None = None  # None: no discriminator
    disc_weight: float = 0.8
    codebook_weight: float = 1.0
    lr: float = 3.6e-5  # taming: base_learning_rate 4.5e-6 x batch size 8
    batch_size: int = 8
    max_steps: int = 10000
    seed: int = 0
    device: str = "auto"
    restart_after: int = 50  # steps a code may go unused before it is restarted
    log_every: int = 10
    save_every: int = 1000
    keep_last: int = 2
    resume: bool = False
    progress: bool = True
    extra: dict = field(default_factory=dict)

    def model_config(self) -> VQGANConfig:
        f = 2 ** (len(self.ch_mult) - 1)
        if self.resolution % f:
            raise UsageError(f"--resolution {self.resolution} is not a multiple of {f}")
        if self.ch % 32:
            raise UsageError("--ch must be a multiple of 32 (GroupNorm groups)")
        attn = self.attn_resolutions
        if attn is None:
            attn = (self.resolution // f,)
        return VQGANConfig(kind="vq", n_embed=self.n_embed, embed_dim=self.embed_dim,
                           ch=self.ch, ch_mult=tuple(self.ch_mult),
                           num_res_blocks=self.num_res_blocks, attn_resolutions=tuple(attn),
                           resolution=self.resolution, z_channels=self.embed_dim,
                           extra={"base_learning_rate": self.lr / self.batch_size})


# ---- data ------------------------------------------------------------------------------------
def image_batches(data, batch_size: int, resolution: int, seed: int = 0, split: str = "train"):
    """Endless batches ``[B, 3, R, R]`` in [-1, 1] from image shards (shards shuffled, random
    horizontal flips)."""
    from kodalle_cli.data.images import to_tensor
    from kodalle_cli.data.shards import iter_image_samples

    rng = random.Random(seed)
    batch = []
    for sample in iter_image_samples(data, split, shuffle_shards=True, seed=seed, repeat=True):
        batch.append(sample.image)
        if len(batch) == batch_size:
            x = to_tensor(batch, size=resolution) * 2 - 1
            flip = torch.tensor([rng.random() < 0.5 for _ in batch])
            x[flip] = x[flip].flip(-1)
            yield x
            batch = []


def fixed_images(data, n: int, resolution: int) -> torch.Tensor:
    """The first ``n`` images (val split when there is one) for the reconstruction grid."""
    from kodalle_cli.data.images import to_tensor
    from kodalle_cli.data.shards import iter_image_samples

    for split in ("val", "train"):
        try:
            images = [s.image for s in iter_image_samples(data, split, limit=n)]
        except KodalleError:
            continue
        if images:
            return to_tensor(images, size=resolution)
    raise KodalleError(f"no images in {data}")


# ---- codebook usage --------------------------------------------------------------------------
class CodebookMonitor:
    """Counts code use; restarts codes unused for ``restart_after`` steps from encoder outputs."""

    def __init__(self, n_embed: int, restart_after: int, device):
        self.last_used = torch.zeros(n_embed, dtype=torch.long, device=device)
        self.restart_after = restart_after
        self.restarted = 0

    def update(self, codes: torch.Tensor, step: int) -> dict:
        counts = torch.bincount(codes.flatten(), minlength=len(self.last_used)).float()
        self.last_used[counts > 0] = step
        p = counts / counts.sum()
        perplexity = torch.exp(-(p * torch.log(p + 1e-10)).sum()).item()
        dead = (step - self.last_used >= self.restart_after).float().mean().item()
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


# ---- the loss --------------------------------------------------------------------------------
class VQGANLoss(torch.nn.Module):
    """taming's VQLPIPSWithDiscriminator: ``generator_loss`` and ``discriminator_loss``."""

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
        logs = {"rec_loss": rec.item(), "q_loss": qloss.item()}
        if self.perceptual is not None:
            p = self.perceptual(x, xrec).mean()
            nll = nll + self.perceptual_weight * p
            logs["p_loss"] = p.item()
        loss = nll + self.codebook_weight * qloss
        if self.disc_active(step):
            g = -self.discriminator(xrec).mean()
            w = adaptive_weight(nll, g, last_layer, self.disc_weight)
            loss = loss + w * g
            logs.update(g_loss=g.item(), d_weight=w.item())
        logs["loss"] = loss.item()
        return loss, logs

    def discriminator_loss(self, x, xrec) -> tuple[torch.Tensor, dict]:
        d = hinge_d_loss(self.discriminator(x.detach()), self.discriminator(xrec.detach()))
        return d, {"d_loss": d.item()}


# ---- the run ---------------------------------------------------------------------------------
def build(cfg: VQGANTrainConfig, device):
    """Model, loss and optimizers (taming's Adam, betas 0.5/0.9)."""
    torch.manual_seed(cfg.seed)
    model = VQGAN(cfg.model_config()).to(device)
    loss = VQGANLoss(cfg).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=(0.5, 0.9))
    opt_d = None
    if loss.discriminator is not None:
        opt_d = torch.optim.Adam(loss.discriminator.parameters(), lr=cfg.lr, betas=(0.5, 0.9))
    return model, loss, opt, opt_d


def train_vqgan(cfg: VQGANTrainConfig) -> Path:
    """Train and write the run directory; returns it."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from kodalle_cli.device import pick_device

    if cfg.batch_size < 1 or cfg.max_steps < 1:
        raise UsageError("--batch-size and --max-steps must be at least 1")
    device = pick_device(cfg.device)
    out = Path(cfg.out)
    if not cfg.resume and (out / "checkpoints").is_dir() and any((out / "checkpoints").iterdir()):
        raise KodalleError(f"{out} already holds a run: pass --resume or another --out")
    out.mkdir(parents=True, exist_ok=True)
    model, loss_fn, opt, opt_d = build(cfg, device)
    if cfg.lpips_weights is None:
        import warnings

        warnings.warn("no --lpips-weights: training without the perceptual loss", stacklevel=2)
    monitor = CodebookMonitor(cfg.n_embed, cfg.restart_after, device)
    step = load_latest(out, model, loss_fn, opt, opt_d, monitor) if cfg.resume else 0
    _write_json(out / "train_config.json", _jsonable(asdict(cfg)))
    batches = image_batches(cfg.data, cfg.batch_size, cfg.resolution, seed=cfg.seed + step)
    metrics = MetricsLog(out / "metrics.csv")
    model.train()
    last_layer = model.decoder.conv_out.weight
    start, logs = time.perf_counter(), {}
    columns = [TextColumn("train vqgan"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
               TextColumn("{task.fields[info]}"), TimeRemainingColumn()]
    with Progress(*columns, disable=not cfg.progress) as bar:
        task = bar.add_task("", total=cfg.max_steps, completed=step, info="")
        while step < cfg.max_steps:
            x = next(batches).to(device)
            xrec, qloss, codes, features = model(x)
            loss, logs = loss_fn.generator_loss(x, xrec, qloss, step, last_layer)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if loss_fn.disc_active(step):
                d_loss, d_logs = loss_fn.discriminator_loss(x, xrec)
                opt_d.zero_grad(set_to_none=True)
                d_loss.backward()
                opt_d.step()
                logs.update(d_logs)
            step += 1
            logs.update(monitor.update(codes, step))
            logs["restarted"] = monitor.restart(model, features, step, opt)
            if not math.isfinite(logs["loss"]):
                raise KodalleError(f"the loss became {logs['loss']} at step {step}; lower --lr")
            if step % cfg.log_every == 0 or step == cfg.max_steps:
                metrics.write({"step": step, "time": round(time.perf_counter() - start, 2),
                               **logs})
                bar.update(task, info=f"rec {logs['rec_loss']:.3f} "
                           f"ppl {logs['perplexity']:.0f} dead {logs['dead_share']:.0%}")
            if step % cfg.save_every == 0 or step == cfg.max_steps:
                save_checkpoint(out, step, model, loss_fn, opt, opt_d, monitor, cfg.keep_last)
            bar.update(task, completed=step)
    model._identity = None
    save_outputs(model.eval(), loss_fn, out, step, cfg)
    return out


def save_outputs(model: VQGAN, loss_fn: VQGANLoss, out: Path, step: int, cfg) -> None:
    """The deliverables: safetensors + yaml, taming .ckpt + .yaml, reconstruction grid."""
    save_vqgan(model, out)
    extra = {}
    if loss_fn.discriminator is not None:
        extra = {f"loss.discriminator.{k}": v.detach().cpu()
                 for k, v in loss_fn.discriminator.state_dict().items()}
    save_taming_checkpoint(model, out / "vqgan.ckpt", global_step=step, extra_state=extra)
    images = fixed_images(cfg.data, 8, cfg.resolution)
    save_reconstruction_grid(model, images, out / "reconstructions.png")


def save_reconstruction_grid(model: VQGAN, images: torch.Tensor, path: Path) -> None:
    from torchvision.utils import save_image

    recon = model.decode(model.encode(images)).cpu()
    tmp = path.with_name(f".tmp-{path.name}")
    save_image(torch.cat([images, recon]), str(tmp), nrow=len(images), format="png")
    os.replace(tmp, path)


# ---- checkpoints and metrics -----------------------------------------------------------------
def save_checkpoint(out: Path, step, model, loss_fn, opt, opt_d, monitor, keep_last: int):
    from safetensors.torch import save_file

    root = out / "checkpoints"
    final = root / f"step-{step:07d}"
    tmp = root / f".tmp-step-{step:07d}"
    tmp.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if loss_fn.discriminator is not None:
        sd.update({f"loss.discriminator.{k}": v.detach().cpu().contiguous()
                   for k, v in loss_fn.discriminator.state_dict().items()})
    save_file(sd, str(tmp / "model.safetensors"))
    torch.save({"opt": opt.state_dict(), "opt_d": opt_d.state_dict() if opt_d else None,
                "last_used": monitor.last_used.cpu()}, tmp / "optimizer.pt")
    _write_json(tmp / "trainer_state.json", {"step": step, "restarted": monitor.restarted})
    if final.exists():
        import shutil

        shutil.rmtree(final)
    os.replace(tmp, final)
    _write_text(root / "latest", final.name)
    done = sorted(p for p in root.glob("step-*") if p.is_dir())
    for old in done[:-keep_last] if keep_last > 0 else []:
        import shutil

        shutil.rmtree(old, ignore_errors=True)


def load_latest(out: Path, model, loss_fn, opt, opt_d, monitor) -> int:
    from safetensors.torch import load_file

    pointer = out / "checkpoints" / "latest"
    if not pointer.is_file():
        raise KodalleError(f"--resume: no checkpoint in {out / 'checkpoints'}")
    ckpt = out / "checkpoints" / pointer.read_text().strip()
    sd = load_file(str(ckpt / "model.safetensors"))
    disc = {k.removeprefix("loss.discriminator."): v for k, v in sd.items()
            if k.startswith("loss.discriminator.")}
    model.load_state_dict({k: v for k, v in sd.items() if not k.startswith("loss.")})
    if loss_fn.discriminator is not None and disc:
        loss_fn.discriminator.load_state_dict(disc)
    state = torch.load(ckpt / "optimizer.pt", map_location="cpu", weights_only=True)
    opt.load_state_dict(state["opt"])
    if opt_d is not None and state.get("opt_d"):
        opt_d.load_state_dict(state["opt_d"])
    monitor.last_used.copy_(state["last_used"])
    return int(json.loads((ckpt / "trainer_state.json").read_text())["step"])


class MetricsLog:
    """Append rows to metrics.csv (header from the first row's keys plus any new ones)."""

    FIELDS = ("step", "time", "loss", "rec_loss", "q_loss", "p_loss", "g_loss", "d_weight",
              "d_loss", "perplexity", "dead_share", "restarted")

    def __init__(self, path: Path):
        self.path = path

    def write(self, row: dict) -> None:
        new = not self.path.is_file()
        with open(self.path, "a", newline="", encoding="utf-8") as fh:
            w = csv.DictWriter(fh, fieldnames=self.FIELDS, extrasaction="ignore")
            if new:
                w.writeheader()
            w.writerow({k: (round(v, 6) if isinstance(v, float) else v) for k, v in row.items()})


def _jsonable(d: dict) -> dict:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in d.items()}


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _write_json(path: Path, data) -> None:
    _write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")

