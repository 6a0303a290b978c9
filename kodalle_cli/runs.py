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

:func:`load_run` opens a run directory, one of its checkpoint directories, or a
DALLE-pytorch / KoDALLE ``.pt`` checkpoint (read with ``weights_only=True``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from kodalle_cli.errors import KodalleError

CONFIG = "config.json"
TOKENIZER_DIR = "tokenizer"
VQGAN_DIR = "vqgan"
SAMPLES_DIR = "samples"


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
    from kodalle_cli.train.trainer import latest_checkpoint

    path = Path(path).expanduser()
    if path.is_file():
        return RunPaths(None, path)
    if not path.is_dir():
        raise KodalleError(f"no run, checkpoint or .pt at {path}")
    if (path / "model.safetensors").is_file():  # a checkpoint directory
        run = path.parent.parent if path.parent.name == "checkpoints" else None
        if run is not None and not (run / CONFIG).is_file():
            run = None
        return RunPaths(run, path)
    if (path / CONFIG).is_file():
        ckpt = latest_checkpoint(path)
        if ckpt is None:
            raise KodalleError(f"run {path} has no checkpoint yet")
        return RunPaths(path, ckpt)
    raise KodalleError(f"{path} is neither a run directory nor a checkpoint")


def load_run(path: str | os.PathLike, device: str | torch.device = "cpu", *,
             backbone: str | None = None, vqgan: str | None = None, with_vqgan: bool = True,
             with_tokenizer: bool = True):
    """-> ``(model, config, tokenizer, vqgan)``: the DALLE in eval mode on ``device``, the run
    config dict, the HF tokenizer (or None) and the VQGAN (or None).

    For a KoDALLE / DALLE-pytorch ``.pt``, ``backbone`` names the tokenizer (KoDALLE:
    ``klue-roberta-large``) and ``vqgan`` the image tokenizer, since the file holds neither.
    """
    from kodalle_cli.model import DALLE, DALLEConfig

    paths = resolve(path)
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
    return model.to(device).eval(), config, tokenizer, vq
