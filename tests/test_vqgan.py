"""The VQGAN against taming-transformers' own classes, and safe checkpoint loading."""

from __future__ import annotations

import os

import pytest
import torch
import yaml

from kodalle_cli.errors import KodalleError
from kodalle_cli.vqgan import load_vqgan, save_vqgan
from kodalle_cli.vqgan.io import CONFIG_DIR, PRESETS, read_config

DD = {
    "double_z": False, "z_channels": 32, "resolution": 32, "in_channels": 3, "out_ch": 3,
    "ch": 32, "ch_mult": [1, 2, 2], "num_res_blocks": 1, "attn_resolutions": [16],
    "dropout": 0.0,
}


def taming_config(kind: str, n_embed: int = 64) -> dict:
    params = {"embed_dim": 32, "n_embed": n_embed, "ddconfig": dict(DD),
              "lossconfig": {"target": "torch.nn.Identity"}}
    if kind == "gumbel":
        params["kl_weight"] = 1e-8
        params["temperature_scheduler_config"] = {
            "target": "taming.lr_scheduler.LambdaWarmUpCosineScheduler",
            "params": {"warm_up_steps": 0, "max_decay_steps": 100, "lr_start": 0.9,
                       "lr_max": 0.9, "lr_min": 1e-6},
        }
    target = "GumbelVQ" if kind == "gumbel" else "VQModel"
    return {"model": {"base_learning_rate": 4.5e-6, "target": f"taming.models.vqgan.{target}",
                      "params": params}}


def build_taming(kind: str, seed: int = 0):
    from taming.main import instantiate_from_config

    torch.manual_seed(seed)
    model = instantiate_from_config(taming_config(kind)["model"]).eval()
    with torch.no_grad():  # a codebook of real encoder outputs, so that many codes are used
        feats = model.quant_conv(model.encoder(torch.rand(2, 3, 32, 32) * 2 - 1))
        feats = feats.permute(0, 2, 3, 1).reshape(-1, 32)
        table = model.quantize.embed if kind == "gumbel" else model.quantize.embedding
        table.weight.copy_(feats[torch.randperm(len(feats))[:64]])
        if kind == "gumbel":
            model.quantize.proj.weight.mul_(30)
    return model


def save_lightning_ckpt(model, path, extra=None):
    """Save like Lightning 1.x does, pickling Lightning objects next to the weights."""
    from pytorch_lightning.callbacks.model_checkpoint import ModelCheckpoint
    from pytorch_lightning.utilities.parsing import AttributeDict

    payload = {
        "epoch": 3, "global_step": 1234, "pytorch-lightning_version": "1.0.8",
        "callbacks": {ModelCheckpoint: {"best_model_score": torch.tensor(0.5),
                                        "best_model_path": "logs/last.ckpt"}},
        "hyper_parameters": AttributeDict(lr=4.5e-6, monitor="val/rec_loss"),
        "state_dict": model.state_dict(),
        "optimizer_states": [], "lr_schedulers": [],
    }
    payload.update(extra or {})
    torch.save(payload, path)


def write_yaml(cfg: dict, path) -> None:
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(1)
    base = torch.rand(4, 3, 8, 8, generator=g)
    return torch.nn.functional.interpolate(base, size=32, mode="bilinear").clamp(0, 1)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["vq", "gumbel"])
def test_taming_checkpoint_gives_identical_codes_and_images(kind, images, tmp_path):
    taming = build_taming(kind)
    # the toy model has a loss module with no weights; real ones have loss.* keys: add one
    save_lightning_ckpt(taming, tmp_path / "last.ckpt")
    ckpt = torch.load(tmp_path / "last.ckpt", weights_only=False)
    ckpt["state_dict"]["loss.discriminator.main.0.weight"] = torch.zeros(2, 3, 4, 4)
    torch.save(ckpt, tmp_path / "last.ckpt")
    write_yaml(taming_config(kind), tmp_path / "model.yaml")

    ours = load_vqgan(tmp_path / "last.ckpt")  # finds model.yaml beside it
    assert ours.num_tokens == 64 and ours.fmap_size == 8 and ours.image_size == 32

    x = 2 * images - 1
    with torch.no_grad():
        if kind == "gumbel":
            ref_codes = taming.quantize.proj(taming.encode_to_prequant(x)).argmax(1).flatten(1)
        else:
            ref_codes = taming.encode(x)[2][2].view(len(x), -1)
        b, n = ref_codes.shape
        z = taming.quantize.get_codebook_entry(ref_codes.flatten(), (b, 8, 8, 32))
        ref_images = (taming.decode(z).clamp(-1, 1) + 1) / 2

    codes = ours.encode(images)
    assert codes.shape == (4, 64) and codes.dtype == torch.long
    assert len(codes.unique()) > 8  # a real test: many different codes
    assert torch.equal(codes, ref_codes)
    decoded = ours.decode(codes)
    assert decoded.shape == (4, 3, 32, 32)
    assert (decoded - ref_images).abs().max() < 1e-5
    assert decoded.min() >= 0 and decoded.max() <= 1
    # batching changes nothing
    assert torch.equal(ours.encode(images, batch_size=3), codes)
    assert (ours.decode(codes, batch_size=3) - decoded).abs().max() < 1e-5


def test_save_and_reload_keeps_identity(tmp_path, images):
    taming = build_taming("vq")
    save_lightning_ckpt(taming, tmp_path / "vq.ckpt")
    write_yaml(taming_config("vq"), tmp_path / "vq.yaml")
    original = load_vqgan(str(tmp_path / "vq.ckpt"), config=tmp_path / "vq.yaml")
    save_vqgan(original, tmp_path / "run" / "vqgan")
    assert (tmp_path / "run/vqgan/model.safetensors").is_file()
    copy = load_vqgan(tmp_path / "run")  # a run directory's vqgan/ is found
    assert copy.identity() == original.identity()
    assert torch.equal(copy.encode(images), original.encode(images))
    other = build_taming("vq", seed=5)
    save_lightning_ckpt(other, tmp_path / "other.ckpt")
    write_yaml(taming_config("vq"), tmp_path / "other.yaml")
    assert load_vqgan(tmp_path / "other.ckpt").identity() != original.identity()


class Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_checkpoint_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "pwned"
    taming = build_taming("vq")
    torch.save({"state_dict": taming.state_dict(), "evil": Evil(marker)}, tmp_path / "evil.ckpt")
    write_yaml(taming_config("vq"), tmp_path / "evil.yaml")
    with pytest.raises(KodalleError, match="refusing to load .*evil.ckpt.*system"):
        load_vqgan(tmp_path / "evil.ckpt")
    assert not marker.exists()


def test_wrong_prefix_or_shapes_are_errors_not_random_weights(tmp_path):
    taming = build_taming("vq")
    sd = {f"model.{k}": v for k, v in taming.state_dict().items()}
    torch.save({"state_dict": sd}, tmp_path / "prefixed.ckpt")
    write_yaml(taming_config("vq"), tmp_path / "prefixed.yaml")
    with pytest.raises(KodalleError, match="missing .*unexpected"):
        load_vqgan(tmp_path / "prefixed.ckpt")

    torch.save({"state_dict": taming.state_dict()}, tmp_path / "shapes.ckpt")
    write_yaml(taming_config("vq", n_embed=128), tmp_path / "shapes.yaml")
    with pytest.raises(KodalleError, match="other shapes .*quantize.embedding.weight"):
        load_vqgan(tmp_path / "shapes.ckpt")


def test_missing_config_and_unknown_spec_are_clear_errors(tmp_path):
    taming = build_taming("vq")
    torch.save({"state_dict": taming.state_dict()}, tmp_path / "lonely.ckpt")
    with pytest.raises(KodalleError, match="--vqgan PATH --vqgan-config YAML"):
        load_vqgan(tmp_path / "lonely.ckpt")
    with pytest.raises(KodalleError, match="neither a file"):
        load_vqgan("no-such-preset")


def test_presets_offline_say_which_file_to_supply(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("KODALLE_CACHE", str(tmp_path))
    for name in PRESETS:
        cfg = read_config(CONFIG_DIR / PRESETS[name].config)
        assert cfg.resolution // cfg.downsample_factor in (16, 32)
        with pytest.raises(KodalleError) as err:
            load_vqgan(name)
        msg = str(err.value)
        assert "\n" not in msg and "last.ckpt" in msg and "--vqgan PATH --vqgan-config" in msg
    assert read_config(CONFIG_DIR / "gumbel-f8-8192.yaml").kind == "gumbel"
