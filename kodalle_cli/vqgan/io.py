"""The VQGAN file formats, read and written here only: kodalle directories
(``model.safetensors`` + taming ``config.yaml``), taming checkpoints (read safely, and
written for taming), taming yaml configs, and the presets.

What ``load_vqgan`` accepts:

- a preset name (``imagenet-f16-1024``, ``imagenet-f16-16384``, ``gumbel-f8-8192``): the
  official taming checkpoint, downloaded once into ``~/.cache/kodalle/vqgan``;
- a kodalle directory (``model.safetensors`` + ``config.yaml``, what :func:`save_vqgan`
  writes; a run directory's ``vqgan/`` folder is found too);
- a taming ``.ckpt`` (a Lightning pickle, weights under ``state_dict``) with its ``.yaml``
  config (given, or beside it: same stem, ``model.yaml``, or ``../configs/*.yaml``), or a
  taming log directory (``checkpoints/last.ckpt`` + ``configs/*-project.yaml``).

Checkpoints are read with ``torch.load(weights_only=True)``. The Lightning objects such
files pickle are mapped to inert stand-ins under their original dotted names; any other
global (``os.system`` ...) is refused before anything runs. ``loss.*`` keys are ignored,
every other key must match the architecture exactly.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from kodalle_cli.atomic import replacing, write_text_atomic
from kodalle_cli.cache import cache_dir as kodalle_cache
from kodalle_cli.errors import KodalleError
from kodalle_cli.vqgan.model import VQGAN, VQGANConfig

CONFIG_DIR = Path(__file__).parent / "configs"
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.yaml"
TAMING_TARGETS = {
    "taming.models.vqgan.VQModel": "vq",
    "taming.models.vqgan.VQNoDiscModel": "vq",
    "taming.models.vqgan.GumbelVQ": "gumbel",
}
DDCONFIG_KEYS = (
    "double_z", "z_channels", "resolution", "in_channels", "out_ch", "ch", "ch_mult",
    "num_res_blocks", "attn_resolutions", "dropout", "resamp_with_conv",
)


@dataclass(frozen=True)
class Preset:
    name: str
    ckpt_url: str
    config: str  # bundled yaml in configs/
    description: str


_HEIBOX = "https://heibox.uni-heidelberg.de/d/{}/files/?p=%2Fckpts%2Flast.ckpt&dl=1"
PRESETS = {
    p.name: p
    for p in (
        Preset("imagenet-f16-1024", _HEIBOX.format("8088892a516d4e3baf92"),
               "imagenet-f16-1024.yaml", "taming ImageNet VQGAN, f16, 1024 codes"),
        Preset("imagenet-f16-16384", _HEIBOX.format("a7530b09fed84f80a887"),
               "imagenet-f16-16384.yaml", "taming ImageNet VQGAN, f16, 16384 codes"),
        Preset("gumbel-f8-8192", _HEIBOX.format("2e5662443a6b4307b470"),
               "gumbel-f8-8192.yaml", "taming OpenImages Gumbel VQGAN, f8, 8192 codes"),
    )
}


# ---- configs ---------------------------------------------------------------------------------
def config_from_taming(cfg: dict, where: str = "config") -> VQGANConfig:
    """A taming yaml (``{model: {target, params}}``, or just its ``model`` part) -> config."""
    model = cfg.get("model", cfg) if isinstance(cfg, dict) else None
    if not isinstance(model, dict) or "params" not in model:
        raise KodalleError(f"{where} is not a taming VQGAN config (no model.params)")
    target = model.get("target", "taming.models.vqgan.VQModel")
    if target not in TAMING_TARGETS:
        raise KodalleError(
            f"{where}: model.target {target!r} is not a VQGAN ({', '.join(TAMING_TARGETS)})"
        )
    params = dict(model["params"])
    if params.get("remap"):
        raise KodalleError(f"{where}: VQGANs with a code remap are not supported")
    dd = params.get("ddconfig") or {}
    try:
        arch = {k: dd[k] for k in DDCONFIG_KEYS if k in dd}
        config = VQGANConfig(
            kind=TAMING_TARGETS[target], n_embed=int(params["n_embed"]),
            embed_dim=int(params["embed_dim"]), kl_weight=float(params.get("kl_weight", 1e-8)),
            **arch,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise KodalleError(f"{where}: bad VQGAN config ({type(exc).__name__}: {exc})") from None
    config.extra = {
        "base_learning_rate": model.get("base_learning_rate"),
        **{k: v for k, v in params.items()
           if k in ("lossconfig", "temperature_scheduler_config", "monitor")},
    }
    return config


def config_to_taming(config: VQGANConfig) -> dict:
    """The taming yaml for a config; ``taming.main.instantiate_from_config`` builds it."""
    dd = {k: getattr(config, k) for k in DDCONFIG_KEYS}
    dd["ch_mult"], dd["attn_resolutions"] = list(config.ch_mult), list(config.attn_resolutions)
    params: dict = {"embed_dim": config.embed_dim, "n_embed": config.n_embed, "ddconfig": dd}
    extra = config.extra or {}
    params["lossconfig"] = extra.get("lossconfig") or {
        "target": "taming.modules.losses.vqperceptual.DummyLoss"
    }
    if config.kind == "gumbel":
        params["kl_weight"] = config.kl_weight
        params["temperature_scheduler_config"] = extra.get("temperature_scheduler_config") or {
            "target": "taming.lr_scheduler.LambdaWarmUpCosineScheduler",
            "params": {"warm_up_steps": 0, "max_decay_steps": 1000001, "lr_start": 0.9,
                       "lr_max": 0.9, "lr_min": 1.0e-06},
        }
    target = "taming.models.vqgan.GumbelVQ" if config.kind == "gumbel" else \
        "taming.models.vqgan.VQModel"
    model = {"base_learning_rate": extra.get("base_learning_rate") or 4.5e-06,
             "target": target, "params": params}
    return {"model": model}


def read_config(path: str | os.PathLike) -> VQGANConfig:
    path = Path(path)
    if not path.is_file():
        raise KodalleError(f"VQGAN config {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise KodalleError(f"VQGAN config {path} is not valid YAML: {exc}") from None
    return config_from_taming(data, str(path))


def write_config(config: VQGANConfig, path: str | os.PathLike) -> None:
    write_text_atomic(Path(path), yaml.safe_dump(config_to_taming(config), sort_keys=False))


# ---- safe checkpoint reading -----------------------------------------------------------------
class LightningObject:
    """Inert stand-in for a pickled Lightning object: keeps its state, runs nothing."""

    def __setstate__(self, state) -> None:
        self.state = state


class LightningDict:
    """Inert stand-in for Lightning's dict subclasses (AttributeDict): becomes a plain dict
    (the safe unpickler only fills plain dicts)."""

    def __new__(cls, *args):
        return {}


_LIGHTNING_OBJECTS = [
    f"{pkg}.callbacks.{mod}"
    for pkg in ("pytorch_lightning", "lightning.pytorch")
    for mod in (
        "model_checkpoint.ModelCheckpoint", "early_stopping.EarlyStopping",
        "lr_monitor.LearningRateMonitor", "progress.ProgressBar",
        "progress.tqdm_progress.TQDMProgressBar", "progress.rich_progress.RichProgressBar",
        "gradient_accumulation_scheduler.GradientAccumulationScheduler",
    )
]
_LIGHTNING_DICTS = [
    "pytorch_lightning.utilities.parsing.AttributeDict",
    "lightning.pytorch.utilities.parsing.AttributeDict",
    "lightning_fabric.utilities.data.AttributeDict",
]


def _stand_ins() -> list:
    """One stand-in class per dotted name (a class may only be registered under one)."""
    out = []
    for name in _LIGHTNING_OBJECTS:
        out.append((type(name.rsplit(".", 1)[1], (LightningObject,), {}), name))
    for name in _LIGHTNING_DICTS:
        out.append((type(name.rsplit(".", 1)[1], (LightningDict,), {}), name))
    return out


_STAND_INS = _stand_ins()


def load_checkpoint(path: str | os.PathLike) -> dict:
    """``torch.load(weights_only=True)`` with Lightning stand-ins; refuses anything else."""
    from kodalle_cli.weights import read_torch_file

    return read_torch_file(path, "VQGAN checkpoint", _STAND_INS,
                           "plain weights and known Lightning objects")


def state_dict_from_checkpoint(ckpt, where: str) -> dict[str, torch.Tensor]:
    sd = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise KodalleError(f"{where} holds no state_dict of tensors")
    return {k: v for k, v in sd.items() if not k.startswith("loss.")}


def load_weights(model: VQGAN, sd: dict[str, torch.Tensor], where: str) -> None:
    """Strict load: every key of the architecture present with its shape, nothing extra."""
    from kodalle_cli.weights import load_strict

    load_strict(model, sd, where, "its VQGAN config")


# ---- presets and the cache -------------------------------------------------------------------
def cache_dir() -> Path:
    return kodalle_cache("vqgan")


def fetch_preset(name: str) -> tuple[Path, Path]:
    """(ckpt, yaml) of a preset, downloading the checkpoint into the cache once."""
    preset = PRESETS[name]
    ckpt = cache_dir() / name / "last.ckpt"
    config = CONFIG_DIR / preset.config
    if ckpt.is_file():
        return ckpt, config
    how = f"download {preset.ckpt_url} and pass --vqgan PATH --vqgan-config {config}"
    from kodalle_cli.backbone import hub_offline

    if hub_offline():
        raise KodalleError(f"VQGAN preset {name}: {ckpt} is not cached and offline mode is on; {how}")
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(preset.ckpt_url, str(ckpt), progress=True)
    except Exception as exc:  # no network, HTTP errors: one line
        raise KodalleError(
            f"VQGAN preset {name}: cannot download {ckpt.name} "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); {how}"
        ) from None
    return ckpt, config


# ---- the entry points ------------------------------------------------------------------------
def resolve(spec: str | os.PathLike, config: str | os.PathLike | None = None
            ) -> tuple[Path, Path]:
    """``--vqgan`` (+ ``--vqgan-config``) -> (weights file, yaml)."""
    if str(spec) in PRESETS and not Path(spec).exists():
        ckpt, preset_config = fetch_preset(str(spec))
        return ckpt, Path(config) if config else preset_config
    path = Path(spec).expanduser()
    hint = (f"pass a preset ({', '.join(PRESETS)}), a kodalle VQGAN directory, or "
            "--vqgan PATH --vqgan-config YAML")
    if path.is_dir():
        for d in (path, path / "vqgan"):
            if (d / WEIGHTS_NAME).is_file() and (d / CONFIG_NAME).is_file():
                return d / WEIGHTS_NAME, Path(config) if config else d / CONFIG_NAME
        ckpts = sorted(path.glob("*.ckpt")) or sorted(path.glob("checkpoints/last.ckpt"))
        if len(ckpts) == 1:
            return ckpts[0], Path(config) if config else _find_yaml(ckpts[0], hint)
        raise KodalleError(f"no VQGAN in {path}: {hint}")
    if not path.is_file():
        raise KodalleError(f"VQGAN {spec} is neither a file, a directory nor a preset; {hint}")
    return path, Path(config) if config else _find_yaml(path, hint)


def _find_yaml(weights: Path, hint: str) -> Path:
    candidates = [weights.with_suffix(".yaml"), weights.with_suffix(".yml"),
                  weights.parent / "model.yaml", weights.parent / CONFIG_NAME]
    candidates += sorted((weights.parent.parent / "configs").glob("*project.yaml"))
    for c in candidates:
        if c.is_file():
            return c
    raise KodalleError(f"no config found beside {weights}: {hint}")


def load_vqgan(spec: str | os.PathLike, config: str | os.PathLike | None = None,
               device: str | torch.device = "cpu") -> VQGAN:
    """Load a VQGAN (preset, directory, or checkpoint + yaml), in eval mode on ``device``."""
    weights, config_path = resolve(spec, config)
    cfg = read_config(config_path)
    try:
        model = VQGAN(cfg)
    except (ValueError, TypeError, RuntimeError, ZeroDivisionError) as exc:
        raise KodalleError(f"VQGAN config {config_path} builds no model ({exc})") from None
    if weights.suffix == ".safetensors":
        from kodalle_cli.weights import read_safetensors

        sd = read_safetensors(weights, "VQGAN weights")
        sd = {k: v for k, v in sd.items() if not k.startswith("loss.")}
    else:
        sd = state_dict_from_checkpoint(load_checkpoint(weights), str(weights))
    load_weights(model, sd, str(weights))
    model.source = str(spec)
    return model.eval().requires_grad_(False).to(device)


def save_vqgan(model: VQGAN, directory: str | os.PathLike) -> Path:
    """``directory/model.safetensors`` + ``directory/config.yaml``; load_vqgan reads it back."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    with replacing(directory / WEIGHTS_NAME) as tmp:
        save_file(sd, str(tmp), metadata={"format": "pt", "identity": model.identity()})
    write_config(model.config, directory / CONFIG_NAME)
    return directory


def save_taming_checkpoint(model: VQGAN, path: str | os.PathLike, global_step: int = 0,
                           epoch: int = 0, extra_state: dict | None = None) -> Path:
    """A Lightning-style ``.ckpt`` (``state_dict`` + step) and its ``.yaml`` beside it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().to("cpu") for k, v in model.state_dict().items()}
    sd.update(extra_state or {})
    payload = {"state_dict": sd, "global_step": int(global_step), "epoch": int(epoch),
               "pytorch-lightning_version": "1.0.8"}
    with replacing(path) as tmp:
        torch.save(payload, tmp)
    write_config(model.config, path.with_suffix(".yaml"))
    return path
