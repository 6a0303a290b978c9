"""A taming VQGAN trained at another resolution than the images it is used on (issue 27
item 1): the code grid comes from the model (or from the images, for ``tokenize``), the
codebook size and downsampling factor from the VQGAN.

dalle-pytorch 1.6.6's ``VQGanVAE`` sets ``image_size = 256`` for every taming VQGAN and
takes f from ``resolution / attn_resolutions[0]``, so its DALLE has a (256/f)-wide grid
whatever resolution the yaml names: ``kodalle sample`` must draw that model's greedy codes
with the same VQGAN file."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from test_dalle_options import cli_greedy_codes, dalle_pytorch_greedy
from test_tokenize import config as tokenize_config
from test_tokenize import random_image, write_image_shard

from kodalle_cli.vqgan import VQGAN, VQGANConfig
from kodalle_cli.vqgan.io import save_taming_checkpoint, save_vqgan

# the reference implementations (`make install`): a missing one fails, it never skips
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import dalle_pytorch
    import taming.models.vqgan  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")

CAPTION = "상의에서 색상은 레드이다."
T, N_CODES = 16, 24


def taming_vqgan(path, resolution: int, levels: int, seed: int = 0):
    """A tiny untrained taming VQGAN (.ckpt + .yaml) downsampling by 2 ** (levels - 1),
    with one attention resolution so that dalle-pytorch's f (resolution / attn[0]) is the
    same factor."""
    f = 2 ** (levels - 1)
    torch.manual_seed(seed)
    vq = VQGAN(VQGANConfig(n_embed=N_CODES, embed_dim=8, ch=32, ch_mult=(1,) * levels,
                           num_res_blocks=1, attn_resolutions=(resolution // f,),
                           resolution=resolution, z_channels=8))
    return save_taming_checkpoint(vq, path), vq


def dalle_pytorch_model(ckpt, num_text_tokens):
    """dalle-pytorch 1.6.6's DALLE on its VQGanVAE of ``ckpt`` (its defaults: rotary
    embeddings and token shift), and the hparams its train_dalle.py saves."""
    from dalle_pytorch.vae import VQGanVAE

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        vae = VQGanVAE(str(ckpt), str(ckpt.with_suffix(".yaml")))
    hparams = dict(num_text_tokens=num_text_tokens, text_seq_len=T, dim=32, depth=1, heads=2,
                   dim_head=16, reversible=False, loss_img_weight=7, attn_types=("full",),
                   ff_dropout=0.0, attn_dropout=0.0, stable=False, shift_tokens=True,
                   rotary_emb=True, shared_attn_ids=None, shared_ff_ids=None,
                   share_input_output_emb=False)
    torch.manual_seed(1)
    ref = dalle_pytorch.DALLE(vae=vae, **hparams)
    with torch.no_grad():  # move LayerScale / norms away from their init so they matter
        for p in ref.transformer.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return ref.eval(), hparams


@pytest.mark.parametrize("resolution,levels,grid", [(64, 4, 32), (128, 5, 16)],
                         ids=["f8-at-64px", "f16-at-128px"])
def test_dalle_pytorch_pt_on_a_vqgan_of_another_resolution_samples_its_greedy_codes(
        resolution, levels, grid, tiny_klue, tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    from kodalle_cli.text import CaptionEncoder

    tokenizer = AutoTokenizer.from_pretrained(tiny_klue)
    ckpt, _ = taming_vqgan(tmp_path / "vq" / "vqgan.ckpt", resolution, levels)
    ref, hparams = dalle_pytorch_model(ckpt, len(tokenizer))
    assert ref.image_seq_len == grid * grid  # 256 / f, not resolution / f
    # what train_dalle.py saves for a taming VQGAN: no vae_params
    torch.save({"hparams": hparams, "vae_params": None, "weights": ref.state_dict()},
               tmp_path / "dalle.pt")
    got = cli_greedy_codes(tmp_path / "dalle.pt", tiny_klue, ckpt, tmp_path, monkeypatch)
    ids = CaptionEncoder(tokenizer, T, 0).encode(CAPTION).ids
    want = dalle_pytorch_greedy(ref, torch.tensor([ids]), use_cache=True)
    assert len(got) == grid * grid
    assert got == want.reshape(-1).tolist()
    (folder,) = (tmp_path / "outs").iterdir()
    from PIL import Image

    assert Image.open(folder / "0000.png").size == (256, 256)  # grid x f


# ---- kodalle runs: same factor at another resolution samples, another factor is refused ----
@pytest.fixture()
def run(tiny_klue, tmp_path):
    from test_bad_checkpoints import write_run

    return write_run(tmp_path / "run", tiny_klue)  # 24 codes, 4x4 grid, f2 at 8 px


@pytest.fixture(scope="module")
def inception(tmp_path_factory):
    from kodalle_cli.score import write_random_inception_weights

    return write_random_inception_weights(tmp_path_factory.mktemp("inc") / "inception.pth")


def _vqgan(directory, levels: int, resolution: int):
    torch.manual_seed(3)
    vq = VQGAN(VQGANConfig(n_embed=N_CODES, embed_dim=8, ch=32, ch_mult=(1,) * levels,
                           num_res_blocks=1, attn_resolutions=(), resolution=resolution,
                           z_channels=32))
    save_vqgan(vq, directory)
    return directory


def test_run_samples_with_a_vqgan_of_the_same_factor_at_another_resolution(run, tmp_path,
                                                                          capsys):
    from test_bad_checkpoints import cli, sample_args

    _vqgan(tmp_path / "big", levels=2, resolution=64)  # f2 trained at 64 px: an 32x32 grid
    code, _, err = cli(capsys, *sample_args(run, tmp_path / "out", "--vqgan", tmp_path / "big"))
    assert code == 0, err
    (folder,) = (tmp_path / "out").iterdir()
    codes = np.load(folder / "codes.npy")
    assert codes.shape[-1] == 16  # the model's 4x4 grid
    from PIL import Image

    assert Image.open(folder / "0000.png").size == (8, 8)


@pytest.mark.parametrize("command", ["sample", "score"])
def test_run_refuses_a_vqgan_of_another_factor_in_one_line(run, inception, tmp_path, capsys,
                                                            command):
    from test_bad_checkpoints import cli, one_error_line, sample_args

    _vqgan(tmp_path / "f4", levels=3, resolution=8)
    if command == "sample":
        args = sample_args(run, tmp_path / "out", "--vqgan", tmp_path / "f4")
    else:
        import shutil

        shutil.rmtree(run / "vqgan")
        _vqgan(run / "vqgan", levels=3, resolution=8)
        args = ["score", "--checkpoint", run, "--data", tmp_path / "no-shards",
                "--num-samples", "2", "--inception-weights", inception, "--device", "cpu",
                "--json"]
    code, _, err = cli(capsys, *args)
    assert code == 1
    assert "downsamples by 4 but the model's codes were made by one that downsamples by 2" in (
        one_error_line(err))
    assert not (tmp_path / "out").exists()


# ---- tokenize: the shards' images at their own size ------------------------------------------
def test_tokenize_encodes_images_at_their_own_size_and_warns_on_another_grid(
        tmp_path, capsys):
    from kodalle_cli.data.tokens import read_manifest, read_shard
    from kodalle_cli.experiments.tiny_backbone import build_klue_like
    from kodalle_cli.tokenize_shards import tokenize

    backbone = build_klue_like(tmp_path / "backbone")
    vq_dir = _vqgan(tmp_path / "vq", levels=3, resolution=16)  # f4 trained at 16 px
    from kodalle_cli.vqgan import load_vqgan

    vq = load_vqgan(str(vq_dir))

    def shards(directory, size):
        directory.mkdir()
        images = [random_image(i, size) for i in range(2)]
        write_image_shard(directory / "train-000000.tar",
                          [(f"s{i:04d}", im, CAPTION) for i, im in enumerate(images)])
        return directory, images

    big, images = shards(tmp_path / "s32", 32)
    setup = (tmp_path, backbone, big)
    out = tmp_path / "tokens"
    tokenize(tokenize_config(setup, vqgan=str(vq_dir), out=out, splits=("train",)))
    manifest = read_manifest(out)
    assert manifest["image_fmap_size"] == 8  # 32 px / f4, not the yaml's 16 px / f4
    assert manifest["vqgan"]["downsample_factor"] == 4
    assert manifest["vqgan"]["image_size"] == 32 and manifest["vqgan"]["resolution"] == 16
    from kodalle_cli.data.images import to_tensor
    from kodalle_cli.data.shards import iter_image_samples

    decoded = [s.image for s in iter_image_samples(big / "train-000000.tar", split=None,
                                                   split_by_worker=False)]
    assert [im.size for im in decoded] == [im.size for im in images] == [(32, 32)] * 2
    want = vq.encode(to_tensor(decoded))
    got = torch.tensor(np.stack([s["codes"] for s in read_shard(out / "train-000000.tar")]))
    assert torch.equal(got, want)
    assert "warning" not in capsys.readouterr().err.lower()

    # the same VQGAN into the same token directory, on 16 px images: one warning, redone
    small, _ = shards(tmp_path / "s16", 16)
    tokenize(tokenize_config((tmp_path, backbone, small), vqgan=str(vq_dir), out=out,
                             splits=("train",)))
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and "8x8 grid" in err[0] and "4x4" in err[0], err
    assert read_manifest(out)["image_fmap_size"] == 4
    assert read_shard(out / "train-000000.tar")[0]["codes"].shape == (16,)
    stats = json.loads((out / "train-000000_stats.json").read_text())
    assert stats["image_fmap_size"] == 4

