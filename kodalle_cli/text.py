"""Captions -> token ids: the one caption encoder.

:class:`CaptionEncoder` owns a tokenizer, ``text_seq_len`` and the pad id, and is the only
place a caption becomes token ids. Every caption is NFC-normalised here, exactly once, and
encoded with the tokenizer's special tokens; one longer than ``text_seq_len`` is cut by the
tokenizer (special tokens kept). Its users:

- ``kodalle tokenize`` (training data): :meth:`CaptionEncoder.encode_batch`, ids padded
  to ``text_seq_len`` as int32 rows, and how many captions were cut;
- ``kodalle sample`` (and everything built on it): :meth:`CaptionEncoder.encode`, one
  caption's padded ids with what a user should be warned about (cut, unknown tokens);
- the reranker's text tower: :meth:`CaptionEncoder.encode_with_mask`, ids padded to the
  longest caption of the batch with an attention mask.

The training and sampling paths give the same ids for the same caption (tested).
"""

from __future__ import annotations

import contextlib
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

UNKNOWN_WARN_FRACTION = 0.5


def normalize(caption: str) -> str:
    """The caption as the encoder sees it: NFC (composed Hangul syllables, not jamo)."""
    return unicodedata.normalize("NFC", caption)


@dataclass
class EncodedCaption:
    """One caption's ids and what a user should hear about them."""

    caption: str  # NFC-normalised
    ids: list[int]  # exactly text_seq_len ids (padded)
    num_tokens: int  # before padding, after truncation
    full_length: int  # before truncation
    unknown_tokens: int
    warnings: list[str] = field(default_factory=list)

    @property
    def truncated(self) -> int:
        return self.full_length - self.num_tokens


@contextlib.contextmanager
def _quiet_length_warning():
    """transformers warns, once, that a caption longer than the tokenizer's maximum "will
    result in indexing errors" when it is only measured here; quiet it for the call."""
    import logging

    log = logging.getLogger("transformers.tokenization_utils_base")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


class CaptionEncoder:
    """A tokenizer, the length every caption is cut or padded to, and the id it is padded with.

    ``pad_id``: for a DALLE, the pad id the model was trained with (the backbone's, see
    :meth:`for_backbone`; a run records it in its model config); for the reranker, its
    tokenizer's (:meth:`for_tokenizer`).
    """

    def __init__(self, tokenizer, text_seq_len: int, pad_id: int):
        self.tokenizer = tokenizer
        self.text_seq_len = int(text_seq_len)
        self.pad_id = int(pad_id)

    @classmethod
    def for_backbone(cls, backbone, text_seq_len: int) -> CaptionEncoder:
        """The backbone's tokenizer, padded with the backbone's pad id (its config's pad
        token; eos for models without one): what ``kodalle tokenize`` writes."""
        from kodalle_cli.backbone import special_ids

        return cls(backbone.load_tokenizer(), text_seq_len, special_ids(backbone.config())[0])

    @classmethod
    def for_tokenizer(cls, tokenizer, text_seq_len: int) -> CaptionEncoder:
        """Padded with the tokenizer's own pad token (GPT-style tokenizers without one are
        given their eos token as pad token): the reranker's text tower."""
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        return cls(tokenizer, text_seq_len, tokenizer.pad_token_id)

    # ---- the one tokenizer call -------------------------------------------------------------
    def _tokens(self, captions: Sequence[str]) -> list[tuple[list[int], list[int]]]:
        """Per caption (already normalised): (all its ids, the ids kept after truncation)."""
        if not captions:
            return []
        with _quiet_length_warning():  # the caller says it better (how many tokens dropped)
            full = self.tokenizer(list(captions), add_special_tokens=True,
                                  truncation=False)["input_ids"]
        long = [i for i, ids in enumerate(full) if len(ids) > self.text_seq_len]
        kept = [list(ids) for ids in full]
        if long:
            cut = self.tokenizer([captions[i] for i in long], add_special_tokens=True,
                                 truncation=True, max_length=self.text_seq_len)["input_ids"]
            for i, ids in zip(long, cut, strict=True):
                kept[i] = list(ids)
        return [(list(f), k) for f, k in zip(full, kept, strict=True)]

    # ---- training data ----------------------------------------------------------------------
    def encode_batch(self, captions: Sequence[str]) -> tuple[np.ndarray, int]:
        """ids ``[B, text_seq_len]`` int32 padded with ``pad_id``, and how many captions were
        truncated."""
        tokens = self._tokens([normalize(c) for c in captions])
        ids = np.full((len(tokens), self.text_seq_len), self.pad_id, dtype=np.int32)
        for i, (_, kept) in enumerate(tokens):
            ids[i, : len(kept)] = kept
        truncated = sum(len(full) > len(kept) for full, kept in tokens)
        return ids, truncated

    # ---- sampling -----------------------------------------------------------------------------
    def encode(self, caption: str) -> EncodedCaption:
        """One caption's ids padded to ``text_seq_len`` (as :meth:`encode_batch` makes them),
        with warnings: a caption longer than ``text_seq_len`` is cut (the warning says how
        many tokens were dropped); one whose tokens are mostly the unknown token gets a
        warning too (the tokenizer does not know the language or the words)."""
        caption = normalize(caption)
        ((full, ids),) = self._tokens([caption])
        special = set(getattr(self.tokenizer, "all_special_ids", []) or [])
        unk = getattr(self.tokenizer, "unk_token_id", None)
        content = [i for i in full if i not in special or i == unk]
        unknown = sum(1 for i in content if unk is not None and i == unk)
        enc = EncodedCaption(caption, ids + [self.pad_id] * (self.text_seq_len - len(ids)),
                             len(ids), len(full), unknown)
        short = caption if len(caption) <= 40 else caption[:40] + "…"
        if enc.truncated:
            enc.warnings.append(
                f"caption {short!r} is {len(full)} tokens, longer than text_seq_len "
                f"{self.text_seq_len}: its last {enc.truncated} tokens "
                f"({100 * enc.truncated / len(full):.0f}% of it) are dropped"
            )
        if not content:
            enc.warnings.append(
                f"caption {short!r} gives no tokens (nothing the tokenizer keeps, such as "
                "control characters only): the images will not depend on it"
            )
        elif unknown / len(content) >= UNKNOWN_WARN_FRACTION:
            enc.warnings.append(
                f"caption {short!r}: {unknown} of its {len(content)} tokens are unknown to "
                "the tokenizer; the images will barely depend on it (is it in the training "
                "language?)"
            )
        return enc

    # ---- the reranker ------------------------------------------------------------------------
    def encode_with_mask(self, captions: Sequence[str]) -> dict:
        """``input_ids`` and ``attention_mask`` (int64 tensors ``[B, longest]``): ids cut to
        ``text_seq_len`` and padded with ``pad_id`` to the batch's longest caption, on the
        tokenizer's padding side."""
        import torch

        kept = [k for _, k in self._tokens([normalize(c) for c in captions])]
        longest = max((len(k) for k in kept), default=0)
        ids = torch.full((len(kept), longest), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(kept), longest), dtype=torch.long)
        left = getattr(self.tokenizer, "padding_side", "right") == "left"
        for i, k in enumerate(kept):
            span = slice(longest - len(k), longest) if left else slice(0, len(k))
            ids[i, span] = torch.tensor(k, dtype=torch.long)
            mask[i, span] = 1
        return {"input_ids": ids, "attention_mask": mask}


# ---- sampling without transformers ----------------------------------------------------------
RAW_CHECK = "kodalle-raw-tokenizer.json"


class RawTokenizer:
    """A run's ``tokenizer.json`` through the ``tokenizers`` library alone: the part of a
    transformers tokenizer :class:`CaptionEncoder` calls (ids with the special tokens, cut to
    a length; the unknown and special ids), without importing transformers, which is about a
    second of every ``kodalle sample``'s start-up.

    transformers may change a tokenizer.json's behaviour from its tokenizer_config (lower
    casing, prefix spaces, added tokens), so a run uses this only where
    :func:`check_raw_tokenizer` found it gives transformers' ids: the check file beside it
    names the tokenizer.json's hash (see :func:`load_run_tokenizer`)."""

    padding_side = "right"

    def __init__(self, path: str | Path, unk_token_id: int | None,
                 all_special_ids: Sequence[int]):
        from tokenizers import Tokenizer

        self._tok = Tokenizer.from_file(str(path))
        # transformers' own answers, recorded by the check (its special tokens come from the
        # tokenizer config, which may list fewer than tokenizer.json marks special)
        self.unk_token_id = unk_token_id
        self.all_special_ids = list(all_special_ids)

    def __call__(self, texts: Sequence[str], add_special_tokens: bool = True,
                 truncation: bool = False, max_length: int | None = None) -> dict:
        # what a transformers fast tokenizer sets before it calls the same encode_batch
        if truncation:
            self._tok.enable_truncation(max_length)
        else:
            self._tok.no_truncation()
        encodings = self._tok.encode_batch(list(texts), add_special_tokens=add_special_tokens)
        return {"input_ids": [e.ids for e in encodings]}


def _sha256(path: Path) -> str:
    import hashlib

    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def check_raw_tokenizer(directory: str | Path, tokenizer, captions: Sequence[str],
                        text_seq_len: int) -> bool:
    """Whether ``directory``'s tokenizer.json alone gives ``tokenizer``'s ids (whole and cut
    to ``text_seq_len``) on ``captions`` (a run's training captions) and a few probes;
    writes the check file (with transformers' unknown and special ids) when it does,
    removes it when not."""
    from kodalle_cli.atomic import write_json_atomic

    directory = Path(directory)
    check, path = directory / RAW_CHECK, directory / "tokenizer.json"
    check.unlink(missing_ok=True)
    if not path.is_file():
        return False
    probes = [normalize(c) for c in captions]
    probes += [" ".join(probes[:16]) * 4, "", " ", "Xyzzy qwerty 12345 ?!", "ÅÉ 漢字 😀 abc"]
    unk = getattr(tokenizer, "unk_token_id", None)
    special = sorted(getattr(tokenizer, "all_special_ids", []) or [])
    raw = RawTokenizer(path, unk, special)
    try:
        with _quiet_length_warning():
            for cut in (False, True):
                length = text_seq_len if cut else None
                if (tokenizer(probes, add_special_tokens=True, truncation=cut,
                              max_length=length)["input_ids"]
                        != raw(probes, True, cut, length)["input_ids"]):
                    return False
    except Exception:  # noqa: BLE001 - any failure: the run keeps using transformers
        return False
    write_json_atomic(check, {"tokenizer.json": _sha256(path), "probes": len(probes),
                              "unk_token_id": unk, "all_special_ids": special})
    return True


def load_run_tokenizer(directory: str | Path):
    """A run's tokenizer: :class:`RawTokenizer` when its check file names this very
    tokenizer.json, else transformers' ``AutoTokenizer``."""
    import json

    directory = Path(directory)
    check, path = directory / RAW_CHECK, directory / "tokenizer.json"
    if check.is_file() and path.is_file():
        try:
            checked = json.loads(check.read_text(encoding="utf-8"))
            if checked["tokenizer.json"] == _sha256(path):
                return RawTokenizer(path, checked["unk_token_id"], checked["all_special_ids"])
        except (ValueError, KeyError, TypeError, OSError):
            pass  # a damaged check file: transformers decides
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(directory)
