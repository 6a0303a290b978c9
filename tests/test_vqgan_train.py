"""`kodalle train vqgan`: a tiny run writes a VQGAN that taming's own VQModel loads."""

from __future__ import annotations

import csv
import json
import warnings

import numpy as np
import pytest
import torch
import yaml
from conftest import write_image_shard
from PIL import Image

from kodalle_cli.errors import KodalleError
from kodalle_cli.vqgan import load_vqgan
from kodalle_cli.vqgan.losses import LPIPS
from kodalle_cli.vqgan.train import CodebookMonitor, VQGANTrainConfig, train_vqgan


def blob_image(rng, size=32):
    """A flat coloured rectangle on white: easy to reconstruct, varied codes."""
    im = np.full((size, size, 3), 255, dtype=np.uint8)
    x0, y0 = rng.integers(0, size // 2, 2)
    w, h = rng.integers(size // 4, size // 2, 2)
    im[y0 : y0 + h, x0 : x0 + w] = rng.integers(0, 200, 3)
    return Image.fromarray(im)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("vqshards")
    rng = np.random.default_rng(0)
    for split, n in (("train", 24), ("val", 4)):
        write_image_shard(root / f"{split}-000000.tar",
                          [(f"{split}{i:03d}", blob_image(rng), "caption") for i in range(n)])
    return root


def tiny(shards, out, **kw):
    base = dict(data=shards, out=out, ch=32, ch_mult=(1, 2), n_embed=32, embed_dim=8,
                resolution=32, num_res_blocks=1, lr=1e-3, batch_size=4, max_steps=8,
                restart_after=3, log_every=2, save_every=4, progress=False)
    base.update(kw)
    return VQGANTrainConfig(**base)


def train_rows(out, split="train"):
    """metrics.csv (tidy) as {metric: {step: value}} for one split."""
    table = {}
    for r in csv.DictReader(open(out / "metrics.csv", encoding="utf-8")):
        if r["split"] == split:
            table.setdefault(r["metric"], {})[int(r["step"])] = float(r["value"])
    return table


@pytest.mark.slow
def test_train_vqgan_writes_taming_compatible_outputs(shards, tmp_path):
    out = tmp_path / "vqgan"
    with pytest.warns(UserWarning, match="without the perceptual loss"):
        train_vqgan(tiny(shards, out, disc_start=4))
    for name in ("model.safetensors", "config.yaml", "vqgan.ckpt", "vqgan.yaml",
                 "reconstructions.png", "metrics.csv", "latest",
                 "checkpoints/step-0000008/discriminator.safetensors"):
        assert (out / name).is_file(), name
    assert Image.open(out / "reconstructions.png").size[1] == 2 * 32 + 3 * 2  # two rows

    m = train_rows(out)
    assert sorted(m["rec_loss"]) == [1, 2, 4, 6, 8]
    assert m["rec_loss"][8] < m["rec_loss"][1]
    assert all(0 <= v <= 1 for v in m["dead_share"].values())
    assert all(v >= 1 for v in m["perplexity"].values())
    assert sorted(m["d_loss"]) == [6, 8]  # the discriminator steps from step 4 on
    assert "rec_loss" in train_rows(out, "val")  # reconstruction of the val images

    ours = load_vqgan(out)
    images = torch.stack([torch.from_numpy(np.array(blob_image(np.random.default_rng(s))))
                          .permute(2, 0, 1).float() / 255 for s in range(3)]).contiguous()
    recon = ours.decode(ours.encode(images))

    # taming's own code loads the .ckpt + .yaml and reproduces the reconstructions
    from taming.main import instantiate_from_config

    config = yaml.safe_load((out / "vqgan.yaml").read_text())
    taming = instantiate_from_config(config["model"])
    sd = torch.load(out / "vqgan.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    assert any(k.startswith("loss.discriminator.") for k in sd)
    missing, unexpected = taming.load_state_dict(sd, strict=False)
    assert not missing and all(k.startswith("loss.") for k in unexpected)
    taming.eval()
    with torch.no_grad():
        quant = taming.encode(images * 2 - 1)[0]
        ref = (taming.decode(quant).clamp(-1, 1) + 1) / 2
    assert (recon - ref).abs().max() < 1e-5
    # and the ckpt loads in kodalle too (same weights, same identity)
    assert load_vqgan(out / "vqgan.ckpt").identity() == ours.identity()


@pytest.mark.slow
def test_l2_codes_stay_unit_norm_and_taming_picks_the_same_codes(shards, tmp_path):
    """--l2-codes trains on the unit sphere; the saved model is still taming's VQModel, and
    taming's Euclidean nearest code of the raw feature is the code kodalle picks."""
    out = tmp_path / "vqgan-l2"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        train_vqgan(tiny(shards, out, l2_codes=True))
    ours = load_vqgan(out)
    norms = ours.codebook.norm(dim=1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)
    images = torch.stack([torch.from_numpy(np.array(blob_image(np.random.default_rng(s))))
                          .permute(2, 0, 1).float() / 255 for s in range(4)]).contiguous()
    codes = ours.encode(images)

    from taming.main import instantiate_from_config

    config = yaml.safe_load((out / "vqgan.yaml").read_text())
    taming = instantiate_from_config(config["model"])
    sd = torch.load(out / "vqgan.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    taming.load_state_dict(sd, strict=False)
    taming.eval()
    with torch.no_grad():
        quant, _, (_, _, indices) = taming.encode(images * 2 - 1)
        ref = (taming.decode(quant).clamp(-1, 1) + 1) / 2
    assert torch.equal(codes.flatten(), indices.flatten())
    assert (ours.decode(codes) - ref).abs().max() < 1e-5


def test_recipes_set_defaults_that_options_override():
    cfg = VQGANTrainConfig(recipe="small-flat", data="d", lr=None, max_steps=7)
    assert (cfg.resolution, cfg.ch, cfg.n_embed, cfg.embed_dim, cfg.l2_codes) == (32, 64, 512,
                                                                                 8, True)
    assert cfg.max_steps == 7 and cfg.lr == 5e-4  # None keeps the recipe's value
    assert cfg.model_config().fmap_size == 8
    kodalle = VQGANTrainConfig()
    assert (kodalle.recipe, kodalle.resolution, kodalle.n_embed, kodalle.lr) == (
        "kodalle", 256, 16384, 3.6e-5)
    assert kodalle.model_config().fmap_size == 16
    with pytest.raises(Exception, match="unknown --recipe"):
        VQGANTrainConfig(recipe="nope")


def test_every_recipe_gives_every_setting_whose_default_is_the_recipes():
    """A field whose default is None means "the recipe's": each recipe names all of them
    (and nothing else), so no setting is left None by one recipe."""
    from dataclasses import fields

    from kodalle_cli.configs import VQGAN_RECIPES

    from_recipe = {f.name for f in fields(VQGANTrainConfig)
                   if f.default is None and "the recipe's" in f.metadata.get("help", "")}
    assert from_recipe >= {"ch", "ch_mult", "lr", "max_steps", "l2_codes"}
    for name, recipe in VQGAN_RECIPES.items():
        assert set(recipe) == from_recipe | {"attn_resolutions"}, name


@pytest.mark.slow
def test_train_vqgan_resume_equals_an_uninterrupted_run(shards, tmp_path):
    """Stopped at step 4 and run again to 6: the same VQGAN, discriminator and metrics as
    one run to 6 (optimizers, codebook usage, RNG and data position are restored)."""
    from safetensors.torch import load_file

    whole, split = tmp_path / "whole", tmp_path / "split"
    kw = dict(disc_start=2, restart_after=2, save_every=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(KodalleError, match="--resume"):
            train_vqgan(tiny(shards, split, max_steps=4, resume=True))  # nothing to resume
        train_vqgan(tiny(shards, whole, max_steps=6, **kw))
        train_vqgan(tiny(shards, split, max_steps=4, **kw))
        train_vqgan(tiny(shards, split, max_steps=6, resume=True, **kw))
        with pytest.raises(KodalleError, match="architecture"):
            train_vqgan(tiny(shards, split, max_steps=8, n_embed=64))
    timing = ("samples_per_s", "tokens_per_s")
    a, b = train_rows(whole), train_rows(split)
    assert {k: v for k, v in a.items() if k not in timing} == {
        k: v for k, v in b.items() if k not in timing}
    assert sorted(b["d_loss"]) == [4, 6] and max(b["restarted"].values()) > 0
    for name in ("model.safetensors", "discriminator.safetensors"):
        a = load_file(whole / "checkpoints/step-0000006" / name)
        b = load_file(split / "checkpoints/step-0000006" / name)
        assert all(torch.equal(a[k], b[k]) for k in a), name
    state = json.loads((split / "checkpoints/step-0000006/trainer_state.json").read_text())
    assert state["step"] == 6


def test_dead_codes_are_restarted_from_encoder_outputs():
    from kodalle_cli.vqgan.model import VQGAN, VQGANConfig

    torch.manual_seed(0)
    model = VQGAN(VQGANConfig(n_embed=16, embed_dim=8, ch=32, ch_mult=(1, 2),
                              num_res_blocks=1, attn_resolutions=(), resolution=8,
                              z_channels=8))
    monitor = CodebookMonitor(16, restart_after=2, device="cpu")
    features = torch.randn(2, 8, 4, 4) * 5
    codes = torch.zeros(2, 4, 4, dtype=torch.long)  # only code 0 in use
    monitor.update(codes, step=1)
    assert monitor.restart(model, features, step=1) == 0
    stats = monitor.update(codes, step=3)
    assert stats["dead_share"] == 15 / 16
    before = model.codebook[0].clone()
    assert monitor.restart(model, features, step=3) == 15
    assert torch.equal(model.codebook[0], before)
    flat = features.permute(0, 2, 3, 1).reshape(-1, 8)
    dist = torch.cdist(model.codebook[1:].detach(), flat).min(1).values
    assert (dist < 0.5).all()  # each restarted code sits on an encoder output


def test_lpips_matches_taming(tmp_path, monkeypatch):
    """Our LPIPS computes taming's LPIPS with the same (here random) weights."""
    import torchvision.models
    from taming.modules.losses import lpips as taming_lpips

    vgg16 = torchvision.models.vgg16
    monkeypatch.setattr(taming_lpips.models, "vgg16",
                        lambda pretrained=False, **kw: vgg16(weights=None))
    monkeypatch.setattr(taming_lpips.LPIPS, "load_from_pretrained", lambda self, name="": None)
    torch.manual_seed(0)
    ref = taming_lpips.LPIPS().eval()
    for lin in (ref.lin0, ref.lin1, ref.lin2, ref.lin3, ref.lin4):
        lin.model[1].weight.data.uniform_(0, 0.1)
    torch.save(ref.state_dict(), tmp_path / "lpips.pth")
    ours = LPIPS.from_file(tmp_path / "lpips.pth")
    x, y = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert (ours(x, y) - ref(x, y)).abs().max() < 1e-5
        assert ours(x, x).abs().max() < 1e-6
