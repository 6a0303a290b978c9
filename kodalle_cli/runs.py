"""The run directory: what ``kodalle train`` writes and every later command reads.

::

    runs/NAME/config.json        every hyperparameter: {"kind": "dalle", "model": DALLEConfig,
                                 "backbone": {...}, "train": {...}, "data": {...}, "vqgan": {...}}
    runs/NAME/tokenizer/         the backbone's tokenizer (save_pretrained)
    runs/NAME/vqgan/             the VQGAN (model.safetensors + config.yaml)
    runs/NAME/checkpoints/step-0001000/{model.safetensors, optimizer.pt, trainer_state.json,
                                        rng.pt}
    runs/NAME/latest             "checkpoints/step-0001000"
    runs/NAME/metrics.csv        step,split,metric,value,time
    runs/NAME/samples/           step-0001000.png grids of fixed validation captions

:func:`load_run` is the one way to open a trained DALLE for use (sampling, scoring, the
demos): a run directory (default: :func:`newest_run` under ``runs/``), one of its checkpoint
directories, or a DALLE-pytorch / KoDALLE ``.pt`` checkpoint (read with
``weights_only=True``); it returns a :class:`LoadedRun` (model, caption encoder, VQGAN).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kodalle_cli.errors import KodalleError
from kodalle_cli.text import CaptionEncoder

CONFIG = "config.json"
TOKENIZER_DIR = "tokenizer"
VQGAN_DIR = "vqgan"
SAMPLES_DIR = "samples"
CKPT_DIR = "checkpoints"
LATEST = "latest"
METRICS = "metrics.csv"


def checkpoint_name(step: int) -> str:
    return f"step-{step:07d}"


def latest_checkpoint(out: Path) -> Path | None:
    """The checkpoint ``latest`` points at; else the newest complete one; else None."""
    out = Path(out)
    pointer = out / LATEST
    if pointer.is_file():
        target = out / pointer.read_text().strip()
        if (target / "trainer_state.json").is_file():
            return target
    found = sorted((out / CKPT_DIR).glob("step-*")) if (out / CKPT_DIR).is_dir() else []
    found = [p for p in found if (p / "trainer_state.json").is_file()]
    return found[-1] if found else None


def write_config(run: Path, config: dict) -> None:
    run.mkdir(parents=True, exist_ok=True)
    tmp = run / f".tmp-{CONFIG}"
    tmp.write_text(json.dumps(config, ensure_ascii=False, indent=2, default=str))
    os.replace(tmp, run / CONFIG)


def read_config(run: Path) -> dict:
    path = Path(run) / CONFIG
    if not path.is_file():
        raise KodalleError(f"{run} is not a kodalle run directory (no {CONFIG})")
    return json.loads(path.read_text())


@dataclass
class RunPaths:
    run: Path | None  # the run directory (None for a bare .pt)
    checkpoint: Path  # the checkpoint directory or .pt file


def resolve(path: str | os.PathLike) -> RunPaths:
    """A run dir (its ``latest`` checkpoint), a checkpoint dir, or a ``.pt`` file."""
    path = Path(path).expanduser()
    if path.is_file():
        return RunPaths(None, path)
    if not path.is_dir():
        raise KodalleError(f"no run, checkpoint or .pt at {path}")
    if (path / "model.safetensors").is_file():  # a checkpoint directory
        run = path.parent.parent if path.parent.name == CKPT_DIR else None
        if run is not None and not (run / CONFIG).is_file():
            run = None
        return RunPaths(run, path)
    if (path / CONFIG).is_file():
        ckpt = latest_checkpoint(path)
        if ckpt is None:
            raise KodalleError(f"run {path} has no checkpoint yet")
        return RunPaths(path, ckpt)
    raise KodalleError(f"{path} is neither a run directory nor a checkpoint")


@dataclass
class LoadedRun:
    """A DALLE loaded for use, with what turns captions into its input and its codes into
    images: what :func:`load_run` returns.

    ``caption_encoder``: the run's tokenizer with the model's text_seq_len and pad id (None
    when the checkpoint comes without a tokenizer); ``vqgan``: None when not loaded or not
    known; ``source``: what was opened, as given (run dir, checkpoint dir or ``.pt``);
    ``config``: the run's config.json, plus ``"checkpoint"``, the checkpoint read.
    """

    model: torch.nn.Module
    caption_encoder: CaptionEncoder | None
    vqgan: torch.nn.Module | None
    source: str
    config: dict = field(default_factory=dict)

    @property
    def tokenizer(self):
        return self.caption_encoder.tokenizer if self.caption_encoder is not None else None

    @property
    def info(self) -> dict:
        """What a sample's metadata records about the run."""
        return {"checkpoint_path": self.config.get("checkpoint"),
                "backbone": self.config.get("backbone"), "model": self.config.get("model"),
                "vqgan": self.config.get("vqgan")}

    def ready_to_sample(self) -> LoadedRun:
        """Itself, or one clear error naming what is missing to draw images."""
        if self.caption_encoder is None or self.vqgan is None:
            missing = " and ".join(n for n, v in (
                ("--backbone NAME (its tokenizer)", self.caption_encoder),
                ("--vqgan PATH", self.vqgan)) if v is None)
            raise KodalleError(
                f"{self.source} comes without a tokenizer or VQGAN: pass {missing}")
        return self


def newest_run(runs_dir: str | os.PathLike = "runs") -> Path:
    """The run under ``runs_dir`` whose ``latest`` checkpoint is the newest (DALLE runs only:
    VQGAN and reranker runs live there too)."""
    runs_dir = Path(runs_dir)
    candidates = []
    for run in sorted(runs_dir.iterdir()) if runs_dir.is_dir() else []:
        try:
            config = json.loads((run / CONFIG).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if not isinstance(config, dict) or config.get("kind", "dalle") != "dalle" or (
                "model" not in config):
            continue
        ckpt = latest_checkpoint(run)
        if ckpt is not None:
            candidates.append((ckpt.stat().st_mtime, str(run), run))
    if not candidates:
        raise KodalleError(
            f"no trained DALLE run with a checkpoint under {runs_dir}/: train one with "
            "`kodalle train`, or pass --checkpoint RUN_DIR|CHECKPOINT_DIR|FILE.pt"
        )
    return max(candidates)[2]


def load_run(path: str | os.PathLike | None = None, device: str | torch.device = "cpu", *,
             runs_dir: str | os.PathLike = "runs", backbone: str | None = None,
             vqgan: str | None = None, with_vqgan: bool = True,
             with_tokenizer: bool = True) -> LoadedRun:
    """The DALLE in ``path`` (default: :func:`newest_run` of ``runs_dir``) in eval mode on
    ``device``, with its caption encoder and VQGAN (see :class:`LoadedRun`).

    For a KoDALLE / DALLE-pytorch ``.pt``, ``backbone`` names the tokenizer (KoDALLE:
    ``klue-roberta-large``) and ``vqgan`` the image tokenizer, since the file holds neither
    (a run's own VQGAN is used otherwise; ``vqgan`` replaces it).
    """
    from kodalle_cli.model import DALLE, DALLEConfig

    target = Path(path) if path is not None else newest_run(runs_dir)
    paths = resolve(target)
    tokenizer = vq = None
    if paths.run is None and paths.checkpoint.is_file():
        from kodalle_cli.model.convert import load_dalle_pytorch_checkpoint

        kwargs = {}
        if backbone is not None:
            from kodalle_cli.backbone import get_backbone, special_ids

            bb = get_backbone(backbone)
            kwargs["pad_id"] = special_ids(bb.config())[0]
            if with_tokenizer:
                tokenizer = bb.load_tokenizer()
        model, vae_params = load_dalle_pytorch_checkpoint(paths.checkpoint, **kwargs)
        config = {"kind": "dalle", "model": model.config.to_dict(),
                  "source": {"dalle_pytorch": str(paths.checkpoint), "vae_params": vae_params},
                  "backbone": {"name": backbone}}
    else:
        from safetensors.torch import load_file

        if paths.run is None:
            raise KodalleError(
                f"{paths.checkpoint} is a checkpoint outside a run directory: its config.json "
                "is not beside it"
            )
        config = read_config(paths.run)
        model = DALLE(DALLEConfig.from_dict(config["model"]))
        model.load_state_dict(load_file(str(paths.checkpoint / "model.safetensors")))
        if with_tokenizer and (paths.run / TOKENIZER_DIR).is_dir():
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(paths.run / TOKENIZER_DIR)
        if vqgan is None and (paths.run / VQGAN_DIR).is_dir():
            vqgan = str(paths.run / VQGAN_DIR)
    if with_vqgan and vqgan is not None:
        from kodalle_cli.vqgan import load_vqgan

        vq = load_vqgan(vqgan, device=device)
    config["checkpoint"] = str(paths.checkpoint)
    # the pad id and length the model was trained with: recorded in its config
    encoder = (CaptionEncoder(tokenizer, model.config.text_seq_len, model.config.pad_id)
               if tokenizer is not None else None)
    return LoadedRun(model.to(device).eval(), encoder, vq, str(target), config)
