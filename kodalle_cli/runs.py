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
    runs/NAME/lock               while a run writes: its pid (:mod:`kodalle_cli.runlock`)

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

from kodalle_cli.atomic import write_json_atomic
from kodalle_cli.errors import KodalleError
from kodalle_cli.text import CaptionEncoder
from kodalle_cli.weights import load_strict, read_safetensors

CONFIG = "config.json"
TOKENIZER_DIR = "tokenizer"
VQGAN_DIR = "vqgan"
TEXT_ENCODER_DIR = "text_encoder"  # contextual runs: the frozen language model
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
        target = out / pointer.read_text(encoding="utf-8").strip()
        if (target / "trainer_state.json").is_file():
            return target
    found = sorted((out / CKPT_DIR).glob("step-*")) if (out / CKPT_DIR).is_dir() else []
    found = [p for p in found if (p / "trainer_state.json").is_file()]
    return found[-1] if found else None


def write_config(run: Path, config: dict) -> None:
    write_json_atomic(Path(run) / CONFIG, config, default=str)


def read_config(run: Path) -> dict:
    path = Path(run) / CONFIG
    if not path.is_file():
        raise KodalleError(f"{run} is not a kodalle run directory (no {CONFIG})")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise KodalleError(f"cannot read {path}: damaged ({type(exc).__name__}: "
                           f"{(str(exc).splitlines() or [''])[0]})") from None
    if not isinstance(config, dict):
        raise KodalleError(f"{path} is damaged: not a JSON object")
    return config


@dataclass
class RunPaths:
    run: Path | None  # the run directory (None for a bare .pt)
    checkpoint: Path  # the checkpoint directory or .pt file


def resolve(path: str | os.PathLike) -> RunPaths:
    """A run dir (its ``latest`` checkpoint), a checkpoint dir, or a ``.pt`` file."""
    path = Path(path).expanduser()
    if path.is_file() and path.name == "model.safetensors":  # its checkpoint directory
        path = path.parent
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
    # the VQGAN downsampling factor the model's codes were made with (None: not recorded)
    downsample_factor: int | None = None

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
        if paths.run is None:
            raise KodalleError(
                f"{paths.checkpoint} is a checkpoint outside a run directory: its config.json "
                "is not beside it"
            )
        config = read_config(paths.run)
        model = _build_model(config, paths.run / CONFIG)
        weights = paths.checkpoint / "model.safetensors"
        load_strict(model, read_safetensors(weights, "DALLE weights"), str(weights),
                    f"the model in {paths.run / CONFIG}")
        if model.config.contextual:
            attach_text_encoder(model, paths.run)
        if with_tokenizer and (paths.run / TOKENIZER_DIR).is_dir():
            tokenizer = _run_tokenizer(paths.run / TOKENIZER_DIR)
        if vqgan is None and (paths.run / VQGAN_DIR).is_dir():
            vqgan = str(paths.run / VQGAN_DIR)
    factor = model_downsample_factor(config, model, paths.run)
    if with_vqgan and vqgan is not None:
        from kodalle_cli.vqgan import load_vqgan

        # decoding only: channels-last convolutions (1.3x faster on 2 CPU cores at ch 32)
        vq = load_vqgan(vqgan, device=device).to(memory_format=torch.channels_last)
        check_vqgan(model, vq, vqgan, factor)
    config["checkpoint"] = str(paths.checkpoint)
    # the pad id and length the model was trained with: recorded in its config
    encoder = (CaptionEncoder(tokenizer, model.config.text_seq_len, model.config.pad_id)
               if tokenizer is not None else None)
    return LoadedRun(model.to(device).eval(), encoder, vq, str(target), config, factor)


def _build_model(config: dict, where: Path):
    """The run's DALLE (random weights); a missing or impossible model config is one error
    line naming the file."""
    from kodalle_cli.errors import ConfigError
    from kodalle_cli.model import DALLE, DALLEConfig

    model = config.get("model")
    if not isinstance(model, dict):
        raise KodalleError(f"{where} has no model config: not a DALLE run")
    try:
        return DALLE(DALLEConfig.from_dict(model))
    except (ConfigError, TypeError, ValueError, KeyError, RuntimeError) as exc:
        raise KodalleError(f"{where}: its model config cannot be built ({exc})") from None


def save_text_encoder(run: Path, lm) -> None:
    """A contextual run's language model, saved once into ``run/text_encoder`` (whole or not
    at all), so that the run samples without its backbone."""
    from kodalle_cli.atomic import replacing

    target = Path(run) / TEXT_ENCODER_DIR
    if (target / "config.json").is_file():
        return
    with replacing(target, directory=True) as tmp:
        lm.save_pretrained(tmp, safe_serialization=True)


def attach_text_encoder(model, run: Path) -> None:
    """Attach the run's frozen language model to a contextual DALLE (one line if missing)."""
    from kodalle_cli.model.contextual import load_contextual

    directory = Path(run) / TEXT_ENCODER_DIR
    if not (directory / "config.json").is_file():
        raise KodalleError(f"{run} is a contextual run but has no {TEXT_ENCODER_DIR}/ (its "
                           "language model): the run is incomplete")
    try:
        encoder = load_contextual(directory, model.config.pad_id, model.config.text_layer)
    except (OSError, ValueError) as exc:
        raise KodalleError(f"cannot load the run's language model {directory}: "
                           f"{(str(exc).splitlines() or [''])[0]}") from None
    model.attach_text_encoder(encoder)


def _run_tokenizer(directory: Path):
    from kodalle_cli.text import load_run_tokenizer

    try:
        return load_run_tokenizer(directory)
    except Exception as exc:  # noqa: BLE001 - OSError, JSON, tokenizers' own errors
        raise KodalleError(
            f"cannot load the run's tokenizer {directory}: damaged ({type(exc).__name__}: "
            f"{(str(exc).splitlines() or [''])[0]})") from None


def model_downsample_factor(config: dict, model, run: Path | None = None) -> int | None:
    """The downsampling factor of the VQGAN a model's codes were made with, where recorded:
    the run's ``vqgan`` section (from its token shards' manifest), else the run's own
    ``vqgan/config.yaml``, else a ``.pt``'s ``vae_params`` (dalle-pytorch's DiscreteVAE:
    ``2 ** num_layers``). None when nothing records it (a dalle-pytorch ``.pt`` trained on a
    taming VQGAN keeps ``vae_params`` None): then any factor is taken.

    Not the VQGAN's yaml ``resolution``: a taming VQGAN is convolutional and draws any grid,
    so the grid comes from the model and the resolution it was trained at does not matter
    (dalle-pytorch's ``VQGanVAE`` likewise sets 256 px whatever its yaml says)."""
    from kodalle_cli.data.tokens import manifest_downsample_factor

    recorded = manifest_downsample_factor(config)  # the run's "vqgan" is its manifest's
    if recorded is not None:
        return recorded
    if run is not None and (run / VQGAN_DIR / "config.yaml").is_file():
        from kodalle_cli.vqgan.io import read_config as read_vqgan_config

        try:
            return read_vqgan_config(run / VQGAN_DIR / "config.yaml").downsample_factor
        except KodalleError:
            return None  # a damaged one is reported when it is loaded
    vae = (config.get("source") or {}).get("vae_params") or {}
    if isinstance(vae.get("num_layers"), int):
        return 2 ** vae["num_layers"]
    size, grid = vae.get("image_size"), model.config.image_fmap_size
    if isinstance(size, int) and size % grid == 0:
        return size // grid
    return None


def check_vqgan(model, vqgan, source, downsample_factor: int | None = None) -> None:
    """A VQGAN that cannot draw this model's codes is an error, before anything is
    generated: another codebook size, or (where the model records one, see
    :func:`model_downsample_factor`) another downsampling factor. The code grid is the
    model's; the resolution the VQGAN was trained at is not checked."""
    cfg = model.config
    if vqgan.num_tokens != cfg.num_image_tokens:
        raise KodalleError(
            f"VQGAN {source} has {vqgan.num_tokens} codes but the model was trained on "
            f"{cfg.num_image_tokens}: use the VQGAN its token shards were made with"
        )
    if downsample_factor is not None and vqgan.downsample_factor != downsample_factor:
        raise KodalleError(
            f"VQGAN {source} downsamples by {vqgan.downsample_factor} but the model's codes "
            f"were made by one that downsamples by {downsample_factor}: use the VQGAN its "
            "token shards were made with"
        )


def save_run(run: str | os.PathLike, model, tokenizer=None, vqgan=None, step: int = 0,
             captions: list[str] | None = None, config: dict | None = None) -> Path:
    """A run directory holding ``model`` (one checkpoint at ``step``), its tokenizer and
    VQGAN: what ``kodalle sample`` opens. For models that did not come from ``kodalle
    train``, such as a converted KoDALLE or dalle-pytorch ``.pt``. ``captions``: checked
    with :func:`kodalle_cli.text.check_raw_tokenizer` (sampling then skips transformers).
    ``config``: more of config.json (for example its ``train`` section)."""
    from safetensors.torch import save_file

    from kodalle_cli.atomic import write_text_atomic

    run = Path(run)
    config = dict(config or {})
    if vqgan is not None and "vqgan" not in config:  # what model_downsample_factor reads
        config["vqgan"] = {"hash": vqgan.identity(), "num_tokens": vqgan.num_tokens,
                           "downsample_factor": vqgan.downsample_factor,
                           "fmap_size": model.config.image_fmap_size}
    write_config(run, {"kind": "dalle", "model": model.config.to_dict(), **config})
    if tokenizer is not None:
        tokenizer.save_pretrained(run / TOKENIZER_DIR)
        if captions:
            from kodalle_cli.text import check_raw_tokenizer

            check_raw_tokenizer(run / TOKENIZER_DIR, tokenizer, captions,
                                model.config.text_seq_len)
    if vqgan is not None:
        from kodalle_cli.vqgan import save_vqgan

        save_vqgan(vqgan, run / VQGAN_DIR)
    if model.text_encoder is not None:
        save_text_encoder(run, model.text_encoder.lm)
    ckpt = run / CKPT_DIR / checkpoint_name(step)
    ckpt.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
              str(ckpt / "model.safetensors"))
    write_text_atomic(ckpt / "trainer_state.json", json.dumps({"step": step}))
    write_text_atomic(run / LATEST, f"{CKPT_DIR}/{ckpt.name}")
    return run
