"""Tiny stand-in backbones, built locally: for the tests and the offline demo.

No hub is reachable in CI or on a newcomer's offline machine, so the real loading code is
exercised on small models saved exactly as the real ones are (``save_pretrained`` with
safetensors): a KLUE-like RoBERTa with a WordPiece tokenizer trained on the captions and
KLUE's special ids ([CLS]=0, [PAD]=1, [SEP]=2, [UNK]=3), a GPT-2-style model with a
position table, and a GPT-J-style one without (rotary).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch

KLUE_SPECIALS = ["[CLS]", "[PAD]", "[SEP]", "[UNK]", "[MASK]"]
GPT_SPECIALS = ["<|endoftext|>", "<unk>", "<pad>"]

SAMPLE_CAPTIONS = [
    "하의에서 기장은 발목이다. 색상은 블루이다. 카테고리는 스커트이다. 소재에는 데님이다.",
    "상의에서 색상은 화이트이다. 카테고리는 블라우스이다. 디테일에는 셔링이다.",
    "상의에서 색상은 레드이다. 카테고리는 티셔츠이다. 소매기장은 반팔이다.",
    "아우터에서 색상은 카키이다. 카테고리는 코트이다. 핏은 루즈이다.",
    "원피스에서 색상은 블랙이다. 카테고리는 드레스이다. 프린트에는 도트이다.",
    "하의에서 색상은 네이비이다. 카테고리는 청바지이다. 핏은 스키니이다.",
]


def _wordpiece(texts: Iterable[str], vocab_size: int, specials: list[str]):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials)
    tok.train_from_iterator(list(texts), trainer=trainer)
    return tok


def _save(model, tokenizer, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def build_klue_like(
    out: str | Path,
    texts: Iterable[str] = SAMPLE_CAPTIONS,
    vocab_size: int = 512,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 2,
    max_positions: int = 130,
    seed: int = 0,
) -> Path:
    """A small RoBERTa + WordPiece tokenizer with klue/roberta's special ids and layout."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast, RobertaConfig, RobertaModel

    tok = _wordpiece(texts, vocab_size, KLUE_SPECIALS)
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", 0), ("[SEP]", 2)],
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, cls_token="[CLS]", pad_token="[PAD]", sep_token="[SEP]",
        unk_token="[UNK]", mask_token="[MASK]", bos_token="[CLS]", eos_token="[SEP]",
        model_max_length=max_positions,
    )
    assert [tokenizer.convert_tokens_to_ids(t) for t in KLUE_SPECIALS] == [0, 1, 2, 3, 4]
    torch.manual_seed(seed)
    config = RobertaConfig(
        vocab_size=tokenizer.vocab_size if len(tokenizer) < vocab_size else vocab_size,
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=hidden * 4, max_position_embeddings=max_positions + 2,
        pad_token_id=1, bos_token_id=0, eos_token_id=2, type_vocab_size=1,
    )
    config.vocab_size = max(config.vocab_size, len(tokenizer))
    return _save(RobertaModel(config), tokenizer, Path(out))


def build_gpt2_like(
    out: str | Path,
    texts: Iterable[str] = SAMPLE_CAPTIONS,
    vocab_size: int = 512,
    hidden: int = 48,
    layers: int = 2,
    heads: int = 2,
    max_positions: int = 256,
    seed: int = 0,
) -> Path:
    """A small GPT-2 (wte + wpe, like skt/ko-gpt-trinity) with a WordPiece tokenizer."""
    from transformers import GPT2Config, GPT2Model, PreTrainedTokenizerFast

    tok = _wordpiece(texts, vocab_size, ["[UNK]", *GPT_SPECIALS])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", bos_token="<|endoftext|>",
        eos_token="<|endoftext|>", pad_token="<pad>", model_max_length=max_positions,
    )
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=len(tokenizer), n_embd=hidden, n_layer=layers, n_head=heads,
        n_positions=max_positions, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    return _save(GPT2Model(config), tokenizer, Path(out))


def build_gptj_like(
    out: str | Path,
    texts: Iterable[str] = SAMPLE_CAPTIONS,
    vocab_size: int = 512,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    seed: int = 0,
) -> Path:
    """A small GPT-J (rotary positions, no wpe, like kakaobrain/kogpt)."""
    from transformers import GPTJConfig, GPTJModel, PreTrainedTokenizerFast

    tok = _wordpiece(texts, vocab_size, ["[UNK]", *GPT_SPECIALS])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", bos_token="<|endoftext|>",
        eos_token="<|endoftext|>", pad_token="<pad>",
    )
    torch.manual_seed(seed)
    config = GPTJConfig(
        vocab_size=len(tokenizer), n_embd=hidden, n_layer=layers, n_head=heads,
        rotary_dim=hidden // heads // 2, n_positions=256, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    return _save(GPTJModel(config), tokenizer, Path(out))
