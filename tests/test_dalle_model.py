"""kodalle's DALLE against DALLE-pytorch 1.6.6 (the oracle), conversion, and the KV cache."""

from __future__ import annotations

import warnings

import pytest
import torch

from kodalle_cli.backbone import get_backbone
from kodalle_cli.model import DALLE, DALLEConfig, init_from_backbone
from kodalle_cli.model.convert import (
    from_dalle_pytorch,
    load_dalle_pytorch_checkpoint,
    save_dalle_pytorch_checkpoint,
    to_dalle_pytorch,
)

T, FMAP, N_IMG, DEPTH, HEADS, DIM_HEAD = 8, 4, 40, 2, 2, 16

# the reference implementation: `make install` installs it (scripts/install_oracles.py);
# imported unconditionally so that a missing oracle fails the tests instead of skipping them
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import dalle_pytorch


def oracle_vae():
    # DALLE-pytorch reads num_tokens, image_size and num_layers: 16 / 2**2 = a 4x4 grid
    return dalle_pytorch.DiscreteVAE(
        image_size=16, num_tokens=N_IMG, codebook_dim=8, num_layers=2, hidden_dim=4
    )


def kodalle_like_oracle(emb):
    """DALLE-pytorch's DALLE with the backbone's tables as text_emb / text_pos_emb (KoDALLE)."""
    torch.manual_seed(0)
    ref = dalle_pytorch.DALLE(
        dim=emb.dim, vae=oracle_vae(), num_text_tokens=emb.vocab_size, text_seq_len=T,
        depth=DEPTH, heads=HEADS, dim_head=DIM_HEAD, rotary_emb=False, shift_tokens=False,
        attn_types=("full",),
    )
    # as KoDALLE did: the text tables are the backbone's (here its whole position table)
    ref.text_emb = torch.nn.Embedding.from_pretrained(emb.token.clone(), freeze=False)
    ref.text_pos_emb = torch.nn.Embedding.from_pretrained(emb.position.clone(), freeze=False)
    with torch.no_grad():  # move LayerScale / norms away from their init so they matter
        for p in ref.transformer.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return ref.eval()


def klue_text(emb, batch=3):
    """Caption ids without id 0 (DALLE-pytorch would remap it) and padded with klue's 1."""
    g = torch.Generator().manual_seed(1)
    text = torch.randint(2, emb.vocab_size, (batch, T), generator=g)
    text[0, 5:] = emb.pad_id
    text[1, 2:] = emb.pad_id
    return text


@pytest.fixture(scope="module")
def klue_emb(tiny_klue):
    return get_backbone(str(tiny_klue)).load_embeddings()


def test_logits_match_kodalle_built_on_dalle_pytorch(klue_emb):
    ref = kodalle_like_oracle(klue_emb)
    cfg, sd = from_dalle_pytorch(ref.state_dict(), {"heads": HEADS, "text_seq_len": T},
                                 pad_id=klue_emb.pad_id)
    assert not cfg.unique_pad_tokens and cfg.pad_id == 1 and cfg.dim == klue_emb.dim
    model = DALLE(cfg).eval()
    model.load_state_dict(sd)
    text = klue_text(klue_emb)
    image = torch.randint(0, N_IMG, (3, FMAP * FMAP), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = ref(text, image)
        got = model(text, image)
        assert got.shape == want.shape == (3, T + FMAP * FMAP, cfg.num_text_logits + N_IMG)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
        # a partial image (generation prefix) too
        torch.testing.assert_close(model(text, image[:, :5]), ref(text, image[:, :5]),
                                   atol=1e-4, rtol=0)
        # the loss with padding counted is DALLE-pytorch's / KoDALLE's loss exactly
        cfg.text_loss_on_padding = True
        loss, _ = model.loss(text, image)
        torch.testing.assert_close(loss, ref(text, image, return_loss=True), atol=1e-5, rtol=0)


def test_stock_dalle_pytorch_unique_padding_and_both_ways():
    torch.manual_seed(0)
    ref = dalle_pytorch.DALLE(
        dim=32, vae=oracle_vae(), num_text_tokens=50, text_seq_len=T, depth=DEPTH,
        heads=HEADS, dim_head=DIM_HEAD, rotary_emb=False, shift_tokens=False,
        attn_types=("full",), sandwich_norm=True, stable=True,
    ).eval()
    cfg, sd = from_dalle_pytorch(ref.state_dict(), {"heads": HEADS, "text_seq_len": T,
                                                    "stable": True})
    assert cfg.unique_pad_tokens and cfg.pad_id == 0 and cfg.sandwich_norm
    model = DALLE(cfg).eval()
    model.load_state_dict(sd)
    text = torch.randint(1, 50, (2, T))
    text[0, 3:] = 0  # DALLE-pytorch's padding: unique tokens per position
    image = torch.randint(0, N_IMG, (2, FMAP * FMAP))
    with torch.no_grad():
        torch.testing.assert_close(model(text, image), ref(text, image), atol=1e-4, rtol=0)

    # and back: kodalle weights into a fresh DALLE-pytorch model
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    back, hparams = to_dalle_pytorch(model)
    assert hparams["text_seq_len"] == T and hparams["num_text_tokens"] == 50
    ref2 = dalle_pytorch.DALLE(
        dim=32, vae=oracle_vae(), num_text_tokens=50, text_seq_len=T, depth=DEPTH,
        heads=HEADS, dim_head=DIM_HEAD, rotary_emb=False, shift_tokens=False,
        attn_types=("full",), sandwich_norm=True, stable=True,
    ).eval()
    missing, unexpected = ref2.load_state_dict(back, strict=False)
    assert not unexpected and all(k.startswith("vae.") for k in missing)
    with torch.no_grad():
        torch.testing.assert_close(ref2(text, image), model(text, image), atol=1e-4, rtol=0)


def test_kodalle_checkpoint_file_round_trip(klue_emb, tmp_path):
    ref = kodalle_like_oracle(klue_emb)
    path = tmp_path / "dalle.pt"
    torch.save({"hparams": {"heads": HEADS, "text_seq_len": T, "dim_head": DIM_HEAD,
                            "attn_types": ["full"]},
                "vae_params": {"image_size": 16}, "weights": ref.state_dict()}, path)
    model, vae_params = load_dalle_pytorch_checkpoint(path, pad_id=1)
    assert vae_params == {"image_size": 16}
    text, image = klue_text(klue_emb), torch.randint(0, N_IMG, (3, FMAP * FMAP))
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(text, image), ref(text, image), atol=1e-4, rtol=0)
    out = tmp_path / "back.pt"
    save_dalle_pytorch_checkpoint(model, out)
    again, _ = load_dalle_pytorch_checkpoint(out, pad_id=1)
    for k, v in model.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k


def tiny_model(emb=None, **kw) -> DALLE:
    torch.manual_seed(0)
    cfg = DALLEConfig(
        num_text_tokens=emb.vocab_size if emb else 60, num_image_tokens=N_IMG,
        image_fmap_size=FMAP, dim=kw.pop("dim", emb.dim if emb else 32), depth=DEPTH,
        heads=HEADS, dim_head=DIM_HEAD, text_seq_len=T,
        text_dim=emb.dim if emb else None, pad_id=emb.pad_id if emb else 1, **kw,
    )
    model = DALLE(cfg)
    if emb is not None:
        init_from_backbone(model, emb)
    return model.eval()


def test_kv_cache_matches_full_forward():
    model = tiny_model()
    text = torch.randint(2, 60, (3, T))
    image = torch.randint(0, N_IMG, (3, FMAP * FMAP))
    with torch.no_grad():
        full = model(text, image)[:, T:, model.config.num_text_logits:]  # image logits
        cache = model.new_cache(3)
        k_before = cache.k.data_ptr()
        steps = [model.prefill(text, cache)]
        for i in range(FMAP * FMAP - 1):
            steps.append(model.step(image[:, i], cache))
        assert cache.k.data_ptr() == k_before and cache.length == T + FMAP * FMAP
        torch.testing.assert_close(torch.stack(steps, 1), full, atol=1e-5, rtol=0)
        # priming with the first image codes, then stepping on
        cache = model.new_cache(3)
        logits = model.prefill(text, cache, image=image[:, :5])
        torch.testing.assert_close(logits, full[:, 5], atol=1e-5, rtol=0)
        torch.testing.assert_close(model.step(image[:, 5], cache), full[:, 6], atol=1e-5, rtol=0)


def test_backbone_tables_projection_and_freezing(tiny_klue, tiny_gpt2, tiny_gptj):
    klue = get_backbone(str(tiny_klue)).load_embeddings()
    model = tiny_model(klue)
    # rows offset..offset+T of RoBERTa's position table (offset 2 = padding_idx + 1)
    assert torch.equal(model.text_pos_emb.weight, klue.position[2 : 2 + T + 1])
    assert torch.equal(model.text_emb.weight, klue.token)
    assert isinstance(model.text_proj, torch.nn.Identity)

    gpt2 = get_backbone(str(tiny_gpt2)).load_embeddings()
    model = tiny_model(gpt2, dim=32)  # backbone dim 48 -> learned projection to 32
    assert model.text_proj.weight.shape == (32, 48)
    gptj = get_backbone(str(tiny_gptj)).load_embeddings()
    assert gptj.position is None
    model = tiny_model(gptj)  # no position table: a learned one
    assert model.text_pos_emb.weight.requires_grad
    frozen = DALLE(model.config)
    init_from_backbone(frozen, gptj, freeze=True)
    assert not frozen.text_emb.weight.requires_grad
    loss, parts = frozen.train().loss(torch.randint(0, 50, (2, T)), torch.randint(0, N_IMG, (2, 16)))
    loss.backward()
    assert frozen.text_emb.weight.grad is None and frozen.image_emb.weight.grad is not None


def test_padding_left_out_of_text_loss_and_cond_drop():
    model = tiny_model()
    text = torch.randint(2, 60, (2, T))
    text[:, 3:] = 1
    image = torch.randint(0, N_IMG, (2, FMAP * FMAP))
    _, parts = model.loss(text, image)
    model.config.text_loss_on_padding = True
    _, parts_all = model.loss(text, image)
    assert not torch.isclose(parts["text_loss"], parts_all["text_loss"])
    torch.testing.assert_close(parts["image_loss"], parts_all["image_loss"])
    # the text loss ignores what follows the first padding token
    other = text.clone()
    model.config.text_loss_on_padding = False
    other[:, 5:] = 1
    torch.testing.assert_close(model.loss(other, image)[1]["text_loss"], parts["text_loss"])
    # cond_drop=1 in training: every caption becomes padding
    model.train()
    torch.manual_seed(0)
    dropped = model.loss(text, image, cond_drop=1.0)[0]
    null = model.loss(model.null_text(2), image)[0]
    torch.testing.assert_close(dropped, null)


def test_a_text_length_beyond_the_backbone_positions_names_the_setting(klue_emb, capsys,
                                                                       monkeypatch):
    from kodalle_cli.cli import main
    from kodalle_cli.errors import ConfigError

    have = klue_emb.position.shape[0] - klue_emb.position_offset
    cfg = DALLEConfig(num_text_tokens=klue_emb.vocab_size, num_image_tokens=N_IMG,
                      image_fmap_size=FMAP, dim=klue_emb.dim, depth=1, heads=HEADS,
                      dim_head=DIM_HEAD, text_seq_len=have, pad_id=klue_emb.pad_id)
    with pytest.raises(ConfigError) as info:
        init_from_backbone(DALLE(cfg), klue_emb)
    assert str(info.value).startswith(f"text_seq_len={have}: ")
    assert str(info.value).endswith(f"use {have - 1} or less")

    def refuse():  # the CLI words the same error as the flag a user typed
        raise info.value

    monkeypatch.setattr("kodalle_cli.backbone.registered_backbones", refuse)
    with pytest.raises(SystemExit) as exit_info:
        main(["backbones"])
    err = " ".join(capsys.readouterr().err.split())
    assert exit_info.value.code == 2 and err.startswith(f"Error: --text-seq-len {have}: needs")
