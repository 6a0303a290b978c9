"""Shared fixtures: tiny backbones and a reranker built once per test session (about a second
each), and writers of image and token shards through the project's own writers."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_klue(tmp_path_factory):
    """A KLUE-like RoBERTa directory (pad 1, [CLS] 0, position offset 2), dim 64."""
    from kodalle_cli.experiments.tiny_backbone import build_klue_like

    return build_klue_like(tmp_path_factory.mktemp("backbones") / "tiny-klue")


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory):
    """A GPT-2-like directory (wte + wpe), dim 48."""
    from kodalle_cli.experiments.tiny_backbone import build_gpt2_like

    return build_gpt2_like(tmp_path_factory.mktemp("backbones") / "tiny-gpt2")


@pytest.fixture(scope="session")
def tiny_gptj(tmp_path_factory):
    """A GPT-J-like directory (no position table), dim 64."""
    from kodalle_cli.experiments.tiny_backbone import build_gptj_like

    return build_gptj_like(tmp_path_factory.mktemp("backbones") / "tiny-gptj")


@pytest.fixture(scope="session")
def tiny_reranker(tmp_path_factory, tiny_klue):
    """A random reranker (EfficientNet-B0 at 32 px, tiny_klue's text tower, 16-dim embeddings,
    16 caption tokens) saved as a reranker directory; copy it before damaging it."""
    import torch

    from kodalle_cli.backbone import get_backbone
    from kodalle_cli.rerank.model import build_reranker, save_reranker

    torch.manual_seed(0)
    model = build_reranker(get_backbone(str(tiny_klue)), image_size=32, embed_dim=16,
                           text_seq_len=16)
    return save_reranker(model, tmp_path_factory.mktemp("rr") / "reranker")


def write_image_shard(path, samples, quality: int = 95):
    """One image shard as `kodalle prepare` writes it (data/shards.py's ShardWriter, its stats
    file beside it). ``samples``: ``(key, image, caption)`` or ``(key, image, caption, meta)``;
    a PIL image is saved as JPEG, bytes (a damaged image, say) are written as they are."""
    import io
    from pathlib import Path

    from kodalle_cli.data.shards import ShardWriter

    writer = ShardWriter(Path(path))
    for key, image, caption, *meta in samples:
        if not isinstance(image, bytes):
            buf = io.BytesIO()
            image.save(buf, format="JPEG", quality=quality)
            image = buf.getvalue()
        writer.write(key, image, caption, meta[0] if meta else {})
    writer.commit({"shard": Path(path).name, "samples": writer.count})
    return Path(path)


def write_tiny_tokens(out, backbone_dir, vqgan_dir=None, *, text_seq_len=16, fmap=4,
                      num_image_tokens=64, train=48, val=12, shard_size=24, seed=0):
    """Learnable token shards: each caption has its own image-code pattern (10% noise).

    Captions are tiny_backbone.SAMPLE_CAPTIONS tokenized by the backbone in ``backbone_dir``;
    the manifest names ``vqgan_dir`` (a saved VQGAN) as the image tokenizer when given.
    """
    from pathlib import Path

    import numpy as np

    from kodalle_cli.backbone import get_backbone, special_ids
    from kodalle_cli.data.tokens import TokenShardsWriter, pad_ids
    from kodalle_cli.experiments.tiny_backbone import SAMPLE_CAPTIONS
    from kodalle_cli.tokenize_shards import tokenizer_identity

    backbone = get_backbone(str(backbone_dir))
    tok = backbone.load_tokenizer()
    pad = special_ids(backbone.config())[0]
    rng = np.random.default_rng(seed)
    patterns = rng.integers(0, num_image_tokens, (len(SAMPLE_CAPTIONS), fmap * fmap))
    vqgan = {"source": str(vqgan_dir)} if vqgan_dir else {}
    if vqgan_dir:
        from kodalle_cli.vqgan import load_vqgan

        vqgan["hash"] = load_vqgan(str(vqgan_dir)).identity()
    with TokenShardsWriter(Path(out), text_seq_len=text_seq_len,
                           num_image_tokens=num_image_tokens, image_fmap_size=fmap, pad_id=pad,
                           tokenizer_hash=tokenizer_identity(backbone), vqgan=vqgan,
                           shard_size=shard_size) as w:
        n = 0
        for split, count in (("train", train), ("val", val)):
            for _ in range(count):
                c = n % len(SAMPLE_CAPTIONS)
                codes = patterns[c].copy()
                noise = rng.random(codes.shape) < 0.1
                codes[noise] = rng.integers(0, num_image_tokens, int(noise.sum()))
                ids = pad_ids(tok(SAMPLE_CAPTIONS[c])["input_ids"], text_seq_len, pad)
                w.write(split, f"s{n:05d}", ids, codes, SAMPLE_CAPTIONS[c])
                n += 1
    return Path(out)


def save_tiny_vqgan(out, num_tokens=64, resolution=16):
    """A tiny untrained VQGAN (4x4 codes for 16x16 images) saved as a run-style directory."""
    import torch

    from kodalle_cli.vqgan import VQGAN, VQGANConfig, save_vqgan

    torch.manual_seed(0)
    vq = VQGAN(VQGANConfig(n_embed=num_tokens, embed_dim=8, ch=32, ch_mult=(1, 2, 2),
                           num_res_blocks=1, attn_resolutions=(), resolution=resolution,
                           z_channels=8))
    save_vqgan(vq, out)
    return out


@pytest.fixture(scope="session")
def tiny_dalle_data(tmp_path_factory, tiny_klue):
    """(backbone dir, token-shard dir, VQGAN dir) for DALLE training tests."""
    root = tmp_path_factory.mktemp("dalle-data")
    vqgan = save_tiny_vqgan(root / "vqgan")
    tokens = write_tiny_tokens(root / "tokens", tiny_klue, vqgan)
    return tiny_klue, tokens, vqgan


def tiny_model_and_vqgan(tokenizer, text_seq_len):
    """A random tiny DALLE (dim 32, depth 2) and the untrained 8 px VQGAN it draws with."""
    import torch

    from kodalle_cli.model.dalle import DALLE, DALLEConfig
    from kodalle_cli.vqgan import VQGAN, VQGANConfig

    torch.manual_seed(0)
    vqgan = VQGAN(VQGANConfig(n_embed=24, embed_dim=8, ch=32, ch_mult=(1, 1), num_res_blocks=1,
                              attn_resolutions=(), resolution=8, z_channels=32)).eval()
    cfg = DALLEConfig(num_text_tokens=len(tokenizer), num_image_tokens=24,
                      image_fmap_size=vqgan.fmap_size, dim=32, depth=2, heads=2, dim_head=16,
                      text_seq_len=text_seq_len, pad_id=tokenizer.pad_token_id, bos_id=0)
    return DALLE(cfg).eval(), vqgan


@pytest.fixture(scope="module")
def one_thread():
    """The CI machine's two cores are shared: one intra-op thread is several times faster
    for tiny models than two threads fighting over them."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def torchrun(args, env_extra=None, timeout: int = 400):
    """``kodalle ARGS`` as two gloo ranks on this machine (torchrun, one thread each)."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("KODALLE_TEST_")}
    env.update({"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **(env_extra or {})})
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "kodalle_cli", *args],
        env=env, capture_output=True, text=True, timeout=timeout,
    )


def train_losses(run):
    """The training losses a run's metrics.csv holds, step by step."""
    from kodalle_cli.train.metrics import read_metrics

    return [r["value"] for r in read_metrics(run / "metrics.csv")
            if r["split"] == "train" and r["metric"] == "loss"]


def assert_two_ranks_train_like_one(args, tmp_path, steps: int):
    """``kodalle ARGS`` in one process at batch 8 and as two gloo ranks at batch 4: the same
    losses (within 1e-5) for every one of ``steps`` steps."""
    from kodalle_cli.cli import main

    main([*args, "--out", str(tmp_path / "one"), "--batch-size", "8"])
    proc = torchrun([*args, "--out", str(tmp_path / "two"), "--batch-size", "4"])
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    one, two = train_losses(tmp_path / "one"), train_losses(tmp_path / "two")
    assert len(one) == len(two) == steps
    for a, b in zip(one, two, strict=True):
        assert abs(a - b) < 1e-5, (one, two)


def toy_regression_task():
    """A Task class for the shared trainer's own tests: a seeded linear regression (y = the
    sum of x), batch ``i`` drawn from seed ``i`` so a resumed stream is the same. Subclass it
    for the hooks a test needs."""
    import torch

    from kodalle_cli.train.task import Task

    class ToyRegression(Task):
        def __init__(self):
            torch.manual_seed(0)
            self.model = torch.nn.Linear(4, 1)

        def train_batches(self, start, rank, world_size):
            i = start
            while True:
                x = torch.randn(8, 4, generator=torch.Generator().manual_seed(i))
                yield {"x": x, "y": x.sum(1, keepdim=True)}
                i += 1

        def loss(self, model, batch):
            return torch.nn.functional.mse_loss(model(batch["x"]), batch["y"]), {}

        def batch_size(self, batch):
            return batch["x"].shape[0]

    return ToyRegression


def wait_for_step(proc, run, step: int, timeout: float, poll: float = 0.1) -> None:
    """Wait until the training process ``proc`` has logged ``step`` in ``run``'s metrics.csv,
    and fail with its stderr when it ended first (or never got there in ``timeout`` s)."""
    import time

    from kodalle_cli.train.metrics import read_metrics

    metrics = run / "metrics.csv"
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if metrics.is_file() and any(r["step"] >= step for r in read_metrics(metrics)):
            break
        time.sleep(poll)
    assert proc.poll() is None, proc.stderr.read()[-3000:]
