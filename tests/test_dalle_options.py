"""DALLE-pytorch 1.6.6's model options in kodalle: reversible, rotary_emb, shift_tokens and
attn_types, against DALLE-pytorch itself (logits, loss, gradients, greedy codes, both
conversion directions), the KV cache for each, training, and refusals."""

from __future__ import annotations

import warnings

import pytest
import torch

from kodalle_cli.errors import ConfigError, KodalleError
from kodalle_cli.model import DALLE, DALLEConfig
from kodalle_cli.model.convert import (
    from_dalle_pytorch,
    load_dalle_pytorch_checkpoint,
    to_dalle_pytorch,
)
from kodalle_cli.model.sampling import SamplingSettings, generate_codes, row_uniforms

# the reference implementation: `make install` installs it (scripts/install_oracles.py);
# imported unconditionally so that a missing oracle fails the tests instead of skipping them
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import dalle_pytorch

T, FMAP, N_IMG, VOCAB = 8, 4, 40, 50
ALL_TYPES = ("full", "axial_row", "axial_col", "conv_like")
# DALLE-pytorch keyword arguments (its defaults are rotary_emb=True, shift_tokens=True)
PLAIN = dict(rotary_emb=False, shift_tokens=False)
CONFIGS = {
    "reversible": dict(PLAIN, reversible=True),
    "rotary": dict(PLAIN, rotary_emb=True),
    "shift_tokens": dict(PLAIN, shift_tokens=True),
    "axial_row": dict(PLAIN, attn_types=("axial_row",)),
    "axial_col": dict(PLAIN, attn_types=("axial_col",)),
    "conv_like": dict(PLAIN, attn_types=("conv_like",)),
    "attn_cycle": dict(PLAIN, attn_types=ALL_TYPES),
    "dalle_pytorch_defaults": dict(),  # rotary + shift tokens, full attention
    "everything": dict(reversible=True, attn_types=ALL_TYPES),
}


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def oracle_vae(num_tokens=N_IMG):
    # DALLE-pytorch reads num_tokens, image_size and num_layers: 16 / 2**2 = a 4x4 grid
    return dalle_pytorch.DiscreteVAE(image_size=16, num_tokens=num_tokens, codebook_dim=8,
                                     num_layers=2, hidden_dim=4)


def oracle(seed=0, num_image_tokens=N_IMG, **kw):
    """DALLE-pytorch's DALLE and the hparams its train_dalle.py would save."""
    hparams = dict(num_text_tokens=VOCAB, text_seq_len=T, dim=32, depth=4, heads=2,
                   dim_head=16, reversible=False, loss_img_weight=7, attn_types=("full",),
                   ff_dropout=0.0, attn_dropout=0.0, stable=False, shift_tokens=True,
                   rotary_emb=True, shared_attn_ids=None, shared_ff_ids=None,
                   share_input_output_emb=False)
    hparams.update(kw)
    torch.manual_seed(seed)
    ref = dalle_pytorch.DALLE(vae=oracle_vae(num_image_tokens), **hparams)
    with torch.no_grad():  # move LayerScale / norms away from their init so they matter
        for p in ref.transformer.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return ref.eval(), hparams


def batch(n=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(1, VOCAB, (n, T), generator=g)
    text[0, 3:] = 0  # DALLE-pytorch's padding
    return text, torch.randint(0, N_IMG, (n, FMAP * FMAP), generator=g)


def max_diff(a, b) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_loss_and_gradients_equal_dalle_pytorch_both_ways(name):
    ref, hparams = oracle(**CONFIGS[name])
    cfg, sd = from_dalle_pytorch(ref.state_dict(), hparams)
    kw = CONFIGS[name]
    assert cfg.reversible == kw.get("reversible", False)
    assert (cfg.rotary_emb, cfg.shift_tokens) == (kw.get("rotary_emb", True),
                                                 kw.get("shift_tokens", True))
    assert cfg.attn_types == kw.get("attn_types", ("full",))
    model = DALLE(cfg).eval()
    model.load_state_dict(sd)
    text, image = batch()
    with torch.no_grad():
        assert max_diff(model(text, image), ref(text, image)) < 1e-4
        assert max_diff(model(text, image[:, :5]), ref(text, image[:, :5])) < 1e-4
        assert max_diff(model.loss(text, image)[0], ref(text, image, return_loss=True)) < 1e-5

    # and back: changed kodalle weights into a fresh DALLE-pytorch model, every key used
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    back, written = to_dalle_pytorch(model)
    assert {k: written[k] for k in ("reversible", "rotary_emb", "shift_tokens")} == {
        "reversible": cfg.reversible, "rotary_emb": cfg.rotary_emb,
        "shift_tokens": cfg.shift_tokens}
    ref2, _ = oracle(seed=1, **CONFIGS[name])
    missing, unexpected = ref2.load_state_dict(back, strict=False)
    assert not unexpected and all(k.startswith("vae.") for k in missing)
    with torch.no_grad():
        assert max_diff(model(text, image), ref2(text, image)) < 1e-4
        assert max_diff(model.loss(text, image)[0], ref2(text, image, return_loss=True)) < 1e-5

    # training: the same gradients (reversible: kodalle's backward vs DALLE-pytorch's)
    model.train().zero_grad()
    ref2.train().zero_grad()
    model.loss(text, image)[0].backward()
    ref2(text, image, return_loss=True).backward()
    # kodalle's gradients under DALLE-pytorch's names: a model holding them, converted
    grads = DALLE(model.config)
    grads.load_state_dict({k: p.grad for k, p in model.named_parameters()})
    theirs = dict(ref2.named_parameters())
    compared = 0
    for key, ours in to_dalle_pytorch(grads)[0].items():
        if key in theirs:
            assert max_diff(ours, theirs[key].grad) < 1e-5, key
            compared += 1
    assert compared == len([p for p in theirs.values() if p.grad is not None])


def test_each_option_changes_the_function():
    """The parity above is not vacuous: each option alone gives other logits."""
    text, image = batch()
    base_ref, hparams = oracle(**PLAIN)
    cfg, sd = from_dalle_pytorch(base_ref.state_dict(), hparams)
    with torch.no_grad():
        base = DALLE(cfg).eval()
        base.load_state_dict(sd)
        want = base(text, image)
        for change in (dict(shift_tokens=True), *({"attn_types": (t,)} for t in ALL_TYPES[1:]),
                       dict(reversible=True)):
            other = DALLE(DALLEConfig(**{**cfg.to_dict(), **change})).eval()
            other.load_state_dict(sd)
            assert max_diff(other(text, image), want) > 1e-3, change


# ---- KoDALLE's published config ---------------------------------------------------------------
KODALLE_T = 64


def kodalle_checkpoint(emb, path, depth=2, num_image_tokens=N_IMG):
    """A KoDALLE train.py checkpoint: REVERSIBLE=True, ATTN_TYPES="full", TEXT_SEQ_LEN=64,
    dropout 0.2, SHIFT_TOKENS/ROTARY_EMB/STABLE None; text_emb / text_pos_emb the backbone's
    wte / whole wpe; the VQGAN's weights under vae.* (as KoDALLE's DALLE holds its VQGanVAE)."""
    torch.manual_seed(0)
    ref = dalle_pytorch.DALLE(
        dim=emb.dim, vae=oracle_vae(num_image_tokens), num_text_tokens=emb.vocab_size,
        text_seq_len=KODALLE_T, depth=depth, heads=2, dim_head=16, reversible=True,
        attn_dropout=0.2, ff_dropout=0.2, rotary_emb=False, shift_tokens=False,
        attn_types=("full",))
    ref.text_emb = torch.nn.Embedding.from_pretrained(emb.token.clone(), freeze=False)
    ref.text_pos_emb = torch.nn.Embedding.from_pretrained(emb.position.clone(), freeze=False)
    with torch.no_grad():
        for p in ref.transformer.parameters():
            p.add_(0.05 * torch.randn_like(p))
    hparams = dict(num_text_tokens=emb.vocab_size, text_seq_len=KODALLE_T, depth=depth, heads=2,
                   dim_head=16, reversible=True, loss_img_weight=7, attn_types="full",
                   ff_dropout=0.2, attn_dropout=0.2, stable=None, shift_tokens=None,
                   rotary_emb=None)
    weights = {k: v for k, v in ref.state_dict().items() if not k.startswith("vae.")}
    weights["vae.model.quantize.embedding.weight"] = torch.randn(num_image_tokens, 8)  # VQGAN
    torch.save({"hparams": hparams, "vae_params": None, "weights": weights}, path)
    return ref.eval()


def kodalle_oracle_for_ids(ref, emb):
    """DALLE-pytorch 1.6.6 turns id 0 into a per-position padding token; KoDALLE's forward
    did not (klue's [CLS] is 0). Rows num_text_tokens.. of the oracle's text table copy row
    0, so the oracle computes KoDALLE's function on kodalle's caption ids."""
    table = ref.text_emb.weight.detach()
    extra = table[:1].expand(KODALLE_T, -1)
    ref.text_emb = torch.nn.Embedding.from_pretrained(torch.cat((table, extra)), freeze=False)
    return ref


def klue_batch(emb, n=2):
    g = torch.Generator().manual_seed(3)
    text = torch.randint(3, emb.vocab_size, (n, KODALLE_T), generator=g)
    text[:, 0] = 0  # [CLS]
    text[0, 10:], text[1, 30:] = emb.pad_id, emb.pad_id
    return text, torch.randint(0, N_IMG, (n, FMAP * FMAP), generator=g)


@pytest.fixture(scope="module")
def klue_emb(tiny_klue):
    from kodalle_cli.backbone import get_backbone

    return get_backbone(str(tiny_klue)).load_embeddings()


def test_kodalle_published_config_file_both_ways(klue_emb, tmp_path):
    ref = kodalle_oracle_for_ids(kodalle_checkpoint(klue_emb, tmp_path / "k.pt"), klue_emb)
    model, _ = load_dalle_pytorch_checkpoint(tmp_path / "k.pt", pad_id=klue_emb.pad_id)
    cfg = model.config
    assert cfg.reversible and not cfg.rotary_emb and not cfg.shift_tokens
    assert (cfg.attn_types, cfg.text_seq_len, cfg.attn_dropout) == (("full",), KODALLE_T, 0.2)
    model.eval()
    text, image = klue_batch(klue_emb)
    with torch.no_grad():
        assert max_diff(model(text, image), ref(text, image)) < 1e-4
        # the loss: captions without [CLS] (DALLE-pytorch would remap the target 0)
        text[:, 0] = 5
        assert max_diff(model.loss(text, image)[0], ref(text, image, return_loss=True)) < 1e-5
    # back to a KoDALLE-layout DALLE-pytorch model
    back, hparams = to_dalle_pytorch(model)
    assert hparams["reversible"] and hparams["text_seq_len"] == KODALLE_T
    ref2 = kodalle_checkpoint(klue_emb, tmp_path / "k2.pt")
    ref2.text_pos_emb = torch.nn.Embedding(KODALLE_T + 1, klue_emb.dim)
    missing, unexpected = ref2.load_state_dict(back, strict=False)
    assert not unexpected and all(k.startswith("vae.") for k in missing)
    ref2 = kodalle_oracle_for_ids(ref2, klue_emb)
    with torch.no_grad():
        assert max_diff(model(text, image), ref2(text, image)) < 1e-4


CAPTION = "상의에서 색상은 레드이다."


def cli_greedy_codes(pt, backbone, vqgan_dir, cwd, monkeypatch):
    """`kodalle sample CAPTION --checkpoint PT --backbone ... --vqgan ... --temperature 0`."""
    import numpy as np

    from kodalle_cli.cli import main

    monkeypatch.chdir(cwd)
    main(["sample", CAPTION, "-n", "1", "--checkpoint", str(pt), "--backbone", str(backbone),
          "--vqgan", str(vqgan_dir), "--temperature", "0", "--device", "cpu", "--out", "outs"])
    (folder,) = (cwd / "outs").iterdir()
    return np.load(folder / "codes.npy").reshape(-1).tolist()


@pytest.fixture(scope="module")
def klue_tokenizer_and_vqgan(tiny_klue, tmp_path_factory):
    from conftest import tiny_model_and_vqgan
    from transformers import AutoTokenizer

    from kodalle_cli.vqgan import save_vqgan

    tokenizer = AutoTokenizer.from_pretrained(tiny_klue)
    _, vqgan = tiny_model_and_vqgan(tokenizer, KODALLE_T)  # 24 codes, 4x4
    directory = tmp_path_factory.mktemp("vq")
    save_vqgan(vqgan, directory)
    return tokenizer, vqgan.num_tokens, directory


def test_kodalle_pt_samples_through_the_cli_with_dalle_pytorchs_greedy_codes(
        klue_emb, tiny_klue, klue_tokenizer_and_vqgan, tmp_path, monkeypatch):
    from kodalle_cli.text import CaptionEncoder

    tokenizer, codes, vq = klue_tokenizer_and_vqgan
    ref = kodalle_checkpoint(klue_emb, tmp_path / "kodalle.pt", num_image_tokens=codes)
    got = cli_greedy_codes(tmp_path / "kodalle.pt", tiny_klue, vq, tmp_path, monkeypatch)
    ids = CaptionEncoder(tokenizer, KODALLE_T, klue_emb.pad_id).encode(CAPTION).ids
    want = dalle_pytorch_greedy(kodalle_oracle_for_ids(ref, klue_emb), torch.tensor([ids]))
    assert got == want.reshape(-1).tolist()


def test_dalle_pytorch_defaults_pt_samples_through_the_cli_with_its_greedy_codes(
        klue_emb, tiny_klue, klue_tokenizer_and_vqgan, tmp_path, monkeypatch):
    """A stock DALLE-pytorch 1.6.6 checkpoint (rotary, token shift, its own text table):
    captions are padded with 0, what DALLE-pytorch pads with, whatever the tokenizer."""
    from kodalle_cli.text import CaptionEncoder

    tokenizer, codes, vq = klue_tokenizer_and_vqgan
    ref, hparams = oracle(num_image_tokens=codes, num_text_tokens=klue_emb.vocab_size,
                          text_seq_len=16)
    torch.save({"hparams": hparams, "vae_params": None, "weights": ref.state_dict()},
               tmp_path / "dalle.pt")
    got = cli_greedy_codes(tmp_path / "dalle.pt", tiny_klue, vq, tmp_path, monkeypatch)
    ids = CaptionEncoder(tokenizer, 16, 0).encode(CAPTION).ids
    assert got == dalle_pytorch_greedy(ref, torch.tensor([ids])).reshape(-1).tolist()


def dalle_pytorch_greedy(ref, text, use_cache=False):
    """DALLE-pytorch's generate_images with top-1 filtering (greedy), its codes captured."""
    seen = {}

    def decode(codes):
        seen["codes"] = codes
        return torch.zeros(codes.shape[0], 3, 1, 1)

    ref.vae.decode = decode
    ref.generate_images(text, filter_thres=1 - 1e-9, use_cache=use_cache)
    return seen["codes"]


@pytest.mark.parametrize("name", ["dalle_pytorch_defaults", "everything"])
def test_greedy_codes_equal_dalle_pytorchs_greedy_decoding(name, tmp_path):
    ref, hparams = oracle(**CONFIGS[name])
    path = tmp_path / "dalle.pt"
    torch.save({"hparams": hparams, "vae_params": {}, "weights": ref.state_dict()}, path)
    model, _ = load_dalle_pytorch_checkpoint(path)
    model.eval()
    text, _ = batch()
    greedy = SamplingSettings(top_k=None, temperature=0.0)
    ours = generate_codes(model, text, torch.zeros(2, FMAP * FMAP), greedy)
    assert torch.equal(ours, dalle_pytorch_greedy(ref, text.clone()))
    assert torch.equal(ours, dalle_pytorch_greedy(ref, text.clone(), use_cache=True))


# ---- the KV cache ----------------------------------------------------------------------------
CACHE_CONFIGS = {
    **{t: dict(attn_types=(t,)) for t in ALL_TYPES},
    "rotary": dict(rotary_emb=True), "shift_tokens": dict(shift_tokens=True),
    "reversible": dict(reversible=True),
    "everything": dict(reversible=True, rotary_emb=True, shift_tokens=True,
                       attn_types=ALL_TYPES),
}


def random_model(**options) -> DALLE:
    torch.manual_seed(0)
    cfg = DALLEConfig(num_text_tokens=VOCAB, num_image_tokens=N_IMG, image_fmap_size=FMAP,
                      dim=32, depth=4, heads=2, dim_head=16, text_seq_len=T, **options)
    model = DALLE(cfg)
    with torch.no_grad():
        for p in model.blocks.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


@pytest.mark.parametrize("name", list(CACHE_CONFIGS))
def test_cached_decoding_equals_full_recomputation(name):
    model = random_model(**CACHE_CONFIGS[name])
    text, image = batch(3)
    with torch.no_grad():
        full = model(text, image)[:, T:, model.config.num_text_logits:]
        cache = model.new_cache(3)
        steps = [model.prefill(text, cache)]
        for i in range(FMAP * FMAP - 1):
            steps.append(model.step(image[:, i], cache))
        assert max_diff(torch.stack(steps, 1), full) < 1e-5
        cache = model.new_cache(3)  # primed with the first codes, then stepping on
        assert max_diff(model.prefill(text, cache, image=image[:, :6]), full[:, 6]) < 1e-5
        assert max_diff(model.step(image[:, 6], cache), full[:, 7]) < 1e-5
    uniforms = torch.stack([row_uniforms(7, i, 0, FMAP * FMAP) for i in range(3)])
    for settings in (SamplingSettings(top_k=None, temperature=0.0),
                     SamplingSettings(top_k=0.5, temperature=1.0)):
        cached = generate_codes(model, text, uniforms, settings)
        recomputed = generate_codes(model, text, uniforms, settings, use_cache=False)
        assert torch.equal(cached, recomputed), settings


# ---- reversible training ---------------------------------------------------------------------
def test_reversible_backward_equals_autograd_with_dropout():
    """Backward rebuilds each block's inputs and replays its dropout masks: the gradients of
    plain autograd through the same two-stream loop."""
    model = random_model(reversible=True, rotary_emb=True, shift_tokens=True,
                         attn_types=ALL_TYPES, attn_dropout=0.3, ff_dropout=0.3).train()
    x = torch.randn(2, T + FMAP * FMAP, 32, requires_grad=True)
    rope = model.rotary(0, x.shape[1])

    torch.manual_seed(5)
    out = model.reversible_blocks(x, rope=rope)
    grads = torch.autograd.grad(out.square().sum(), [x, *model.blocks.parameters()])

    torch.manual_seed(5)
    x1 = x2 = x
    for block in model.blocks:
        x1 = x1 + block.attn_branch(x2, rope=rope)
        x2 = x2 + block.ff_branch(x1, rope=rope)
    plain = (x1 + x2) / 2
    assert torch.equal(out, plain)
    want = torch.autograd.grad(plain.square().sum(), [x, *model.blocks.parameters()])
    for got, exp in zip(grads, want, strict=True):
        torch.testing.assert_close(got, exp, atol=1e-5, rtol=1e-4)


def saved_bytes(model, text, image) -> int:
    """Bytes autograd keeps for backward during one training forward."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.loss(text, image)
    return total


def test_reversible_activation_memory_does_not_grow_with_depth():
    text, image = batch()

    def model(depth, reversible):
        cfg = DALLEConfig(num_text_tokens=VOCAB, num_image_tokens=N_IMG, image_fmap_size=FMAP,
                          dim=32, depth=depth, heads=2, dim_head=16, text_seq_len=T,
                          reversible=reversible, shift_tokens=True, rotary_emb=True)
        return DALLE(cfg).train()

    assert saved_bytes(model(2, True), text, image) == saved_bytes(model(8, True), text, image)
    assert saved_bytes(model(8, False), text, image) > 3 * saved_bytes(model(2, True), text,
                                                                        image)


# ---- refusals --------------------------------------------------------------------------------
def test_sparse_and_unknown_attention_are_one_line_config_errors():
    base = dict(num_text_tokens=VOCAB, num_image_tokens=N_IMG, image_fmap_size=FMAP)
    with pytest.raises(ConfigError, match=r"^attn_types=full,sparse: sparse"):
        DALLEConfig(**base, attn_types="full,sparse")
    with pytest.raises(ConfigError, match=r"^attn_types=axial: each must be one of"):
        DALLEConfig(**base, attn_types=("axial",))
    assert DALLEConfig(**base, attn_types="full,conv_like").attn_types == ("full", "conv_like")


@pytest.mark.parametrize("change, message", [
    (dict(attn_types=("full", "sparse")), "checkpoint hparam attn_types=full,sparse: sparse"),
    (dict(sparse_attn=True), "checkpoint hparam sparse_attn=True"),
    (dict(shared_attn_ids=("0", "1")), "checkpoint hparam shared_attn_ids=('0', '1')"),
    (dict(share_input_output_emb=True), "checkpoint hparam share_input_output_emb=True"),
    (dict(rotary_emb=False), "checkpoint hparam rotary_emb=False contradicts its weights"),
    (dict(reversible=True), "checkpoint hparam reversible=True contradicts its weights"),
    (dict(heads=4), "transformer.pos_emb (25, 12) is not DALLE-pytorch 1.6.6's rotary"),
    (dict(weights={"transformer.extra.weight": torch.zeros(1)}),
     "unknown DALLE weight transformer.extra.weight"),
])
def test_checkpoints_kodalle_cannot_represent_are_refused_in_one_line(change, message,
                                                                     tmp_path):
    ref, hparams = oracle()  # DALLE-pytorch's defaults: rotary and shift tokens
    weights = {**ref.state_dict(), **change.pop("weights", {})}
    path = tmp_path / "bad.pt"
    torch.save({"hparams": {**hparams, **change}, "weights": weights}, path)
    with pytest.raises(KodalleError) as info:
        load_dalle_pytorch_checkpoint(path)
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


def test_missing_shift_tokens_hparam_takes_the_default_of_the_checkpoints_kind():
    rotary, hparams = oracle()  # 1.6.6 defaults: rotary and shift tokens go together
    del hparams["shift_tokens"], hparams["rotary_emb"]
    assert from_dalle_pytorch(rotary.state_dict(), hparams)[0].shift_tokens
    tables, hparams = oracle(**PLAIN)  # position tables: KoDALLE or older releases
    del hparams["shift_tokens"]
    assert not from_dalle_pytorch(tables.state_dict(), hparams)[0].shift_tokens


# ---- kodalle train with every option ---------------------------------------------------------
OPTIONS = ["--reversible", "--rotary", "--shift-tokens", "--attn-types",
           "full,axial_row,axial_col,conv_like"]
TINY_TRAIN = ["--dim", "32", "--depth", "4", "--heads", "2", "--dim-head", "16", "--device",
              "cpu", "--workers", "0", "--no-progress", "--lr", "1e-3", "--warmup-steps", "2",
              "--schedule", "constant", "--eval-every", "0", "--log-every", "1"]


def test_train_with_every_option_resumes_exactly(tiny_dalle_data, tmp_path, capsys):
    import json

    from safetensors.torch import load_file

    from kodalle_cli.cli import main
    from kodalle_cli.runs import load_run

    backbone, tokens, _ = tiny_dalle_data
    args = ["train", "--backbone", str(backbone), "--data", str(tokens), *TINY_TRAIN, *OPTIONS,
            "--batch-size", "4", "--save-every", "2", "--cond-drop", "0.3"]
    main([*args, "--out", str(tmp_path / "straight"), "--max-steps", "4",
          "--sample-every", "4", "--sample-captions", "2"])
    main([*args, "--out", str(tmp_path / "split"), "--max-steps", "2", "--sample-every", "0"])
    capsys.readouterr()
    main([*args, "--out", str(tmp_path / "split"), "--max-steps", "4", "--sample-every", "0",
          "--resume"])
    assert "resuming from" in capsys.readouterr().out
    model = json.loads((tmp_path / "straight" / "config.json").read_text())["model"]
    assert model["reversible"] and model["rotary_emb"] and model["shift_tokens"]
    assert model["attn_types"] == ["full", "axial_row", "axial_col", "conv_like"]
    assert (tmp_path / "straight" / "samples" / "step-0000004.png").is_file()
    want = load_file(str(tmp_path / "straight" / "checkpoints" / "step-0000004" /
                         "model.safetensors"))
    got = load_file(str(tmp_path / "split" / "checkpoints" / "step-0000004" /
                        "model.safetensors"))
    assert want.keys() == got.keys() and "text_pos_emb.weight" not in want
    for k in want:
        assert torch.equal(want[k], got[k]), k
    loaded = load_run(tmp_path / "split", with_vqgan=False).model
    assert loaded.config == DALLEConfig.from_dict(model)


def test_train_refuses_sparse_attention_naming_the_flag(tiny_dalle_data, tmp_path, capsys):
    from kodalle_cli.cli import main

    backbone, tokens, _ = tiny_dalle_data
    with pytest.raises(SystemExit) as info:
        main(["train", "--backbone", str(backbone), "--data", str(tokens), *TINY_TRAIN,
              "--attn-types", "full,sparse", "--out", str(tmp_path / "run"), "--max-steps", "1"])
    err = " ".join(capsys.readouterr().err.split())
    assert info.value.code == 2 and err.startswith("Error: --attn-types full,sparse: sparse")


@pytest.mark.slow
def test_every_option_under_two_gloo_ranks_matches_one_process(tiny_klue, tmp_path):

    from conftest import assert_two_ranks_train_like_one, write_tiny_tokens

    tokens = write_tiny_tokens(tmp_path / "tokens", tiny_klue, train=48, val=0, shard_size=100)
    args = ["train", "--backbone", str(tiny_klue), "--data", str(tokens), *TINY_TRAIN,
            *OPTIONS, "--max-steps", "3", "--save-every", "3", "--sample-every", "0"]
    assert_two_ranks_train_like_one(args, tmp_path, steps=3)
