"""`kodalle plan` and `train --dry-run`: the estimates against the real model.

Parameters are compared with the built model's, FLOPs with torch's FlopCounterMode, memory
with the peak a real training step reaches (process memory on the CPU, in a subprocess;
tests/test_cuda.py compares with ``torch.cuda.max_memory_allocated`` on a GPU).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from kodalle_cli import plan
from kodalle_cli.cli import main
from kodalle_cli.model import DALLE, DALLEConfig

BASE = dict(num_text_tokens=300, num_image_tokens=200, image_fmap_size=8, dim=64, depth=2,
            heads=2, dim_head=16, text_seq_len=16)
OPTIONS = {
    "plain": {},
    "reversible": {"reversible": True},
    "rotary": {"rotary_emb": True},
    "shift": {"shift_tokens": True},
    "attn_types": {"attn_types": "full,axial_row,axial_col,conv_like"},
    "text_dim": {"text_dim": 48},
    "sandwich_stable": {"sandwich_norm": True, "stable": True},
    "no_text_head": {"text_loss_weight": 0.0},
    "unique_pad": {"unique_pad_tokens": True},
    "contextual": {"text_encoder": "contextual", "text_dim": 48},
    "all": {"reversible": True, "rotary_emb": True, "shift_tokens": True, "text_dim": 48,
            "attn_types": "axial_row,conv_like", "ff_mult": 2},
}


def build(options: dict, frozen: bool = False) -> DALLE:
    model = DALLE(DALLEConfig(**BASE, **options))
    if model.config.contextual:  # a stand-in for the frozen language model's states
        model.attach_text_encoder(lambda ids: torch.randn(ids.shape[0], ids.shape[1], 48))
    if frozen and model.text_emb is not None:
        model.text_emb.weight.requires_grad_(False)
        if model.text_pos_emb is not None:
            model.text_pos_emb.weight.requires_grad_(False)
    return model


@pytest.mark.parametrize("frozen", [False, True])
@pytest.mark.parametrize("name", list(OPTIONS))
def test_param_count_equals_the_built_models(name, frozen):
    model = build(OPTIONS[name], frozen)
    counted = plan.count_params(model.config, frozen_text=frozen)
    assert counted.total == sum(p.numel() for p in model.parameters())
    assert counted.trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert counted.blocks == sum(p.numel() for p in model.blocks.parameters())


class _NoModuleTracking:
    """FlopCounterMode's module tracker refuses autograd.grad inside backward (reversible
    blocks, checkpointing): count every op under one name instead."""

    parents = {"Global"}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def counted_flops(model: DALLE, batch: int = 3) -> int:
    torch.manual_seed(0)
    cfg = model.config
    text = torch.randint(2, cfg.num_text_tokens, (batch, cfg.text_seq_len))
    codes = torch.randint(0, cfg.num_image_tokens, (batch, cfg.image_seq_len))
    counter = FlopCounterMode(display=False)
    counter.mod_tracker = _NoModuleTracking()
    # the math kernel: FlopCounterMode has no formula for the CPU's fused attention kernel
    with sdpa_kernel(SDPBackend.MATH), counter:
        loss, _ = model(text, codes, return_loss=True)
        loss.backward()
    return counter.get_total_flops()


@pytest.mark.parametrize(("name", "frozen", "checkpointing"), [
    ("plain", False, False), ("plain", False, True), ("reversible", False, False),
    ("text_dim", True, False), ("text_dim", False, False), ("all", False, False),
    ("no_text_head", False, False), ("contextual", False, False),
    ("attn_types", True, True),
])
def test_flops_match_flop_counter(name, frozen, checkpointing):
    model = build(OPTIONS[name], frozen)
    model.grad_checkpointing = checkpointing
    cfg = model.config
    estimate = plan.train_flops(cfg, frozen_text=frozen,
                                recompute=cfg.reversible or checkpointing)
    measured = counted_flops(model, batch=3)
    assert abs(estimate.executed * 3 / measured - 1) < 0.05, (estimate, measured)
    # model FLOPs, from the built model's linear layers: PaLM's 6 N per token (N: the
    # weights each position multiplies) + 12 * layers * inner * L per token, no recomputation
    t, seq = cfg.text_seq_len, cfg.text_seq_len + cfg.image_seq_len
    blocks = sum(m.weight.numel() for m in model.blocks.modules()
                 if isinstance(m, torch.nn.Linear))
    proj = model.text_proj.weight.numel() if isinstance(model.text_proj, torch.nn.Linear) else 0
    head = cfg.dim * (cfg.text_head_rows * t + cfg.num_image_tokens * cfg.image_seq_len)
    inner = cfg.heads * cfg.dim_head
    assert estimate.model == pytest.approx(6 * (blocks * seq + proj * (t + 1) + head)
                                           + 12 * cfg.depth * inner * seq * seq)


# ---- memory ------------------------------------------------------------------------------------
MEASURE = r"""
import json, sys
import torch
from kodalle_cli.device import autocast
from kodalle_cli.model import DALLE, DALLEConfig

def status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024

spec = json.loads(sys.argv[1])
torch.manual_seed(0)
dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[spec["precision"]]
cpu = torch.device("cpu")

def steps(model, batch, n):
    cfg = model.config
    model.grad_checkpointing = spec["checkpointing"]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], fused=True)
    text = torch.randint(2, cfg.num_text_tokens, (batch, cfg.text_seq_len))
    codes = torch.randint(0, cfg.num_image_tokens, (batch, cfg.image_seq_len))
    for _ in range(n):
        with autocast(cpu, dtype):
            loss, _ = model(text, codes, return_loss=True)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

# kernels and libraries loaded by a tiny model first, then the peak counter reset
steps(DALLE(DALLEConfig(**{**spec["model"], "dim": 16, "depth": 1, "heads": 1})), 1, 2)
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
base = status("VmRSS")
steps(DALLE(DALLEConfig(**spec["model"])), spec["batch"], 2)  # step 2 has AdamW's state
print(json.dumps({"peak": status("VmHWM") - base}))
"""

MEMORY_MODEL = dict(num_text_tokens=1000, num_image_tokens=512, image_fmap_size=12, dim=128,
                    depth=3, heads=2, dim_head=64, text_seq_len=48)


@pytest.mark.slow  # two training steps in a fresh interpreter each
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
@pytest.mark.parametrize(("precision", "mode"), [
    ("fp32", "plain"), ("fp32", "reversible"), ("fp32", "checkpointing"), ("bf16", "plain"),
])
def test_memory_estimate_within_25_percent_of_the_measured_peak(precision, mode):
    model = dict(MEMORY_MODEL, reversible=mode == "reversible")
    spec = {"model": model, "batch": 4, "precision": precision,
            "checkpointing": mode == "checkpointing"}
    # a fixed malloc threshold: tensors are mapped and unmapped, so resident memory follows
    # what is allocated (glibc's sliding threshold otherwise keeps freed heap resident)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    out = subprocess.run([sys.executable, "-c", MEASURE, json.dumps(spec)], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    peak = json.loads(out.stdout)["peak"]
    estimate = plan.memory(DALLEConfig(**model), 4, precision,
                           reversible=mode == "reversible",
                           checkpointing=mode == "checkpointing").total
    print(f"{precision} {mode}: estimate {estimate / 2**20:.1f} MiB, "
          f"measured {peak / 2**20:.1f} MiB ({estimate / peak - 1:+.1%})")
    assert 0.75 <= estimate / peak <= 1.25


def test_memory_parts_and_strategies():
    cfg = DALLEConfig(**MEMORY_MODEL)
    p = plan.count_params(cfg)
    one = plan.memory(cfg, 4, "fp32")
    assert (one.weights, one.gradients, one.optimizer) == (4 * p.total, 4 * p.total,
                                                           8 * p.total)
    assert one.casts == 0 and one.buffers == 0
    frozen = plan.memory(cfg, 4, "fp32", frozen_text=True)
    assert frozen.gradients < one.gradients and frozen.weights == one.weights
    assert plan.memory(cfg, 4, "bf16").casts > 0
    ddp = plan.memory(cfg, 4, "fp32", gpus=4)
    assert ddp.buffers == 4 * p.trainable  # gradient buckets
    fsdp = plan.memory(cfg, 4, "fp32", strategy="fsdp", gpus=4)
    assert fsdp.optimizer == one.optimizer / 4
    # activations grow with the batch; reversible ones do not grow with depth
    assert plan.memory(cfg, 8, "fp32").activations > 1.9 * one.activations
    deep = DALLEConfig(**{**MEMORY_MODEL, "depth": 12, "reversible": True})
    shallow = DALLEConfig(**{**MEMORY_MODEL, "depth": 3, "reversible": True})
    assert (plan.memory(deep, 4, "fp32", reversible=True).activations
            == plan.memory(shallow, 4, "fp32", reversible=True).activations)
    assert one.max_batch(one.total) == 4


# ---- the command -------------------------------------------------------------------------------
KLUE_LARGE = {  # klue/roberta-large's published config: the sizes plan reads
    "architectures": ["RobertaForMaskedLM"], "model_type": "roberta", "vocab_size": 32000,
    "hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16,
    "intermediate_size": 4096, "max_position_embeddings": 514, "type_vocab_size": 1,
    "pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2,
}


def token_manifest(where: Path, pairs: int, text: int = 128, fmap: int = 16,
                   codes: int = 16384) -> Path:
    """A token-shard manifest that says ``pairs`` training pairs (plan reads nothing else)."""
    where.mkdir(parents=True, exist_ok=True)
    (where / "manifest.json").write_text(json.dumps({
        "format": "kodalle-tokens", "version": 1, "text_seq_len": text, "pad_id": 1,
        "num_image_tokens": codes, "image_fmap_size": fmap,
        "tokenizer": {"backbone": "klue-roberta-large", "vocab_size": 32000},
        "splits": {"train": {"count": pairs, "shards": []}, "val": {"count": 0, "shards": []}},
    }), encoding="utf-8")
    return where


@pytest.fixture
def klue_large(tmp_path):
    (tmp_path / "klue").mkdir()
    (tmp_path / "klue" / "config.json").write_text(json.dumps(KLUE_LARGE), encoding="utf-8")
    return tmp_path / "klue"


def run_plan(capsys, *args) -> dict:
    main(["plan", *args, "--json"])
    return json.loads(capsys.readouterr().out)


def test_plan_recommends_the_largest_config_that_fits_and_meets_the_rule(
        tmp_path, klue_large, capsys):
    data = token_manifest(tmp_path / "tokens", 800_000)
    result = run_plan(capsys, "--data", str(data), "--backbone", "klue-roberta-large",
                      "--backbone-path", str(klue_large), "--card", "v100-32gb",
                      "--precision", "fp16")
    rows = result["rows"]
    assert len(rows) == len(plan.GRID_DEPTHS) * len(plan.GRID_DIMS)
    best = [r for r in rows if r["recommended"]]
    assert len(best) == 1
    best = best[0]
    assert best["fits"] and best["meets_rule"]
    assert result["recommended"]["depth"] == best["depth"]
    bigger = [r for r in rows if r["params"]["total"] > best["params"]["total"]]
    assert bigger and all(r["passed_over"] for r in bigger)
    assert all(not (r["fits"] and r["meets_rule"]) for r in bigger)
    assert any(r["passed_over"].startswith("memory:") for r in bigger)
    assert any(r["passed_over"].startswith("data rule") for r in bigger)
    assert result["train_command"].startswith(
        f"kodalle train --backbone klue-roberta-large --data {data} --dim {best['dim']} "
        f"--depth {best['depth']}")
    # 16 epochs of 800k pairs of 128 + 256 tokens at most
    assert max(r["tokens_seen"] for r in rows) == pytest.approx(16 * 800_000 * 384)
    assert "Hoffmann" in result["rule"] and "Muennighoff" in result["rule"]


def test_kodalle_fits_a_v100_and_dalle_does_not_fit_an_80gb_card(tmp_path, klue_large,
                                                                  capsys):
    data = token_manifest(tmp_path / "tokens", 800_000)
    common = ["--data", str(data), "--backbone", "klue-roberta-large", "--backbone-path",
              str(klue_large)]
    kodalle = run_plan(capsys, *common, "--gpus", "1", "--gpu-memory", "32", "--precision",
                       "fp16", "--tflops", "125", "--depth", "16", "--dim", "1024")
    (row,) = kodalle["rows"]
    assert row["fits"] and row["runs_as"] == "ddp"
    assert 300e6 < row["params"]["total"] < 450e6
    dalle = run_plan(capsys, *common, "--card", "h100-80gb", "--depth", "64", "--dim", "3968",
                     "--heads", "62")
    (row,) = dalle["rows"]
    assert row["params"]["total"] > 12e9 and not row["fits"]
    assert dalle["recommended"] is None and dalle["verdict"].startswith("nothing fits")
    # even sharded over 8 GPUs, weights + gradients + AdamW alone are 16 bytes a parameter
    assert row["min_memory_gib"] > 80


@pytest.mark.slow  # the throughput measurement takes its few seconds
def test_plan_table_and_calibration(tmp_path, klue_large, capsys):
    """The rich table, and a throughput measured on this CPU within the time limit."""
    data = token_manifest(tmp_path / "tokens", 480, text=24, fmap=4, codes=64)
    main(["plan", "--data", str(data), "--backbone", "klue-roberta-large", "--backbone-path",
          str(klue_large), "--device", "cpu", "--precision", "fp32", "--gpu-memory", "8",
          "--depth", "8", "--dim", "512"])
    out = capsys.readouterr().out
    assert "measured on cpu" in out and "480 pairs x 40 tokens" in out
    with pytest.raises(SystemExit) as exc:
        main(["plan", "--data", str(data), "--backbone-path", str(klue_large), "--device",
              "cpu", "--precision", "fp16"])
    assert exc.value.code == 2
    assert "--card" in capsys.readouterr().err


def test_plan_reads_image_shards_with_a_vqgan(tmp_path, tiny_dalle_data, capsys):
    backbone, _tokens, vqgan = tiny_dalle_data
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "manifest.json").write_text(json.dumps({
        "format": "folder", "options": {"image_size": 64}, "samples": 90,
        "splits": {"train": 80, "val": 10}, "shards": []}), encoding="utf-8")
    with pytest.raises(SystemExit) as exc:
        main(["plan", "--data", str(shards), "--backbone", str(backbone), "--tflops", "10"])
    assert exc.value.code == 2 and "--vqgan" in capsys.readouterr().err
    result = run_plan(capsys, "--data", str(shards), "--vqgan", str(vqgan), "--backbone",
                      str(backbone), "--tflops", "10", "--text-seq-len", "32")
    from kodalle_cli.vqgan import load_vqgan

    vq = load_vqgan(str(vqgan))
    assert result["data"]["samples"] == 80
    assert result["data"]["image_fmap_size"] == 64 // vq.config.downsample_factor
    assert result["data"]["num_image_tokens"] == vq.config.n_embed
    assert result["data"]["text_seq_len"] == 32


# ---- train --dry-run and the memory check ------------------------------------------------------
TINY_TRAIN = ["--dim", "32", "--depth", "2", "--heads", "2", "--dim-head", "16",
              "--batch-size", "4", "--device", "cpu", "--workers", "0", "--no-progress",
              "--sample-every", "0", "--eval-every", "0", "--max-steps", "2"]


@pytest.mark.slow  # the throughput measurement takes its few seconds
def test_train_dry_run_prints_the_exact_config_and_writes_nothing(tiny_dalle_data, tmp_path,
                                                                  capsys):
    backbone, tokens, _ = tiny_dalle_data
    out = tmp_path / "run"
    main(["train", "--backbone", str(backbone), "--data", str(tokens), "--out", str(out),
          *TINY_TRAIN, "--reversible", "--dry-run"])
    text = capsys.readouterr().out
    assert not out.exists()
    assert "depth 2, dim 32" in text and "reversible" in text and "GiB" in text
    assert "measured on cpu" in text


def test_train_refuses_a_config_too_big_for_the_device(tiny_dalle_data, tmp_path, capsys,
                                                       monkeypatch):
    backbone, tokens, _ = tiny_dalle_data
    monkeypatch.setattr(plan, "device_memory_gib", lambda device: 0.001)  # 1 MiB
    read = []
    from kodalle_cli.data import tokens as token_shards

    real_check = token_shards.check_shards
    monkeypatch.setattr(token_shards, "check_shards",
                        lambda *a, **k: read.append(1) or real_check(*a, **k))
    out = tmp_path / "run"
    args = ["train", "--backbone", str(backbone), "--data", str(tokens), "--out", str(out),
            *TINY_TRAIN]
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "GiB per GPU" in err and "--force" in err
    assert not read and not out.exists()  # refused before the data, no empty run left
    main([*args, "--force"])
    assert read and (out / "latest").is_file()


def test_readme_plan_commands_run(tmp_path, klue_large, capsys, monkeypatch):
    """The README's `kodalle plan` lines, on a manifest that says 800k pairs: KoDALLE's
    config fits its V100 32GB, DALL-E's shape fits no 80 GB card."""
    import shlex

    from test_readme import readme_commands

    commands = [c for c in readme_commands() if c.startswith("kodalle plan")]
    assert len(commands) == 2
    token_manifest(tmp_path / "shards" / "tokens", 8)
    monkeypatch.chdir(tmp_path)
    results = [run_plan(capsys, *shlex.split(c)[2:], "--backbone-path", str(klue_large))
               for c in commands]
    kodalle = next(r for r in results[0]["rows"] if (r["depth"], r["dim"]) == (16, 1024))
    assert results[0]["data"]["samples"] == 800_000 and kodalle["fits"]
    assert results[1]["verdict"].startswith("nothing fits 1 x 80 GiB")


def test_plan_without_the_text_head(tmp_path, klue_large, capsys):
    data = token_manifest(tmp_path / "tokens", 800_000)
    common = ["--data", str(data), "--backbone-path", str(klue_large), "--tflops", "100",
              "--depth", "16", "--dim", "1024"]
    (with_head,) = run_plan(capsys, *common)["rows"]
    no_head = run_plan(capsys, *common, "--text-loss-weight", "0")
    (row,) = no_head["rows"]
    # the text rows of the output layer: (32000 + 128) x 1024 weights and biases
    assert with_head["params"]["total"] - row["params"]["total"] == (32000 + 128) * 1025
    assert row["memory_gib"]["ddp"]["total"] < with_head["memory_gib"]["ddp"]["total"]
