"""Damaged and mismatched checkpoints, VQGANs and rerankers given to `sample`, `score` and
`rerank` (issue 15, item 6): each is one ``Error: ...`` line and exit status 1, no traceback,
nothing written, and no model half loaded (a pickle payload never runs)."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from conftest import tiny_model_and_vqgan

CAPTION = "상의에서 색상은 레드이다."

pytestmark = pytest.mark.usefixtures("one_thread")


# ---- helpers (the input tests use them too) --------------------------------------------------
def write_run(run: Path, tokenizer_dir, *, cond_drop: float | None = 0.0) -> Path:
    """A DALLE run directory as `kodalle train` lays it out (config with its train section,
    tokenizer, VQGAN, one checkpoint), random tiny weights (24 codes, 4x4 grid, 8 px)."""
    from transformers import AutoTokenizer

    from kodalle_cli.runs import save_run

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    model, vqgan = tiny_model_and_vqgan(tokenizer, text_seq_len=12)
    train = {"train": {"cond_drop": cond_drop}} if cond_drop is not None else {}
    save_run(run, model, tokenizer, vqgan, step=1, config=train)
    return run


def cli(capsys, *args) -> tuple[int, str, str]:
    """``kodalle ARGS`` in this process: (exit status, stdout, stderr)."""
    from kodalle_cli.cli import main

    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(err: str) -> str:
    """The single ``Error: ...`` line on stderr (and nothing else: no traceback)."""
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith("Error: "), err
    return lines[0]


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


class Payload:
    """A real pickle payload: unpickling it runs ``touch MARKER``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def good_run(tiny_klue, tmp_path_factory):
    return write_run(tmp_path_factory.mktemp("good") / "run", tiny_klue)


@pytest.fixture
def run(good_run, tmp_path):
    """A fresh copy of the good run, to damage."""
    return Path(shutil.copytree(good_run, tmp_path / "run"))


def sample_args(checkpoint, out, *extra):
    return ["sample", CAPTION, "--checkpoint", checkpoint, "-n", "1", "--seed", "0",
            "--device", "cpu", "--out", out, *extra]


# ---- the good run works (so the failures below are the damage's) -----------------------------
def test_the_undamaged_run_samples(run, tmp_path, capsys):
    code, out, err = cli(capsys, *sample_args(run, tmp_path / "out"))
    assert code == 0, err
    assert (tmp_path / "out" / "상의에서-색상은-레드이다" / "0000.png").is_file()


# ---- DALLE weights ---------------------------------------------------------------------------
@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage", "missing"])
def test_damaged_model_safetensors_is_one_line(run, tmp_path, capsys, damage):
    weights = run / "checkpoints" / "step-0000001" / "model.safetensors"
    if damage == "truncated":
        truncate(weights)
    elif damage == "empty":
        weights.write_bytes(b"")
    elif damage == "garbage":
        weights.write_bytes(b"\x89PNG not weights at all" * 10)
    else:
        weights.unlink()
    code, _, err = cli(capsys, *sample_args(run, tmp_path / "out"))
    assert code == 1
    line = one_error_line(err)
    assert str(weights) in line
    assert ("missing" in line) if damage == "missing" else ("damaged or truncated" in line)
    assert not (tmp_path / "out").exists()  # nothing written


def test_config_that_does_not_match_the_weights_is_one_line(run, tmp_path, capsys):
    config = json.loads((run / "config.json").read_text())
    config["model"]["depth"] = 3  # one layer more than the weights hold
    config["model"]["text_seq_len"] = 20  # and another position table
    (run / "config.json").write_text(json.dumps(config))
    code, _, err = cli(capsys, *sample_args(run, tmp_path / "out"))
    assert code == 1
    line = one_error_line(err)
    assert "does not match the model in" in line and "config.json" in line
    assert "missing (e.g. blocks.2." in line and "other shapes (e.g. text_pos_emb.weight" in line
    assert not (tmp_path / "out").exists()


def test_no_model_is_half_loaded(run):
    """The Python API raises too, instead of returning a model with random layers."""
    from kodalle_cli.errors import KodalleError
    from kodalle_cli.runs import load_run

    config = json.loads((run / "config.json").read_text())
    config["model"]["depth"] = 1  # fewer layers: strict=False would load and keep going
    (run / "config.json").write_text(json.dumps(config))
    with pytest.raises(KodalleError, match="unexpected .*blocks.1"):
        load_run(run)


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"kind": "dalle"}',
                                     '{"kind": "dalle", "model": {"dim": "wide"}}'])
def test_damaged_run_config_is_one_line(run, tmp_path, capsys, content):
    (run / "config.json").write_text(content)
    code, _, err = cli(capsys, *sample_args(run, tmp_path / "out"))
    assert code == 1
    assert "config.json" in one_error_line(err)


def test_damaged_tokenizer_is_one_line(run, tmp_path, capsys):
    for f in (run / "tokenizer").iterdir():
        if f.suffix == ".json":
            f.write_text("{broken")
    code, _, err = cli(capsys, *sample_args(run, tmp_path / "out"))
    assert code == 1
    assert "cannot load the run's tokenizer" in one_error_line(err)


# ---- .pt checkpoints: pickles are refused, nothing runs ------------------------------------------
def _pt_args(pt, run, tmp_path, backbone):
    return sample_args(pt, tmp_path / "out", "--backbone", backbone, "--vqgan", run / "vqgan")


def test_the_payload_is_real(tmp_path):
    """Unpickled without protection, the payload does create its marker file."""
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps({"weights": Payload(marker)}))
    assert marker.exists()


@pytest.mark.parametrize("how", ["torch.save", "pickle-protocol-2", "pickle-protocol-4",
                                 "inside-weights"])
def test_pt_with_a_pickle_payload_is_refused_and_nothing_runs(run, tiny_klue, tmp_path,
                                                              capsys, how):
    from kodalle_cli.model.convert import to_dalle_pytorch
    from kodalle_cli.runs import load_run

    marker = tmp_path / "pwned"
    sd, hparams = to_dalle_pytorch(load_run(run, with_vqgan=False).model)
    pt = tmp_path / "evil.pt"
    if how == "torch.save":
        torch.save({"hparams": hparams, "weights": sd, "vae_params": Payload(marker)}, pt)
    elif how == "inside-weights":
        torch.save({"hparams": hparams, "weights": {**sd, "x": Payload(marker)}}, pt)
    else:
        with open(pt, "wb") as f:
            pickle.dump({"hparams": hparams, "weights": Payload(marker)}, f,
                        protocol=int(how[-1]))
    code, _, err = cli(capsys, *_pt_args(pt, run, tmp_path, tiny_klue))
    assert code == 1
    line = one_error_line(err)
    assert f"refusing to load {pt}: it needs arbitrary code to unpickle" in line
    if how != "pickle-protocol-4":  # protocol 4 is refused at its first opcode
        assert "posix.system" in line or "os.system" in line
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


def test_pt_payload_is_refused_by_score_too(run, inception, tmp_path, capsys):
    from kodalle_cli.model.convert import to_dalle_pytorch
    from kodalle_cli.runs import load_run

    marker = tmp_path / "pwned"
    sd, hparams = to_dalle_pytorch(load_run(run, with_vqgan=False).model)
    torch.save({"hparams": Payload(marker), "weights": sd}, tmp_path / "evil.pt")
    code, _, err = cli(capsys, "score", "--checkpoint", tmp_path / "evil.pt", "--data",
                       tmp_path / "no-shards", "--num-samples", "2", "--inception-weights",
                       inception, "--device", "cpu", "--json")
    assert code == 1
    assert "refusing to load" in one_error_line(err)
    assert not marker.exists()


def test_truncated_and_incomplete_pt_are_one_line(run, tiny_klue, tmp_path, capsys):
    from kodalle_cli.model.convert import save_dalle_pytorch_checkpoint, to_dalle_pytorch
    from kodalle_cli.runs import load_run

    model = load_run(run, with_vqgan=False).model
    pt = tmp_path / "model.pt"
    save_dalle_pytorch_checkpoint(model, pt)
    truncate(pt)
    code, _, err = cli(capsys, *_pt_args(pt, run, tmp_path, tiny_klue))
    assert code == 1
    assert "damaged, truncated or not a PyTorch file" in one_error_line(err)

    sd, hparams = to_dalle_pytorch(model)
    del sd["to_logits.1.weight"]  # a weight the layout needs
    torch.save({"hparams": hparams, "weights": sd}, pt)
    code, _, err = cli(capsys, *_pt_args(pt, run, tmp_path, tiny_klue))
    assert code == 1
    assert "not a complete DALLE-pytorch checkpoint" in one_error_line(err)

    sd, hparams = to_dalle_pytorch(model)
    sd["image_emb.weight"] = sd["image_emb.weight"][:, :16]  # shapes that do not fit together
    torch.save({"hparams": hparams, "weights": sd}, pt)
    code, _, err = cli(capsys, *_pt_args(pt, run, tmp_path, tiny_klue))
    assert code == 1
    one_error_line(err)
    assert not (tmp_path / "out").exists()


# ---- VQGANs ------------------------------------------------------------------------------------
def _other_vqgan(directory: Path, n_embed: int = 32, resolution: int = 8) -> Path:
    from kodalle_cli.vqgan import VQGAN, VQGANConfig
    from kodalle_cli.vqgan.io import save_vqgan

    torch.manual_seed(1)
    vq = VQGAN(VQGANConfig(n_embed=n_embed, embed_dim=8, ch=32, ch_mult=(1, 1),
                           num_res_blocks=1, attn_resolutions=(), resolution=resolution,
                           z_channels=32))
    return save_vqgan(vq, directory)


def test_vqgan_with_another_codebook_size_is_one_line(run, tmp_path, capsys):
    shutil.rmtree(run / "vqgan")
    _other_vqgan(run / "vqgan", n_embed=32)
    code, _, err = cli(capsys, *sample_args(run, tmp_path / "out"))
    assert code == 1
    line = one_error_line(err)
    assert "has 32 codes but the model was trained on 24" in line
    assert not (tmp_path / "out").exists()


def test_replacing_vqgan_with_another_downsampling_factor_is_one_line(run, tmp_path, capsys):
    # (another training resolution with the same factor samples: test_vqgan_resolution.py)
    from kodalle_cli.vqgan import VQGAN, VQGANConfig
    from kodalle_cli.vqgan.io import save_vqgan

    save_vqgan(VQGAN(VQGANConfig(n_embed=24, embed_dim=8, ch=32, ch_mult=(1, 1, 1),
                                 num_res_blocks=1, attn_resolutions=(), resolution=8,
                                 z_channels=32)), tmp_path / "f4")
    code, _, err = cli(capsys, *sample_args(run, tmp_path / "out", "--vqgan", tmp_path / "f4"))
    assert code == 1
    assert "downsamples by 4 but the model's codes were made by one that downsamples by 2" in (
        one_error_line(err))


@pytest.mark.parametrize("damage", ["truncated weights", "weights of another config",
                                    "config that builds no model"])
def test_damaged_vqgan_is_one_line(run, tmp_path, capsys, damage):
    config = run / "vqgan" / "config.yaml"
    if damage == "truncated weights":
        truncate(run / "vqgan" / "model.safetensors")
        want = "cannot read VQGAN weights"
    elif damage == "weights of another config":
        config.write_text(config.read_text().replace("num_res_blocks: 1", "num_res_blocks: 2"))
        want = "does not match its VQGAN config: 32 missing"
    else:
        config.write_text(config.read_text().replace("ch: 32", "ch: 16"))  # GroupNorm(32)
        want = "builds no model"
    code, _, err = cli(capsys, *sample_args(run, tmp_path / "out"))
    assert code == 1
    assert want in one_error_line(err)


# ---- score -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def inception(tmp_path_factory):
    from kodalle_cli.score import write_random_inception_weights

    return write_random_inception_weights(tmp_path_factory.mktemp("inc") / "inception.pth")


def test_score_refuses_a_damaged_checkpoint_before_reading_data(run, inception, tmp_path,
                                                                 capsys):
    truncate(run / "checkpoints" / "step-0000001" / "model.safetensors")
    code, _, err = cli(capsys, "score", "--checkpoint", run, "--data", tmp_path / "no-shards",
                       "--num-samples", "2", "--inception-weights", inception,
                       "--device", "cpu", "--json")
    assert code == 1
    assert "damaged or truncated" in one_error_line(err)
    assert not (run / "score").exists()


def test_score_refuses_a_mismatched_vqgan(run, inception, tmp_path, capsys):
    shutil.rmtree(run / "vqgan")
    _other_vqgan(run / "vqgan", n_embed=32)
    code, _, err = cli(capsys, "score", "--checkpoint", run, "--data", tmp_path / "no-shards",
                       "--num-samples", "2", "--inception-weights", inception,
                       "--device", "cpu", "--json")
    assert code == 1
    assert "has 32 codes but the model was trained on 24" in one_error_line(err)


# ---- rerankers ---------------------------------------------------------------------------------
@pytest.fixture
def image(tmp_path):
    from PIL import Image

    path = tmp_path / "a.png"
    Image.new("RGB", (16, 16), (200, 30, 30)).save(path)
    return path


@pytest.mark.parametrize("damage", ["truncated weights", "config of another size",
                                    "damaged config", "text tower of another size"])
def test_damaged_reranker_is_one_line(tiny_reranker, image, tmp_path, capsys, damage):
    rr = Path(shutil.copytree(tiny_reranker, tmp_path / "rr"))
    if damage == "truncated weights":
        truncate(rr / "model.safetensors")
        want = "cannot read reranker weights"
    elif damage == "config of another size":
        config = json.loads((rr / "config.json").read_text())
        config["embed_dim"] = 12
        (rr / "config.json").write_text(json.dumps(config))
        want = "does not match the reranker in"
    elif damage == "damaged config":
        (rr / "config.json").write_text("{")
        want = "cannot read"
    else:
        config = json.loads((rr / "text" / "config.json").read_text())
        config["num_hidden_layers"] += 1  # a layer the weights do not hold
        (rr / "text" / "config.json").write_text(json.dumps(config))
        want = "does not match its config"
    code, out, err = cli(capsys, "rerank", image, "--caption", CAPTION, "--reranker", rr,
                         "--device", "cpu", "--json")
    assert code == 1 and out == ""
    assert want in one_error_line(err)


def test_sample_with_a_damaged_reranker_is_one_line(tiny_reranker, run, tmp_path, capsys):
    rr = Path(shutil.copytree(tiny_reranker, tmp_path / "rr"))
    truncate(rr / "model.safetensors")
    code, _, err = cli(capsys, *sample_args(run, tmp_path / "out", "--rerank", rr,
                                            "--keep", "1"))
    assert code == 1
    assert "cannot read reranker weights" in one_error_line(err)
    assert not (tmp_path / "out").exists()
